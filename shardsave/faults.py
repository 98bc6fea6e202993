"""Named fault points: deterministic crash and failure injection for tests and CI.

A checkpoint engine's promise -- a checkpoint exists whole or not at all, whatever crashes
-- is only as good as the crashes it was tested against. So the save path calls
:func:`fault_point` at the moments where a crash is most interesting, and tests arm those
points to SIGKILL the process (a real crash: no ``finally``, no ``atexit``, no flush) or to
raise, at an exact hit. Unarmed, a fault point costs one environment lookup.

The points, in the order a save reaches them (``shardsave.save`` documents the protocol):

================== ====================================================================
``after-plan``      every rank, after the plan is broadcast and before any data is written
``mid-data-write``  every rank, after each chunk is appended to its data file (``#n``: the
                    n-th chunk), so the file is partly written
``after-data``      every rank, after its data file is complete and durable, before the
                    coordinator has the results (data on storage, no index yet)
``mid-index-write`` the coordinator, with half of the new index written to its temporary
                    file (local storage only: object stores commit with one PUT, which
                    has no middle)
``after-rename``    the coordinator, right after the index is renamed into place (local
                    storage; the commit point has passed, old files are not yet removed)
``mid-cleanup``     the coordinator, after the first of the replaced checkpoint's data files
                    was removed and before the others
================== ====================================================================

Arming: programmatically with :func:`arm` (a context manager, for in-process tests), or with
the environment variable ``SHARDSAVE_FAULTS`` (for subprocesses and CI), a comma-separated
list of ``point:action[@rank][#hit]``, e.g. ``mid-data-write:kill@1#2`` kills rank 1 when
it has written its second chunk. Actions: ``kill`` (SIGKILL this process), ``raise``
(:class:`~shardsave.errors.FaultInjectedError`), ``enospc`` (``OSError(ENOSPC)``, a
permanent storage error) and ``eio`` (``OSError(EIO)``, which storage retries as
transient). ``@rank`` is the global rank (``torch.distributed`` when initialised, else the
``RANK`` environment variable, else 0). A seeded choice of point and hit is available as
:func:`choose`, and :func:`kill_after` kills the process after a seeded random delay, for
crashes at moments no named point marks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from shardsave.errors import FaultInjectedError

__all__ = ["ACTIONS", "ENV", "POINTS", "Fault", "arm", "choose", "disarm_all", "fault_point", "kill_after", "parse"]

ENV = "SHARDSAVE_FAULTS"
POINTS = ("after-plan", "mid-data-write", "after-data", "mid-index-write", "after-rename", "mid-cleanup")
ACTIONS = ("kill", "raise", "enospc", "eio")


@dataclass(frozen=True)
class Fault:
    """One armed fault: fire ``action`` at the ``hit``-th time ``point`` is reached."""

    point: str
    action: str = "kill"
    rank: int | None = None
    """Only on this global rank (None: every process)."""
    hit: int = 1
    """1-based: which arrival at the point fires (later arrivals pass)."""

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise ValueError(f"unknown fault point {self.point!r}; known: {', '.join(POINTS)}")
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; known: {', '.join(ACTIONS)}")
        if self.hit < 1:
            raise ValueError(f"a fault's hit count is 1-based, got {self.hit}")


def parse(spec: str) -> list[Fault]:
    """Parse ``SHARDSAVE_FAULTS`` syntax: ``point:action[@rank][#hit]``, comma-separated."""
    out: list[Fault] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        hit = 1
        rank: int | None = None
        if "#" in item:
            item, _, h = item.partition("#")
            hit = int(h)
        if "@" in item:
            item, _, r = item.partition("@")
            rank = int(r)
        point, _, action = item.partition(":")
        out.append(Fault(point, action or "kill", rank, hit))
    return out


_lock = threading.Lock()
_armed: list[Fault] = []
_hits: dict[str, int] = {}
_env_spec: str | None = None
_env_faults: list[Fault] = []


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        with contextlib.suppress(Exception):
            if dist.is_available() and dist.is_initialized():
                return int(dist.get_rank())
    with contextlib.suppress(ValueError):
        return int(os.environ.get("RANK", "0"))
    return 0


def fault_point(name: str) -> None:
    """Fire the fault armed for ``name`` at this arrival, if any; otherwise do nothing."""
    global _env_spec, _env_faults
    spec = os.environ.get(ENV)
    if spec != _env_spec:  # parsed once per value, so an unarmed point stays cheap
        _env_faults = parse(spec) if spec else []
        _env_spec = spec
    if not _armed and not _env_faults:
        return
    with _lock:
        n = _hits[name] = _hits.get(name, 0) + 1
        candidates = [f for f in (*_armed, *_env_faults) if f.point == name and f.hit == n]
    rank = _rank() if candidates else 0
    for f in candidates:
        if f.rank is None or f.rank == rank:
            _fire(f)


def _fire(f: Fault) -> None:
    where = f"fault point {f.point!r} (hit {f.hit})"
    if f.action == "kill":
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if f.action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {where})")
    if f.action == "eio":
        raise OSError(errno.EIO, f"Input/output error (injected at {where})")
    raise FaultInjectedError(f"failure injected at {where}")


@contextlib.contextmanager
def arm(*faults: Fault) -> Iterator[None]:
    """Arm ``faults`` for the duration of the block; hit counts start from zero."""
    with _lock:
        _armed.extend(faults)
        _hits.clear()
    try:
        yield
    finally:
        with _lock:
            for f in faults:
                with contextlib.suppress(ValueError):
                    _armed.remove(f)
            _hits.clear()


def disarm_all() -> None:
    """Forget every programmatically armed fault and every hit count."""
    with _lock:
        _armed.clear()
        _hits.clear()


def choose(seed: int, points: Sequence[str] = POINTS, *, action: str = "kill", rank: int | None = None,
           max_hit: int = 3) -> Fault:
    """A fault at a point and hit drawn from ``random.Random(seed)``: reproducible by seed."""
    rng = random.Random(seed)
    point = rng.choice(list(points))
    hit = rng.randint(1, max_hit) if point == "mid-data-write" else 1
    return Fault(point, action, rank, hit)


def kill_after(seed: int, max_delay_s: float) -> float:
    """SIGKILL this process after a delay drawn from ``random.Random(seed)`` in
    ``[0, max_delay_s)``; returns the delay. For crashes between the named points."""
    delay = random.Random(seed).uniform(0.0, max_delay_s)
    timer = threading.Timer(delay, os.kill, args=(os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()
    return delay
