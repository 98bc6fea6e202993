"""Peak host memory during a save (issue 3, scenario g).

On every rank the peak RSS (VmHWM) is reset through ``/proc/self/clear_refs`` right before
the save and read right after it returns (async: after the checkpoint is durable); the
growth over the RSS before the save is the extra memory the save needed at its worst
moment. Reported: the largest growth over ranks, as a fraction of that rank's own share of
the state. The cold (first) save shows buffers that stay allocated afterwards (an async
save's staging copy of the state, kept for reuse); warm saves show what each save adds. Sync: shardsave (default codec and raw), DCP, torch.save; async: shardsave and
DCP (thread mode, so its staging copy is in the rank's own RSS).
"""

from __future__ import annotations

from benchmarks.common.config import RunConfig
from benchmarks.common.report import ScenarioResult, bars, check, collect
from benchmarks.common.saveloop import run_saves

COLUMNS = ["mode", "case", "engine", "cold peak extra MiB/rank", "cold x state/rank", "warm median MiB/rank",
           "warm x state/rank"]


def run(cfg: RunConfig) -> ScenarioResult:
    mcfg = cfg.with_(reps=min(cfg.reps, 2))
    names = ["shardsave", "shardsave[raw]", "dcp", "torch.save", "async:shardsave", "async:dcp"]
    print("[memory] sync and async, interleaved", flush=True)
    records = run_saves(mcfg, mcfg.spec(), names, cfg.storage_options, "mem")
    for r in records:
        r["case"] = f"{r['mode']}: {r['case']}"
    mib = collect(records, "peak_extra_bytes")
    frac = collect(records, "peak_extra_frac")
    rows = []
    for (case, engine), s in mib.items():
        rows.append({"mode": case.split(":")[0], "case": case.split(": ", 1)[1], "engine": engine,
                     "cold peak extra MiB/rank": (s.cold or 0) / 2**20,
                     "warm median MiB/rank": (s.median or 0) / 2**20,
                     "cold x state/rank": frac[(case, engine)].cold,
                     "warm x state/rank": frac[(case, engine)].median})
    sync = next((r for r in rows if r["mode"] == "sync" and r["engine"] == "shardsave"), None)
    asy = next((r for r in rows if r["mode"] == "async" and r["engine"] == "shardsave"), None)
    checks = [check("peak extra host memory, sync save, x state (cold)", sync and sync["cold x state/rank"],
                    "<=", 0.25),
              check("peak extra host memory, sync save, x state (warm)", sync and sync["warm x state/rank"],
                    "<=", 0.25),
              check("peak extra host memory, async save, x state (cold; no target, for reference)",
                    asy and asy["cold x state/rank"], "<=", 10.0,
                    "async keeps its staging copy between saves, so warm growth is ~0")]
    plot = {"title": "peak extra host memory per rank during save (lower is better)", "xlabel": "MiB",
            "bars": bars(mib, lambda case, v: v / 2**20)}
    return ScenarioResult("memory", rows, checks, records, COLUMNS, {"plot": plot})
