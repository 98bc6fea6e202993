"""Cutting a stored piece into chunks of bounded size.

A resharding load reads and decodes whole chunks, so chunks bound both the surplus a
load reads and the memory one decode needs. The grid is a pure function of the piece's
shape, the element size and the checkpoint's ``chunk_bytes`` (recorded in the index), so
no chunk list is stored anywhere:

* find the first dimension ``d`` whose trailing slab (``prod(shape[d+1:]) * itemsize``)
  fits in ``chunk_bytes`` (the last dimension if none does: then chunks are one element);
* the chunk shape is ``1`` on dimensions before ``d``, ``max(1, chunk_bytes // slab)``
  on ``d``, and the full extent after ``d``;
* chunks are numbered row-major over the grid, anchored at the piece's origin; the last
  chunk along each dimension may be short.

A 0-d piece, or any piece with no elements, is one chunk.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

from shardsave.plan.layout import Box


def chunk_shape(shape: Sequence[int], itemsize: int, chunk_bytes: int) -> tuple[int, ...]:
    """The chunk shape for a piece of ``shape`` (see the module docstring)."""
    if not shape or math.prod(shape) == 0:
        return tuple(shape)
    last = len(shape) - 1
    for d in range(len(shape)):
        slab = math.prod(shape[d + 1 :]) * itemsize
        if slab <= chunk_bytes or d == last:
            rows = min(shape[d], max(1, chunk_bytes // slab))
            return (1,) * d + (rows,) + tuple(shape[d + 1 :])
    raise AssertionError("unreachable")


def grid(shape: Sequence[int], chunk: Sequence[int]) -> tuple[int, ...]:
    """Number of chunks along each dimension."""
    return tuple(-(-s // c) if c else 1 for s, c in zip(shape, chunk))


def chunk_count(shape: Sequence[int], itemsize: int, chunk_bytes: int) -> int:
    return math.prod(grid(shape, chunk_shape(shape, itemsize, chunk_bytes)))


def chunk_box(shape: Sequence[int], chunk: Sequence[int], chunk_id: int) -> Box:
    """Offsets (relative to the piece) and sizes of chunk ``chunk_id``."""
    g = grid(shape, chunk)
    idx: list[int] = []
    rest = chunk_id
    for n in reversed(g):
        rest, i = divmod(rest, n)
        idx.append(i)
    idx.reverse()
    offs = tuple(i * c for i, c in zip(idx, chunk))
    sizes = tuple(min(c, s - o) for c, s, o in zip(chunk, shape, offs))
    return offs, sizes


def chunks_of(shape: Sequence[int], itemsize: int, chunk_bytes: int) -> Iterator[tuple[int, Box]]:
    """Every chunk of a piece: (chunk id, box relative to the piece)."""
    chunk = chunk_shape(shape, itemsize, chunk_bytes)
    for cid in range(math.prod(grid(shape, chunk))):
        yield cid, chunk_box(shape, chunk, cid)


def _product(ranges: list[range]) -> Iterator[tuple[int, ...]]:
    """``itertools.product`` of ranges, lazily when large: ``itertools.product`` turns each
    range into a tuple first, and an index with a forged shape or chunk size can ask for
    billions of chunks -- the caller (``plan_reads``' ``max_reads``) stops such a walk early."""
    if math.prod(len(r) for r in ranges) <= 1 << 16:
        yield from itertools.product(*ranges)
        return

    def walk(i: int, prefix: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        if i == len(ranges):
            yield prefix
            return
        for v in ranges[i]:
            yield from walk(i + 1, (*prefix, v))

    yield from walk(0, ())


def chunks_overlapping(shape: Sequence[int], itemsize: int, chunk_bytes: int, region: Box) -> Iterator[tuple[int, Box]]:
    """Chunks of a piece overlapping ``region`` (relative to the piece): O(chunks hit)."""
    chunk = chunk_shape(shape, itemsize, chunk_bytes)
    g = grid(shape, chunk)
    ranges = []
    for (o, n), c, gn in zip(zip(*region), chunk, g):
        if c == 0:
            ranges.append(range(0, 1))
        else:
            ranges.append(range(o // c, min(gn, -(-(o + n) // c))))
    for idx in _product(ranges):
        cid = 0
        for i, gn in zip(idx, g):
            cid = cid * gn + i
        yield cid, chunk_box(shape, chunk, cid)
