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
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from shardsave import knobs
from shardsave.codec import checksum, decode_chunk
from shardsave.errors import CorruptionError, FormatError, LimitExceededError
from shardsave.format.dtypes import itemsize_of, torch_dtype
from shardsave.format.index import CheckpointInfo, FileInfo
from shardsave.format.toc import TocLookup, decode_toc
from shardsave.plan.load_plan import ChunkRead, Region, plan_reads, stored_pieces
from shardsave.storage import Storage

if TYPE_CHECKING:
    from shardsave.crypto import SaveCipher

RAW_DESCRIPTOR = "raw/1"


def _slices(box: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(*box))


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
    and the raw bytes the reads decode. Raises before the caller allocates a target if the
    index implies a chunk that no TOC lists, or one of another size: what an index
    declares is believed only as far as the data files back it.
    """
    ranks: set[int] = set()
    for entry_index, rank, regions in requests:
        for region in regions:
            ranks.update(r for _, _, r in stored_pieces(info, entry_index, region.box, rank))
    tocs = load_tocs(storage, [info.file_of_rank(r) for r in sorted(ranks)], cipher=cipher)
    reads = plan_reads(info, requests, max_reads=sum(len(t.rows) for t in tocs.values()))
    total = 0
    for cr in reads:
        row = tocs[cr.rank].find(cr.entry, cr.piece, cr.chunk)
        f = info.file_of_rank(cr.rank)
        if row is None:
            raise CorruptionError(f"{storage.full_path(f.name)}: {_chunk_key(info, cr)} is missing from the file")
        e = info.entries[cr.entry]
        dtype = e.dtype if not e.is_per_rank else (e.per_rank[cr.rank].dtype if cr.rank < len(e.per_rank)
                                                   and e.per_rank[cr.rank] is not None else None)
        want = math.prod(cr.shape) * itemsize_of(dtype or "uint8")
        if int(row["raw_length"]) != want:
            raise CorruptionError(f"{storage.full_path(f.name)}: {_chunk_key(info, cr)} declares "
                                  f"{int(row['raw_length'])} raw bytes, the index implies {want}")
        total += want
    return reads, tocs, total


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
        fields = {"entry": int(row["entry"]), "chunk": int(row["chunk"]), "piece": int(row["piece"]),
                  "raw_length": int(row["raw_length"]), "codec": int(row["codec"])}
        if descriptor == RAW_DESCRIPTOR and len(payload) == out.nbytes + _overhead():
            # A raw chunk's plaintext is the chunk itself: decrypt straight into the output.
            cipher.decrypt_chunk(payload, out=out, where=where, **fields)
            return
        payload = memoryview(cipher.decrypt_chunk(payload, where=where, **fields))
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

    budget = knobs.read_batch_bytes()
    with cf.ThreadPoolExecutor(knobs.io_threads(), thread_name_prefix="shardsave-decode") as pool:
        batch: list[tuple[ChunkRead, np.void, FileInfo]] = []
        size = 0
        futures: list[cf.Future[None]] = []
        for item in located:
            batch.append(item)
            size += int(item[1]["length"])
            if size >= budget:
                futures += _run_batch(storage, info, batch, targets, dtypes, pool, cipher)
                _wait(futures)
                futures = []
                batch, size = [], 0
        if batch:
            futures += _run_batch(storage, info, batch, targets, dtypes, pool, cipher)
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
    cipher: SaveCipher | None = None,
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
            futures.append(pool.submit(_decode_and_copy, storage, info, cr, row, f, payload, targets, dtypes,
                                       cipher))
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
    out = np.empty(raw_length, dtype=np.uint8)
    decode_stored(cipher, info.codecs[codec_id], payload, row, out=out, itemsize=dtype.itemsize, where=where)
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
