"""Async save (issue 3, scenario b): time blocked (the training stall) and total, vs dcp.async_save.

``ss.async_save`` against ``dcp.async_save`` (default thread-based checkpointer, default
stager) on the same state, interleaved, each into a fresh directory. *Blocked* is how long
the call takes to return on the slowest rank (what a training step waits for); *total* runs
until the checkpoint is durable (the handle's wait / the Future's result).
"""

from __future__ import annotations

from benchmarks.common.config import RunConfig
from benchmarks.common.report import ScenarioResult, bars, check, collect
from benchmarks.common.saveloop import run_saves

ENGINES = ["shardsave", "dcp"]
COLUMNS = ["case", "engine", "cold blocked s", "warm blocked median s", "warm blocked min-max s",
           "blocked x DCP", "warm total median s", "total x DCP"]


def run(cfg: RunConfig) -> ScenarioResult:
    import shardsave as ss

    records = run_saves(cfg, cfg.spec(), [f"async:{e}" for e in ENGINES], cfg.storage_options, "async")
    blocked = collect(records, "blocked_s")
    total = collect(records, "seconds")
    rows = []
    for (case, engine), s in blocked.items():
        d = blocked.get((case, "dcp"))
        tt, td = total[(case, engine)], total.get((case, "dcp"))
        rows.append({"case": case, "engine": engine, "cold blocked s": s.cold, "warm blocked median s": s.median,
                     "warm blocked min-max s": f"{s.lo:.3g}-{s.hi:.3g}" if s.lo is not None else "-",
                     "blocked x DCP": s.median / d.median if d and d.median and s.median is not None else None,
                     "warm total median s": tt.median,
                     "total x DCP": tt.median / td.median if td and td.median and tt.median else None})
    ours = next((r for r in rows if r["engine"] == "shardsave"), None)
    note = "" if hasattr(ss, "async_save") else "ss.async_save does not exist yet in this tree"
    checks = [check("async save: blocked time x dcp.async_save (warm)", ours and ours["blocked x DCP"], "<=", 0.5,
                    note)]
    plot = {"title": "async save: time blocked (lower is better)", "xlabel": "seconds", "bars": bars(blocked)}
    return ScenarioResult("async_save", rows, checks, records, COLUMNS, {"plot": plot})
