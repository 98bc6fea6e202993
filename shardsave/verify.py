"""``ss.verify``: check every file and every chunk of a committed checkpoint.

Without building tensors: each data file must exist with the size the index records, its
table of contents must pass its checksum and list exactly the chunks the layouts imply,
and every chunk must pass its checksum and decode to its declared size. Files under
``data/`` that the index does not name are reported as extra (left by failed saves;
``gc`` removes them).

Encrypted checkpoints: with the key, the index, every table of contents and every chunk
are authenticated too (``report.authenticated`` is True). Without it, only what needs no
key is checked -- sizes, checksums of the stored (encrypted) bytes, the chunk lists -- so
storage corruption is still found, tampering is not (``report.authenticated`` is False).

The checkpoint may be hostile: what verify materialises (the expected chunk list of a
file, decode buffers) is bounded by the table of contents actually read and by
``knobs.max_load_bytes()``, never by what the index merely declares.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardsave import knobs
from shardsave.codec import checksum
from shardsave.crypto import SaveCipher
from shardsave.errors import KeyRequiredError, ShardsaveError
from shardsave.format.dtypes import itemsize_of
from shardsave.format.index import CheckpointInfo, Entry
from shardsave.format.names import DATA_DIR
from shardsave.load import open_checkpoint, read_index
from shardsave.pipeline.read import decode_stored, load_tocs
from shardsave.plan.chunking import chunk_count
from shardsave.plan.layout import resolve
from shardsave.storage import Storage


@dataclass
class VerifyReport:
    """The outcome of ``ss.verify``: ``ok`` only when nothing at all is wrong."""

    path: str
    files_checked: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)
    authenticated: bool | None = None
    """None: a plain checkpoint. True: encrypted, and the key authenticated the index, every
    table of contents and every chunk. False: encrypted, verified without the key --
    checksums and structure only, so corruption is found but tampering is not."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok


def expected_chunks(info: CheckpointInfo) -> dict[int, set[tuple[int, int, int]]]:
    """Per file rank, every (entry, piece, chunk) the index implies it holds.

    Materialises every chunk: for trusted indexes only (``verify`` uses
    :func:`_pieces_by_rank` and materialises one file's list once its TOC backs it).
    """
    return {rank: _chunk_set(pieces) for rank, pieces in _pieces_by_rank(info).items()}


_Piece = tuple[int, int, int]  # entry index, piece id, chunk count


def _pieces_by_rank(info: CheckpointInfo) -> dict[int, list[_Piece]]:
    """Per file rank, its non-empty pieces and their chunk counts (no chunk is listed)."""
    out: dict[int, list[_Piece]] = {f.rank: [] for f in info.files}
    for idx, e in enumerate(info.entries):
        for rank, piece, shape, dtype in _pieces(info, idx, e):
            if math.prod(shape) == 0:
                continue
            n = chunk_count(shape, itemsize_of(dtype), info.chunk_bytes)
            out.setdefault(rank, []).append((idx, piece, n))
    return out


def _chunk_set(pieces: list[_Piece]) -> set[tuple[int, int, int]]:
    return {(idx, piece, c) for idx, piece, n in pieces for c in range(n)}


def _dtype_in_file(entry: Entry | None, rank: int) -> str | None:
    """The dtype of an entry's chunks in rank ``rank``'s file (per-rank values: that rank's)."""
    if entry is None:
        return None
    if entry.is_per_rank:
        rv = entry.per_rank[rank] if rank < len(entry.per_rank) else None
        return rv.dtype if rv is not None else None
    return entry.dtype


def _entry_bytes(entry: Entry | None, rank: int) -> int:
    """Bytes of the whole value a chunk of ``entry`` in rank ``rank``'s file belongs to (0: none)."""
    if entry is None:
        return 0
    if entry.is_per_rank:
        rv = entry.per_rank[rank] if rank < len(entry.per_rank) else None
        if rv is None or rv.shape is None or rv.dtype is None:
            return 0
        return math.prod(rv.shape) * itemsize_of(rv.dtype)
    if entry.shape is None or entry.dtype is None:
        return 0
    return math.prod(entry.shape) * itemsize_of(entry.dtype)


def _pieces(info: CheckpointInfo, idx: int, e: Entry) -> Any:
    if e.kind == "json" or e.layout is None:
        return
    if e.layout.type == "per_rank":
        for r, rv in enumerate(e.per_rank):
            if rv is not None and rv.shape is not None and rv.dtype is not None:
                yield r, 0, rv.shape, rv.dtype
        return
    assert e.shape is not None and e.dtype is not None
    if e.layout.type == "replicated":
        yield e.layout.writer, 0, e.shape, e.dtype
        return
    if e.layout.type == "boxes":
        for i, (_, size, writer) in enumerate(e.layout.pieces):
            yield writer, i, size, e.dtype
        return
    layout = resolve(e.layout, e.shape, info.meshes)
    per_dim = [
        [(s, int(ln)) for s, ln in enumerate(c.lengths.reshape(-1)) if ln > 0 or c.lengths.size == 1]
        for c in layout.cuts
    ]
    for combo in itertools.product(*per_dim):
        slots = [s for s, _ in combo]
        yield layout.writer_rank(idx, slots), layout.piece_id(slots), tuple(n for _, n in combo), e.dtype


def verify(path: str, *, storage_options: dict[str, Any] | None = None,
           encryption_key: bytes | None = None) -> VerifyReport:
    """Check every file and chunk of the checkpoint at ``path``; never raises for damage found.

    ``encryption_key``: authenticate an encrypted checkpoint too (see the module docstring).
    A plain checkpoint checked with a key is a problem: something expected to be encrypted
    is not.
    """
    storage = Storage.from_url(path, storage_options)
    report = VerifyReport(storage.url)
    cipher: SaveCipher | None = None
    try:
        info = read_index(storage)
        if info.encrypted or encryption_key is not None:
            try:
                info, cipher = open_checkpoint(storage, encryption_key)
                report.authenticated = True
            except KeyRequiredError:
                report.authenticated = False
    except ShardsaveError as exc:
        report.problems.append(str(exc))
        return report
    named = {f.name for f in info.files}
    try:
        present = set(storage.listdir(DATA_DIR))
    except ShardsaveError as exc:
        report.problems.append(str(exc))
        present = set()
    report.extra_files = sorted(present - named)
    try:
        expected = _pieces_by_rank(info)
    except ShardsaveError as exc:
        report.problems.append(str(exc))
        return report
    for f in info.files:
        report.files_checked += 1
        full = storage.full_path(f.name)
        try:
            size = storage.size(f.name)
        except ShardsaveError as exc:
            report.problems.append(f"{full}: missing ({exc})")
            continue
        if size != f.size:
            report.problems.append(f"{full}: {size} bytes, the index records {f.size}")
            continue
        try:
            toc = load_tocs(storage, [f], cipher=cipher)[f.rank]
        except ShardsaveError as exc:
            report.problems.append(str(exc))
            continue
        rows = toc.rows
        have = {(int(r["entry"]), int(r["piece"]), int(r["chunk"])) for r in rows}
        pieces = expected.get(f.rank, [])
        n_want = sum(n for _, _, n in pieces)
        # Materialise the expected list only when the TOC actually read backs its length.
        want = _chunk_set(pieces) if n_want == len(rows) else set()
        if n_want != len(rows) or have != want:
            report.problems.append(
                f"{full}: table of contents lists {len(have)} chunks, the index implies {n_want}"
                + (f" ({len(want - have)} missing, {len(have - want)} unexpected)" if want else "")
            )
        for row in rows:
            report.chunks_checked += 1
            start, length = int(row["offset"]), int(row["length"])
            entry = info.entries[int(row["entry"])] if int(row["entry"]) < len(info.entries) else None
            label = f"key {entry.key!r}" if entry else f"entry #{int(row['entry'])}"
            try:
                payload = storage.read_range(f.name, start, start + length)
                if checksum(payload) != int(row["checksum"]):
                    report.problems.append(f"{full}: {label} chunk {int(row['chunk'])} fails its checksum")
                    continue
                codec = int(row["codec"])
                if codec >= len(info.codecs):
                    report.problems.append(f"{full}: {label} names unknown codec #{codec}")
                    continue
                raw = int(row["raw_length"])
                dtype = _dtype_in_file(entry, f.rank)
                itemsize = itemsize_of(dtype) if dtype else 1
                bound = min(max(info.chunk_bytes, itemsize), _entry_bytes(entry, f.rank), knobs.max_load_bytes())
                if raw > bound:
                    report.problems.append(f"{full}: {label} chunk {int(row['chunk'])} declares {raw} raw bytes, "
                                           f"more than a chunk of it can hold ({bound})")
                    continue
                if info.encrypted and cipher is None:
                    report.bytes_checked += length  # no key: the checksum is all we can check
                    continue
                where = f"{full}: {label} chunk {int(row['chunk'])}"
                decode_stored(cipher, info.codecs[codec], payload, row, out=np.empty(raw, dtype=np.uint8),
                              itemsize=itemsize, where=where)
                report.bytes_checked += raw
            except ShardsaveError as exc:
                report.problems.append(f"{full}: {label} chunk {int(row['chunk'])}: {exc}")
    return report
