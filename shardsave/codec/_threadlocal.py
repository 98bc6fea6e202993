"""Per-thread scratch buffers and zstd contexts.

Why per thread: codecs run on the save/load thread pools, and ``zstandard`` compressor and
decompressor objects are not thread-safe (one context per thread is the documented rule). A
lock would serialise the pool; a fresh context per call costs an allocation of its tables.

Why scratch buffers are kept: writing into a fresh multi-MiB allocation runs at ~0.5 GB/s on
the reference machine (page faults), into an already-touched buffer at 3-11 GB/s. So each
thread keeps one buffer per purpose, grows it when a larger chunk comes, and reuses it. Very
large requests (over ``_MAX_CACHED_BYTES``) are served by a one-off allocation so that a single
huge chunk does not pin its size per thread forever.

A scratch view is only valid until the same thread asks for the same purpose again; codecs
never return one to their caller.
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np
import zstandard

from shardsave import knobs
from shardsave.codec import _zstd_cffi
from shardsave.codec.base import U8Array
from shardsave.errors import CodecError

_MAX_CACHED_BYTES = 256 * 1024 * 1024
_MIN_LEVEL = -(1 << 17)  # zstd's fastest "negative" level


class _State(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[str, U8Array] = {}
        self.compressors: dict[tuple[int, bool], zstandard.ZstdCompressor] = {}
        self.stream_compressors: dict[tuple[int, bool], StreamCompressor] = {}
        self.decompressor: zstandard.ZstdDecompressor | None = None
        self.direct_decompressor: _zstd_cffi.Decompressor | None = None


_state = _State()


def scratch(purpose: str, size: int) -> U8Array:
    """A uint8 view of ``size`` bytes private to this thread, reused across calls."""
    if size > _MAX_CACHED_BYTES:
        return np.empty(size, dtype=np.uint8)
    buf = _state.buffers.get(purpose)
    if buf is None or buf.size < size:
        # Grow with headroom so that slightly larger chunks do not reallocate each time.
        buf = np.empty(min(_MAX_CACHED_BYTES, max(size, size + size // 8)), dtype=np.uint8)
        _state.buffers[purpose] = buf
    return buf[:size]


class StreamCompressor(Protocol):
    def compress_into(self, src: U8Array, dst: U8Array) -> int:
        """Compress ``src`` as one zstd frame into the start of ``dst`` (at least
        ``frame_bound(src.size)`` bytes); return the frame's length."""
        ...


def frame_bound(size: int) -> int:
    """Most bytes a zstd frame of ``size`` input bytes takes (zstd's ``ZSTD_COMPRESSBOUND``)."""
    return size + (size >> 8) + ((128 * 1024 - size) >> 11 if size < 128 * 1024 else 0)


def compressor(level: int, *, byte_streams: bool) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor (C binding) for ``level``.

    ``byte_streams`` selects parameters tuned for byte-grouped float streams (see
    ``shuffle.py``); otherwise the plain zstd parameters of ``level``.
    """
    key = (level, byte_streams)
    cctx = _state.compressors.get(key)
    if cctx is None:
        _check_level(level)
        params = _stream_params(level) if byte_streams else None
        if params is None:
            cctx = zstandard.ZstdCompressor(
                level=level, write_content_size=True, write_checksum=False
            )
        else:
            cctx = zstandard.ZstdCompressor(compression_params=params)
        _state.compressors[key] = cctx
    return cctx


def stream_compressor(level: int) -> StreamCompressor:
    """This thread's compressor for byte-grouped float streams at ``level``: through the cffi
    binding with accelerated matching and Huffman-coded literals where it is available and
    the ``ZSTD_CFFI`` knob allows (``_zstd_cffi``), else the C binding's ``compressor``."""
    direct = knobs.zstd_cffi() and _zstd_cffi.binding() is not None
    key = (level, direct)
    found = _state.stream_compressors.get(key)
    if found is None:
        if direct:
            _check_level(level)
            tuned = _tuned_for_streams(level)
            found = _zstd_cffi.Compressor(
                level=level,
                hash_log=_STREAM_HASH_LOG if tuned else 0,
                min_match=_STREAM_MIN_MATCH if tuned else 0,
                target_length=_STREAM_ACCELERATION if tuned else 0,
                huffman_literals=tuned,
            )
        else:
            found = _CBindingStreamCompressor(compressor(level, byte_streams=True))
        _state.stream_compressors[key] = found
    return found


class _CBindingStreamCompressor:
    def __init__(self, cctx: zstandard.ZstdCompressor) -> None:
        self._cctx = cctx

    def compress_into(self, src: U8Array, dst: U8Array) -> int:
        frame: bytes = self._cctx.compress(src.data)  # releases the GIL while compressing
        dst[: len(frame)] = np.frombuffer(frame, dtype=np.uint8)
        return len(frame)


def direct_decompressor() -> _zstd_cffi.Decompressor | None:
    """This thread's cffi decompressor (decodes straight into the caller's buffer), or None
    where the cffi binding is unavailable or the ``ZSTD_CFFI`` knob is 0."""
    if not knobs.zstd_cffi() or _zstd_cffi.binding() is None:
        return None
    dctx = _state.direct_decompressor
    if dctx is None:
        dctx = _state.direct_decompressor = _zstd_cffi.Decompressor()
    return dctx


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor."""
    dctx = _state.decompressor
    if dctx is None:
        dctx = zstandard.ZstdDecompressor()
        _state.decompressor = dctx
    return dctx


# Byte streams of floats (exponent bytes above all) are low-entropy noise: level 1's hash
# table finds many short, useless matches there, which costs time on both ends and even
# some ratio. A 64-entry hash table with 7-byte minimum matches leaves mostly Huffman-coded
# literals plus the genuinely long repeats. Measured on byte streams of a trained transformer
# (bf16 exponent stream, one core): level 1 defaults 2.80x at 0.16-0.22 GB/s compress,
# 0.6-0.9 GB/s decompress; hash_log=6/min_match=7 3.09x at 0.36-0.52 GB/s, 1.0-1.44 GB/s.
# On Adam exp_avg it loses ~7% of that stream's ratio (2.37x -> 2.20x) for ~2x speed.
_STREAM_HASH_LOG = 6
_STREAM_MIN_MATCH = 7
# Through the cffi binding, also skip ahead faster where nothing matches while keeping
# Huffman-coded literals (see _zstd_cffi): ~1.6-1.9x the speed on exponent streams. 16 is
# where the gain levels off (targetLength 4/8/16/32 on bf16 weights: 0.62/0.68/0.73/0.75
# GB/s) before sparse streams lose much ratio (1% non-zero: 37/33/26/20x, 40x without).
_STREAM_ACCELERATION = 16


def _check_level(level: int) -> None:
    if not _MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise CodecError(
            f"zstd level {level} (knob ZSTD_LEVEL / SHARDSAVE_ZSTD_LEVEL) is out of range; "
            f"use {_MIN_LEVEL}..{zstandard.MAX_COMPRESSION_LEVEL} (1 fast, 3 zstd's "
            "default, 19 and up very slow)"
        )


def _tuned_for_streams(level: int) -> bool:
    """Whether byte streams at ``level`` get the tuned parameters above.

    Slower strategies parse by cost and are not hurt by the big table; negative levels
    already trade ratio for speed. At those, the level is used as the user set it.
    """
    base = zstandard.ZstdCompressionParameters.from_level(level)
    return base.strategy == zstandard.STRATEGY_FAST and level >= 1


def _stream_params(level: int) -> zstandard.ZstdCompressionParameters | None:
    if not _tuned_for_streams(level):
        return None
    return zstandard.ZstdCompressionParameters.from_level(
        level,
        hash_log=_STREAM_HASH_LOG,
        min_match=_STREAM_MIN_MATCH,
        write_content_size=True,
        write_checksum=False,
    )
