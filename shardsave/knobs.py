"""Tuning constants, each overridable through an environment variable.

An explicit function argument always wins over a knob; a knob wins over the default.
Tests change knobs with :func:`override`, which restores the previous value on exit.
Read knobs through the accessor functions at call time (never copy them into module
globals) so that an override or an environment change takes effect.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_DEFAULTS: dict[str, int | float] = {
    # Target size of one stored chunk (raw bytes). A resharding load reads, checks and
    # decompresses whole chunks, so smaller chunks read less surplus; smaller ones cost more
    # bookkeeping (a TOC row and a few Python calls each). Measured on the benchmark's trained
    # weights (288 MiB, auto codec, one thread): 16, 4 and 1 MiB chunks store 1.2058x /
    # 1.2058x / 1.2057x (fp32) and 1.5182x at all three (bf16), encoding at the same speed
    # within noise (0.48-0.52 GB/s). Since a load interleaves only the elements its targets
    # want (codec/_boxes.py), the surplus left is checksumming and decompressing exponent
    # streams of partly wanted chunks.
    "CHUNK_BYTES": 4 * 1024 * 1024,
    # Encoder/decoder threads per rank. zstandard and numpy copies release the GIL.
    "IO_THREADS": max(1, min(8, os.cpu_count() or 1)),
    # How many encoded chunks may wait for the writer at once (bounds host memory).
    "MAX_INFLIGHT_CHUNKS": 4,
    # 1: byte grouping and interleaving of floats use numba-compiled kernels when numba is
    # installed (``shardsave[fast]``; codec/_native.py), 0: always numpy. Same bytes.
    "NATIVE_KERNELS": 1,
    # 1: zstd goes through the cffi binding that zstandard ships when cffi is installed
    # (``shardsave[fast]``; codec/_zstd_cffi.py): exponent streams compress ~1.7x faster,
    # frames decode straight into their destination. 0: always the C binding. Either way
    # the frames are ordinary zstd frames.
    "ZSTD_CFFI": 1,
    # zstd compression level (1 is the fast end; trained weights gain little above it).
    "ZSTD_LEVEL": 1,
    # "auto" keeps a compressed stream only if it is at most this fraction of its input.
    "MIN_COMPRESSION_GAIN": 0.97,
    # "auto" stores chunks smaller than this raw without trying: biases, norms and other
    # small tensors, a negligible share of a model's bytes. Compressing one saves a few
    # hundred bytes to a few KiB, and decoding it costs a fixed ~70 us more than copying
    # it (codec setup, frame checks, a Python call or ten; measured on trained fp32 weights,
    # one core: 2 KiB 80 vs 15 us, 16 KiB 86 vs 23 us, 64 KiB 126 vs 26 us), which on
    # a resharding load with hundreds of them per rank is more than storage saves.
    "MIN_COMPRESS_BYTES": 16 * 1024,
    # 1: while a data file is streamed, ask the OS to start writing each chunk back to the
    # device right after it is written, so the disk works while later chunks are encoded and
    # the final fsync waits only for the tail (0 disables; durability never depends on it).
    "EARLY_WRITEBACK": 1,
    # With EARLY_WRITEBACK, a durable local data file is also fdatasync'ed in a background
    # thread each time this many more bytes are written, so the device's write cache is
    # flushed while later chunks are encoded, not all by the final fsync (0: only at close).
    "EARLY_SYNC_BYTES": 32 * 1024 * 1024,
    # Seconds a checkpoint collective waits for a peer before reporting it lost.
    "COLLECTIVE_TIMEOUT_S": 300.0,
    # Byte gap under which two ranged reads of one file are merged into one request.
    "READ_COALESCE_GAP": 1024 * 1024,
    # Compressed bytes one load step fetches before decoding them (bounds load memory; two
    # halves are in flight: one read while the other is decoded). Object stores want many
    # requests in flight, hence the large default; local files want small batches, whose
    # read buffers the allocator recycles instead of page-faulting in fresh memory (measured
    # 32 vs 256 MiB, warm page cache: -32% CPU, -40% time).
    "READ_BATCH_BYTES": 256 * 1024 * 1024,
    "LOCAL_READ_BATCH_BYTES": 32 * 1024 * 1024,
    # 1: loads from local files map them (mmap) and decode straight from the page cache
    # instead of copying every byte into a fresh buffer first (measured on the reference
    # machine: 8 GB/s vs 1.7 GB/s from a warm page cache, a third of the CPU from a cold one).
    # A file truncated by another process while it is mapped kills the reader with SIGBUS;
    # shardsave never truncates a data file. 0 reads with pread.
    "LOCAL_MMAP": 1,
    # Retries of a transient storage failure, with exponential backoff from this base.
    "STORAGE_RETRIES": 5,
    "STORAGE_RETRY_BASE_S": 0.05,
    # Largest index.json accepted from storage (an untrusted index must not exhaust memory).
    "MAX_INDEX_BYTES": 512 * 1024 * 1024,
    # Largest table of contents accepted from a data file (48 bytes per chunk: ~5.6 M chunks).
    "MAX_TOC_BYTES": 256 * 1024 * 1024,
    # Largest total of bytes one load may allocate for what a checkpoint declares (load_full's
    # tensors, decode buffers). 0: the machine's physical memory -- a checkpoint declaring
    # more could not be loaded into it anyway, and a lying index must not try.
    "MAX_LOAD_BYTES": 0,
    # Permissions of the files and directories a save creates on local filesystems (the
    # umask still applies). Owner-only by default: checkpoints hold a model's weights. In the
    # environment, write them in octal: SHARDSAVE_FILE_MODE=640.
    "FILE_MODE": 0o600,
    "DIR_MODE": 0o700,
    # A commit claim older than this is presumed left by a crashed save and may be broken.
    "CLAIM_STALE_S": 120.0,
}

# Knobs whose environment value is written in octal (file modes), e.g. "640" or "0o640".
_OCTAL = frozenset({"FILE_MODE", "DIR_MODE"})

_overrides: dict[str, int | float] = {}


def _get(name: str) -> int | float:
    if name in _overrides:
        return _overrides[name]
    default = _DEFAULTS[name]
    raw = os.environ.get(f"SHARDSAVE_{name}")
    if raw is None:
        return default
    try:
        if name in _OCTAL:
            return int(raw.strip().lower().removeprefix("0o"), 8)
        return type(default)(raw)
    except ValueError as exc:
        raise ValueError(
            f"environment variable SHARDSAVE_{name}={raw!r} is not a valid "
            f"{type(default).__name__}; unset it or give a number like {default!r}"
        ) from exc


def get_int(name: str) -> int:
    """The current value of an integer knob."""
    return int(_get(name))


def get_float(name: str) -> float:
    """The current value of a float knob."""
    return float(_get(name))


def chunk_bytes() -> int:
    return get_int("CHUNK_BYTES")


def io_threads() -> int:
    return max(1, get_int("IO_THREADS"))


def native_kernels() -> bool:
    return get_int("NATIVE_KERNELS") != 0


def zstd_cffi() -> bool:
    return get_int("ZSTD_CFFI") != 0


def max_inflight_chunks() -> int:
    return max(1, get_int("MAX_INFLIGHT_CHUNKS"))


def zstd_level() -> int:
    return get_int("ZSTD_LEVEL")


def min_compression_gain() -> float:
    return get_float("MIN_COMPRESSION_GAIN")


def min_compress_bytes() -> int:
    return get_int("MIN_COMPRESS_BYTES")


def early_writeback() -> bool:
    return get_int("EARLY_WRITEBACK") != 0


def early_sync_bytes() -> int:
    return get_int("EARLY_SYNC_BYTES")


def local_mmap() -> bool:
    return get_int("LOCAL_MMAP") != 0


def collective_timeout_s() -> float:
    return get_float("COLLECTIVE_TIMEOUT_S")


def read_coalesce_gap() -> int:
    return get_int("READ_COALESCE_GAP")


def read_batch_bytes(*, local: bool = False) -> int:
    """The load batch budget; local files use the smaller of the two knobs."""
    batch = get_int("READ_BATCH_BYTES")
    if local:
        batch = min(batch, get_int("LOCAL_READ_BATCH_BYTES"))
    return max(1, batch)


def storage_retries() -> int:
    return get_int("STORAGE_RETRIES")


def storage_retry_base_s() -> float:
    return get_float("STORAGE_RETRY_BASE_S")


def max_index_bytes() -> int:
    return get_int("MAX_INDEX_BYTES")


def max_toc_bytes() -> int:
    return get_int("MAX_TOC_BYTES")


def max_load_bytes() -> int:
    """The MAX_LOAD_BYTES knob, with 0 resolved to the machine's physical memory."""
    value = get_int("MAX_LOAD_BYTES")
    if value > 0:
        return value
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): a generous fixed cap
        return 64 * 1024**3


def file_mode() -> int:
    return get_int("FILE_MODE") & 0o7777


def dir_mode() -> int:
    return get_int("DIR_MODE") & 0o7777


def claim_stale_s() -> float:
    return get_float("CLAIM_STALE_S")


@contextlib.contextmanager
def override(**values: int | float) -> Iterator[None]:
    """Temporarily set knobs by name, e.g. ``with override(CHUNK_BYTES=4096): ...``."""
    unknown = sorted(set(values) - set(_DEFAULTS))
    if unknown:
        raise KeyError(f"unknown knob(s) {unknown}; known: {sorted(_DEFAULTS)}")
    saved = {k: _overrides[k] for k in values if k in _overrides}
    _overrides.update(values)
    try:
        yield
    finally:
        for k in values:
            _overrides.pop(k, None)
        _overrides.update(saved)
