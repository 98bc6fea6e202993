"""One rank's read path: fetch tables of contents, fetch only the chunk byte ranges the
plan needs (adjacent ranges merged into one request), verify each chunk's checksum,
decode it (bounded by its declared raw size) and copy the overlaps into the targets.

Reads go out in batches of about ``knobs.read_batch_bytes()`` so a load's extra memory
stays bounded; decoding and copying run in a thread pool (zstandard and torch copies
release the GIL).

Untrusted input: :func:`prepare_reads` reads the tables of contents *before* the caller
allocates anything, bounds planning by their row count and checks that every chunk the
index implies is listed with the size the index implies -- so a lying index fails before
a byte is allocated for it. Encrypted checkpoints (``cipher``) get every TOC's MAC and
every chunk's GCM tag checked after its checksum and before it is decoded.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import threading
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from shardsave import knobs
from shardsave.codec import BoxCopy, checksum, decode_chunk, decode_chunk_boxes
from shardsave.codec.base import box_slices
from shardsave.errors import CorruptionError, FormatError, LimitExceededError
from shardsave.format.dtypes import itemsize_of, torch_dtype
from shardsave.format.index import CheckpointInfo, FileInfo
from shardsave.format.toc import TocLookup, decode_toc
from shardsave.plan.layout import Box, ShardedLayout
from shardsave.plan.load_plan import ChunkRead, Region, plan_reads, stored_pieces
from shardsave.storage import Storage

if TYPE_CHECKING:
    from shardsave.crypto import SaveCipher

RAW_DESCRIPTOR = "raw/1"


def load_tocs(storage: Storage, files: Sequence[FileInfo], *, cipher: SaveCipher | None = None
              ) -> dict[int, TocLookup]:
    """Fetch and parse the tables of contents of ``files`` (one ranged read each), by rank.

    Each is bounded (``knobs.max_toc_bytes``) before it is read, checked against its
    checksum (and its MAC with ``cipher``) and must list as many rows as the index says.
    """
    limit = knobs.max_toc_bytes()
    for f in files:
        if f.toc_length > limit:
            raise LimitExceededError(
                f"{storage.full_path(f.name)}: the index declares a {f.toc_length}-byte table of contents, over "
                f"the limit of {limit}; if the checkpoint is genuine, raise SHARDSAVE_MAX_TOC_BYTES"
            )
    blobs = storage.read_ranges([(f.name, f.toc_offset, f.toc_offset + f.toc_length) for f in files])
    out: dict[int, TocLookup] = {}
    for f, blob in zip(files, blobs):
        where = storage.full_path(f.name)
        if checksum(blob) != f.toc_checksum:
            raise CorruptionError(
                f"{where}: table of contents fails its checksum; the file is corrupt "
                "(run `ss.verify` on the checkpoint)"
            )
        if cipher is not None:
            cipher.check_toc(f.rank, blob, f.toc_mac, where)
        rows = decode_toc(blob, file=where, file_size=f.size)
        if len(rows) != f.chunks:
            raise FormatError(f"{where}: table of contents lists {len(rows)} chunks, the index says {f.chunks}")
        out[f.rank] = TocLookup(rows, file=where)
    return out


def prepare_reads(
    storage: Storage,
    info: CheckpointInfo,
    requests: list[tuple[int, int, list[Region]]],
    *,
    cipher: SaveCipher | None = None,
) -> tuple[list[ChunkRead], dict[int, TocLookup], int]:
    """Plan the reads of ``requests`` (as for ``plan_reads``) against the tables of contents.

    Returns the reads, the TOCs of the files they touch (pass them to :func:`execute_reads`)
    and the bytes the requests cover. Raises before the caller allocates a target if the
    index implies a chunk that no TOC lists, or one of another size, or if the chunks do
    not cover every requested element (a forged layout must not leave a target's memory
    uninitialised): what an index declares is believed only as far as the data files back it.
    """
    ranks: set[int] = set()
    layouts: dict[int, ShardedLayout] = {}
    pieces: dict[tuple[int, int, Box], list[tuple[int, Box, int]]] = {}
    for entry_index, rank, regions in requests:
        for region in regions:
            found = pieces[(entry_index, rank, region.box)] = stored_pieces(
                info, entry_index, region.box, rank, layouts)
            ranks.update(r for _, _, r in found)
    tocs = load_tocs(storage, [info.file_of_rank(r) for r in sorted(ranks)], cipher=cipher)
    reads = plan_reads(info, requests, max_reads=sum(len(t.rows) for t in tocs.values()), layouts=layouts,
                       pieces=pieces)
    covered = 0
    for cr in reads:
        row = tocs[cr.rank].find(cr.entry, cr.piece, cr.chunk)
        f = info.file_of_rank(cr.rank)
        if row is None:
            raise CorruptionError(f"{storage.full_path(f.name)}: {_chunk_key(info, cr)} is missing from the file")
        itemsize = itemsize_of(_stored_dtype(info, cr.entry, cr.rank))
        want = math.prod(cr.shape) * itemsize
        if int(row["raw_length"]) != want:
            raise CorruptionError(f"{storage.full_path(f.name)}: {_chunk_key(info, cr)} declares "
                                  f"{int(row['raw_length'])} raw bytes, the index implies {want}")
        covered += sum(math.prod(cp.dst[1]) for cp in cr.copies) * itemsize
    requested = sum(math.prod(region.box[1]) * itemsize_of(_stored_dtype(info, entry_index, rank))
                    for entry_index, rank, regions in requests for region in regions)
    if covered != requested:
        raise FormatError(f"{info.path or 'index.json'}: the stored pieces cover {covered} of the {requested} bytes "
                          "requested; the index's layouts are corrupt or forged")
    return reads, tocs, covered


def _stored_dtype(info: CheckpointInfo, entry_index: int, rank: int) -> str:
    e = info.entries[entry_index]
    if e.is_per_rank:
        rv = e.per_rank[rank] if rank < len(e.per_rank) else None
        return rv.dtype if rv is not None and rv.dtype is not None else "uint8"
    return e.dtype or "uint8"


def decode_stored(
    cipher: SaveCipher | None,
    descriptor: str,
    payload: memoryview | bytes,
    row: np.void,
    *,
    out: np.ndarray,
    itemsize: int,
    where: str,
) -> None:
    """Decode one stored chunk (its checksum already verified) into ``out``: decrypt and
    authenticate it first when the checkpoint is encrypted (the TOC row gives its place)."""
    if cipher is not None:
        # A raw chunk's plaintext is the chunk itself: decrypt straight into the output.
        direct = descriptor == RAW_DESCRIPTOR and len(payload) == out.nbytes + _overhead()
        plain = cipher.decrypt_chunk(payload, entry=int(row["entry"]), chunk=int(row["chunk"]),
                                     piece=int(row["piece"]), raw_length=int(row["raw_length"]),
                                     codec=int(row["codec"]), out=out if direct else None, where=where)
        if direct:
            return
        payload = plain.data
    decode_chunk(descriptor, payload, raw_length=out.nbytes, itemsize=itemsize, out=out)


def _overhead() -> int:
    from shardsave.crypto import OVERHEAD

    return OVERHEAD


def _chunk_key(info: CheckpointInfo, cr: ChunkRead) -> str:
    return f"key {info.entries[cr.entry].key!r} (piece {cr.piece}, chunk {cr.chunk})"


def execute_reads(
    storage: Storage,
    info: CheckpointInfo,
    reads: list[ChunkRead],
    targets: Sequence[torch.Tensor],
    dtypes: Sequence[str],
    *,
    tocs: dict[int, TocLookup] | None = None,
    cipher: SaveCipher | None = None,
) -> None:
    """Fetch, verify, decode and scatter ``reads`` into ``targets`` (local tensors, by target id).

    ``tocs``: the tables of contents from :func:`prepare_reads` (fetched here if None);
    ``cipher``: the save's keys, for an encrypted checkpoint.
    """
    if not reads:
        return
    files = {cr.rank for cr in reads}
    if tocs is None or not files <= set(tocs):
        tocs = load_tocs(storage, [info.file_of_rank(r) for r in sorted(files)], cipher=cipher)
    located: list[tuple[ChunkRead, np.void, FileInfo]] = []
    for cr in reads:
        f = info.file_of_rank(cr.rank)
        row = tocs[cr.rank].find(cr.entry, cr.piece, cr.chunk)
        if row is None:
            raise CorruptionError(f"{storage.full_path(f.name)}: {_chunk_key(info, cr)} is missing from the file")
        located.append((cr, row, f))
    located.sort(key=lambda t: (t[2].rank, int(t[1]["offset"])))

    # Batches overlap: the fetch thread reads up to ``ahead`` batches ahead of the one the
    # decoder threads are given, back to back, so the storage never waits for the decoders
    # to finish a batch (nor for this thread to wake up and ask for the next one), and the
    # decoders never wait at a batch boundary while the storage keeps up. Each batch is a
    # share of the budget, so a load's extra memory stays within
    # ``knobs.read_batch_bytes()`` (local files are mapped, and their pages are the page
    # cache's).
    ahead = 2
    budget = max(1, knobs.read_batch_bytes(local=storage.is_local) // (ahead + 2))
    batches: list[list[tuple[ChunkRead, np.void, FileInfo]]] = [[]]
    size = 0
    for item in located:
        if size >= budget:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += int(item[1]["length"])
    with cf.ThreadPoolExecutor(knobs.io_threads(), thread_name_prefix="shardsave-decode") as pool, \
            cf.ThreadPoolExecutor(1, thread_name_prefix="shardsave-fetch") as fetcher:
        fetches = deque(fetcher.submit(_fetch, storage, b) for b in batches[:ahead])
        # Plain checkpoints decode straight into the targets' memory; encrypted ones never put
        # unauthenticated bytes into a target, so they go via scratch.
        views = _byte_views(targets, dtypes) if cipher is None else [None] * len(targets)
        queued: list[cf.Future[None]] = []
        for i in range(len(batches)):
            spans, blobs = fetches.popleft().result()
            if i + ahead < len(batches):
                fetches.append(fetcher.submit(_fetch, storage, batches[i + ahead]))
            futures = _submit_decodes(storage, info, spans, blobs, targets, views, dtypes, pool, cipher)
            del spans, blobs
            _wait(queued)
            queued = futures
        _wait(queued)


def _wait(futures: list[cf.Future[None]]) -> None:
    for fut in futures:
        fut.result()


Span = list[tuple[ChunkRead, np.void, FileInfo]]


def _fetch(storage: Storage, batch: Span) -> tuple[list[tuple[Span, int]], list[bytes | memoryview]]:
    """Read one batch: its chunks as spans of neighbouring ranges, one request per span."""
    # Merge neighbouring ranges of one file into one request: fewer round trips on object
    # stores, and the surplus bytes in a small gap cost less than another request.
    gap = knobs.read_coalesce_gap()
    spans: list[Span] = []
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
    blobs = storage.map_ranges(requests)
    return [(span, start) for span, (_, start, _) in zip(spans, requests)], blobs


def _submit_decodes(
    storage: Storage,
    info: CheckpointInfo,
    spans: list[tuple[Span, int]],
    blobs: list[bytes | memoryview],
    targets: Sequence[torch.Tensor],
    views: Sequence[np.ndarray | None],
    dtypes: Sequence[str],
    pool: cf.ThreadPoolExecutor,
    cipher: SaveCipher | None = None,
) -> list[cf.Future[None]]:
    futures: list[cf.Future[None]] = []
    for (span, start), blob in zip(spans, blobs):
        view = memoryview(blob)
        for cr, row, f in span:
            off = int(row["offset"]) - start
            payload = view[off : off + int(row["length"])]
            futures.append(pool.submit(_decode_and_copy, storage, info, cr, row, f, payload, targets, views,
                                       dtypes, cipher))
    return futures


class _Scratch(threading.local):
    buf: np.ndarray | None = None


_scratch = _Scratch()


def _scratch_bytes(n: int) -> np.ndarray:
    """A per-thread decode buffer, reused: a fresh multi-MiB allocation per chunk costs a page
    fault per 4 KiB (writes into fresh memory run at ~0.5 GB/s on the reference machine)."""
    buf = _scratch.buf
    if buf is None or buf.size < n:
        buf = np.empty(max(n, knobs.chunk_bytes()), dtype=np.uint8)
        _scratch.buf = buf
    return buf[:n]


def _byte_views(targets: Sequence[torch.Tensor], dtypes: Sequence[str]) -> list[np.ndarray | None]:
    """Each target as a uint8 array of shape ``(*shape, itemsize)`` over its own memory, for
    decoding chunks straight into it; None where that cannot be (not a CPU tensor of the
    stored dtype, conjugated or negated, or a last dimension that is not contiguous). Made
    once per load: per chunk, a destination is then a numpy slice, not a tensor index and a
    conversion (which cost ~0.1 s per GiB loaded, under the GIL, in the decode threads)."""
    out: list[np.ndarray | None] = []
    for t, stored in zip(targets, dtypes):
        dtype = torch_dtype(stored)
        view = None
        if t.dtype == dtype and t.device.type == "cpu" and not t.is_conj() and not t.is_neg():
            try:
                view = t.detach().reshape(1).view(torch.uint8).numpy() if t.dim() == 0 \
                    else t.detach().view(torch.uint8).numpy()  # needs a unit last stride
                view = view.view()
                view.shape = (*t.shape, dtype.itemsize)  # a view or an error, never a copy
            except (RuntimeError, AttributeError, TypeError):
                view = None
        out.append(view)
    return out


def _box_destinations(cr: ChunkRead, views: Sequence[np.ndarray | None]) -> list[BoxCopy] | None:
    """Each copy of ``cr`` as ``(box in the chunk, uint8 view of its target region)``, for
    decoding straight into the targets; None unless every target has a byte view. Saves a
    scratch buffer and a copy per chunk, and for byte-grouped floats only the elements a
    target wants are interleaved."""
    out: list[BoxCopy] = []
    for cp in cr.copies:
        view = views[cp.target]
        if view is None:
            return None
        if 0 in cp.src[1]:
            continue
        out.append(((tuple(cp.src[0]), tuple(cp.src[1])), view[box_slices(cp.dst)] if cp.dst[0] else view))
    return out


def _decode_and_copy(
    storage: Storage,
    info: CheckpointInfo,
    cr: ChunkRead,
    row: np.void,
    f: FileInfo,
    payload: memoryview,
    targets: Sequence[torch.Tensor],
    views: Sequence[np.ndarray | None],
    dtypes: Sequence[str],
    cipher: SaveCipher | None = None,
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
    boxes = _box_destinations(cr, views)
    if boxes is not None:
        try:
            decode_chunk_boxes(info.codecs[codec_id], payload, raw_length=raw_length, itemsize=dtype.itemsize,
                               shape=tuple(cr.shape), copies=boxes)
        except CorruptionError as exc:
            raise CorruptionError(f"{where}: {exc}") from exc
        return
    out = _scratch_bytes(raw_length)
    decode_stored(cipher, info.codecs[codec_id], payload, row, out=out, itemsize=dtype.itemsize, where=where)
    if raw_length:
        chunk = torch.from_numpy(out).view(dtype).reshape(cr.shape)
    else:
        chunk = torch.empty(cr.shape, dtype=dtype)
    for cp in cr.copies:
        dst = targets[cp.target]
        src = chunk[box_slices(cp.src)] if cp.src[0] else chunk
        if cp.dst[0]:
            dst[box_slices(cp.dst)].copy_(src)
        else:
            dst.copy_(src)
