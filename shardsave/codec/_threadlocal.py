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

import numpy as np
import zstandard

from shardsave.codec.base import U8Array
from shardsave.errors import CodecError

_MAX_CACHED_BYTES = 256 * 1024 * 1024
_MIN_LEVEL = -(1 << 17)  # zstd's fastest "negative" level


class _State(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[str, U8Array] = {}
        self.compressors: dict[tuple[int, bool], zstandard.ZstdCompressor] = {}
        self.decompressor: zstandard.ZstdDecompressor | None = None


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


def compressor(level: int, *, byte_streams: bool) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor for ``level``.

    ``byte_streams`` selects parameters tuned for byte-grouped float streams (see
    ``shuffle.py``); otherwise the plain zstd parameters of ``level``.
    """
    key = (level, byte_streams)
    cctx = _state.compressors.get(key)
    if cctx is None:
        if not _MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise CodecError(
                f"zstd level {level} (knob ZSTD_LEVEL / SHARDSAVE_ZSTD_LEVEL) is out of range; "
                f"use {_MIN_LEVEL}..{zstandard.MAX_COMPRESSION_LEVEL} (1 fast, 3 zstd's "
                "default, 19 and up very slow)"
            )
        params = _stream_params(level) if byte_streams else None
        if params is None:
            cctx = zstandard.ZstdCompressor(
                level=level, write_content_size=True, write_checksum=False
            )
        else:
            cctx = zstandard.ZstdCompressor(compression_params=params)
        _state.compressors[key] = cctx
    return cctx


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


def _stream_params(level: int) -> zstandard.ZstdCompressionParameters | None:
    base = zstandard.ZstdCompressionParameters.from_level(level)
    if base.strategy != zstandard.STRATEGY_FAST or level < 1:
        # Slower strategies parse by cost and are not hurt by the big table; negative levels
        # already trade ratio for speed. Use the level as the user set it.
        return None
    return zstandard.ZstdCompressionParameters.from_level(
        level,
        hash_log=_STREAM_HASH_LOG,
        min_match=_STREAM_MIN_MATCH,
        write_content_size=True,
        write_checksum=False,
    )
