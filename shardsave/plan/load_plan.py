"""Load planning: which stored chunks overlap what a rank needs, and where each overlap goes.

(each rank, independently) for every target region -- a box of the global tensor that is
contiguous in the rank's local tensor -- find the stored pieces overlapping it (binary
search per dimension, ``plan.layout``), the chunks of each piece overlapping it (pure
grid arithmetic, ``plan.chunking``) and the file holding each piece. No all-pairs
comparison of stored and requested chunks anywhere.

Pure: the checkpoint's index and the targets' geometry in, a list of chunk reads out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardsave.errors import FormatError
from shardsave.format.dtypes import itemsize_of
from shardsave.format.index import CheckpointInfo, Entry
from shardsave.plan.chunking import chunks_overlapping
from shardsave.plan.layout import Box, ShardedLayout, intersect, resolve


@dataclass(frozen=True)
class Region:
    """A box of the global tensor that sits contiguously in the target at ``local`` offsets."""

    box: Box
    local: tuple[int, ...]


@dataclass(frozen=True)
class Copy:
    """Copy ``src`` (relative to the decoded chunk) into ``dst`` (relative to target ``target``)."""

    target: int
    src: Box
    dst: Box


@dataclass
class ChunkRead:
    """One stored chunk to fetch, verify, decode, and scatter into targets."""

    entry: int
    piece: int
    chunk: int
    rank: int
    """Rank whose data file holds the chunk."""
    shape: tuple[int, ...]
    copies: list[Copy] = field(default_factory=list)


def stored_pieces(info: CheckpointInfo, entry_index: int, box: Box, rank: int,
                  layouts: dict[int, ShardedLayout] | None = None) -> list[tuple[int, Box, int]]:
    """Stored pieces of an entry overlapping ``box``: (piece id, piece box, file rank).

    ``rank`` selects the saved rank's value of a per-rank entry. ``layouts`` caches the
    entries' resolved layouts across calls (one per entry, however many regions ask).
    """
    e = info.entries[entry_index]
    assert e.layout is not None
    if e.layout.type == "per_rank":
        rv = e.per_rank[rank] if rank < len(e.per_rank) else None
        if rv is None or rv.shape is None:
            return []
        return [(0, ((0,) * len(rv.shape), rv.shape), rank)]
    assert e.shape is not None
    if e.layout.type == "replicated":
        return [(0, ((0,) * len(e.shape), e.shape), e.layout.writer)]
    if e.layout.type == "boxes":  # listed one by one: a scan (writers such as DCP's cut few)
        return [(i, (off, size), w) for i, (off, size, w) in enumerate(e.layout.pieces)
                if 0 not in size and intersect((off, size), box) is not None]
    layout = layouts.get(entry_index) if layouts is not None else None
    if layout is None:
        layout = resolve(e.layout, e.shape, info.meshes)
        if layouts is not None:
            layouts[entry_index] = layout
    return [
        (layout.piece_id(slots), pbox, layout.writer_rank(entry_index, slots))
        for slots, pbox, _ in layout.overlapping(box)
    ]


def _dtype_of(e: Entry, rank: int) -> str:
    if e.is_per_rank:
        rv = e.per_rank[rank]
        assert rv is not None and rv.dtype is not None
        return rv.dtype
    assert e.dtype is not None
    return e.dtype


def plan_reads(
    info: CheckpointInfo,
    requests: list[tuple[int, int, list[Region]]],
    *,
    max_reads: int | None = None,
    layouts: dict[int, ShardedLayout] | None = None,
    pieces: dict[tuple[int, int, Box], list[tuple[int, Box, int]]] | None = None,
) -> list[ChunkRead]:
    """Chunk reads for targets given as (entry index, saved rank for per-rank entries, regions).

    Target ids in the returned copies are positions in ``requests``. ``max_reads`` bounds
    the distinct chunks planned (FormatError past it): each must be a row of some table of
    contents, so a reader that has read the tables passes their row count, and an index
    declaring absurd shapes or a tiny ``chunk_bytes`` cannot make planning run for hours.
    ``layouts`` and ``pieces`` (by entry index, rank and region box) hold what an earlier
    pass over the same requests found with :func:`stored_pieces`, so it is not found twice.
    """
    reads: dict[tuple[int, int, int, int], ChunkRead] = {}
    layouts = {} if layouts is None else layouts
    for target_id, (entry_index, rank, regions) in enumerate(requests):
        e = info.entries[entry_index]
        itemsize = itemsize_of(_dtype_of(e, rank))
        for region in regions:
            found = pieces.get((entry_index, rank, region.box)) if pieces is not None else None
            if found is None:
                found = stored_pieces(info, entry_index, region.box, rank, layouts)
            for piece, pbox, file_rank in found:
                ov = intersect(pbox, region.box) if pbox[0] else ((), ())
                if ov is None:
                    continue
                rel = (tuple(o - p for o, p in zip(ov[0], pbox[0])), ov[1])
                for cid, cbox in chunks_overlapping(pbox[1], itemsize, info.chunk_bytes, rel):
                    cglob = (tuple(p + c for p, c in zip(pbox[0], cbox[0])), cbox[1])
                    part = intersect(cglob, region.box) if cglob[0] else ((), ())
                    if part is None:
                        continue
                    src = (tuple(a - c for a, c in zip(part[0], cglob[0])), part[1])
                    dst = (tuple(a - b + lo for a, b, lo in zip(part[0], region.box[0], region.local)), part[1])
                    key = (entry_index, file_rank, piece, cid)
                    cr = reads.get(key)
                    if cr is None:
                        if max_reads is not None and len(reads) >= max_reads:
                            raise FormatError(
                                f"{info.path or 'index.json'}: the index implies more chunks than the data files' "
                                f"tables of contents list ({max_reads}); the index is corrupt or forged"
                            )
                        cr = reads[key] = ChunkRead(entry_index, piece, cid, file_rank, cbox[1])
                    cr.copies.append(Copy(target_id, src, dst))
    return list(reads.values())
