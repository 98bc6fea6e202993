"""An in-memory fsspec filesystem that counts what is read: ``countmem://``.

Tests of partial loads prove "only the selected keys' bytes are read" by counting the
bytes every read returns, per file, through the public API (``ss.load_full(
"countmem://...")``) -- no shardsave internals patched. It shares nothing with
``memory://``: its own store, so counts never mix with other tests.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

PROTOCOL = "countmem"


class CountingMemoryFS(MemoryFileSystem):
    """MemoryFileSystem whose ``cat_file`` (every read shardsave's Storage does) counts bytes."""

    protocol = PROTOCOL
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    _lock = threading.Lock()
    bytes_read: ClassVar[collections.Counter[str]] = collections.Counter()

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = str(path).removeprefix(f"{PROTOCOL}://")
        text = text.lstrip("/").rstrip("/")
        return "/" + text if text else ""

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        data: bytes = super().cat_file(path, start=start, end=end, **kwargs)
        with self._lock:
            self.bytes_read[self._strip_protocol(path)] += len(data)
        return data

    @classmethod
    def reset(cls) -> None:
        with cls._lock:
            cls.bytes_read.clear()

    @classmethod
    def read_under(cls, prefix: str) -> int:
        """Bytes read from files whose path starts with ``prefix`` (no protocol)."""
        return sum(n for p, n in cls.bytes_read.items() if p.startswith(prefix))


fsspec.register_implementation(PROTOCOL, CountingMemoryFS, clobber=True)
