"""Layout arithmetic against torch's own placement semantics, without processes.

The reference applies torch's ``Shard._split_tensor`` / ``_StridedShard._split_tensor``
left to right to a tensor of global indices, exactly as DTensor does to build local
shards; ``plan.layout`` must reproduce every coordinate's local tensor from its pieces.
"""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor.placement_types import Shard, _StridedShard

from shardsave.format.index import Mesh, Placement
from shardsave.plan.layout import ShardedLayout, intersect


def _torch_placement(p: Placement) -> object:
    if p.kind == "strided_shard":
        return _StridedShard(p.dim, split_factor=p.split_factor)
    return Shard(p.dim)


def _reference_local(full: torch.Tensor, mesh_shape: tuple[int, ...], placements: tuple[Placement, ...],
                     coord: tuple[int, ...]) -> torch.Tensor:
    local = full
    for m, p in enumerate(placements):
        if p.kind == "replicate":
            continue
        parts, _ = _torch_placement(p)._split_tensor(local, mesh_shape[m], with_padding=False)  # type: ignore[attr-defined]
        local = parts[coord[m]]
    return local


def _from_pieces(layout: ShardedLayout, full: torch.Tensor, coord: tuple[int, ...]) -> torch.Tensor:
    out = torch.full(layout.local_shape(coord), -1, dtype=full.dtype)
    for _slots, (offs, sizes), local in layout.local_pieces(coord):
        src = full[tuple(slice(o, o + n) for o, n in zip(offs, sizes))]
        out[tuple(slice(lo, lo + n) for lo, n in zip(local, sizes))] = src
    return out


placements_st = st.sampled_from(["R", "S0", "S1", "SS0"])


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], tuple[Placement, ...]]:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(0, 11)) for _ in range(ndim))
    mesh_ndim = draw(st.integers(1, 3))
    mesh_shape = tuple(draw(st.integers(1, 4)) for _ in range(mesh_ndim))
    placements: list[Placement] = []
    for m in range(mesh_ndim):
        kind = draw(placements_st)
        dim = draw(st.integers(0, ndim - 1))
        if kind == "R":
            placements.append(Placement("replicate"))
        elif kind == "SS0" and m == 0:
            placements.append(Placement("strided_shard", dim=dim, split_factor=draw(st.integers(2, 3))))
        else:
            placements.append(Placement("shard", dim=dim))
    return shape, mesh_shape, tuple(placements)


@settings(deadline=None, max_examples=200)
@given(layouts())
def test_local_pieces_reproduce_torch_local_shards(case: tuple) -> None:
    shape, mesh_shape, placements = case
    full = torch.arange(math.prod(shape)).reshape(shape)
    layout = ShardedLayout(shape, Mesh(mesh_shape, tuple(range(math.prod(mesh_shape)))), placements)
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        ref = _reference_local(full, mesh_shape, placements, coord)
        assert tuple(ref.shape) == layout.local_shape(coord)
        assert torch.equal(_from_pieces(layout, full, coord), ref)


@settings(deadline=None, max_examples=150)
@given(layouts(), st.data())
def test_pieces_tile_the_tensor_and_overlap_finds_exactly_the_intersecting(case: tuple, data: st.DataObject) -> None:
    shape, mesh_shape, placements = case
    layout = ShardedLayout(shape, Mesh(mesh_shape, tuple(range(math.prod(mesh_shape)))), placements)
    # Every element is covered by exactly one distinct piece.
    pieces: dict[int, tuple] = {}
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        for slots, box, _ in layout.local_pieces(coord):
            if 0 in box[1] and box[1]:
                continue
            pieces.setdefault(layout.piece_id(slots), box)
    covered = torch.zeros(shape, dtype=torch.int64)
    for offs, sizes in pieces.values():
        covered[tuple(slice(o, o + n) for o, n in zip(offs, sizes))] += 1
    assert bool((covered == 1).all())
    # overlapping() returns exactly the pieces that intersect a random box.
    offs = tuple(data.draw(st.integers(0, max(0, s - 1))) for s in shape)
    sizes = tuple(data.draw(st.integers(1, max(1, s - o))) if s else 0 for s, o in zip(shape, offs))
    box = (offs, sizes)
    found = {layout.piece_id(s) for s, _, _ in layout.overlapping(box)}
    expected = {pid for pid, pbox in pieces.items() if intersect(pbox, box) is not None}
    assert found == expected


def test_writer_spreads_replicated_pieces_over_replicas() -> None:
    mesh = Mesh((4, 2), tuple(range(8)))
    layout = ShardedLayout((16, 4), mesh, (Placement("replicate"), Placement("shard", dim=0)))
    writers = [layout.writer_rank(e, (p, 0)) for e in range(8) for p in range(2)]
    # Every rank writes something; each piece is written by one of its holders.
    assert set(writers) == set(range(8))
    for e in range(8):
        for p in range(2):
            assert layout.writer_rank(e, (p, 0)) % 2 == p


@pytest.mark.timeout(120)
def test_overlap_queries_scale_to_16384_ranks() -> None:
    n = 16384
    mesh = Mesh((n,), tuple(range(n)))
    layout = ShardedLayout((n * 8 + 5, 64), mesh, (Placement("shard", dim=0),))
    start = time.perf_counter()
    for r in range(0, n, 7):
        box = ((r * 8, 0), (8, 64))
        hits = list(layout.overlapping(box))
        assert 1 <= len(hits) <= 2
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("ranks", [6, 2048])  # list-backed and array-backed slot searches
def test_overlap_on_large_meshes_matches_brute_force(ranks: int) -> None:
    import random

    mesh = Mesh((ranks,), tuple(range(ranks)))
    # Uneven shards, and (for 2048) trailing ranks with empty shards: 3 * 2048 - 5 rows.
    layout = ShardedLayout((3 * ranks - 5, 4), mesh, (Placement("shard", dim=0),))
    pieces = {layout.piece_id(s): box for r in range(ranks) for s, box, _ in layout.local_pieces((r,))
              if 0 not in box[1]}
    rng = random.Random(ranks)
    rows = 3 * ranks - 5
    for _ in range(200):
        lo = rng.randrange(rows)
        box = ((lo, 1), (rng.randint(1, min(rows - lo, 40)), 2))
        found = {layout.piece_id(s): b for s, b, _ in layout.overlapping(box)}
        assert found == {pid: b for pid, b in pieces.items() if intersect(b, box) is not None}
