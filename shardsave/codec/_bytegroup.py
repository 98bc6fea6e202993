"""Byte grouping: split k-byte elements into k byte streams and back.

Stream ``j`` holds byte ``j`` (little-endian significance) of every element, so for floats
the sign/exponent bytes land in one stream that zstd compresses well, and the mantissa bytes
in others that it barely touches.

This is pure memory shuffling, so the only question is speed. numpy has no byte-transpose
kernel. Candidates, measured on the 2-core reference machine (one thread, CPU time, trained
MLP weights: 4.4 MB bf16 / 8.8 MB fp32 / 17.5 MB fp64, into already-touched buffers, GB/s of
chunk, best of 15-20 round-robin runs; ``benchmarks/codecs/microbench.py --grouping``):

    variant                          k=2 grp/ungrp  k=4 grp/ungrp  k=8 grp/ungrp
    numpy strided copy per stream      2.8 / 2.6      1.9 / 1.8      1.0 / 1.0
    same, blocked to 256 KiB input     2.7 / 2.8      2.4 / 2.1      2.0 / 1.8
    numpy transpose copy               2.9 / -        2.2 / -        1.1 / -
    uint view shift + cast into out=   6.8 / 5.1      2.6 / 1.0      1.0 / 0.4
    stream 0 by cast, rest blocked      -  / -        2.8 / 2.4      1.8 / 1.7
    torch ``copy_`` of byte views      2.1 / 2.2      1.9 / 2.0      1.2 / 1.2

(ungroup "shift" = widen, shift and OR into the word view). When numba is installed,
compiled loops (``_native``) do both directions for k = 2 and 4 at 5-9 GB/s instead, and
the numpy versions below serve everything else. Of the numpy versions: shifts on a uint16 view for
k=2 (bf16/fp16, the common case); otherwise stream 0 by a truncating/widening cast of the
word view and the other streams by strided copies in cache-sized blocks, which keep the
input block in L2 while each stream takes its bytes. Under load from other processes the
wall-clock figures dropped by up to half and reordered the close candidates, which is why
the benchmark times thread CPU time round-robin. The ~0.3 GB/s transpose quoted in
MEASUREMENTS.md was into a fresh allocation; into a warm buffer numpy's transpose is as
fast as strided copies. All of these run in numpy loops that release the GIL.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shardsave.codec import _native
from shardsave.codec.base import WORD_DTYPES, U8Array

# Elements per block for the blocked copies: ~256 KiB of input stays in L2 while each of the
# k streams takes its bytes from it, instead of streaming the whole chunk from memory k times.
_BLOCK_BYTES = 256 * 1024


def group_into(src: U8Array, dst: U8Array, k: int) -> None:
    """Write the k byte streams of ``src`` back to back into ``dst`` (same length)."""
    n = src.size // k
    if n == 0 or _native.group(src, dst, k):
        return
    if k == 2:
        _group_shift2(src, dst, n)
    else:
        _group_cast_blocked(src, dst, k, n)


def ungroup_into(streams: Sequence[U8Array], out: U8Array, k: int) -> None:
    """Interleave ``k`` byte streams of equal length back into elements in ``out``."""
    n = out.size // k
    if n == 0 or _native.ungroup_box(streams, k, 0, 0, out.reshape(1, n, k)):
        return
    if k == 2:
        _ungroup_shift2(streams, out, n)
    else:
        _ungroup_cast_blocked(streams, out, k, n)




def _group_shift2(src: U8Array, dst: U8Array, n: int) -> None:
    words = src.view(np.uint16)
    np.copyto(dst[:n], words, casting="unsafe")  # uint16 -> uint8 keeps the low byte
    np.right_shift(words, 8, out=dst[n : 2 * n], casting="unsafe")


def _ungroup_shift2(streams: Sequence[U8Array], out: U8Array, n: int) -> None:
    words = out.view(np.uint16)
    np.left_shift(streams[1], 8, out=words, dtype=np.uint16)
    np.bitwise_or(words, streams[0], out=words)


def _group_cast_blocked(src: U8Array, dst: U8Array, k: int, n: int) -> None:
    first = 0
    if k in WORD_DTYPES:
        # A truncating cast of the word view is vectorised and yields stream 0 at about twice
        # the speed of a strided byte copy; the other streams have no such shortcut.
        np.copyto(dst[:n], src.view(WORD_DTYPES[k]), casting="unsafe")
        first = 1
    elements = src.reshape(n, k)
    block = max(1, _BLOCK_BYTES // k)
    for start in range(0, n, block):
        stop = min(n, start + block)
        for j in range(first, k):
            np.copyto(dst[j * n + start : j * n + stop], elements[start:stop, j])


def _ungroup_cast_blocked(streams: Sequence[U8Array], out: U8Array, k: int, n: int) -> None:
    first = 0
    if k in WORD_DTYPES:
        # Widening stream 0 into the word view writes every byte of ``out`` (the others as 0)
        # in one vectorised pass; the other streams are then put in place.
        np.copyto(out.view(WORD_DTYPES[k]), streams[0], casting="unsafe")
        first = 1
    elements = out.reshape(n, k)
    block = max(1, _BLOCK_BYTES // k)
    for start in range(0, n, block):
        stop = min(n, start + block)
        for j in range(first, k):
            np.copyto(elements[start:stop, j], streams[j][start:stop])


# The alternatives measured above, kept callable so that the micro-benchmark can re-measure
# them on other machines. Not used by the codecs.
def _group_strided(src: U8Array, dst: U8Array, k: int, n: int) -> None:
    elements = src.reshape(n, k)
    for j in range(k):
        np.copyto(dst[j * n : (j + 1) * n], elements[:, j])


def _ungroup_strided(streams: Sequence[U8Array], out: U8Array, k: int, n: int) -> None:
    elements = out.reshape(n, k)
    for j in range(k):
        np.copyto(elements[:, j], streams[j])


def _group_blocked(src: U8Array, dst: U8Array, k: int, n: int) -> None:
    elements = src.reshape(n, k)
    block = max(1, _BLOCK_BYTES // k)
    for start in range(0, n, block):
        stop = min(n, start + block)
        for j in range(k):
            np.copyto(dst[j * n + start : j * n + stop], elements[start:stop, j])


def _ungroup_blocked(streams: Sequence[U8Array], out: U8Array, k: int, n: int) -> None:
    elements = out.reshape(n, k)
    block = max(1, _BLOCK_BYTES // k)
    for start in range(0, n, block):
        stop = min(n, start + block)
        for j in range(k):
            np.copyto(elements[start:stop, j], streams[j][start:stop])


def _group_transpose(src: U8Array, dst: U8Array, k: int, n: int) -> None:
    np.copyto(dst[: n * k].reshape(k, n), src.reshape(n, k).T)


def _group_shift(src: U8Array, dst: U8Array, k: int, n: int) -> None:
    words = src.view(WORD_DTYPES[k])
    for j in range(k):
        np.right_shift(words, 8 * j, out=dst[j * n : (j + 1) * n], casting="unsafe")


GROUP_VARIANTS = {
    "numpy strided": _group_strided,
    "numpy strided, blocked": _group_blocked,
    "numpy transpose": _group_transpose,
    "uint view shift+cast": _group_shift,
    "cast stream 0 + blocked": _group_cast_blocked,
}
UNGROUP_VARIANTS = {
    "numpy strided": _ungroup_strided,
    "numpy strided, blocked": _ungroup_blocked,
    "cast stream 0 + blocked": _ungroup_cast_blocked,
}
