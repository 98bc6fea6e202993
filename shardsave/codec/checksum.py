"""The per-chunk checksum: CRC-32 (zlib polynomial) of the stored payload bytes.

Why CRC-32 and not something else: it is checked on every load, so it must be fast, and it
must be *sound* for storage errors (any single flipped byte, swapped or shifted blocks, bursts
up to 32 bits are always caught). With only the standard library, numpy and zstandard
available, measured on the 2-core reference machine (16 MiB buffer, one thread):

    zlib.crc32 2.3 GB/s | zlib.adler32 2.6 | hashlib.sha1 1.5 | sha256 1.4 | md5 0.6 | blake2b 0.5
    numpy uint64 sum 11.6 GB/s (but blind to reordered words, so not sound)

Adler-32 is barely faster and much weaker on short changes; the cryptographic hashes are
slower and buy nothing against accidental corruption (the checksum is not a security
boundary: a tampered checkpoint can carry a matching checksum whatever we pick). CPython's
``zlib.crc32`` releases the GIL for buffers over a few KiB, so the loader's threads verify in
parallel. It checksums the *payload* (what is on storage), so corruption is caught before
any decompressor sees the bytes.
"""

from __future__ import annotations

import zlib

import numpy as np

from shardsave.codec.base import as_u8


def checksum(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC-32 of a contiguous buffer, as an unsigned 32-bit integer (0 for an empty buffer)."""
    if isinstance(data, (bytes, bytearray)):
        return zlib.crc32(data) & 0xFFFFFFFF
    return zlib.crc32(as_u8(data, "checksum input").data) & 0xFFFFFFFF
