"""Chunk grids: bounded size, exact tiling, and overlap queries that hit only what is needed."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardsave.plan.chunking import chunk_shape, chunks_of, chunks_overlapping
from shardsave.plan.layout import intersect

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


@settings(deadline=None, max_examples=300)
@given(shapes, st.sampled_from([1, 2, 4, 8]), st.integers(1, 300))
def test_chunks_tile_the_piece_and_stay_bounded(shape: tuple[int, ...], itemsize: int, budget: int) -> None:
    covered = torch.zeros(shape, dtype=torch.int64)
    for _cid, (offs, sizes) in chunks_of(shape, itemsize, budget):
        if math.prod(shape):
            # A chunk exceeds the budget only when one element already does.
            assert math.prod(sizes) * itemsize <= max(budget, itemsize)
        covered[tuple(slice(o, o + n) for o, n in zip(offs, sizes))] += 1
    assert bool((covered == 1).all())


@settings(deadline=None, max_examples=300)
@given(shapes.filter(lambda s: len(s) > 0 and math.prod(s) > 0), st.sampled_from([1, 2, 4]),
       st.integers(1, 100), st.data())
def test_overlap_returns_exactly_the_chunks_hit(shape: tuple[int, ...], itemsize: int, budget: int,
                                                data: st.DataObject) -> None:
    offs = tuple(data.draw(st.integers(0, s - 1)) for s in shape)
    sizes = tuple(data.draw(st.integers(1, s - o)) for s, o in zip(shape, offs))
    region = (offs, sizes)
    hit = dict(chunks_overlapping(shape, itemsize, budget, region))
    want = {cid: box for cid, box in chunks_of(shape, itemsize, budget) if intersect(box, region)}
    assert hit == want


def test_chunk_shape_prefers_whole_rows() -> None:
    assert chunk_shape((1000, 1000), 4, 1 << 20) == (262, 1000)
    assert chunk_shape((4, 1 << 20), 4, 1 << 20) == (1, 262144)
    assert chunk_shape((), 4, 16) == ()
    assert chunk_shape((0, 5), 4, 16) == (0, 5)
