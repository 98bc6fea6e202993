"""Compiled byte grouping, used when numba is installed (the ``shardsave[fast]`` extra).

Why: byte grouping is pure memory shuffling and numpy has no kernel for it. Its best
composition (``_bytegroup``) moves ~2 GB/s on the reference machine, and inside a load, with
the other rank and the page cache competing for memory, it was over half of the decoder
threads' busy time (py-spy, fp32 load, 1.5 of 2.8 thousand samples). A compiled loop that
reads each stream once and writes each element once (``_kernels``) measured, on the same
machine, one thread, 4 MiB of trained fp32 weights into untouched-in-cache memory:

    ungroup k=4: 1.9 GB/s numpy -> 5-9 GB/s compiled;  group k=4: 2.5 -> 8 GB/s

and the benchmark's 4->2 resharding load (2 ranks, 1.13 GiB fp32) went from 1.35-1.43 s to
1.10-1.16 s, user CPU per rank 0.90 -> 0.65 s (``NUMBA`` A/B in the phase harness).

Compiling costs 1-2 s of one core, so it never blocks a caller: the first request starts it
in a background thread and gets None (use numpy) until the kernels are ready. numba keeps the
compiled code in its on-disk cache, so later processes only load it. The bytes are the same
either way; ``SHARDSAVE_NATIVE_KERNELS=0`` turns the kernels off.

Every wrapper checks the shapes, strides and bounds of what it passes, because the kernels
do not (numba does not bounds-check), and returns False for anything it does not handle so
that the caller falls back to numpy.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Sequence
from types import ModuleType

import numpy as np
from numpy.lib.stride_tricks import as_strided

from shardsave import knobs
from shardsave.codec.base import WORD_DTYPES, U8Array

# Element sizes with a compiled kernel: bf16/fp16 and fp32, what training state is made of.
_SIZES = (2, 4)

_lock = threading.Lock()
_kernels: ModuleType | None = None
_state = "new"  # -> "compiling" -> "ready" | "unavailable"
_ready = threading.Event()
_error: BaseException | None = None


def status() -> str:
    """``"ready"``, ``"compiling"``, ``"unavailable"`` (no numba, or it failed) or ``"new"``."""
    return _state


def wait(timeout: float | None = None) -> bool:
    """Start compiling if needed and block until done; whether the kernels can be used."""
    _start()
    _ready.wait(timeout)
    return _kernels is not None


def _get() -> ModuleType | None:
    if not knobs.native_kernels():
        return None
    if _kernels is None and _state == "new":
        _start()
    return _kernels


def _start() -> None:
    global _state
    with _lock:
        if _state != "new":
            return
        if importlib.util.find_spec("numba") is None:
            _state = "unavailable"
            _ready.set()
            return
        _state = "compiling"
        # Not a daemon: interpreter shutdown must not tear down LLVM in mid-compile.
        threading.Thread(target=_compile, name="shardsave-jit").start()


def _compile() -> None:
    global _kernels, _state, _error
    try:
        module = importlib.import_module("shardsave.codec._kernels")
        _self_test(module)
    except Exception as exc:  # any failure: numpy serves, as without numba
        _error = exc
        _state = "unavailable"
    else:
        _kernels = module
        _state = "ready"
    finally:
        _ready.set()


def _self_test(module: ModuleType) -> None:
    """A round trip of every kernel against numpy on a small odd-sized array."""
    rng = np.random.default_rng(0)
    for k in _SIZES:
        raw = rng.integers(0, 256, 37 * k, dtype=np.uint8)
        dst = np.empty((k, 37), dtype=np.uint8)
        getattr(module, f"group{k}")(raw.view(WORD_DTYPES[k]), dst)
        if not np.array_equal(dst, raw.reshape(37, k).T):
            raise RuntimeError(f"compiled group{k} disagrees with numpy")
        out = np.empty_like(raw)
        getattr(module, f"ungroup{k}")(*dst, out.view(WORD_DTYPES[k]), 1, 37, 0, 0, 0)
        if not np.array_equal(out, raw):
            raise RuntimeError(f"compiled ungroup{k} disagrees with numpy")


def group(src: U8Array, dst: U8Array, k: int) -> bool:
    """Write the ``k`` byte streams of ``src`` (1-D contiguous) back to back into ``dst``;
    False (nothing written) where no compiled kernel applies."""
    kernels = _get()
    if kernels is None or k not in _SIZES or src.size % k or dst.size < src.size:
        return False
    if not (src.flags.c_contiguous and dst.flags.c_contiguous and dst.flags.writeable):
        return False
    n = src.size // k
    getattr(kernels, f"group{k}")(src.view(WORD_DTYPES[k]), dst[: n * k].reshape(k, n))
    return True


def ungroup_box(streams: Sequence[U8Array], k: int, s_off: int, s_rs: int, dst: U8Array) -> bool:
    """Interleave a box of elements from ``k`` byte streams into ``dst``; False (nothing
    written) where no compiled kernel applies.

    ``dst`` is a writable uint8 array of shape ``(rows, cols, k)`` whose elements are
    contiguous within a row (a view of a target's region); row ``r`` of the box is stream
    bytes ``[s_off + r*s_rs, s_off + r*s_rs + cols)``.
    """
    kernels = _get()
    if kernels is None or k not in _SIZES or len(streams) != k or dst.ndim != 3:
        return False
    rows, cols, width = dst.shape
    if width != k or dst.dtype != np.uint8 or not dst.flags.writeable:
        return False
    if rows == 0 or cols == 0:
        return True
    row_stride = dst.strides[0] if rows > 1 else cols * k
    if dst.strides[2] != 1 or (cols > 1 and dst.strides[1] != k) or row_stride < 0 or row_stride % k:
        return False
    need = s_off + (rows - 1) * s_rs + cols
    if s_off < 0 or s_rs < 0 or any(
        s.ndim != 1 or s.dtype != np.uint8 or not s.flags.c_contiguous or s.size < need for s in streams
    ):
        return False
    o_rs = row_stride // k
    if rows == 1:
        words = dst[0].view(WORD_DTYPES[k]).reshape(cols)  # a view: the row's elements are adjacent
    else:  # the destination as one run of words from its first element to its last
        words = as_strided(dst.view(WORD_DTYPES[k]), shape=((rows - 1) * o_rs + cols,), strides=(k,))
    getattr(kernels, f"ungroup{k}")(*streams, words, rows, cols, s_off, s_rs, o_rs)
    return True
