"""The payload checksum: CRC-32, unsigned, the same for every buffer type."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from shardsave.codec import checksum
from shardsave.errors import CodecError


def test_known_value_and_types() -> None:
    data = b"123456789"
    assert checksum(data) == 0xCBF43926  # the CRC-32 check value
    assert checksum(bytearray(data)) == checksum(memoryview(data)) == 0xCBF43926
    assert checksum(np.frombuffer(data, np.uint8)) == 0xCBF43926
    assert checksum(b"") == 0


def test_detects_every_single_flipped_byte() -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 4096, dtype=np.uint8)
    reference = checksum(data)
    for pos in range(0, data.size, 7):
        for bit in (0x01, 0x80):
            flipped = data.copy()
            flipped[pos] ^= bit
            assert checksum(flipped) != reference


def test_other_dtypes_and_shapes_checksum_their_bytes() -> None:
    arr = np.arange(100, dtype=np.float32).reshape(10, 10)
    assert checksum(arr) == zlib.crc32(arr.tobytes())


def test_non_contiguous_rejected() -> None:
    with pytest.raises(CodecError):
        checksum(np.zeros(16, np.uint8)[::2])


def test_isal_and_zlib_compute_the_same_crc() -> None:
    """The stored value must not depend on which library computed it: a checkpoint saved
    with ``shardsave[fast]`` installed loads without it, and the other way round."""
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (1 << 20) + 77, dtype=np.uint8)
    # Sizes and misalignments around the SIMD folding widths, and a multi-MiB buffer.
    for start in (0, 1, 3, 15, 64):
        for size in (0, 1, 15, 16, 17, 63, 64, 65, 255, 256, 4097, (1 << 20)):
            piece = data[start : start + size].data
            assert isal_zlib.crc32(piece) == zlib.crc32(piece), (start, size)


def test_uses_isal_when_installed() -> None:
    import importlib

    pytest.importorskip("isal.isal_zlib")
    assert importlib.import_module("shardsave.codec.checksum").IMPLEMENTATION == "isal"
