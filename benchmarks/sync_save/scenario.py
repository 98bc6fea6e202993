"""Sync durable save (issue 3, scenario a): logical GB/s, bytes written, ratio vs DCP.

Engines on the same state in the same run, interleaved: shardsave with the default codec
(``auto``), shardsave with ``codec="raw"`` (no compression: the pipeline alone), ``dcp.save``
(FileSystemWriter, sync_files=True) and per-rank ``torch.save`` + fsync. One run per dtype.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common.config import RunConfig
from benchmarks.common.report import ScenarioResult, bars, check, collect, paired_ratio
from benchmarks.common.saveloop import run_saves

ENGINES = ["shardsave", "shardsave[raw]", "dcp", "torch.save"]
COLUMNS = ["case", "engine", "cold s", "warm median s", "warm min-max s", "GB/s", "MiB stored",
           "speed x DCP", "speed x torch.save", "bytes x DCP"]


def summarize(name: str, records: list[dict[str, Any]], columns: list[str] = COLUMNS) -> tuple[
        list[dict[str, Any]], dict[str, Any]]:
    t = collect(records, "seconds")
    b = collect(records, "bytes")
    rows = []
    for (case, engine), s in t.items():
        dcp = t.get((case, "dcp"))
        ts = t.get((case, "torch.save"))
        bd = b.get((case, "dcp"))
        logical = next(r["logical_bytes"] for r in records if r["case"] == case)
        rows.append({
            "case": case, "engine": engine, "cold s": s.cold, "warm median s": s.median,
            "warm min-max s": f"{s.lo:.3g}-{s.hi:.3g}" if s.lo is not None else "-",
            "GB/s": logical / s.median / 1e9 if s.median else None,
            "MiB stored": b[(case, engine)].median / 2**20 if (case, engine) in b else None,
            "speed x DCP": dcp.median / s.median if dcp and dcp.median and s.median else None,
            "speed x torch.save": ts.median / s.median if ts and ts.median and s.median else None,
            "bytes x DCP": b[(case, engine)].median / bd.median if bd and bd.median else None,
            "paired speed x DCP": (1 / pr) if (pr := paired_ratio(records, "seconds", case, engine, "dcp")) else None,
        })
    logical = {r["case"]: r["logical_bytes"] for r in records}
    plot = {"title": f"{name}: logical GB/s (higher is better)", "xlabel": "GB/s",
            "bars": bars(t, lambda case, v: logical[case] / v / 1e9 if v else 0.0)}
    return rows, plot


def _row(rows: list[dict[str, Any]], dtype: str, engine: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["case"].startswith(dtype + ",") and r["engine"] == engine), None)


def run(cfg: RunConfig) -> ScenarioResult:
    records: list[dict[str, Any]] = []
    for dtype in cfg.dtypes:
        print(f"[sync_save] {dtype}", flush=True)
        records += run_saves(cfg, cfg.spec(dtype), cfg.engines(ENGINES), cfg.storage_options, "sync")
    rows, plot = summarize("sync save", records)
    checks = []
    for dtype in cfg.dtypes:
        ss, raw = _row(rows, dtype, "shardsave"), _row(rows, dtype, "shardsave[raw]")
        checks.append(check(f"sync save {dtype}, default codec, speed x DCP", ss and ss["speed x DCP"], ">=", 1.0))
        checks.append(check(f"sync save {dtype}, raw codec, speed x DCP", raw and raw["speed x DCP"], ">=", 1.3))
        bound = {"bf16": 0.72, "fp32": 0.85}.get(dtype)
        if bound:
            checks.append(check(f"bytes stored {dtype}, default codec, x DCP", ss and ss["bytes x DCP"], "<=", bound))
    return ScenarioResult("sync_save", rows, checks, records, COLUMNS, {"plot": plot})
