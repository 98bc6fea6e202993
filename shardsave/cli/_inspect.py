"""``shardsave ls``, ``info`` and ``verify``: reading checkpoints without loading tensors.

``info`` reports compression per key from the tables of contents (one ranged read per
data file): the index alone knows each key's raw size but not what it occupies on
storage, because the codec is chosen per chunk.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import Any

import shardsave as ss
from shardsave.cli._output import (
    human_age,
    human_bytes,
    json_safe,
    parse_time,
    print_json,
    shape_str,
    table,
)
from shardsave.convert._items import entry_raw_bytes
from shardsave.format.index import CheckpointInfo, Entry
from shardsave.gc import CheckpointDir, scan
from shardsave.load import read_index
from shardsave.pipeline.read import load_tocs
from shardsave.storage import Storage

# --------------------------------------------------------------------------- ls


def _metrics(md: Any) -> dict[str, Any]:
    m = md.get("metrics") if isinstance(md, dict) else None
    return dict(m) if isinstance(m, dict) else {}


def _ls_record(c: CheckpointDir, now: float) -> dict[str, Any]:
    created = parse_time(c.info.created_at) if c.info is not None else None
    when = created if created is not None else c.newest_mtime
    md = dict(c.info.metadata) if c.info is not None else {}
    step = c.step if c.step is not None else md.get("step") if isinstance(md.get("step"), int) else None
    status = "committed" if c.info is not None else ("unreadable" if c.committed else "partial")
    rec: dict[str, Any] = {
        "name": c.name or ".",
        "path": c.url,
        "step": step,
        "status": status,
        "size": c.size,
        "files": len(c.files),
        "created_at": c.info.created_at if c.info is not None else None,
        "age_s": None if when is None else round(now - when, 3),
        "metrics": json_safe(_metrics(md)),
    }
    if c.info is not None:
        rec.update(save_id=c.info.save_id, world_size=c.info.world_size, keys=len(c.info.entries),
                   metadata=json_safe(md))
    if c.error:
        rec["error"] = c.error
    return rec


def cmd_ls(args: argparse.Namespace) -> int:
    now = time.time()
    records = [_ls_record(c, now) for c in scan(args.root, storage_options=args.storage_options)]
    if args.json:
        print_json(records)
        return 0
    if not records:
        print(f"no checkpoints under {args.root}", file=sys.stderr)
        return 0
    rows = []
    for r in records:
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
        rows.append([r["name"], "-" if r["step"] is None else str(r["step"]), r["status"], human_bytes(r["size"]),
                     human_age(r["age_s"]), metrics or "-"])
    table(rows, ["CHECKPOINT", "STEP", "STATUS", "SIZE", "AGE", "METRICS"])
    for r in records:
        if r.get("error"):
            print(f"{r['name']}: {r['error']}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- info


def _layout(e: Entry, ckpt: CheckpointInfo) -> str:
    if e.kind == "json":
        return "-"
    if e.is_per_rank:
        return f"per-rank ({sum(v is not None for v in e.per_rank)} ranks)"
    assert e.layout is not None
    if e.layout.type == "replicated":
        return f"replicated (rank {e.layout.writer})"
    mesh = ckpt.meshes[e.layout.mesh]
    parts = [p.kind if p.kind == "replicate" else f"{p.kind}({p.dim}" + (f",{p.split_factor})" if
             p.kind == "strided_shard" else ")") for p in e.layout.placements]
    return f"{'x'.join(str(n) for n in mesh.shape)} mesh: {', '.join(parts)}"


def checkpoint_stats(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``info`` shows, as plain data."""
    storage = Storage.from_url(path, storage_options)
    ckpt = read_index(storage)
    stored: dict[int, int] = defaultdict(int)
    raw: dict[int, int] = defaultdict(int)
    chunks: dict[int, int] = defaultdict(int)
    codecs: dict[int, set[str]] = defaultdict(set)
    codec_totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for toc in load_tocs(storage, ckpt.files).values():
        rows = toc.rows
        for entry, codec, length, raw_length in zip(rows["entry"].tolist(), rows["codec"].tolist(),
                                                    rows["length"].tolist(), rows["raw_length"].tolist()):
            stored[entry] += length
            raw[entry] += raw_length
            chunks[entry] += 1
            name = ckpt.codecs[codec] if codec < len(ckpt.codecs) else f"#{codec}"
            codecs[entry].add(name)
            totals = codec_totals[name]
            totals[0] += 1
            totals[1] += raw_length
            totals[2] += length
    entries: list[dict[str, Any]] = []
    for i, e in enumerate(ckpt.entries):
        rec: dict[str, Any] = {"key": e.key, "kind": e.kind}
        if e.kind == "json":
            jt = e.json_type if not e.is_per_rank else "per-rank"
            rec.update(type=jt, value=json_safe(e.value) if not e.is_per_rank else
                       [json_safe(v.value) if v is not None else None for v in e.per_rank])
        else:
            if e.is_per_rank:
                rec.update(per_rank=[None if v is None else {"dtype": v.dtype, "shape": list(v.shape or ())}
                                     for v in e.per_rank])
            else:
                rec.update(dtype=e.dtype, shape=list(e.shape or ()))
            r, s = raw.get(i, 0), stored.get(i, 0)
            rec.update(layout=_layout(e, ckpt), raw_bytes=entry_raw_bytes(e), stored_bytes=s, chunks=chunks.get(i, 0),
                       ratio=round(r / s, 4) if s else None, codecs=sorted(codecs.get(i, ())))
        entries.append(rec)
    total_raw, total_stored = sum(raw.values()), sum(stored.values())
    return {
        "path": storage.url,
        "format_version": f"{ckpt.format_version[0]}.{ckpt.format_version[1]}",
        "save_id": ckpt.save_id,
        "created_at": ckpt.created_at,
        "world_size": ckpt.world_size,
        "chunk_bytes": ckpt.chunk_bytes,
        "raw_bytes": total_raw,
        "stored_bytes": total_stored,
        "files_bytes": ckpt.stored_bytes,
        "ratio": round(total_raw / total_stored, 4) if total_stored else None,
        "codecs": {name: {"chunks": c, "raw_bytes": r, "stored_bytes": s} for name, (c, r, s) in
                   sorted(codec_totals.items())},
        "files": [{"name": f.name, "rank": f.rank, "size": f.size, "chunks": f.chunks} for f in ckpt.files],
        "metadata": json_safe(dict(ckpt.metadata)),
        "environment": json_safe(dict(ckpt.environment)),
        "entries": entries,
    }


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def cmd_info(args: argparse.Namespace) -> int:
    st = checkpoint_stats(args.checkpoint, args.storage_options)
    if args.json:
        print_json(st)
        return 0
    import json

    created = parse_time(st["created_at"])
    age = f" ({human_age(time.time() - created)} ago)" if created is not None else ""
    out = sys.stdout
    out.write(f"checkpoint   {st['path']}\n")
    out.write(f"committed    {st['created_at']}{age}, save id {st['save_id']}, format {st['format_version']}\n")
    out.write(f"saved by     {st['world_size']} rank(s); {len(st['files'])} data file(s), "
              f"{human_bytes(st['files_bytes'])} on storage\n")
    out.write(f"size         {human_bytes(st['raw_bytes'])} raw -> {human_bytes(st['stored_bytes'])} stored "
              f"({_ratio(st['ratio'])})\n")
    for name, c in st["codecs"].items():
        r = c["raw_bytes"] / c["stored_bytes"] if c["stored_bytes"] else None
        out.write(f"codec        {name}: {c['chunks']} chunk(s), {human_bytes(c['raw_bytes'])} raw -> "
                  f"{human_bytes(c['stored_bytes'])} ({_ratio(r)})\n")
    out.write(f"metadata     {json.dumps(st['metadata'], ensure_ascii=False)}\n")
    env = st["environment"]
    out.write("environment  " + (", ".join(f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}"
                                           for k, v in env.items()) or "-") + "\n\n")
    rows = []
    for e in st["entries"]:
        if e["kind"] == "json":
            value = json.dumps(e["value"], ensure_ascii=False)
            rows.append([e["key"], "json", e["type"], value if len(value) <= 40 else value[:37] + "...", "", "", "",
                         "", ""])
            continue
        if "per_rank" in e:
            first = next((v for v in e["per_rank"] if v is not None), None)
            dtype = shape_str(first["dtype"], first["shape"]) + " per rank" if first else "-"
        else:
            dtype = shape_str(e["dtype"], e["shape"])
        rows.append([e["key"], e["kind"], dtype, e["layout"], human_bytes(e["raw_bytes"]),
                     human_bytes(e["stored_bytes"]), _ratio(e["ratio"]), str(e["chunks"]), ",".join(e["codecs"])])
    table(rows, ["KEY", "KIND", "DTYPE/SHAPE", "LAYOUT", "RAW", "STORED", "RATIO", "CHUNKS", "CODECS"])
    return 0


# --------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    report = ss.verify(args.checkpoint, storage_options=args.storage_options)
    bad_extra = bool(report.extra_files) and not args.allow_extra
    ok = report.ok and not bad_extra
    if args.json:
        print_json({"path": report.path, "ok": ok, "files_checked": report.files_checked,
                    "chunks_checked": report.chunks_checked, "bytes_checked": report.bytes_checked,
                    "problems": report.problems, "extra_files": report.extra_files,
                    "authenticated": report.authenticated})
        return 0 if ok else 1
    for p in report.problems:
        print(f"PROBLEM  {p}")
    for f in report.extra_files:
        print(f"EXTRA    {f}: not named by the index (left by a failed or interrupted save; `shardsave gc` "
              "removes it)")
    summary = (f"{report.files_checked} file(s), {report.chunks_checked} chunk(s), "
               f"{human_bytes(report.bytes_checked)} checked")
    if report.authenticated is not None:
        summary += ("; encrypted, authenticated with the key" if report.authenticated else
                    "; encrypted, checksums only (no key: pass --key-file to authenticate)")
    if ok:
        print(f"OK  {report.path}: {summary}" + (f"; {len(report.extra_files)} extra file(s) allowed"
                                                  if report.extra_files else ""))
        return 0
    what = []
    if report.problems:
        what.append(f"{len(report.problems)} problem(s)")
    if bad_extra:
        what.append(f"{len(report.extra_files)} extra file(s) (pass --allow-extra to accept them)")
    print(f"FAILED  {report.path}: {' and '.join(what)}; {summary}")
    return 1

