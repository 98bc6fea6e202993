"""Codec choice: names, fallbacks, "auto" keeping only what shrinks, input validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shardsave import knobs
from shardsave.codec import (
    CODEC_DESCRIPTORS,
    CODEC_NAMES,
    EncodedChunk,
    codec_registry,
    encode_chunk,
    validate_codec_name,
)
from shardsave.errors import CodecError, ShardsaveError

from .helpers import roundtrip, sample


def test_codec_names() -> None:
    assert CODEC_NAMES == ("auto", "raw", "zstd", "zstd-shuffle")
    for name in CODEC_NAMES:
        assert validate_codec_name(name) == name


@pytest.mark.parametrize("bad", ["lz4", "ZSTD", "", "zstd/1", None, 3])
def test_unknown_codec_name(bad: object) -> None:
    with pytest.raises(CodecError) as info:
        validate_codec_name(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert repr(bad) in str(info.value)
    assert "'zstd-shuffle'" in str(info.value) and "'auto'" in str(info.value)


def test_encode_rejects_unknown_codec_name() -> None:
    with pytest.raises(CodecError, match="'lz4'"):
        encode_chunk(np.zeros(8, np.uint8), itemsize=1, is_float=False, codec="lz4")


def test_descriptors_are_versioned_and_registered() -> None:
    assert set(CODEC_DESCRIPTORS) == set(codec_registry())
    assert CODEC_DESCRIPTORS[:3] == ("raw/1", "zstd/1", "zstd-shuffle/1")


def test_auto_stores_random_bytes_raw() -> None:
    raw = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    for itemsize, is_float in ((1, False), (4, True), (2, True), (8, False)):
        enc = encode_chunk(raw, itemsize=itemsize, is_float=is_float, codec="auto")
        assert enc.descriptor == "raw/1"
        assert enc.payload is raw


def test_auto_compresses_zeros() -> None:
    raw = np.zeros(1 << 20, np.uint8)
    for itemsize, is_float, expected in ((1, False, "zstd/1"), (4, True, "zstd-shuffle/1")):
        enc = encode_chunk(raw, itemsize=itemsize, is_float=is_float, codec="auto")
        assert enc.descriptor == expected
        assert enc.stored_length < raw.size // 100
        assert np.array_equal(roundtrip(enc.descriptor, enc.payload, raw, itemsize), raw)


def test_auto_empty_chunk_is_raw() -> None:
    enc = encode_chunk(np.empty(0, np.uint8), itemsize=4, is_float=True, codec="auto")
    assert enc.descriptor == "raw/1" and enc.stored_length == 0 and enc.checksum == 0


def test_auto_stores_small_chunks_raw_without_trying() -> None:
    limit = 16 * 1024
    with knobs.override(MIN_COMPRESS_BYTES=limit):
        small = np.zeros(limit - 4, np.uint8)  # would compress ~1000x
        enc = encode_chunk(small, itemsize=4, is_float=True, codec="auto")
        assert enc.descriptor == "raw/1" and enc.payload is small
        big = np.zeros(limit, np.uint8)
        assert encode_chunk(big, itemsize=4, is_float=True, codec="auto").descriptor == "zstd-shuffle/1"
        # an explicit codec is honoured whatever the size
        for codec, expected in (("zstd", "zstd/1"), ("zstd-shuffle", "zstd-shuffle/1")):
            assert encode_chunk(small, itemsize=4, is_float=True, codec=codec).descriptor == expected
    with knobs.override(MIN_COMPRESS_BYTES=0):
        assert encode_chunk(small, itemsize=4, is_float=True, codec="auto").descriptor == "zstd-shuffle/1"


def test_auto_respects_min_compression_gain() -> None:
    raw = sample(torch.bfloat16, 50_000)  # compresses to ~0.7-0.8 of its size
    with knobs.override(MIN_COMPRESSION_GAIN=0.3):
        assert encode_chunk(raw, itemsize=2, is_float=True, codec="auto").descriptor == "raw/1"
    with knobs.override(MIN_COMPRESSION_GAIN=0.97):
        enc = encode_chunk(raw, itemsize=2, is_float=True, codec="auto")
        assert enc.descriptor == "zstd-shuffle/1"


def test_shuffle_falls_back_to_zstd() -> None:
    raw = sample(torch.int32, 1000)
    assert (
        encode_chunk(raw, itemsize=4, is_float=False, codec="zstd-shuffle").descriptor == "zstd/1"
    )
    f8 = sample(torch.float8_e4m3fn, 1000)
    assert encode_chunk(f8, itemsize=1, is_float=True, codec="zstd-shuffle").descriptor == "zstd/1"


def test_explicit_zstd_is_honoured_even_when_it_does_not_shrink() -> None:
    raw = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
    enc = encode_chunk(raw, itemsize=1, is_float=False, codec="zstd")
    assert enc.descriptor == "zstd/1"
    assert np.array_equal(roundtrip(enc.descriptor, enc.payload, raw, 1), raw)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4), np.uint8),
        np.zeros(16, np.float32),
        np.zeros(32, np.uint8)[::2],
        b"\x00" * 16,
    ],
    ids=["2-D", "float32", "strided", "bytes"],
)
def test_encode_rejects_bad_raw(bad: object) -> None:
    with pytest.raises(CodecError, match="1-D C-contiguous uint8"):
        encode_chunk(bad, itemsize=1, is_float=False, codec="auto")  # type: ignore[arg-type]


@pytest.mark.parametrize("itemsize", [0, -1, 2.0])
def test_encode_rejects_bad_itemsize(itemsize: object) -> None:
    with pytest.raises(CodecError, match="itemsize"):
        encode_chunk(np.zeros(8, np.uint8), itemsize=itemsize, is_float=True, codec="auto")  # type: ignore[arg-type]


def test_encoded_chunk_is_frozen() -> None:
    enc = encode_chunk(np.zeros(8, np.uint8), itemsize=1, is_float=False, codec="zstd")
    assert isinstance(enc, EncodedChunk)
    with pytest.raises(dataclasses.FrozenInstanceError):
        enc.descriptor = "raw/1"  # type: ignore[misc]


def test_errors_are_shardsave_errors() -> None:
    assert issubclass(CodecError, ShardsaveError) and issubclass(CodecError, ValueError)


@pytest.mark.parametrize("level", [23, 100])
def test_out_of_range_zstd_level_names_the_knob(level: int) -> None:
    with knobs.override(ZSTD_LEVEL=level), pytest.raises(CodecError, match="ZSTD_LEVEL"):
        encode_chunk(np.zeros(64, np.uint8), itemsize=1, is_float=False, codec="zstd")
