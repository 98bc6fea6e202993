"""Planning at scale (issue 3, scenario f), simulated in one process: 16,384 ranks x 1,000 tensors.

An FSDP-style job: 1,000 bf16 weights of ~65,536 x 1,024, each ``Shard(0)`` over a 1-D mesh of
16,384 ranks. Measured, each in a fresh spawned process (so peak RSS belongs to it alone):

* save planning, what the coordinator does: ``make_rank_plan`` of one rank's 1,000 leaf
  descriptions, and ``merge_plans`` of 16,384 rank plans (ranks whose descriptions hash
  like the coordinator's send no leaf list, as in ``ss.save``); then the index is
  serialised (``index_to_json``, reported for size);
* a resharding load plan on one rank of 8,192: ``index_from_json`` of that index and
  ``plan_reads`` of the rank's share of every tensor.

Time is wall time; memory is the growth of peak RSS (VmHWM) over the step.
"""

from __future__ import annotations

import dataclasses
import time
from multiprocessing import get_context
from typing import Any

from benchmarks.common.config import RunConfig
from benchmarks.common.report import ScenarioResult, check

COLUMNS = ["step", "ranks", "tensors", "seconds", "peak extra MiB", "index MiB", "reads planned"]


def _measure(n_ranks: int, n_tensors: int) -> dict[str, Any]:
    """(spawned process) Plan a save and a resharding load; time and peak memory of each."""
    from benchmarks.common import memory
    from shardsave.format.index import (
        CheckpointInfo,
        FileInfo,
        Placement,
        index_from_json,
        index_to_json,
    )
    from shardsave.plan.load_plan import Region, plan_reads
    from shardsave.plan.save_plan import LeafMeta, ShardSpec, make_rank_plan, merge_plans

    spec = ShardSpec((n_ranks,), tuple(range(n_ranks)), (Placement("shard", dim=0),))
    metas = [LeafMeta(f"layers.{i}.w", ("layers", i, "w"), "tensor", dtype="bfloat16", shape=(65536 + i, 1024),
                      shard=spec, nbytes=2 * 1024 * (65536 + i) // n_ranks) for i in range(n_tensors)]
    out: dict[str, Any] = {}

    memory.reset_peak()
    base = memory.current()
    t0 = time.perf_counter()
    rank0 = make_rank_plan(metas)
    plans = [rank0] + [dataclasses.replace(rank0, shared=None)] * (n_ranks - 1)
    plan, failures = merge_plans(plans)
    out["save_s"] = time.perf_counter() - t0
    out["save_peak"] = memory.peak() - base
    assert plan is not None and not failures, failures
    files = tuple(FileInfo(f"data/x-r{r}.bin", r, 10**9, 0, 64, 0, n_tensors) for r in range(n_ranks))
    info = CheckpointInfo("20260101T000000-00000000", n_ranks, "now", 16 << 20, ("raw/1",), plan.meshes, files,
                          plan.entries)
    t0 = time.perf_counter()
    blob = index_to_json(info)
    out["index_s"] = time.perf_counter() - t0
    out["index_bytes"] = len(blob)
    del plans, plan, info

    load_ranks = max(1, n_ranks // 2)
    me = min(4321, load_ranks - 1)
    memory.reset_peak()
    base = memory.current()
    t0 = time.perf_counter()
    parsed = index_from_json(blob)
    requests = []
    for idx, e in enumerate(parsed.entries):
        assert e.shape is not None
        rows = -(-e.shape[0] // load_ranks)
        lo = min(me * rows, e.shape[0])
        n_rows = min(rows, e.shape[0] - lo)
        requests.append((idx, 0, [Region(((lo, 0), (n_rows, e.shape[1])), (0, 0))]))
    reads = plan_reads(parsed, requests)
    out["load_s"] = time.perf_counter() - t0
    out["load_peak"] = memory.peak() - base
    out["reads"] = len(reads)
    out["load_ranks"] = load_ranks
    return out


def run(cfg: RunConfig) -> ScenarioResult:
    n_ranks, n_tensors = (256, 50) if cfg.tiny else (16384, 1000)
    if cfg.tiny:  # a smoke run: no fresh process needed for figures nobody reads
        m = _measure(n_ranks, n_tensors)
    else:
        with get_context("spawn").Pool(1) as pool:
            m = pool.apply(_measure, (n_ranks, n_tensors))
    rows = [
        {"step": "save plan (make_rank_plan + merge_plans)", "ranks": n_ranks, "tensors": n_tensors,
         "seconds": m["save_s"], "peak extra MiB": m["save_peak"] / 2**20, "index MiB": None, "reads planned": None},
        {"step": "index_to_json (for size)", "ranks": n_ranks, "tensors": n_tensors, "seconds": m["index_s"],
         "peak extra MiB": None, "index MiB": m["index_bytes"] / 2**20, "reads planned": None},
        {"step": f"resharding load plan on 1 of {m['load_ranks']} ranks (index parse + plan_reads)",
         "ranks": n_ranks, "tensors": n_tensors, "seconds": m["load_s"], "peak extra MiB": m["load_peak"] / 2**20,
         "index MiB": None, "reads planned": m["reads"]},
    ]
    print(f"  save plan {m['save_s']:.2f} s (+{m['save_peak'] / 2**20:.0f} MiB), index "
          f"{m['index_bytes'] / 2**20:.1f} MiB, load plan {m['load_s']:.2f} s (+{m['load_peak'] / 2**20:.0f} MiB)",
          flush=True)
    note = "" if not cfg.tiny else "tiny run: 256 x 50 only"
    checks = [check(f"save planning {n_ranks} x {n_tensors}, seconds", m["save_s"], "<", 10, note),
              check(f"resharding load planning {n_ranks} x {n_tensors}, seconds", m["load_s"], "<", 10, note)]
    return ScenarioResult("planning", rows, checks, [m], COLUMNS)
