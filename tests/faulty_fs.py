"""A failing fsspec filesystem for fault-injection tests, reachable by URL (``faultymem://``).

``ss.save`` and ``ss.load_full`` take URLs, so the failing filesystem is registered with
fsspec under its own protocol: an in-memory filesystem whose operations fail on demand --
transiently at a seeded random rate (the connection resets object stores see), or with
ENOSPC once a byte budget of writes is used up. It is not a LocalFileSystem, so Storage
takes the generic fsspec path (the one object stores use).
"""

from __future__ import annotations

import contextlib
import errno
import random
import threading
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

PROTOCOL = "faultymem"


class _Faults:
    """What the filesystem does wrong right now (set through :func:`failing`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rate = 0.0
        self.rng = random.Random(0)
        self.budget: int | None = None  # bytes that may still be written before ENOSPC
        self.transient = 0
        self.enospc = 0

    def maybe_fail(self) -> None:
        with self.lock:
            if self.rate and self.rng.random() < self.rate:
                self.transient += 1
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer (injected)")

    def spend(self, n: int) -> None:
        with self.lock:
            if self.budget is None:
                return
            if n > self.budget:
                self.enospc += 1
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            self.budget -= n


FAULTS = _Faults()


class _FailingFile(MemoryFile):
    def write(self, data: Any) -> int:
        FAULTS.spend(memoryview(data).nbytes)
        return super().write(data)


class FaultyMemoryFS(MemoryFileSystem):
    """``memory://`` with injected failures (shares memory://'s store; use unique paths)."""

    protocol = (PROTOCOL,)
    cachable = False

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        FAULTS.maybe_fail()
        f = super()._open(path, mode, *args, **kwargs)
        if isinstance(f, MemoryFile) and any(c in mode for c in "wxa"):
            f.__class__ = _FailingFile  # same object, same store entry: its writes now spend the budget
        return f

    def pipe_file(self, path: str, value: Any, mode: str = "overwrite", **kwargs: Any) -> None:
        FAULTS.maybe_fail()
        FAULTS.spend(len(value))
        super().pipe_file(path, value, mode=mode, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> Any:
        FAULTS.maybe_fail()
        return super().cat_file(path, start=start, end=end, **kwargs)

    def info(self, path: str, **kwargs: Any) -> Any:
        FAULTS.maybe_fail()
        return super().info(path, **kwargs)

    def exists(self, path: str, **kwargs: Any) -> bool:
        FAULTS.maybe_fail()
        return bool(super().exists(path, **kwargs))

    def find(self, path: str, *args: Any, **kwargs: Any) -> Any:
        FAULTS.maybe_fail()
        return super().find(path, *args, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        FAULTS.maybe_fail()
        super().makedirs(path, exist_ok=exist_ok)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        FAULTS.maybe_fail()
        super().rm(path, recursive=recursive, maxdepth=maxdepth)


fsspec.register_implementation(PROTOCOL, FaultyMemoryFS, clobber=True)


@contextlib.contextmanager
def failing(*, rate: float = 0.0, seed: int = 0, budget: int | None = None) -> Iterator[_Faults]:
    """Make ``faultymem://`` fail: at ``rate`` transiently (seeded), and with ENOSPC once
    ``budget`` bytes have been written. Restores a working filesystem on exit."""
    with FAULTS.lock:
        FAULTS.rate, FAULTS.rng, FAULTS.budget = rate, random.Random(seed), budget
        FAULTS.transient = FAULTS.enospc = 0
    try:
        yield FAULTS
    finally:
        with FAULTS.lock:
            FAULTS.rate, FAULTS.budget = 0.0, None
