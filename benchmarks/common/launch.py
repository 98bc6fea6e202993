"""Start N ranks for a benchmark: spawned processes joined in a gloo group over a file store.

Why spawn and a file store (not torchrun): the benchmark is one command that launches its
own ranks, several times per run (each scenario and world size), and a ``file://`` store
in a private temporary directory needs no free TCP port. The ranks still run real
``torch.distributed`` with gloo, exactly as under torchrun.

``launch(fn, n, *args)`` runs ``fn(*args)`` on every rank of a fresh world and returns each
rank's result in a list indexed by rank. A failure on any rank kills every rank and
raises with every traceback. Each rank gets ``OMP_NUM_THREADS = cores // n`` (at least 1)
so ranks do not fight over cores.

Fresh processes per scenario keep "cold" figures honest (the first save in a process pays
for imports, thread pools and first-touch page faults) and memory figures unpolluted.
Smoke tests, which only check that scenarios run, use :func:`reuse_ranks` instead: worlds
stay up between launches of the same size, because starting one costs ~2 s per rank on a
quiet 2-core machine (importing torch) and several times that on a busy one.
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
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

T = TypeVar("T")

_pools: dict[int, _World] | None = None


@contextlib.contextmanager
def reuse_ranks() -> Iterator[None]:
    """Within this block, worlds of the same size are started once and reused."""
    global _pools
    outer = _pools
    _pools = {} if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            for w in _pools.values():
                w.close()
            _pools = None


def launch(fn: Callable[..., T], world_size: int, *args: Any, timeout: float = 3600.0) -> list[T]:
    """Run ``fn(*args)`` on ``world_size`` ranks; return their results by rank."""
    if _pools is None:
        world = _World(world_size, timeout)
        try:
            return world.run(fn, args, timeout)
        finally:
            world.close()
    world = _pools.get(world_size)
    if world is None:
        world = _pools[world_size] = _World(world_size, timeout)
    try:
        return world.run(fn, args, timeout)
    except BaseException:
        _pools.pop(world_size, None)
        world.kill()
        raise


class _World:
    """``n`` spawned ranks in one gloo group, each running jobs sent over its pipe."""

    def __init__(self, n: int, timeout: float) -> None:
        threads = max(1, (os.cpu_count() or 1) // n)
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if "GLOO_SOCKET_IFNAME" not in os.environ:
            env["GLOO_SOCKET_IFNAME"] = "lo"
        ctx = get_context("spawn")
        self.n = n
        self._store_dir = tempfile.mkdtemp(prefix="shardsave-bench-rdzv-")
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        for rank in range(n):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_child, args=(rank, n, os.path.join(self._store_dir, "store"), env, child,
                                                 timeout), daemon=False)
            self._procs.append(p)
            self._conns.append(parent)
            p.start()
            child.close()

    def run(self, fn: Callable[..., T], args: tuple[Any, ...], timeout: float) -> list[T]:
        payload = pickle.dumps((fn, args))
        for c in self._conns:
            c.send_bytes(payload)
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        pending = set(range(self.n))
        while pending and not failures:
            left = deadline - time.monotonic()
            if left <= 0:
                failures.update({i: "timed out" for i in pending})
                break
            by_conn = {id(self._conns[i]): i for i in pending}
            sentinels = {self._procs[i].sentinel: i for i in pending}
            for obj in wait([self._conns[i] for i in pending] + list(sentinels), timeout=left):
                i = by_conn[id(obj)] if isinstance(obj, Connection) else sentinels[obj]
                if i not in pending:
                    continue
                if isinstance(obj, Connection) or self._conns[i].poll():
                    try:
                        kind, value = self._conns[i].recv()
                    except (EOFError, OSError):
                        kind, value = "error", f"rank {i} exited without a result (exit code {self._procs[i].exitcode})"
                else:
                    kind, value = "error", f"rank {i} died with exit code {self._procs[i].exitcode}"
                pending.discard(i)
                (results if kind == "ok" else failures)[i] = value
        if failures:
            # Peers of a failed rank block in collectives: give them a moment to report theirs.
            for i in list(pending):
                if self._conns[i].poll(2.0):
                    with contextlib.suppress(EOFError):
                        kind, value = self._conns[i].recv()
                        (results if kind == "ok" else failures)[i] = value
            self.kill()
            body = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(failures.items()))
            raise RuntimeError(f"{getattr(fn, '__qualname__', fn)} failed on {len(failures)} of {self.n} ranks:\n"
                               f"{body}")
        return [results[r] for r in range(self.n)]

    def close(self) -> None:
        for c in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                c.send_bytes(b"")
        for p in self._procs:
            p.join(timeout=10)
        self.kill()

    def kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                for kill in (os.killpg, os.kill):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        kill(p.pid, signal.SIGKILL)
        for p in self._procs:
            p.join(timeout=30)
        for c in self._conns:
            c.close()
        shutil.rmtree(self._store_dir, ignore_errors=True)


def _child(rank: int, world_size: int, store: str, env: dict[str, str], conn: Connection, timeout: float) -> None:
    with contextlib.suppress(OSError):
        os.setsid()  # its own process group, so the parent can kill whatever it starts
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        from shardsave.codec import _native

        _native.wait()  # compile (or load) the byte-grouping kernels before anything is timed
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        os._exit(1)
    while True:
        try:
            payload = conn.recv_bytes()
        except EOFError:
            break
        if not payload:
            break
        try:
            fn, args = pickle.loads(payload)
            message: tuple[str, Any] = ("ok", fn(*args))
        except BaseException:
            message = ("error", traceback.format_exc())
        try:
            conn.send(message)
        except Exception:
            conn.send(("error", traceback.format_exc()))
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
    # Interpreter teardown with torch and a process group costs seconds and nothing needs it.
    os._exit(0)
