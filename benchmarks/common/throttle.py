"""A bandwidth-limited fsspec filesystem: local files behind one token bucket per node.

Emulates a shared filesystem or object store whose bandwidth, not the CPU, is the limit
(e.g. 200 MB/s per node): the regime where writing fewer bytes pays off. Every rank of the
node draws from the same bucket, so two ranks share 200 MB/s, they do not get 200 each.

The bucket lives in a small file (``bucket=``) that every process of the node opens; one
``flock``-protected 8-byte field holds the time (CLOCK_MONOTONIC, shared by all processes
of a Linux host) at which the link is next free. A transfer of ``n`` bytes reserves
``[max(now, free), max(now, free) + n / rate)``, performs the real I/O, and then sleeps
until its reservation ends, so a transfer takes max(real time, throttled time) and
concurrent transfers queue in arrival order. Transfers are cut into pieces of at most
``piece`` bytes (4 MiB) so that ranks interleave finely.

Both sides of every comparison go through this one class: shardsave via its generic fsspec
storage, DCP via ``FsspecWriter`` / ``FsspecReader`` with the same storage options, and
torch.save via ``fsspec.open``. Closing a written file fsyncs it (an object store's upload is
durable once it completes), and ``fileno()`` exposes the descriptor so DCP's own fsync
works as on local disk. Not a subclass of fsspec's LocalFileSystem, on purpose: shardsave
(rightly) routes LocalFileSystem to its unthrottled os-level fast path.

    url:  throttled:///abs/dir   storage_options: {"bucket": "/tmp/x.bucket", "rate": 200e6}
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "throttled"
_PIECE = 4 << 20


class TokenBucket:
    """A byte-rate limiter shared by every process that opens the same ``path``."""

    def __init__(self, path: str, rate: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {rate}")
        self.path = path
        self.rate = float(rate)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def reserve(self, n: int) -> float:
        """Reserve the link for ``n`` bytes; returns the monotonic time the transfer may end."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self._fd, 8, 0)
            free = struct.unpack("<d", raw)[0] if len(raw) == 8 else 0.0
            start = max(free, time.monotonic())
            end = start + n / self.rate
            os.pwrite(self._fd, struct.pack("<d", end), 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return end

    def transfer(self, n: int, fn: Any) -> Any:
        """Run ``fn()`` (which moves ``n`` bytes) no faster than the bucket allows."""
        end = self.reserve(n)
        out = fn()
        wait = end - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return out


class ThrottledFile:
    """A local file whose reads and writes draw from the node's bucket."""

    def __init__(self, f: Any, bucket: TokenBucket, mode: str) -> None:
        self._f = f
        self._bucket = bucket
        self.mode = mode
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < view.nbytes:
            piece = view[done : done + _PIECE]
            self._bucket.transfer(piece.nbytes, lambda piece=piece: self._f.write(piece))
            done += piece.nbytes
        return done

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, os.fstat(self._f.fileno()).st_size - self._f.tell())
        parts = []
        while size > 0:
            n = min(size, _PIECE)
            b = self._bucket.transfer(n, lambda n=n: self._f.read(n))
            if not b:
                break
            parts.append(b)
            size -= len(b)
        return b"".join(parts)

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        while done < view.nbytes:
            piece = view[done : done + _PIECE]
            n = self._bucket.transfer(piece.nbytes, lambda piece=piece: self._f.readinto(piece))
            if not n:
                break
            done += n
        return done

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if "w" in self.mode or "a" in self.mode:
            self._f.flush()
            os.fsync(self._f.fileno())  # durable on close, as a completed upload is
        self._f.close()

    def discard(self) -> None:
        self.closed = True
        self._f.close()

    def __enter__(self) -> ThrottledFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # seek, tell, flush, fileno, readable, ...
        return getattr(self._f, name)


class ThrottledFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """Local directories behind a per-node token bucket (see the module docstring)."""

    protocol = PROTOCOL
    root_marker = "/"

    def __init__(self, bucket: str, rate: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bucket = TokenBucket(bucket, rate)
        self.local = LocalFileSystem()

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        if path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3 :]
        return path.rstrip("/") or "/"

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self._strip_protocol(name)}"

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> ThrottledFile:
        if "w" in mode or "a" in mode:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return ThrottledFile(open(path, mode), self.bucket, mode)

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> ThrottledFile:
        return self._open(self._strip_protocol(path), mode)

    # Metadata goes straight to the local filesystem (no bytes move).
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        out = self.local.ls(self._strip_protocol(path), detail=detail)
        return out

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self.local.info(self._strip_protocol(path))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.local.mkdir(self._strip_protocol(path), create_parents=create_parents)

    def rmdir(self, path: str) -> None:
        self.local.rmdir(self._strip_protocol(path))

    def rm_file(self, path: str) -> None:
        self.local.rm_file(self._strip_protocol(path))

    def _rm(self, path: str) -> None:
        self.local._rm(self._strip_protocol(path))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        paths = [path] if isinstance(path, str) else list(path)
        self.local.rm([self._strip_protocol(p) for p in paths], recursive=recursive, maxdepth=maxdepth)

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        os.replace(self._strip_protocol(path1), self._strip_protocol(path2))

    def rename(self, path1: str, path2: str, **kwargs: Any) -> None:
        self.mv(path1, path2)


fsspec.register_implementation(PROTOCOL, ThrottledFileSystem, clobber=True)


def options(bucket: str, rate: float) -> dict[str, Any]:
    """Storage options selecting the node's bucket (pass the same to every rank and engine)."""
    return {"bucket": bucket, "rate": float(rate)}
