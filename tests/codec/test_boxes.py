"""Decoding boxes of a chunk straight into strided destinations (``decode_chunk_boxes``):
for every codec and dtype, the bytes that land are exactly those of the decoded chunk."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shardsave.codec import decode_chunk, decode_chunk_boxes, encode_chunk
from shardsave.codec._boxes import flat_range
from shardsave.errors import CodecError, CorruptionError

from .helpers import DTYPES

pytestmark = pytest.mark.usefixtures("native")

SHAPES = [(), (1,), (37,), (12, 9), (5, 1, 7), (3, 4, 2, 5)]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = max(1, math.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if dtype.is_floating_point and dtype.itemsize >= 2:  # trained-like floats: few exponents
        raw = (torch.randn(max(1, math.prod(shape)), generator=g) * 0.02).to(dtype).view(torch.uint8)
    return raw[: math.prod(shape) * torch.empty((), dtype=dtype).element_size()].view(dtype).reshape(shape)


def _random_box(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    offs, sizes = [], []
    for s in shape:
        a = int(rng.integers(0, s + 1))
        b = int(rng.integers(a, s + 1))
        offs.append(a)
        sizes.append(b - a)
    return tuple(offs), tuple(sizes)


def _strided_dst(sizes: tuple[int, ...], itemsize: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
    """A destination view into a larger, padded buffer (rows not adjacent), the buffer, and
    where the view sits in it."""
    pad = [int(rng.integers(0, 3)) for _ in sizes]
    big = np.full((*(n + 2 * p for n, p in zip(sizes, pad)), itemsize), 0xAB, dtype=np.uint8)
    where = tuple(slice(p, p + n) for n, p in zip(sizes, pad))
    return big[where], big, where


@pytest.mark.parametrize("codec", ["raw", "zstd", "zstd-shuffle", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_boxes_equal_slices_of_the_decoded_chunk(codec: str, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(hash((codec, str(dtype))) % 2**32)
    for seed, shape in enumerate(SHAPES):
        t = _tensor(dtype, shape, seed)
        k = t.element_size()
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        enc = encode_chunk(raw, itemsize=k, is_float=dtype.is_floating_point or dtype.is_complex, codec=codec)
        payload = np.frombuffer(enc.payload, np.uint8) if not isinstance(enc.payload, np.ndarray) else enc.payload
        whole = np.empty(raw.size, np.uint8)
        decode_chunk(enc.descriptor, payload, raw_length=raw.size, itemsize=k, out=whole)
        elements = whole.reshape(*shape, k)
        boxes = [((0,) * len(shape), shape)] + [_random_box(shape, rng) for _ in range(6)]
        copies, bigs = [], []
        for box in boxes:
            dst, big, where = _strided_dst(box[1], k, rng)
            copies.append((box, dst))
            bigs.append((big, where))
        decode_chunk_boxes(enc.descriptor, payload, raw_length=raw.size, itemsize=k, shape=shape, copies=copies)
        for (box, dst), (big, where) in zip(copies, bigs):
            want = elements[tuple(slice(o, o + n) for o, n in zip(*box))]
            assert np.array_equal(dst, want), (codec, dtype, shape, box)
            outside = np.ones(big.shape[:-1], dtype=bool)
            outside[where] = False
            assert np.all(big[outside] == 0xAB), "bytes outside the destination were written"


def test_flat_range() -> None:
    assert flat_range((4, 5), ((1, 0), (2, 5))) == (5, 15)
    assert flat_range((4, 5), ((1, 2), (1, 3))) == (7, 10)
    assert flat_range((4, 5), ((1, 1), (2, 3))) is None
    assert flat_range((4, 5, 6), ((2, 3, 0), (1, 1, 6))) == (78, 84)
    assert flat_range((), ((), ())) == (0, 1)
    assert flat_range((4, 5), ((0, 0), (0, 5))) == (0, 0)


def test_bad_boxes_and_destinations_are_refused() -> None:
    raw = np.arange(48, dtype=np.uint8)
    enc = encode_chunk(raw, itemsize=4, is_float=True, codec="zstd-shuffle")
    payload = np.frombuffer(enc.payload, np.uint8) if not isinstance(enc.payload, np.ndarray) else enc.payload
    kw = {"raw_length": 48, "itemsize": 4, "shape": (3, 4)}
    with pytest.raises(CodecError, match="not inside"):
        decode_chunk_boxes(enc.descriptor, payload, copies=[(((2, 0), (2, 4)), np.empty((2, 4, 4), np.uint8))], **kw)
    with pytest.raises(CodecError, match="shape"):
        decode_chunk_boxes(enc.descriptor, payload, copies=[(((0, 0), (1, 4)), np.empty((1, 3, 4), np.uint8))], **kw)
    with pytest.raises(CodecError, match="contiguous last axis"):
        decode_chunk_boxes(enc.descriptor, payload, copies=[(((0, 0), (1, 4)), np.empty((1, 4, 8), np.uint8)[..., ::2])],
                           **kw)
    with pytest.raises(CorruptionError, match="declared"):
        decode_chunk_boxes(enc.descriptor, payload, raw_length=48, itemsize=4, shape=(2, 4), copies=[])
