"""The contract every registered codec meets (run for each codec in the registry)."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses

import numpy as np
import pytest
import torch

from shardsave.codec import Codec, codec_registry, get_codec
from shardsave.errors import CodecError, CorruptionError

from .helpers import sample

CODECS = list(codec_registry().values())
CASES = [
    (torch.float32, 4),
    (torch.bfloat16, 2),
    (torch.float64, 8),
    (torch.int64, 8),
    (torch.uint8, 1),
]


def applicable(codec: Codec, raw: np.ndarray, itemsize: int, is_float: bool) -> bool:
    return codec.supports(length=raw.size, itemsize=itemsize, is_float=is_float)


@pytest.fixture(params=CODECS, ids=lambda c: c.descriptor)
def codec(request: pytest.FixtureRequest) -> Codec:
    return request.param  # type: ignore[no-any-return]


def test_is_a_frozen_dataclass_registered_by_versioned_descriptor(codec: Codec) -> None:
    assert isinstance(codec, Codec)
    assert dataclasses.is_dataclass(codec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        codec.descriptor = "x/1"  # type: ignore[misc]
    name, _, version = codec.descriptor.partition("/")
    assert name and version.isdigit()
    assert get_codec(codec.descriptor) is codec


def test_round_trip(codec: Codec) -> None:
    for dtype, itemsize in CASES:
        is_float = dtype.is_floating_point
        for numel in (0, 1, 5, 4096, 300_000):
            raw = sample(dtype, numel, seed=numel)
            if not applicable(codec, raw, itemsize, is_float):
                continue
            payload = codec.encode(raw, itemsize=itemsize)
            data = (
                np.frombuffer(memoryview(payload), np.uint8)
                if raw.size or len(memoryview(payload))
                else np.empty(0, np.uint8)
            )
            out = np.full(raw.size, 0x5A, np.uint8)
            codec.decode(data, raw_length=raw.size, itemsize=itemsize, out=out)
            assert np.array_equal(out, raw), (codec.descriptor, dtype, numel)


def test_encoding_is_deterministic(codec: Codec) -> None:
    raw = sample(torch.float32, 50_000)
    if applicable(codec, raw, 4, True):
        a = bytes(memoryview(codec.encode(raw, itemsize=4)))
        b = bytes(memoryview(codec.encode(raw.copy(), itemsize=4)))
        assert a == b


def test_truncated_payload_is_corruption(codec: Codec) -> None:
    raw = sample(torch.float32, 4096)
    payload = bytes(memoryview(codec.encode(raw, itemsize=4)))
    for cut in (0, 1, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CorruptionError):
            codec.decode(
                np.frombuffer(payload[:cut], np.uint8) if cut else np.empty(0, np.uint8),
                raw_length=raw.size,
                itemsize=4,
                out=np.empty(raw.size, np.uint8),
            )


def test_thread_safe(codec: Codec) -> None:
    # The pool encodes and decodes different chunks at once; per-thread contexts and scratch
    # must keep them apart, and results must equal the single-threaded ones.
    chunks = [sample(torch.bfloat16, 20_000 + 1000 * i, seed=i) for i in range(16)]
    expected = [bytes(memoryview(codec.encode(c, itemsize=2))) for c in chunks]

    def work(i: int) -> bool:
        payload = bytes(memoryview(codec.encode(chunks[i], itemsize=2)))
        out = np.empty(chunks[i].size, np.uint8)
        codec.decode(np.frombuffer(payload, np.uint8), raw_length=out.size, itemsize=2, out=out)
        return payload == expected[i] and bool(np.array_equal(out, chunks[i]))

    with cf.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, list(range(16)) * 4))


def test_unknown_descriptor() -> None:
    with pytest.raises(CodecError, match="unknown codec descriptor 'nope/1'"):
        get_codec("nope/1")
