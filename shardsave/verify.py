"""``ss.verify``: check every file and every chunk of a committed checkpoint.

Without building tensors: each data file must exist with the size the index records, its
table of contents must pass its checksum and list exactly the chunks the layouts imply,
and every chunk must pass its checksum and decode to its declared size. Files under
``data/`` that the index does not name are reported as extra (left by failed saves;
``gc`` removes them).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardsave.codec import checksum, decode_chunk
from shardsave.errors import ShardsaveError
from shardsave.format.dtypes import itemsize_of
from shardsave.format.index import CheckpointInfo, Entry
from shardsave.format.names import DATA_DIR
from shardsave.load import read_index
from shardsave.pipeline.read import load_tocs
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

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok


def expected_chunks(info: CheckpointInfo) -> dict[int, set[tuple[int, int, int]]]:
    """Per file rank, every (entry, piece, chunk) the index implies it holds."""
    out: dict[int, set[tuple[int, int, int]]] = {f.rank: set() for f in info.files}
    for idx, e in enumerate(info.entries):
        for rank, piece, shape, dtype in _pieces(info, idx, e):
            if math.prod(shape) == 0:
                continue
            n = chunk_count(shape, itemsize_of(dtype), info.chunk_bytes)
            out.setdefault(rank, set()).update((idx, piece, c) for c in range(n))
    return out


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


def verify(path: str, *, storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Check every file and chunk of the checkpoint at ``path``; never raises for damage found."""
    storage = Storage.from_url(path, storage_options)
    report = VerifyReport(storage.url)
    try:
        info = read_index(storage)
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
    expected = expected_chunks(info)
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
            toc = load_tocs(storage, [f])[f.rank]
        except ShardsaveError as exc:
            report.problems.append(str(exc))
            continue
        rows = toc.rows
        have = {(int(r["entry"]), int(r["piece"]), int(r["chunk"])) for r in rows}
        want = expected.get(f.rank, set())
        if have != want:
            report.problems.append(
                f"{full}: table of contents lists {len(have)} chunks, the index implies {len(want)} "
                f"({len(want - have)} missing, {len(have - want)} unexpected)"
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
                itemsize = itemsize_of(entry.dtype) if entry is not None and entry.dtype else 1
                decode_chunk(info.codecs[codec], payload, raw_length=raw, itemsize=itemsize,
                             out=np.empty(raw, dtype=np.uint8))
                report.bytes_checked += raw
            except ShardsaveError as exc:
                report.problems.append(f"{full}: {label} chunk {int(row['chunk'])}: {exc}")
    return report
