"""Bitwise round trips: every torch dtype x every codec name, empty and odd sizes included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardsave import knobs
from shardsave.codec import CODEC_NAMES, checksum, decode_chunk, encode_chunk
from shardsave.codec.shuffle import MODE_RAW, MODE_ZSTD, parse_header

from .helpers import DTYPES, is_float, roundtrip, sample

pytestmark = pytest.mark.usefixtures("native", "zstd_binding")

NUMELS = [0, 1, 3, 17, 1000, 4099]


def expected_descriptors(codec: str, dtype: torch.dtype, nbytes: int, itemsize: int) -> set[str]:
    groupable = is_float(dtype) and itemsize >= 2 and nbytes % itemsize == 0
    if codec == "raw":
        return {"raw/1"}
    if codec == "zstd":
        return {"zstd/1"}
    preferred = "zstd-shuffle/1" if groupable else "zstd/1"
    return {preferred} if codec == "zstd-shuffle" else {preferred, "raw/1"}


@pytest.mark.parametrize("codec", CODEC_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_every_codec(dtype: torch.dtype, codec: str) -> None:
    itemsize = dtype.itemsize
    for numel in NUMELS:
        raw = sample(dtype, numel, seed=numel)
        enc = encode_chunk(raw, itemsize=itemsize, is_float=is_float(dtype), codec=codec)
        assert enc.descriptor in expected_descriptors(codec, dtype, raw.size, itemsize)
        assert enc.raw_length == raw.size
        assert enc.checksum == checksum(enc.payload)
        assert 0 <= enc.checksum < 2**32
        out = roundtrip(enc.descriptor, enc.payload, raw, itemsize)
        assert np.array_equal(out, raw), (dtype, codec, numel)


@pytest.mark.parametrize("codec", CODEC_NAMES)
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_lengths_that_are_not_whole_elements(codec: str, itemsize: int) -> None:
    raw = np.random.default_rng(itemsize).integers(0, 4, 1001, dtype=np.uint8)
    enc = encode_chunk(raw, itemsize=itemsize, is_float=True, codec=codec)
    assert enc.descriptor != "zstd-shuffle/1"
    assert np.array_equal(roundtrip(enc.descriptor, enc.payload, raw, itemsize), raw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_large_chunk_takes_the_probe_path(dtype: torch.dtype) -> None:
    # Streams over 256 KiB are probed first: mantissa streams must come out raw, the
    # exponent stream compressed, and the whole must still round-trip.
    itemsize = dtype.itemsize
    numel = (1 << 20) // itemsize * 2
    raw = sample(dtype, numel)
    enc = encode_chunk(raw, itemsize=itemsize, is_float=True, codec="zstd-shuffle")
    assert enc.descriptor == "zstd-shuffle/1"
    payload = np.frombuffer(memoryview(enc.payload), np.uint8)
    _, _, streams = parse_header(payload, raw_length=raw.size, itemsize=itemsize)
    modes = [mode for mode, _, _ in streams]
    assert modes[0] == MODE_RAW  # lowest mantissa byte: noise
    assert modes[itemsize - 1 if not dtype.is_complex else itemsize // 2 - 1] == MODE_ZSTD
    assert np.array_equal(roundtrip(enc.descriptor, enc.payload, raw, itemsize), raw)


def test_raw_payload_aliases_input() -> None:
    raw = sample(torch.float32, 100)
    enc = encode_chunk(raw, itemsize=4, is_float=True, codec="raw")
    assert enc.payload is raw


def test_payload_types_accepted_by_decode() -> None:
    raw = sample(torch.bfloat16, 5000)
    enc = encode_chunk(raw, itemsize=2, is_float=True, codec="zstd-shuffle")
    as_bytes = bytes(memoryview(enc.payload))
    for payload in (
        as_bytes,
        memoryview(as_bytes),
        np.frombuffer(as_bytes, np.uint8),
        bytearray(as_bytes),
    ):
        assert np.array_equal(roundtrip(enc.descriptor, payload, raw, 2), raw)


@pytest.mark.parametrize("level", [-3, 1, 3, 9])
def test_zstd_level_knob(level: int) -> None:
    raw = sample(torch.float32, 70_000)
    with knobs.override(ZSTD_LEVEL=level):
        for codec in ("zstd", "zstd-shuffle"):
            enc = encode_chunk(raw, itemsize=4, is_float=True, codec=codec)
            assert np.array_equal(roundtrip(enc.descriptor, enc.payload, raw, 4), raw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_unaligned_input_and_output(dtype: torch.dtype) -> None:
    itemsize = dtype.itemsize
    raw = sample(dtype, 40_000)
    backing = np.zeros(raw.size + 3, np.uint8)
    shifted = backing[1 : 1 + raw.size]  # odd address: word views are unaligned
    shifted[:] = raw
    for codec in CODEC_NAMES:
        enc = encode_chunk(shifted, itemsize=itemsize, is_float=True, codec=codec)
        target = np.zeros(raw.size + 1, np.uint8)[1:]
        decode_chunk(
            enc.descriptor, enc.payload, raw_length=raw.size, itemsize=itemsize, out=target
        )
        assert np.array_equal(target, raw)
