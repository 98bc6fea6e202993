"""The interleaved save loop that the sync, throttled and memory scenarios share.

On every rank: build the sharded trained state once, then for rep = 0 (cold), 1..N (warm),
for every engine in an order rotated by rep: barrier, save into a fresh directory, barrier
(the time between the two barriers is the save's wall time on the slowest rank), measure
the bytes it stored and the peak extra RSS of each rank, delete the directory.
"""

from __future__ import annotations

import time
from typing import Any

import torch.distributed as dist

from benchmarks.common import memory
from benchmarks.common.config import RunConfig, rotate
from benchmarks.common.engines import (
    Engine,
    bytes_on_storage,
    dcp_engine,
    remove,
    shardsave_engine,
    torch_save_engine,
    wait_async,
)
from benchmarks.common.launch import launch
from benchmarks.common.state import DataSpec, barrier, global_bytes, local_bytes, sharded_state


def make_engine(name: str, storage_options: dict[str, Any] | None) -> Engine:
    """An engine by name; ``shardsave@KNOB=V,KNOB2=V2`` runs shardsave under those knobs (A/B runs)."""
    if "@" in name:
        return _with_knobs(name, storage_options)
    if name == "shardsave":
        return shardsave_engine("auto", storage_options)
    if name.startswith("shardsave["):
        return shardsave_engine(name[len("shardsave["):-1], storage_options)
    if name == "dcp":
        return dcp_engine(storage_options)
    if name == "torch.save":
        return torch_save_engine(storage_options)
    raise ValueError(f"unknown engine {name!r}")


def _with_knobs(name: str, storage_options: dict[str, Any] | None) -> Engine:
    import dataclasses
    import functools

    from shardsave import knobs

    base, _, spec = name.partition("@")
    values: dict[str, int | float] = {}
    for kv in spec.split(","):
        k, _, v = kv.partition("=")
        values[k] = float(v) if "." in v else int(v)
    inner = make_engine(base, storage_options)

    def wrap(fn: Any) -> Any:
        if fn is None:
            return None

        @functools.wraps(fn)
        def run(*args: Any, **kw: Any) -> Any:
            with knobs.override(**values):
                return fn(*args, **kw)
        return run

    return dataclasses.replace(inner, name=name, save=wrap(inner.save), load=wrap(inner.load),
                               async_save=wrap(inner.async_save))


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"  {msg}", flush=True)


def _save_rank(cfg: RunConfig, spec: DataSpec, names: list[str], opts: dict[str, Any],
               tag: str) -> list[dict[str, Any]]:
    """(every rank) ``names``: engines; ``async:NAME`` runs NAME's async save (then waits for it)."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, ws = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (ws,))
    state = sharded_state(spec, mesh)
    logical = global_bytes(state)
    mine = local_bytes(state)
    engines: list[tuple[Engine, str]] = []
    for n in names:
        mode, _, name = n.rpartition(":")
        e = make_engine(name, opts)
        if mode != "async" or e.async_save is not None:
            engines.append((e, mode or "sync"))
    records: list[dict[str, Any]] = []
    case = f"{spec.dtype}, {ws} ranks, {logical / 2**30:.2f} GiB"
    for rep in range(cfg.reps + 1):
        for e, mode in rotate(engines, rep):
            url = cfg.url(f"{tag}-{mode}-{spec.dtype}-{e.name}-{rep}".replace("[", "_").replace("]", "")
                          .replace("@", "_").replace("=", "_").replace(",", "_"))
            rec: dict[str, Any] = {"case": case, "engine": e.name, "mode": mode, "rep": rep,
                                   "logical_bytes": logical}
            barrier()
            memory.reset_peak()
            base = memory.current()
            t0 = time.perf_counter()
            if mode == "sync":
                e.save(state, url)
                t_block = None
            else:
                assert e.async_save is not None
                handle = e.async_save(state, url)
                t_block = time.perf_counter() - t0
                wait_async(handle)
            t_local = time.perf_counter() - t0
            peak_extra = memory.peak() - base
            barrier()
            rec["seconds"] = time.perf_counter() - t0
            if t_block is not None:
                # The stall is per rank; the training step waits for the slowest one.
                blocks = [None] * ws
                dist.all_gather_object(blocks, t_block)
                rec["blocked_s"] = max(b for b in blocks if b is not None)
            extras = [None] * ws
            dist.all_gather_object(extras, (peak_extra, mine, t_local))
            rec["peak_extra_bytes"] = max(x[0] for x in extras if x is not None)
            rec["peak_extra_frac"] = max(x[0] / max(1, x[1]) for x in extras if x is not None)
            if rank == 0:
                rec["bytes"] = bytes_on_storage(url, opts)
                remove(url, opts)
                records.append(rec)
                blocked = f", blocked {rec['blocked_s']:.3f} s" if "blocked_s" in rec else ""
                _log(f"{tag} rep {rep} {mode:5s} {e.name:18s} {rec['seconds']:7.3f} s{blocked}, "
                     f"{rec['bytes'] / 2**20:8.1f} MiB, peak +{rec['peak_extra_bytes'] / 2**20:.0f} MiB/rank")
            barrier()
    return records


def run_saves(cfg: RunConfig, spec: DataSpec, names: list[str], opts: dict[str, Any],
              tag: str) -> list[dict[str, Any]]:
    """Launch ``cfg.world_size`` ranks and run the loop; rank 0's records. ``names`` as in
    :func:`_save_rank`."""
    spec.full()  # train or load the cache once, in the parent, before the ranks read it
    results = launch(_save_rank, cfg.world_size, cfg, spec, names, opts, tag)
    return results[0]
