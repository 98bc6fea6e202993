"""Start N ranks for a benchmark: spawned processes joined in a gloo group over a file store.

Why spawn and a file store (not torchrun): the benchmark is one command that launches its
own ranks, several times per run (each scenario and world size), and a ``file://`` store
in a private temporary directory needs no free TCP port. The ranks still run real
``torch.distributed`` with gloo, exactly as under torchrun.

``fn(*args)`` runs on every rank; each rank's return value comes back in a list indexed by
rank. A failure on any rank kills the others and raises with every traceback. Each rank
gets ``OMP_NUM_THREADS = cores // world_size`` (at least 1) so ranks do not fight over cores.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

T = TypeVar("T")


def launch(fn: Callable[..., T], world_size: int, *args: Any, timeout: float = 3600.0) -> list[T]:
    """Run ``fn(*args)`` on ``world_size`` ranks; return their results by rank."""
    payload = pickle.dumps((fn, args))
    threads = max(1, (os.cpu_count() or 1) // world_size)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    ctx = get_context("spawn")
    store_dir = tempfile.mkdtemp(prefix="shardsave-bench-rdzv-")
    procs: list[Any] = []
    readers: list[Connection] = []
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(rank, world_size, os.path.join(store_dir, "store"), env,
                                                 payload, writer, timeout), daemon=False)
            procs.append(p)
            readers.append(reader)
            p.start()
            writer.close()
        deadline = time.monotonic() + timeout
        pending = {id(r): i for i, r in enumerate(readers)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                failures.update({i: "timed out" for i in pending.values()})
                break
            sentinels = {p.sentinel: i for i, p in enumerate(procs) if i in pending.values()}
            ready = wait([readers[i] for i in pending.values()] + list(sentinels), timeout=left)
            for obj in ready:
                if isinstance(obj, Connection):
                    i = pending.pop(id(obj), None)
                    if i is None:
                        continue
                    try:
                        kind, value = obj.recv()
                    except EOFError:
                        kind, value = "error", f"rank {i} exited without a result"
                    (results if kind == "ok" else failures)[i] = value
                else:
                    i = sentinels[obj]
                    if id(readers[i]) in pending and not readers[i].poll():
                        pending.pop(id(readers[i]))
                        failures[i] = f"rank {i} died with exit code {procs[i].exitcode}"
            if failures:
                # Peers of a failed rank block in collectives: give them a moment, then stop.
                for r in list(pending.values()):
                    if readers[r].poll(2.0):
                        with contextlib.suppress(EOFError):
                            kind, value = readers[r].recv()
                            (results if kind == "ok" else failures)[r] = value
                break
    finally:
        for p in procs:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join(timeout=30)
        for r in readers:
            r.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    if failures:
        body = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(failures.items()))
        raise RuntimeError(f"{getattr(fn, '__qualname__', fn)} failed on {len(failures)} of {world_size} ranks:\n"
                           f"{body}")
    return [results[r] for r in range(world_size)]


def _child(rank: int, world_size: int, store: str, env: dict[str, str], payload: bytes, conn: Connection,
           timeout: float) -> None:
    with contextlib.suppress(OSError):
        os.setsid()
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        fn, args = pickle.loads(payload)
        message: tuple[str, Any] = ("ok", fn(*args))
    except BaseException:
        message = ("error", traceback.format_exc())
    try:
        conn.send(message)
    except Exception:
        conn.send(("error", traceback.format_exc()))
    conn.close()
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    # Interpreter teardown with torch and a process group costs seconds and nothing needs it.
    os._exit(0 if message[0] == "ok" else 1)
