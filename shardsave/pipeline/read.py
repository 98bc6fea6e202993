"""One rank's read path: fetch tables of contents, fetch only the chunk byte ranges the
plan needs (adjacent ranges merged into one request), verify each chunk's checksum,
decode it (bounded by its declared raw size) and copy the overlaps into the targets.

Reads go out in batches of about ``knobs.read_batch_bytes()`` so a load's extra memory
stays bounded; decoding and copying run in a thread pool (zstandard and torch copies
release the GIL).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from shardsave import knobs
from shardsave.codec import checksum, decode_chunk
from shardsave.errors import CorruptionError, FormatError
from shardsave.format.dtypes import torch_dtype
from shardsave.format.index import CheckpointInfo, FileInfo
from shardsave.format.toc import TocLookup, decode_toc
from shardsave.plan.load_plan import ChunkRead
from shardsave.storage import Storage


def _slices(box: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(*box))


def load_tocs(storage: Storage, files: Sequence[FileInfo]) -> dict[int, TocLookup]:
    """Fetch and parse the tables of contents of ``files`` (one ranged read each), by rank."""
    blobs = storage.read_ranges([(f.name, f.toc_offset, f.toc_offset + f.toc_length) for f in files])
    out: dict[int, TocLookup] = {}
    for f, blob in zip(files, blobs):
        if checksum(blob) != f.toc_checksum:
            raise CorruptionError(
                f"{storage.full_path(f.name)}: table of contents fails its checksum; the file is corrupt "
                "(run `ss.verify` on the checkpoint)"
            )
        out[f.rank] = TocLookup(decode_toc(blob, file=storage.full_path(f.name), file_size=f.size),
                                file=storage.full_path(f.name))
    return out


def _chunk_key(info: CheckpointInfo, cr: ChunkRead) -> str:
    return f"key {info.entries[cr.entry].key!r} (piece {cr.piece}, chunk {cr.chunk})"


def execute_reads(
    storage: Storage,
    info: CheckpointInfo,
    reads: list[ChunkRead],
    targets: Sequence[torch.Tensor],
    dtypes: Sequence[str],
) -> None:
    """Fetch, verify, decode and scatter ``reads`` into ``targets`` (local tensors, by target id)."""
    if not reads:
        return
    files = {cr.rank for cr in reads}
    tocs = load_tocs(storage, [info.file_of_rank(r) for r in sorted(files)])
    located: list[tuple[ChunkRead, np.void, FileInfo]] = []
    for cr in reads:
        f = info.file_of_rank(cr.rank)
        row = tocs[cr.rank].find(cr.entry, cr.piece, cr.chunk)
        if row is None:
            raise CorruptionError(f"{storage.full_path(f.name)}: {_chunk_key(info, cr)} is missing from the file")
        located.append((cr, row, f))
    located.sort(key=lambda t: (t[2].rank, int(t[1]["offset"])))

    budget = knobs.read_batch_bytes()
    with cf.ThreadPoolExecutor(knobs.io_threads(), thread_name_prefix="shardsave-decode") as pool:
        batch: list[tuple[ChunkRead, np.void, FileInfo]] = []
        size = 0
        futures: list[cf.Future[None]] = []
        for item in located:
            batch.append(item)
            size += int(item[1]["length"])
            if size >= budget:
                futures += _run_batch(storage, info, batch, targets, dtypes, pool)
                _wait(futures)
                futures = []
                batch, size = [], 0
        if batch:
            futures += _run_batch(storage, info, batch, targets, dtypes, pool)
        _wait(futures)


def _wait(futures: list[cf.Future[None]]) -> None:
    for fut in futures:
        fut.result()


def _run_batch(
    storage: Storage,
    info: CheckpointInfo,
    batch: list[tuple[ChunkRead, np.void, FileInfo]],
    targets: Sequence[torch.Tensor],
    dtypes: Sequence[str],
    pool: cf.ThreadPoolExecutor,
) -> list[cf.Future[None]]:
    # Merge neighbouring ranges of one file into one request: fewer round trips on object
    # stores, and the surplus bytes in a small gap cost less than another request.
    gap = knobs.read_coalesce_gap()
    spans: list[list[tuple[ChunkRead, np.void, FileInfo]]] = []
    for item in batch:
        if spans:
            last = spans[-1][-1]
            end = int(last[1]["offset"]) + int(last[1]["length"])
            if last[2].rank == item[2].rank and int(item[1]["offset"]) - end <= gap:
                spans[-1].append(item)
                continue
        spans.append([item])
    requests = [
        (s[0][2].name, int(s[0][1]["offset"]), int(s[-1][1]["offset"]) + int(s[-1][1]["length"])) for s in spans
    ]
    blobs = storage.read_ranges(requests)
    futures: list[cf.Future[None]] = []
    for span, blob, (_, start, _) in zip(spans, blobs, requests):
        view = memoryview(blob)
        for cr, row, f in span:
            off = int(row["offset"]) - start
            payload = view[off : off + int(row["length"])]
            futures.append(pool.submit(_decode_and_copy, storage, info, cr, row, f, payload, targets, dtypes))
    return futures


def _decode_and_copy(
    storage: Storage,
    info: CheckpointInfo,
    cr: ChunkRead,
    row: np.void,
    f: FileInfo,
    payload: memoryview,
    targets: Sequence[torch.Tensor],
    dtypes: Sequence[str],
) -> None:
    where = f"{storage.full_path(f.name)}: {_chunk_key(info, cr)}"
    if checksum(payload) != int(row["checksum"]):
        raise CorruptionError(f"{where} fails its checksum (stored bytes are corrupt); the checkpoint cannot be "
                              "loaded -- restore it from another copy or load an earlier one")
    codec_id = int(row["codec"])
    if codec_id >= len(info.codecs):
        raise FormatError(f"{where} names codec #{codec_id}, but the index lists {len(info.codecs)} codecs")
    dtype = torch_dtype(dtypes[cr.copies[0].target])
    raw_length = int(row["raw_length"])
    numel = 1
    for s in cr.shape:
        numel *= s
    if raw_length != numel * dtype.itemsize:
        raise CorruptionError(f"{where} declares {raw_length} raw bytes, expected {numel * dtype.itemsize} "
                              f"for shape {list(cr.shape)} of {dtype}")
    out = np.empty(raw_length, dtype=np.uint8)
    decode_chunk(info.codecs[codec_id], payload, raw_length=raw_length, itemsize=dtype.itemsize, out=out)
    if raw_length:
        chunk = torch.from_numpy(out).view(dtype).reshape(cr.shape)
    else:
        chunk = torch.empty(cr.shape, dtype=dtype)
    for cp in cr.copies:
        dst = targets[cp.target]
        src = chunk[_slices(cp.src)] if cp.src[0] else chunk
        if cp.dst[0]:
            dst[_slices(cp.dst)].copy_(src)
        else:
            dst.copy_(src)
