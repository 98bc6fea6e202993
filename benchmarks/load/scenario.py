"""Load (issue 3, scenario c): same layout and resharded, vs ``dcp.load`` (and torch.load).

Cases (``N -> M``: saved on N ranks, loaded on M):

* same layout, ``Shard(0)`` on W -> W (W = --world-size); per-rank torch.load joins here only;
* ``Shard(0)`` 2 -> 3 and 4 -> 2 (other world sizes);
* ``Shard(0)`` -> ``Shard(1)`` on W ranks (other placement, every 2-D tensor resharded).

Engines: shardsave (default codec), shardsave[raw] (saved with ``codec="raw"``: the same
load path without decompression, for reference) and DCP.

One spawn of max(N, M) over all cases runs them in turn; saving uses a sub-group of the
first N ranks and loading one of the first M (``DeviceMesh.from_group``). Each engine saves its checkpoint
once (untimed); then the loads run interleaved, rep 0 cold and 1..N warm, into
preallocated targets (zeros, pages touched: a resume loads into an existing model). Before
every load the checkpoint's files are evicted from the page cache (``posix_fadvise
DONTNEED``), so loads read the storage, as a resume after a restart does. Every engine's
cold load is checked bitwise against the trained tensors.
"""

from __future__ import annotations

import time
from typing import Any

import torch.distributed as dist

from benchmarks.common.config import RunConfig, rotate
from benchmarks.common.engines import evict_page_cache, remove
from benchmarks.common.launch import launch
from benchmarks.common.report import ScenarioResult, bars, check, collect
from benchmarks.common.saveloop import make_engine
from benchmarks.common.state import DataSpec, barrier, check_equal, global_bytes, sharded_state

COLUMNS = ["case", "engine", "cold s", "warm median s", "warm min-max s", "GB/s", "speed x DCP",
           "speed x torch.load", "bitwise ok"]


def _zero(state: dict[str, Any]) -> None:
    from torch.distributed.tensor import DTensor

    for v in state.values():
        if isinstance(v, DTensor):
            v.to_local().zero_()


def _load_rank(cfg: RunConfig, spec: DataSpec, all_cases: list[tuple[str, int, int, int, int, list[str]]]
               ) -> list[dict[str, Any]]:
    """(every rank) Every case in turn, on sub-groups of one world (spawning costs seconds)."""
    records: list[dict[str, Any]] = []
    for case, n_save, n_load, sd, ld, names in all_cases:
        if dist.get_rank() == 0:
            print(f"[load] {case}", flush=True)
        records += _load_case(cfg, spec, n_save, n_load, sd, ld, names, case)
    return records


def _load_case(cfg: RunConfig, spec: DataSpec, n_save: int, n_load: int, save_dim: int, load_dim: int,
               names: list[str], case: str) -> list[dict[str, Any]]:
    from torch.distributed.device_mesh import DeviceMesh

    rank, ws = dist.get_rank(), dist.get_world_size()
    # new_group is collective over the whole world: every rank calls it, in the same order.
    save_pg = dist.new_group(list(range(n_save))) if n_save < ws else dist.group.WORLD
    load_pg = dist.new_group(list(range(n_load))) if n_load < ws else dist.group.WORLD
    engines = [make_engine(n, cfg.storage_options) for n in names]
    urls = {e.name: cfg.url(f"load-{case}-{e.name}".replace(" ", "_").replace(">", "").replace("(", "")
                            .replace(")", "")) for e in engines}
    logical = 0
    if rank < n_save:
        mesh = DeviceMesh.from_group(save_pg, "cpu")
        state = sharded_state(spec, mesh, save_dim)
        logical = global_bytes(state)
        for e in engines:
            e.save(state, urls[e.name], save_pg)
        del state
    barrier()
    target = None
    mesh = None
    if rank < n_load:
        mesh = DeviceMesh.from_group(load_pg, "cpu")
        target = sharded_state(spec, mesh, load_dim, zeros=True)
        logical = global_bytes(target)
    records = []
    for rep in range(cfg.reps + 1):
        for e in rotate(engines, rep):
            if rank == 0:
                evict_page_cache(urls[e.name])
            if target is not None and rep == 0:
                _zero(target)
            barrier()
            t0 = time.perf_counter()
            if target is not None:
                assert e.load is not None
                e.load(target, urls[e.name], load_pg)
            barrier()
            seconds = time.perf_counter() - t0
            bad: list[str] = []
            if target is not None and rep == 0:
                bad = check_equal(target, spec, mesh, load_dim)
            gathered: list[Any] = [None] * ws
            dist.all_gather_object(gathered, bad)
            if rank == 0:
                wrong = sorted({k for g in gathered if g for k in g})
                rec = {"case": case, "engine": e.name if e.name != "torch.save" else "torch.load", "rep": rep,
                       "seconds": seconds, "logical_bytes": logical}
                if rep == 0:
                    rec["bitwise_ok"] = not wrong
                    rec["wrong_keys"] = wrong[:10]
                records.append(rec)
                print(f"  load {case} rep {rep} {rec['engine']:12s} {seconds:7.3f} s"
                      + ("" if rep else f", bitwise {'ok' if not wrong else 'WRONG: ' + ', '.join(wrong[:3])}"),
                      flush=True)
            barrier()
    barrier()
    if rank == 0:
        for u in urls.values():
            remove(u, cfg.storage_options)
    return records


def cases(cfg: RunConfig) -> list[tuple[str, int, int, int, int, list[str]]]:
    w = cfg.world_size
    # shardsave[raw]: the same load without decompression (a checkpoint saved with
    # codec="raw"), for reference; the targets are the default codec's.
    both = ["shardsave", "shardsave[raw]", "dcp"]
    out = [(f"same layout {w}->{w} Shard(0)", w, w, 0, 0, [*both, "torch.save"]),
           ("reshard 2->3 Shard(0)", 2, 3, 0, 0, both),
           ("reshard 4->2 Shard(0)", 4, 2, 0, 0, both),
           (f"reshard Shard(0)->Shard(1) {w}->{w}", w, w, 0, 1, both)]
    return out


def run(cfg: RunConfig) -> ScenarioResult:
    spec = cfg.spec()
    spec.full()
    todo = [(case, n_save, n_load, sd, ld, names) for case, n_save, n_load, sd, ld, names in cases(cfg)]
    world = max(max(c[1], c[2]) for c in todo)
    records = launch(_load_rank, world, cfg, spec, todo)[0]
    t = collect(records, "seconds")
    rows = []
    for (case, engine), s in t.items():
        dcp = t.get((case, "dcp"))
        tl = t.get((case, "torch.load"))
        logical = next(r["logical_bytes"] for r in records if r["case"] == case)
        ok = next((r.get("bitwise_ok") for r in records if r["case"] == case and r["engine"] == engine
                   and r["rep"] == 0), None)
        rows.append({"case": case, "engine": engine, "cold s": s.cold, "warm median s": s.median,
                     "warm min-max s": f"{s.lo:.3g}-{s.hi:.3g}" if s.lo is not None else "-",
                     "GB/s": logical / s.median / 1e9 if s.median else None,
                     "speed x DCP": dcp.median / s.median if dcp and dcp.median and s.median else None,
                     "speed x torch.load": tl.median / s.median if tl and tl.median and s.median else None,
                     "bitwise ok": {True: "yes", False: "NO", None: "-"}[ok]})

    def speed(case_prefix: str, engine: str = "shardsave") -> float | None:
        r = next((r for r in rows if r["case"].startswith(case_prefix) and r["engine"] == engine), None)
        return r["speed x DCP"] if r else None

    checks = [check("resharding load 2->3 Shard(0), speed x DCP", speed("reshard 2->3"), ">=", 1.5),
              check("resharding load 4->2 Shard(0), speed x DCP", speed("reshard 4->2"), ">=", 1.5),
              check("resharding load Shard(0)->Shard(1), speed x DCP", speed("reshard Shard(0)->Shard(1)"), ">=", 1.0),
              check("same-layout load, speed x DCP (no target; for reference)", speed("same layout"), ">=", 0.0),
              check("resharding load 2->3, raw codec, speed x DCP (no target; for reference)",
                    speed("reshard 2->3", "shardsave[raw]"), ">=", 0.0)]
    logical = {r["case"]: r["logical_bytes"] for r in records}
    plot = {"title": "load: logical GB/s, page cache evicted (higher is better)", "xlabel": "GB/s",
            "bars": bars(t, lambda case, v: logical[case] / v / 1e9 if v else 0.0)}
    return ScenarioResult("load", rows, checks, records, COLUMNS, {"plot": plot})

