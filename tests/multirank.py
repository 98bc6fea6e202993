"""Run a function on N real processes joined in a gloo process group: the multi-rank test harness.

Every multi-rank test goes through :func:`run_multirank`::

    def _sum_ranks() -> float:                      # module level, so the child can import it
        t = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(t)                          # (all ranks)
        return t.item()

    @pytest.mark.multirank
    @pytest.mark.timeout(60)
    def test_sum() -> None:
        assert run_multirank(_sum_ranks, 2) == [1.0, 1.0]

How it works, and why:

* Children are started with the multiprocessing ``spawn`` context, never ``fork``: forking a
  parent that has already imported torch (and maybe started its thread pools) is unsafe. So
  ``fn`` and ``args`` must be picklable, which means ``fn`` is a module-level function of an
  importable module (not a lambda, not a closure). This is checked in the parent, before any
  process starts, with a message that says so.
* Rendezvous is a fresh ``file://`` store in a private temporary directory, not TCP, so
  tests running in parallel under pytest-xdist can never collide on a port.
* ``OMP_NUM_THREADS=1`` and ``MKL_NUM_THREADS=1`` are set in each child before torch is
  imported there (``fn`` and ``args`` travel as bytes and are unpickled only after the
  environment is set), because CI machines have two cores and run tests in parallel.
  ``GLOO_SOCKET_IFNAME=lo`` is set too unless the caller's environment already chooses one:
  every rank is on this host, and a sandbox hostname that does not resolve would otherwise
  break gloo. ``env=`` overrides any of these.
* Each rank reports over its own one-way pipe: ``("ok", result)`` or ``("error",
  traceback text)``. The exception object itself is never sent: it may not pickle.
* The parent waits on the pipes and on the process sentinels together, with one deadline
  (``timeout``, which is also the process-group timeout). It fails fast: once one rank has
  failed, the others get :data:`FAILURE_GRACE_S` to report their own failures (a peer blocked
  in a collective would otherwise sit there until the gloo timeout), then they are killed.
* Each child makes itself a session and process-group leader and asks the kernel to SIGKILL
  it if the parent dies (``PR_SET_PDEATHSIG``), with a watchdog thread as a fallback. On
  every way out of the parent -- success, failure, timeout, a pytest-timeout exception,
  KeyboardInterrupt -- a ``finally`` SIGKILLs every child's process group and reaps it.
  No child outlives :func:`run_multirank`.

Crash injection: ``allow_death={1}`` lets rank 1 exit without a result (``os._exit``, a
signal); its slot in the returned list is ``None`` and the other ranks' results are still
collected. An exception raised on an allowed rank is still a failure: only a death is allowed.

Cost, and running several cases in one spawn: spawning and initialising a gloo group costs
about 1.7 s for 2 ranks and 3.5 s for 4 on the 2-core CI machines, far more than most
checks. So a test of many N -> M reshard cases should spawn once, at the largest world
size, and build a sub-group per case inside ``fn``::

    def _reshard_cases() -> list[bool]:
        results = []
        for save_ranks, load_ranks in [([0, 1], [0, 1, 2, 3]), ([0, 1, 2], [0, 1])]:
            # new_group is collective over the default group: EVERY rank calls it, in the
            # same order, including ranks that are not members.
            save_pg = dist.new_group(save_ranks)
            load_pg = dist.new_group(load_ranks)
            if dist.get_rank() in save_ranks:        # (save ranks only)
                mesh = DeviceMesh.from_group(save_pg, "cpu")
                ...  # distribute_tensor(..., mesh, [Shard(0)]); save with group=save_pg
            dist.barrier()                           # (all ranks)
            if dist.get_rank() in load_ranks:        # (load ranks only)
                mesh = DeviceMesh.from_group(load_pg, "cpu")
                ...
            dist.barrier()                           # (all ranks)
        return results

    run_multirank(_reshard_cases, 4)

Collectives inside a case must pass ``group=`` (or work through the mesh); a bare
``dist.barrier()`` is over the whole world. ``init_device_mesh("cpu", (n,))`` is the short
form when the case uses the whole world; ``init_device_mesh("cpu", (2, 2))`` gives a 2-D mesh.

For end-to-end tests through torchrun, which rendezvous over TCP, use :func:`free_port`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from datetime import timedelta
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

__all__ = ["FAILURE_GRACE_S", "free_port", "run_multirank", "tmp_rendezvous_file"]

T = TypeVar("T")

#: Seconds the remaining ranks get to report their own failures once one rank has failed.
FAILURE_GRACE_S = 2.0

#: Set in every child unless ``env=`` says otherwise.
DEFAULT_CHILD_ENV: dict[str, str] = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (for torchrun tests).

    Racy by nature: another process may take it before the caller binds it. Prefer
    :func:`run_multirank`'s file rendezvous wherever TCP is not the thing under test.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def tmp_rendezvous_file() -> Iterator[str]:
    """Yield the path of a not-yet-existing file in a private temporary directory.

    Use it as ``init_method=f"file://{path}"``. A file store must not be reused by a second
    group, so each call gives a new directory; it is removed on exit.
    """
    directory = tempfile.mkdtemp(prefix="shardsave-rdzv-")
    try:
        yield os.path.join(directory, "store")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_multirank(
    fn: Callable[..., T],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
    allow_death: Collection[int] = (),
) -> list[T]:
    """Run fn(*args) on world_size real processes with an initialised default process group; return each rank's result.

    Inside ``fn``, ``torch.distributed.get_rank()`` and ``get_world_size()`` give the rank
    and the world size. The result list is indexed by rank; a rank in ``allow_death`` that
    died without a result gets ``None``.

    Raises AssertionError naming every failed rank, with its remote traceback, when a rank
    raises, when a rank not in ``allow_death`` exits without a result ("rank R died with
    exit code C"), or when the whole run takes longer than ``timeout`` seconds (spawn
    included). Every child is killed and reaped before this returns or raises.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    unknown = sorted(set(allow_death) - set(range(world_size)))
    if unknown:
        raise ValueError(f"allow_death names ranks {unknown} outside 0..{world_size - 1}")
    try:
        payload = pickle.dumps((fn, args))
    except Exception as e:
        raise TypeError(
            f"run_multirank needs a picklable fn and args, because children are spawned; "
            f"define {getattr(fn, '__qualname__', fn)!r} at module level of an importable "
            f"module (not a lambda or closure) and pass picklable args: {e}"
        ) from e

    child_env = {**DEFAULT_CHILD_ENV, **(env or {})}
    if "GLOO_SOCKET_IFNAME" not in os.environ and "GLOO_SOCKET_IFNAME" not in child_env:
        child_env["GLOO_SOCKET_IFNAME"] = "lo"

    ctx = get_context("spawn")
    deadline = time.monotonic() + timeout
    procs: list[Any] = []
    readers: list[Connection] = []
    reaped: set[int] = set()  # ranks already killed-by-group and joined
    with tmp_rendezvous_file() as store_path:
        try:
            for rank in range(world_size):
                reader, writer = ctx.Pipe(duplex=False)
                readers.append(reader)
                proc = ctx.Process(
                    target=_child_main,
                    args=(rank, world_size, store_path, backend, timeout, child_env,
                          payload, writer, os.getpid()),
                    name=f"multirank-rank{rank}",
                    # Not daemonic: fn may start processes of its own (async checkpointing).
                    daemon=False,
                )
                # Listed before it starts, so that an interrupt right after start still
                # finds it in the finally below.
                procs.append(proc)
                try:
                    proc.start()
                finally:
                    # Close our copy of the write end, so a child that dies yields EOF.
                    writer.close()
            outcomes = _collect(procs, readers, deadline, set(allow_death), timeout, reaped)
        finally:
            _kill_all(procs, reaped)
            for reader in readers:
                reader.close()
    failures = [o for o in outcomes if o.failure is not None]
    if failures:
        header = f"run_multirank({_name(fn)}, world_size={world_size}): "
        if any(o.timed_out for o in outcomes):
            header += f"timeout after {timeout:g} s; "
        header += f"{len(failures)} of {world_size} ranks failed"
        body = "\n\n".join(f"--- rank {o.rank} ---\n{o.failure}" for o in failures)
        raise AssertionError(f"{header}\n\n{body}")
    return [o.result for o in outcomes]


class _Outcome:
    """What the parent learned about one rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.reported = False  # a message ("ok" or "error") arrived
        self.exited = False
        self.result: Any = None
        self.failure: str | None = None  # text for the AssertionError; None means fine
        self.timed_out = False


def _collect(
    procs: list[Any], readers: list[Connection], deadline: float, allow_death: set[int],
    timeout: float, reaped: set[int],
) -> list[_Outcome]:
    """Wait for every rank to report and exit, or for the deadline / failure grace to pass."""
    outcomes = [_Outcome(r) for r in range(len(procs))]
    by_reader = {id(c): r for r, c in enumerate(readers)}
    by_sentinel = {p.sentinel: r for r, p in enumerate(procs)}
    open_readers = set(range(len(procs)))
    stop_at = deadline
    failed_early = False

    def read(rank: int) -> None:
        o = outcomes[rank]
        try:
            kind, value = pickle.loads(readers[rank].recv_bytes())
        except (EOFError, OSError):
            open_readers.discard(rank)  # closed without a message: judged at exit
            return
        except Exception as e:  # a result that pickled but does not unpickle here
            kind, value = "error", f"result could not be unpickled in the parent: {e!r}"
        open_readers.discard(rank)
        o.reported = True
        if kind == "ok":
            o.result = value
        else:
            o.failure = value

    while not all(o.exited for o in outcomes):
        remaining = stop_at - time.monotonic()
        if remaining <= 0:
            break
        waitables: list[Any] = [readers[r] for r in open_readers]
        waitables += [p.sentinel for r, p in enumerate(procs) if not outcomes[r].exited]
        for ready in wait(waitables, timeout=remaining):
            if isinstance(ready, Connection):
                read(by_reader[id(ready)])
                continue
            rank = by_sentinel[ready]
            # Anything the rank wrote before exiting is still in the pipe: read it first.
            while rank in open_readers and readers[rank].poll():
                read(rank)
            open_readers.discard(rank)
            # Take down anything it left in its group while it is an unreaped zombie (so its
            # pid, the group id, cannot have been reused), then reap it.
            _kill_tree(procs[rank].pid)
            procs[rank].join()
            reaped.add(rank)
            o = outcomes[rank]
            o.exited = True
            code = procs[rank].exitcode
            if o.failure is None:
                if not o.reported and rank not in allow_death:
                    o.failure = f"rank {rank} died with exit code {_describe_code(code)}"
                elif o.reported and code != 0 and rank not in allow_death:
                    o.failure = (f"rank {rank} returned a result but then exited with code "
                                 f"{_describe_code(code)}")
        if not failed_early and any(o.failure is not None for o in outcomes):
            # Fail fast: peers of a failed rank usually block in a collective until the
            # process-group timeout. Give them a short grace to report their own errors.
            failed_early = True
            stop_at = min(stop_at, time.monotonic() + FAILURE_GRACE_S)

    timed_out = not failed_early and time.monotonic() >= deadline
    for o in outcomes:
        if o.exited:
            continue
        if timed_out:
            o.timed_out = True
            o.failure = (f"rank {o.rank} still running at the {timeout:g} s timeout; killed"
                         + (" (it had already sent its result)" if o.reported else ""))
        elif o.failure is None and not o.reported:
            o.failure = f"rank {o.rank} still running after another rank failed; killed"
    return outcomes


def _kill_tree(pid: int | None) -> None:
    """SIGKILL a child's process group (its id is the child's pid: the child called setsid),
    which takes anything the child started, and the child itself (in case it had not yet
    called setsid)."""
    if pid is None:
        return
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def _kill_all(procs: list[Any], reaped: set[int]) -> None:
    """SIGKILL every child not yet reaped, with its process group, then reap it. Never raises."""
    # Kill all before joining any: a rank blocked in a collective waits for its peers.
    for rank, proc in enumerate(procs):
        if rank not in reaped:
            _kill_tree(proc.pid)
    for proc in procs:
        if proc.pid is not None:
            proc.join(timeout=30)
        with contextlib.suppress(Exception):
            proc.close()


def _describe_code(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# --------------------------------------------------------------------------- child side


def _die_with_parent(parent_pid: int) -> None:
    """Make sure this child does not outlive the parent, even if the parent is SIGKILLed."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)  # polling the parent, not synchronising with it
        os._exit(70)

    # The parent may already be gone before prctl took effect; the watchdog also covers
    # platforms without prctl.
    threading.Thread(target=watch, name="multirank-parent-watch", daemon=True).start()


def _child_main(
    rank: int, world_size: int, store_path: str, backend: str, timeout: float,
    env: dict[str, str], payload: bytes, conn: Connection, parent_pid: int,
) -> None:
    with contextlib.suppress(OSError):
        os.setsid()  # own process group, so the parent can kill whatever this child starts
    _die_with_parent(parent_pid)
    # Before torch is imported here: unpickling fn imports its module, which imports torch.
    os.environ.update(env)
    message: tuple[str, Any]
    dist: Any = None
    try:
        fn, args = pickle.loads(payload)
        import torch
        import torch.distributed as dist

        if "OMP_NUM_THREADS" in env:  # in case torch was imported before env was set
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        dist.init_process_group(
            backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        message = ("ok", fn(*args))
    except SystemExit:
        # sys.exit() in fn is an exit, like os._exit: no message, the exit code tells.
        conn.close()
        raise
    except BaseException:
        message = ("error", traceback.format_exc())
    # Plain pickle, not the connection's ForkingPickler: torch registers reducers there that
    # pass tensors through shared memory owned by this process, which exits right below.
    try:
        payload = pickle.dumps(message)
    except Exception:  # an unpicklable result: say so instead of dying silently
        message = ("error", f"rank {rank}: result could not be pickled:\n"
                            f"{traceback.format_exc()}")
        payload = pickle.dumps(message)
    conn.send_bytes(payload)
    conn.close()
    if dist is not None and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    if not _coverage_running():
        # Interpreter teardown with torch loaded costs about 1 s on the CI machines, for every
        # rank of every test, and nothing a test relies on happens in it: leave now. (Under
        # coverage the normal exit stays, so that the child can save its data.)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0 if message[0] == "ok" else 1)


def _coverage_running() -> bool:
    coverage = sys.modules.get("coverage")
    return coverage is not None and getattr(coverage.Coverage, "current", lambda: None)() is not None
