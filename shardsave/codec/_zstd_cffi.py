"""zstd through the cffi binding that ``zstandard`` ships, for what its C binding cannot do.

Why: an exponent stream of trained floats is low-entropy noise (~2.6 bits per byte) with few
repeats, so nearly all of zstd's output is Huffman-coded literals and most of its time at
level 1 goes into looking for matches that are not there. zstd can search less
(``targetLength`` on the fast strategy, its "acceleration"), but then it also stops
Huffman-coding literals, which leaves these streams uncompressed, unless the experimental
parameter ``ZSTD_c_literalCompressionMode`` says otherwise. The C binding cannot set that
parameter; the cffi binding reaches the whole ``zstd.h``. Measured on exponent streams of
the benchmark's trained weights and Adam moments (2 MiB pieces, one core, level 1, hash_log
6, min_match 7), compress GB/s and ratio:

    stream              C binding       targetLength 16 + Huffman literals
    bf16 weights        0.44  3.10x     0.73  3.13x
    bf16 exp_avg_sq     0.29  3.71x     0.56  3.79x
    fp32 weights        0.46  3.09x     0.75  3.11x
    1% non-zero bytes   1.28  39.8x     1.26  26.2x   (sparse data loses ratio, not speed)

Both directions also work straight in the caller's buffers (no ``bytes`` object and copy
per frame), which decodes a 32 KiB stream ~25% faster and a 2 MiB one ~5%.

The frames are ordinary zstd frames that any zstd decoder reads, so this is a speed choice
made per process, never a format: without ``cffi`` (the ``fast`` extra; ``cryptography``
needs it too), or with ``SHARDSAVE_ZSTD_CFFI=0``, the C binding does the same work a little
slower (``_threadlocal``).
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from shardsave.codec.base import U8Array
from shardsave.errors import CodecError, CorruptionError

# Everything this module calls; an old zstandard whose cffi binding lacks one is not used.
_NEEDED = (
    "ZSTD_createCCtx", "ZSTD_freeCCtx", "ZSTD_CCtx_setParameter", "ZSTD_compress2",
    "ZSTD_createDCtx", "ZSTD_freeDCtx", "ZSTD_decompressDCtx", "ZSTD_isError",
    "ZSTD_getErrorName", "ZSTD_c_compressionLevel", "ZSTD_c_hashLog", "ZSTD_c_minMatch",
    "ZSTD_c_targetLength", "ZSTD_c_literalCompressionMode", "ZSTD_c_contentSizeFlag",
    "ZSTD_c_checksumFlag",
)
_PS_ENABLE = 1  # ZSTD_ps_enable

_lock = threading.Lock()
_binding: tuple[Any, Any] | None = None
_loaded = False


def binding() -> tuple[Any, Any] | None:
    """``(lib, ffi)`` of zstandard's cffi binding, or None where it cannot be loaded."""
    global _binding, _loaded
    if _loaded:
        return _binding
    with _lock:
        if not _loaded:
            try:
                backend_cffi = importlib.import_module("zstandard.backend_cffi")  # needs cffi
                lib, ffi = backend_cffi.lib, backend_cffi.ffi
                if all(hasattr(lib, name) for name in _NEEDED):
                    _binding = (lib, ffi)
            except Exception:  # ImportError, or a binding that fails to load: use the C one
                _binding = None
            _loaded = True
    return _binding


def _require() -> tuple[Any, Any]:
    found = binding()
    if found is None:
        raise CodecError("zstandard's cffi binding is not available (pip install cffi)")
    return found


def _error_name(lib: Any, ffi: Any, result: int) -> str | None:
    """zstd's name for the error ``result`` encodes, or None if it is not an error."""
    return ffi.string(lib.ZSTD_getErrorName(result)).decode() if lib.ZSTD_isError(result) else None


def _check(lib: Any, ffi: Any, result: int, what: str) -> int:
    reason = _error_name(lib, ffi, result)
    if reason is not None:
        raise CodecError(f"{what}: {reason}")
    return int(result)


class Compressor:
    """One zstd compression context (one thread at a time) with fixed parameters."""

    def __init__(self, *, level: int, hash_log: int = 0, min_match: int = 0,
                 target_length: int = 0, huffman_literals: bool = False) -> None:
        self._lib, self._ffi = lib, ffi = _require()
        self._cctx = ffi.gc(lib.ZSTD_createCCtx(), lib.ZSTD_freeCCtx)
        settings = [
            (lib.ZSTD_c_compressionLevel, level),
            (lib.ZSTD_c_contentSizeFlag, 1),  # the decoder checks the declared size
            (lib.ZSTD_c_checksumFlag, 0),  # chunks carry their own CRC-32
        ]
        # 0 leaves a parameter at what the level implies.
        settings += [(p, v) for p, v in ((lib.ZSTD_c_hashLog, hash_log),
                                          (lib.ZSTD_c_minMatch, min_match),
                                          (lib.ZSTD_c_targetLength, target_length)) if v]
        if huffman_literals:
            settings.append((lib.ZSTD_c_literalCompressionMode, _PS_ENABLE))
        for param, value in settings:
            _check(lib, ffi, lib.ZSTD_CCtx_setParameter(self._cctx, param, value),
                   f"zstd parameter {param}={value}")

    def compress_into(self, src: U8Array, dst: U8Array) -> int:
        """Compress ``src`` as one frame into the start of ``dst``; the frame's length.

        ``dst`` should hold ``_threadlocal.frame_bound(src.size)`` bytes; a smaller one that the frame
        does not fit raises ``CodecError``.
        """
        lib, ffi = self._lib, self._ffi
        # The call releases the GIL (cffi does for every C call).
        result = lib.ZSTD_compress2(self._cctx, ffi.from_buffer(dst), dst.size,
                                    ffi.from_buffer(src), src.size)
        return _check(lib, ffi, result, f"zstd compression of {src.size} bytes")


class Decompressor:
    """One zstd decompression context (one thread at a time)."""

    def __init__(self) -> None:
        self._lib, self._ffi = lib, ffi = _require()
        self._dctx = ffi.gc(lib.ZSTD_createDCtx(), lib.ZSTD_freeDCtx)

    def decompress_into(self, frame: memoryview, out: U8Array, what: str) -> None:
        """Decompress ``frame`` into ``out``, which it must fill exactly.

        zstd writes at most ``out.size`` bytes and checks the content size the frame
        declares against what its blocks decode to; the caller has already checked that the
        frame is exactly one frame declaring ``out.size`` bytes (``_zstd_frame``).
        """
        lib, ffi = self._lib, self._ffi
        result = lib.ZSTD_decompressDCtx(self._dctx, ffi.from_buffer(out), out.size,
                                         ffi.from_buffer(frame), frame.nbytes)
        reason = _error_name(lib, ffi, result)
        if reason is not None:
            raise CorruptionError(f"{what}: zstd cannot decode the frame ({reason})")
        if result != out.size:
            raise CorruptionError(
                f"{what}: zstd frame decoded to {result} bytes, expected {out.size}"
            )
