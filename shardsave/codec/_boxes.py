"""Decoding parts of a chunk straight into their destinations.

A load rarely wants a chunk as a whole buffer: it wants boxes of it (a row range when
``Shard(0)`` is resharded onto another world size, a column range when ``Shard(0)`` becomes
``Shard(1)``) copied into target tensors. Decoding the whole chunk into a scratch buffer and
copying the boxes out costs an extra pass over every byte, and for byte-grouped floats
interleaves bytes that no target wants. So a codec that can, moves only the boxes' bytes,
from its own stored form (raw bytes, byte streams) into the destinations directly.

A *copy* is ``(box, dst)``: ``box`` is ``(offsets, sizes)`` relative to the chunk, whose
elements lie row-major in ``shape``; ``dst`` is a writable uint8 array of shape
``(*sizes, itemsize)`` (any strides, last axis contiguous: a view into a target tensor).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from shardsave.codec import _native
from shardsave.codec._bytegroup import ungroup_into
from shardsave.codec.base import WORD_DTYPES, Box, BoxCopy, U8Array, box_slices

# Rows per block of the N-D copies: about this many destination bytes, so that a block stays
# in L2 while each byte stream writes its bytes into it.
_BLOCK_BYTES = 256 * 1024


def flat_range(shape: Sequence[int], box: Box) -> tuple[int, int] | None:
    """The element range ``[lo, hi)`` a box covers in row-major order, or None if the box
    is not one contiguous run (it is when every dimension after its first non-unit one is
    full)."""
    offs, sizes = box
    if not shape:
        return (0, 1)
    if math.prod(sizes) == 0:
        return (0, 0)
    d = next((i for i, n in enumerate(sizes) if n != 1), len(sizes) - 1)
    if any(sizes[i] != shape[i] for i in range(d + 1, len(shape))):
        return None
    lo = 0
    for o, s in zip(offs, shape):
        lo = lo * s + o
    return lo, lo + math.prod(sizes)


def _row_blocks(box: Box, row_bytes: int) -> Iterator[tuple[Box, slice]]:
    """``box`` cut along its first dimension into blocks of about ``_BLOCK_BYTES``."""
    offs, sizes = box
    if not sizes or sizes[0] <= 1:
        yield box, slice(None)
        return
    step = max(1, _BLOCK_BYTES // max(1, row_bytes))
    for start in range(0, sizes[0], step):
        n = min(step, sizes[0] - start)
        yield ((offs[0] + start, *offs[1:]), (n, *sizes[1:])), slice(start, start + n)


def copy_boxes(raw: U8Array, shape: Sequence[int], itemsize: int, copies: Sequence[BoxCopy]) -> None:
    """Copy boxes of a decoded chunk (``raw``: its bytes, row-major) into their destinations."""
    elements = raw.reshape(*shape, itemsize)
    for box, dst in copies:
        if math.prod(box[1]) == 0:
            continue
        np.copyto(dst, elements[box_slices(box)])


def ungroup_boxes(streams: Sequence[U8Array], shape: Sequence[int], itemsize: int,
                  copies: Sequence[BoxCopy]) -> None:
    """Interleave the elements of each box from the chunk's ``itemsize`` byte streams (each
    one byte per element, row-major) into its destination: only the boxes' bytes move."""
    k = itemsize
    for box, dst in copies:
        count = math.prod(box[1])
        if count == 0:
            continue
        run = flat_range(shape, box)
        if run is not None and dst.flags.c_contiguous:
            lo, hi = run
            ungroup_into([s[lo:hi] for s in streams], dst.reshape(-1), k)
            continue
        if len(shape) == 2 and _native.ungroup_box(streams, k, box[0][0] * shape[1] + box[0][1], shape[1], dst):
            continue
        planes = [s.reshape(shape) for s in streams]
        row_bytes = k * count // max(1, box[1][0]) if box[1] else k
        for sub, rows in _row_blocks(box, row_bytes):
            part = dst[rows] if box[1] else dst
            where = box_slices(sub)
            if k == 2:  # shifts on the word view, as ``ungroup_into`` does
                words = part.view(np.uint16)[..., 0]
                np.left_shift(planes[1][where], 8, out=words, dtype=np.uint16)
                np.bitwise_or(words, planes[0][where], out=words)
                continue
            first = 0
            if k in WORD_DTYPES:  # stream 0 widened into the words writes every byte in one pass
                np.copyto(part.view(WORD_DTYPES[k])[..., 0], planes[0][where], casting="unsafe")
                first = 1
            for j in range(first, k):
                np.copyto(part[..., j], planes[j][where])
