"""The numba kernels behind ``_native`` (imported, and so compiled, only by ``_native``).

Each kernel moves the bytes of 2- or 4-byte elements (bf16/fp16, fp32) between one array of
words and ``k`` byte streams, in one pass over each. Other sizes (fp64, complex) are rare in
training state and keep numpy's versions. They index nothing they are not given: the callers in
``_native`` check every offset and length before a call (numba does not bounds-check).

Ungroup kernels fill a box of ``rows`` x ``cols`` elements: row ``r`` takes stream bytes
``[s_off + r*s_rs, ... + cols)`` and writes words ``[r*o_rs, ... + cols)``. The inner
loops run over slices, whose indices numba knows to be in range and non-negative, so LLVM
vectorises them (indexing with ``base + c`` instead kept a negative-index check per byte
and ran ~6x slower).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types

Arr = np.ndarray  # what the kernels take, for the type checker (numba types them by signature)

_RO8 = types.Array(types.uint8, 1, "C", readonly=True)
_U8x2 = types.Array(types.uint8, 2, "C")
_I = types.int64


def _words(dtype: types.Integer, readonly: bool) -> types.Array:
    return types.Array(dtype, 1, "C", readonly=readonly)


@numba.njit(types.void(_words(types.uint16, True), _U8x2), nogil=True, cache=True, error_model="numpy")
def group2(words: Arr, dst: Arr) -> None:
    d0 = dst[0]
    d1 = dst[1]
    for i in range(words.shape[0]):
        x = words[i]
        d0[i] = np.uint8(x & np.uint16(0xFF))
        d1[i] = np.uint8(x >> np.uint16(8))


@numba.njit(types.void(_words(types.uint32, True), _U8x2), nogil=True, cache=True, error_model="numpy")
def group4(words: Arr, dst: Arr) -> None:
    d0 = dst[0]
    d1 = dst[1]
    d2 = dst[2]
    d3 = dst[3]
    m = np.uint32(0xFF)
    for i in range(words.shape[0]):
        x = words[i]
        d0[i] = np.uint8(x & m)
        d1[i] = np.uint8((x >> np.uint32(8)) & m)
        d2[i] = np.uint8((x >> np.uint32(16)) & m)
        d3[i] = np.uint8(x >> np.uint32(24))


@numba.njit(types.void(_RO8, _RO8, _words(types.uint16, False), _I, _I, _I, _I, _I),
            nogil=True, cache=True, error_model="numpy")
def ungroup2(s0: Arr, s1: Arr, out: Arr, rows: int, cols: int, s_off: int, s_rs: int, o_rs: int) -> None:
    for r in range(rows):
        a = s_off + r * s_rs
        b = r * o_rs
        x0 = s0[a : a + cols]
        x1 = s1[a : a + cols]
        o = out[b : b + cols]
        for c in range(cols):
            o[c] = np.uint16(x0[c]) | (np.uint16(x1[c]) << np.uint16(8))


@numba.njit(types.void(_RO8, _RO8, _RO8, _RO8, _words(types.uint32, False), _I, _I, _I, _I, _I),
            nogil=True, cache=True, error_model="numpy")
def ungroup4(s0: Arr, s1: Arr, s2: Arr, s3: Arr, out: Arr, rows: int, cols: int, s_off: int, s_rs: int,
             o_rs: int) -> None:
    for r in range(rows):
        a = s_off + r * s_rs
        b = r * o_rs
        x0 = s0[a : a + cols]
        x1 = s1[a : a + cols]
        x2 = s2[a : a + cols]
        x3 = s3[a : a + cols]
        o = out[b : b + cols]
        for c in range(cols):
            o[c] = (np.uint32(x0[c]) | (np.uint32(x1[c]) << np.uint32(8))
                    | (np.uint32(x2[c]) << np.uint32(16)) | (np.uint32(x3[c]) << np.uint32(24)))
