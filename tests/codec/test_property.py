"""Property tests: any bytes round-trip through any codec; mutated payloads never escape as
anything but a ShardsaveError."""

from __future__ import annotations

import contextlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardsave.codec import CODEC_NAMES, decode_chunk, encode_chunk
from shardsave.errors import ShardsaveError

ITEMSIZES = st.sampled_from([1, 2, 4, 8, 16])


@st.composite
def chunks(draw: st.DrawFn) -> tuple[np.ndarray, int, bool]:
    itemsize = draw(ITEMSIZES)
    kind = draw(st.sampled_from(["random", "runs", "low-entropy"]))
    n = draw(st.integers(0, 3000))
    if kind == "random":
        data = np.frombuffer(draw(st.binary(min_size=n, max_size=n)), np.uint8)
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        if kind == "runs":
            data = np.repeat(rng.integers(0, 256, max(1, n // 50), dtype=np.uint8), 50)[:n]
        else:
            data = rng.integers(0, 4, n, dtype=np.uint8) + 60
    if draw(st.booleans()):  # whole elements most of the time, ragged otherwise
        data = data[: data.size // itemsize * itemsize]
    return np.ascontiguousarray(data, dtype=np.uint8), itemsize, draw(st.booleans())


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(chunk=chunks(), codec=st.sampled_from(CODEC_NAMES))
def test_round_trip(chunk: tuple[np.ndarray, int, bool], codec: str) -> None:
    raw, itemsize, is_float = chunk
    enc = encode_chunk(raw, itemsize=itemsize, is_float=is_float, codec=codec)
    out = np.empty(raw.size, np.uint8)
    decode_chunk(enc.descriptor, enc.payload, raw_length=raw.size, itemsize=itemsize, out=out)
    assert np.array_equal(out, raw)


@st.composite
def mutations(draw: st.DrawFn, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "splice"]))
        if op in ("flip", "set") and data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = (
                data[pos] ^ (1 << draw(st.integers(0, 7)))
                if op == "flip"
                else draw(st.integers(0, 255))
            )
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif op == "splice" and data:
            start = draw(st.integers(0, len(data) - 1))
            data[start : start + 8] = draw(st.binary(min_size=0, max_size=12))
    return bytes(data)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), codec=st.sampled_from(["zstd", "zstd-shuffle", "raw"]))
def test_mutated_payloads_only_raise_shardsave_errors(data: st.DataObject, codec: str) -> None:
    itemsize = data.draw(st.sampled_from([2, 4, 8]))
    n = data.draw(st.integers(1, 400)) * itemsize
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    raw = (rng.normal(0, 0.02, n // 4 + 1).astype(np.float32).view(np.uint8)[:n]).copy()
    enc = encode_chunk(raw, itemsize=itemsize, is_float=True, codec=codec)
    bad = data.draw(mutations(bytes(memoryview(enc.payload))))
    claim = data.draw(st.sampled_from([n, n, n, 0, n - itemsize, n + itemsize, 2 * n]))
    out = np.empty(max(0, claim), np.uint8)
    # CorruptionError (or CodecError) is the contract; any other exception fails the test.
    with contextlib.suppress(ShardsaveError):
        decode_chunk(enc.descriptor, bad, raw_length=max(0, claim), itemsize=itemsize, out=out)
