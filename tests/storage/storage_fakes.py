"""Fake fsspec filesystems for the storage tests (imported by conftest and tests)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

# Methods of an fsspec filesystem that touch storage (what FlakyFS can make fail).
IO_METHODS = frozenset(
    {
        "open",
        "cat_file",
        "cat_ranges",
        "pipe_file",
        "exists",
        "size",
        "info",
        "find",
        "rm",
        "makedirs",
    }
)


class FlakyFS:
    """Wraps an fsspec filesystem; its I/O methods fail the first ``fail`` calls.

    ``methods`` limits which methods fail (default: all of IO_METHODS); ``error`` builds the
    exception raised. ``calls`` counts the calls of each method, failed ones included. Not an
    ``AbstractFileSystem`` subclass on purpose: wrapping a local filesystem thus exercises
    the generic fsspec code path on a real disk.
    """

    def __init__(
        self,
        inner: Any,
        *,
        fail: int = 0,
        error: Callable[[], BaseException] = lambda: ConnectionResetError(104, "reset by peer"),
        methods: frozenset[str] | set[str] | None = None,
    ) -> None:
        self.inner = inner
        self.remaining = fail
        self.error = error
        self.methods = IO_METHODS if methods is None else frozenset(methods)
        self.calls: collections.Counter[str] = collections.Counter()
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in IO_METHODS or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if self.remaining > 0 and name in self.methods:
                self.remaining -= 1
                self.failures += 1
                raise self.error()
            return attr(*args, **kwargs)

        return call
