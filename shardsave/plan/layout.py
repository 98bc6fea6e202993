"""Layout arithmetic: which global region each stored piece of a sharded tensor covers.

Pure offset math on plain data (no process group), so it can be tested at 16,384
simulated ranks in one process.

A DTensor layout is a mesh shape plus one placement per mesh dimension. Following torch,
placements apply left to right; each ``shard`` cuts the *current local* extent of its
tensor dimension with ``torch.chunk`` semantics (chunk = ceil(L / n); trailing parts may
be short or empty). ``strided_shard`` (FSDP2 + TP) first cuts the local extent into
``split_factor`` parts, cuts each of those into n, and gives coordinate i the i-th part of
every one of them, concatenated.

Along one tensor dimension the mesh coordinates that cut it select a *partition*; a
partition is an ordered list of K global intervals (K = product of the split factors; one
for plain ``shard``). The rank's local tensor is those intervals concatenated. A *piece*
is one interval per dimension: a box in global coordinates that is contiguous in the
local tensor. Pieces are numbered row-major over (partition, interval) per dimension.

Of the coordinates that hold the same piece (replicated mesh dimensions), exactly one
writes it: ``(entry_index + piece_id) mod replicas``, so replicated writes spread over
ranks without any coordination.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from shardsave.format.index import Layout, Mesh, Placement

Box = tuple[tuple[int, ...], tuple[int, ...]]
"""(offsets, sizes) in global coordinates."""


@dataclass(frozen=True)
class DimCuts:
    """Every partition of one tensor dimension: ``starts[p, k]``, ``lengths[p, k]``."""

    starts: np.ndarray
    lengths: np.ndarray
    mesh_dims: tuple[int, ...]
    """Mesh dimensions cutting this tensor dim, in application order (p's mixed radix)."""
    sorted_single: bool
    """K == 1 and starts non-decreasing in p: overlap queries can binary-search."""

    @property
    def partitions(self) -> int:
        return int(self.starts.shape[0])

    @property
    def intervals(self) -> int:
        return int(self.starts.shape[1])

    @functools.cached_property
    def slot_bounds(self) -> tuple[Sequence[int], Sequence[int], Sequence[int]]:
        """Starts, ends and lengths of the flattened (partition, interval) slots, for overlap
        queries: a load asks one per target region and touches a few slots each, so a binary
        search by element access beats numpy's per-call overhead. Up to ``_LIST_SLOTS`` slots
        they are Python lists (fastest to index); beyond, the arrays themselves, since
        converting 16,384 partitions per tensor would cost more than the queries."""
        starts, lengths = self.starts.reshape(-1), self.lengths.reshape(-1)
        if starts.size <= _LIST_SLOTS:
            return starts.tolist(), (starts + lengths).tolist(), lengths.tolist()
        return _Ints(starts), _Ints(starts, lengths), _Ints(lengths)


_LIST_SLOTS = 1024


class _Ints(Sequence[int]):
    """A 1-D int array (or the sum of two) read one element at a time: what ``bisect`` needs,
    without materialising anything per query or per tensor."""

    __slots__ = ("_a", "_b")

    def __init__(self, a: np.ndarray, b: np.ndarray | None = None) -> None:
        self._a, self._b = a, b

    def __len__(self) -> int:
        return len(self._a)

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[int]: ...
    def __getitem__(self, i: int | slice) -> int | Sequence[int]:
        if isinstance(i, slice):
            raise TypeError("_Ints is read one element at a time")
        return int(self._a[i]) + (0 if self._b is None else int(self._b[i]))


def _cut(starts: np.ndarray, lengths: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map local ranges [lo, hi) through each partition's intervals.

    ``starts``/``lengths``: [P, K]; ``lo``/``hi``: [P, *extra]. Returns [P, *extra, K].
    """
    local_start = np.cumsum(lengths, axis=1) - lengths
    shape = (lengths.shape[0],) + (1,) * (lo.ndim - 1) + (lengths.shape[1],)
    ls = local_start.reshape(shape)
    st = starts.reshape(shape)
    ln = lengths.reshape(shape)
    a = np.maximum(lo[..., None], ls)
    b = np.minimum(hi[..., None], ls + ln)
    new_len = np.maximum(b - a, 0)
    # An empty result still gets the position where it would start, so starts (and ends)
    # stay non-decreasing along partitions and can be binary-searched.
    new_start = st + np.clip(a - ls, 0, ln)
    return new_start, new_len


@functools.lru_cache(maxsize=4096)
def _dim_cuts_cached(size: int, splits: tuple[tuple[int, int, int], ...]) -> DimCuts:
    starts = np.zeros((1, 1), dtype=np.int64)
    lengths = np.full((1, 1), size, dtype=np.int64)
    for _mesh_dim, n, split_factor in splits:
        total = lengths.sum(axis=1)[:, None]  # [P, 1]
        i = np.arange(n, dtype=np.int64)[None, :]  # [1, n]
        if split_factor == 1:
            c = -(-total // n)
            lo = np.minimum(i * c, total)
            hi = np.minimum((i + 1) * c, total)
            s, ln = _cut(starts, lengths, lo, hi)  # [P, n, K]
        else:
            j = np.arange(split_factor, dtype=np.int64)[None, None, :]  # [1, 1, f]
            tot = total[:, :, None]
            c1 = -(-tot // split_factor)
            part_lo = np.minimum(j * c1, tot)
            part_hi = np.minimum((j + 1) * c1, tot)
            c2 = -(-(part_hi - part_lo) // n)
            ii = i[:, :, None]
            lo = np.minimum(part_lo + ii * c2, part_hi)  # [P, n, f]
            hi = np.minimum(part_lo + (ii + 1) * c2, part_hi)
            s, ln = _cut(starts, lengths, lo, hi)  # [P, n, f, K]
        # New partition index = old * n + i (mixed radix in application order); a
        # partition's intervals are in local order (strided part j, then old interval k).
        starts = s.reshape(s.shape[0] * n, -1)
        lengths = ln.reshape(ln.shape[0] * n, -1)
    starts.setflags(write=False)
    lengths.setflags(write=False)
    single = (
        starts.shape[1] == 1
        and bool(np.all(np.diff(starts[:, 0]) >= 0))
        and bool(np.all(np.diff(starts[:, 0] + lengths[:, 0]) >= 0))
    )
    return DimCuts(starts, lengths, tuple(s[0] for s in splits), single)


def dim_splits(mesh_shape: Sequence[int], placements: Sequence[Placement], dim: int) -> tuple[tuple[int, int, int], ...]:
    """(mesh_dim, mesh size, split factor) of each placement cutting ``dim``, in order."""
    return tuple(
        (m, mesh_shape[m], p.split_factor if p.kind == "strided_shard" else 1)
        for m, p in enumerate(placements)
        if p.kind != "replicate" and p.dim == dim
    )


def dim_cuts(size: int, mesh_shape: Sequence[int], placements: Sequence[Placement], dim: int) -> DimCuts:
    return _dim_cuts_cached(size, dim_splits(mesh_shape, placements, dim))


@dataclass(frozen=True)
class ShardedLayout:
    """A sharded entry's layout resolved against its global shape (all pieces, lazily)."""

    shape: tuple[int, ...]
    mesh: Mesh
    placements: tuple[Placement, ...]

    @functools.cached_property
    def cuts(self) -> tuple[DimCuts, ...]:
        return tuple(dim_cuts(s, self.mesh.shape, self.placements, d) for d, s in enumerate(self.shape))

    @functools.cached_property
    def radix(self) -> tuple[int, ...]:
        """Per dim, the number of (partition, interval) slots: piece ids are row-major over these."""
        return tuple(c.partitions * c.intervals for c in self.cuts)

    @functools.cached_property
    def replicate_dims(self) -> tuple[int, ...]:
        return tuple(m for m, p in enumerate(self.placements) if p.kind == "replicate")

    @functools.cached_property
    def replicas(self) -> int:
        return math.prod(self.mesh.shape[m] for m in self.replicate_dims)

    def piece_id(self, slots: Sequence[int]) -> int:
        pid = 0
        for s, r in zip(slots, self.radix):
            pid = pid * r + s
        return pid

    def piece_box(self, slots: Sequence[int]) -> Box:
        offs: list[int] = []
        sizes: list[int] = []
        for c, s in zip(self.cuts, slots):
            p, k = divmod(s, c.intervals)
            offs.append(int(c.starts[p, k]))
            sizes.append(int(c.lengths[p, k]))
        return tuple(offs), tuple(sizes)

    def partition_of(self, coord: Sequence[int]) -> tuple[int, ...]:
        """Per tensor dim, the partition index that mesh coordinate ``coord`` holds."""
        out: list[int] = []
        for c in self.cuts:
            p = 0
            for m in c.mesh_dims:
                p = p * self.mesh.shape[m] + coord[m]
            out.append(p)
        return tuple(out)

    def local_pieces(self, coord: Sequence[int]) -> Iterator[tuple[tuple[int, ...], Box, tuple[int, ...]]]:
        """The pieces mesh coordinate ``coord`` holds: (slots, global box, offsets in the local tensor)."""
        parts = self.partition_of(coord)
        per_dim: list[list[tuple[int, int, int, int]]] = []  # (slot, global start, length, local start)
        for c, p in zip(self.cuts, parts):
            items = []
            local = 0
            for k in range(c.intervals):
                ln = int(c.lengths[p, k])
                # Keep an empty interval only when it is the sole one, so empty shards still
                # produce their (empty) piece and shapes stay checkable.
                if ln > 0 or c.intervals == 1:
                    items.append((p * c.intervals + k, int(c.starts[p, k]), ln, local))
                local += ln
            per_dim.append(items)
        yield from _product(per_dim)

    def local_shape(self, coord: Sequence[int]) -> tuple[int, ...]:
        parts = self.partition_of(coord)
        return tuple(int(c.lengths[p].sum()) for c, p in zip(self.cuts, parts))

    def piece_holder(self, slots: Sequence[int]) -> list[int]:
        """The mesh coordinate holding a piece, with every replicate dim at 0."""
        coord = [0] * len(self.mesh.shape)
        for c, s in zip(self.cuts, slots):
            p = s // c.intervals
            for m in reversed(c.mesh_dims):
                p, coord[m] = divmod(p, self.mesh.shape[m])
        return coord

    def writer_rank(self, entry_index: int, slots: Sequence[int]) -> int:
        """The global rank that writes a piece: replica ``(entry_index + piece_id) % replicas``."""
        coord = self.piece_holder(slots)
        r = (entry_index + self.piece_id(slots)) % self.replicas
        for m in reversed(self.replicate_dims):
            r, coord[m] = divmod(r, self.mesh.shape[m])
        flat = 0
        for m, c in enumerate(coord):
            flat = flat * self.mesh.shape[m] + c
        return self.mesh.ranks[flat]

    def overlapping(self, box: Box) -> Iterator[tuple[tuple[int, ...], Box, tuple[int, ...]]]:
        """The non-empty pieces overlapping a global box: (slots, piece box, zeros).

        Binary search per dimension where the cuts are single sorted intervals (every plain
        ``shard`` layout), a vectorised scan otherwise: never all pairs of pieces x targets.
        """
        per_dim: list[list[tuple[int, int, int, int]]] = []
        offs, sizes = box
        for c, a, n in zip(self.cuts, offs, sizes):
            if n <= 0:
                return
            b = a + n
            starts, ends, lengths = c.slot_bounds
            if c.sorted_single:
                slots = [t for t in range(bisect.bisect_right(ends, a), bisect.bisect_left(starts, b)) if lengths[t] > 0]
            else:
                flat_s, flat_l = c.starts.reshape(-1), c.lengths.reshape(-1)
                slots = np.nonzero((flat_l > 0) & (flat_s < b) & (flat_s + flat_l > a))[0].tolist()
            if not slots:
                return
            per_dim.append([(t, int(starts[t]), int(lengths[t]), 0) for t in slots])
        yield from _product(per_dim)


def _product(
    per_dim: list[list[tuple[int, int, int, int]]],
) -> Iterator[tuple[tuple[int, ...], Box, tuple[int, ...]]]:
    """Cartesian product of per-dimension (slot, start, length, local start) lists."""
    for combo in itertools.product(*per_dim):
        yield (
            tuple(c[0] for c in combo),
            (tuple(c[1] for c in combo), tuple(c[2] for c in combo)),
            tuple(c[3] for c in combo),
        )


def resolve(layout: Layout, shape: Sequence[int], meshes: Sequence[Mesh]) -> ShardedLayout:
    """The arithmetic view of a ``sharded`` layout."""
    return ShardedLayout(tuple(shape), meshes[layout.mesh], layout.placements)


def intersect(a: Box, b: Box) -> Box | None:
    """The overlap of two boxes, or None when they do not overlap (or it is empty)."""
    offs: list[int] = []
    sizes: list[int] = []
    for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1]):
        lo = max(ao, bo)
        hi = min(ao + an, bo + bn)
        if hi <= lo:
            return None
        offs.append(lo)
        sizes.append(hi - lo)
    return tuple(offs), tuple(sizes)
