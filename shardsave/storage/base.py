"""A checkpoint directory on any fsspec filesystem.

Every rank holds a :class:`Storage` for the same checkpoint directory and writes its own data
files through it in parallel; the coordinator then commits ``index.json`` with
:meth:`Storage.write_atomic`. This module is the generic implementation in terms of the
fsspec filesystem API, used for object stores (s3://, gs://, …), memory:// and any other
protocol. Local paths get :class:`~shardsave.storage.local.LocalStorage`, which overrides the
I/O with os-level calls because fsspec's local file object cannot fsync.

Atomic commit without rename: object stores have no rename (a "move" is copy + delete, and
neither step is atomic with the other), but a single PUT is atomic — readers see the old
object or the new one, never half of it. So on this path :meth:`Storage.write_atomic` is one
``fs.pipe_file``. The same holds for memory://, which lives inside one process (ranks in
other processes do not see it): it is for tests and single-process use.

Names passed to methods are relative to the directory, '/'-separated, with no '..'; they are
checked so that a malformed index can never make a reader look outside its checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shardsave.errors import StorageError
from shardsave.storage.retry import call_with_retry, describe, is_transient
from shardsave.storage.writer import DataWriter, FsspecWriter

__all__ = ["Storage"]

# Protocols whose "directories" are only key prefixes: there is nothing to create before
# writing an object, and asking costs a request per file.
_FLAT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


def check_name(name: str) -> str:
    """Validate a relative '/'-separated name; ``""`` is the directory itself."""
    if not isinstance(name, str):
        raise TypeError(f"a storage name must be a str, got {type(name).__name__}")
    if name == "":
        return name
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        raise ValueError(
            f"invalid storage name {name!r}: names are relative, '/'-separated, without "
            "empty, '.' or '..' components"
        )
    return name


def check_range(name: str, start: int, end: int) -> None:
    if start < 0 or end < start:
        raise ValueError(f"invalid byte range [{start}, {end}) of {name!r}: need 0 <= start <= end")


def check_length(data: bytes, *, path: str, start: int, end: int) -> bytes:
    """A ranged read must return exactly the bytes asked for."""
    if len(data) != end - start:
        raise StorageError(
            f"read of {path} bytes [{start}, {end}) returned {len(data)} of "
            f"{end - start} bytes: the file is shorter than its index says (truncated or "
            "overwritten?)"
        )
    return data


class Storage:
    """A checkpoint directory on some fsspec filesystem.

    Build one with :meth:`from_url` (which picks the local fast path for local paths) or
    :meth:`from_filesystem`. Names passed to methods are relative, '/'-separated. Every
    operation retries transient failures (:mod:`shardsave.storage.retry`) and raises
    :class:`~shardsave.errors.StorageError` naming the full path and the operation, or
    :class:`~shardsave.errors.MissingFileError` when a file is absent.

    Thread-safe: a Storage holds no mutable state, so writer threads may share one.
    """

    url: str
    """The directory as a URL (a plain absolute path for local storage), for messages."""
    protocol: str
    """The filesystem's protocol: ``"file"``, ``"memory"``, ``"s3"``, …"""
    is_local: bool
    """Whether I/O goes through the os-level local fast path."""

    def __init__(
        self, fs: Any, root: str, *, storage_options: dict[str, Any] | None = None
    ) -> None:
        """Use :meth:`from_url` or :meth:`from_filesystem` rather than this.

        ``fs`` is an fsspec filesystem and ``root`` the directory in its own path form (no
        protocol); this class always does generic fsspec I/O, whatever ``fs`` is.
        """
        self.fs = fs
        if root not in ("", "/"):
            root = root.rstrip("/")
        self.root = root
        self.storage_options = dict(storage_options or {})
        proto = fs.protocol
        self.protocol = proto if isinstance(proto, str) else proto[0]
        self.is_local = False
        self.url = self._make_url()

    def _make_url(self) -> str:
        return str(self.fs.unstrip_protocol(self.root))

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, storage_options: dict[str, Any] | None = None) -> Storage:
        """The directory at ``url``: a local path (relative or absolute), ``file://…``,
        ``memory://…``, ``s3://bucket/prefix`` or any fsspec URL (chained URLs too).

        ``storage_options`` go to the filesystem (credentials, endpoint, …).
        """
        if not isinstance(url, str) or not url:
            raise ValueError(f"a storage URL must be a non-empty str, got {url!r}")
        options = dict(storage_options or {})
        try:
            fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as exc:
            raise StorageError(
                f"cannot open {url}: the filesystem for it is not installed ({describe(exc)}); "
                "install the fsspec implementation it names (for s3:// that is s3fs)"
            ) from exc
        except (ValueError, TypeError) as exc:
            raise StorageError(f"cannot open {url}: {describe(exc)}") from exc
        return cls.from_filesystem(fs, root, storage_options=options)

    @classmethod
    def from_filesystem(
        cls, fs: Any, root: str, *, storage_options: dict[str, Any] | None = None
    ) -> Storage:
        """A Storage for directory ``root`` of fsspec filesystem ``fs``.

        A :class:`fsspec.implementations.local.LocalFileSystem` gets the os-level fast path;
        anything else (including wrappers of a local filesystem) the generic fsspec path.
        """
        if isinstance(fs, LocalFileSystem):
            from shardsave.storage.local import LocalStorage  # local builds on this module

            return LocalStorage(fs, root, storage_options=storage_options)
        return cls(fs, root, storage_options=storage_options)

    def child(self, name: str) -> Storage:
        """Sub-directory ``name`` as its own Storage (same filesystem, same options)."""
        check_name(name)
        return type(self)(self.fs, self._path(name), storage_options=self.storage_options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- paths ------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        """``name`` in the filesystem's own path form."""
        check_name(name)
        if not name:
            return self.root
        if self.root in ("", "/"):
            return self.root + name if self.root else name
        return f"{self.root}/{name}"

    def full_path(self, name: str) -> str:
        """``name`` as a URL (a plain path for local storage), for error messages."""
        return self._full(self._path(name))

    def _full(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def _relative(self, path: str) -> str:
        """Inverse of :meth:`_path` for paths the filesystem lists."""
        path = self.fs._strip_protocol(path)
        if not self.root:
            return path.lstrip("/")
        prefix = self.root if self.root.endswith("/") else self.root + "/"
        if not path.startswith(prefix):
            raise StorageError(f"listing {self.url} returned {path!r}, outside the directory")
        return path[len(prefix) :]

    def _parent_dir(self, path: str) -> str:
        return str(self.fs._parent(path))

    def _ensure_parent(self, path: str) -> None:
        if self.protocol in _FLAT_PROTOCOLS:
            return
        parent = self._parent_dir(path)
        if parent and parent != path:
            self.fs.makedirs(parent, exist_ok=True)

    # -- queries ----------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        path = self._path(name)
        found = call_with_retry(lambda: self.fs.exists(path), op="exists", path=self._full(path))
        return bool(found)

    def size(self, name: str) -> int:
        """Size in bytes; :class:`MissingFileError` if absent."""
        path = self._path(name)
        full = self._full(path)
        size = call_with_retry(lambda: self.fs.size(path), op="size", path=full)
        if size is None:
            raise StorageError(f"size {full}: the filesystem does not report file sizes")
        return int(size)

    def listdir(self, prefix: str = "") -> list[str]:
        """Names (relative to this directory) of all files under directory ``prefix``,
        recursively, sorted; ``[]`` if it does not exist. A file named ``prefix`` lists
        itself."""
        path = self._path(prefix)

        def find() -> list[str]:
            try:
                return list(self.fs.find(path))
            except FileNotFoundError:
                return []

        found = call_with_retry(find, op="list", path=self._full(path))
        return sorted(self._relative(p) for p in found)

    # -- reads ------------------------------------------------------------------------

    def read_bytes(self, name: str, *, max_bytes: int | None = None) -> bytes:
        """The whole file. With ``max_bytes``, a larger file raises :class:`StorageError`
        without being read (an untrusted index must not exhaust memory)."""
        path = self._path(name)
        full = self._full(path)
        if max_bytes is None:
            return bytes(call_with_retry(lambda: self.fs.cat_file(path), op="read", path=full))
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        # Read at most one byte past the limit: one request, and never a huge one.
        def read() -> bytes:
            try:
                return bytes(self.fs.cat_file(path, start=0, end=max_bytes + 1))
            except FileNotFoundError:
                raise
            except OSError:
                # S3 answers a ranged GET of an empty object with 416 (InvalidRange).
                if self._size_or_none(path) == 0:
                    return b""
                raise

        data = call_with_retry(read, op="read", path=full)
        if len(data) > max_bytes:
            raise self._too_large(full, max_bytes, self._size_or_none(path))
        return bytes(data)

    def _size_or_none(self, path: str) -> int | None:
        with contextlib.suppress(Exception):
            size = self.fs.size(path)
            return None if size is None else int(size)
        return None

    @staticmethod
    def _too_large(full: str, max_bytes: int, size: int | None) -> StorageError:
        got = f"{size} bytes" if size is not None else "more"
        return StorageError(
            f"read {full}: the file holds {got}, over the limit of {max_bytes} bytes; if "
            "it is genuine, raise the limit (e.g. SHARDSAVE_MAX_INDEX_BYTES for index.json)"
        )

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; a short read raises :class:`StorageError`."""
        check_range(name, start, end)
        path = self._path(name)
        full = self._full(path)
        if start == end:
            return self._empty_range(name, start)

        def read() -> bytes:
            return bytes(self.fs.cat_file(path, start=start, end=end))

        data = call_with_retry(read, op=f"read [{start}, {end}) of", path=full)
        return check_length(data, path=full, start=start, end=end)

    def _empty_range(self, name: str, start: int) -> bytes:
        """An empty read still names an existing file and a position inside it."""
        size = self.size(name)
        if start > size:
            raise StorageError(
                f"read of {self.full_path(name)} bytes [{start}, {start}): starts past the "
                f"end of the {size}-byte file"
            )
        return b""

    def read_ranges(self, requests: list[tuple[str, int, int]]) -> list[bytes]:
        """Many ranged reads ``(name, start, end)``, possibly across files, concurrently.

        Results come in request order, each checked for length. Here one
        ``fs.cat_ranges`` call issues them all (concurrently on async filesystems such as
        s3fs); a retry re-reads only the ranges that failed.
        """
        for name, start, end in requests:
            check_range(name, start, end)
        paths = [self._path(name) for name, _, _ in requests]
        results: list[bytes | None] = [None] * len(requests)
        # Empty ranges are answered without I/O but must still name an existing file.
        for i, (_, start, end) in enumerate(requests):
            if start == end:
                results[i] = self._empty_range(requests[i][0], start)

        failed = [0]  # index of the request the last failure belongs to, for the message

        def read_pending() -> None:
            pending = [i for i, r in enumerate(results) if r is None]
            if not pending:
                return
            out = self.fs.cat_ranges(
                [paths[i] for i in pending],
                [requests[i][1] for i in pending],
                [requests[i][2] for i in pending],
                on_error="return",
            )
            failures: list[tuple[int, BaseException]] = []
            for i, data in zip(pending, out, strict=True):
                if isinstance(data, BaseException):
                    failures.append((i, data))
                else:
                    results[i] = bytes(data)
            if failures:
                # Report a permanent failure in preference, so it is not retried pointlessly.
                failures.sort(key=lambda f: (is_transient(f[1]), f[0]))
                failed[0] = failures[0][0]
                raise failures[0][1]

        def where() -> str:
            _, start, end = requests[failed[0]]
            return f"{self._full(paths[failed[0]])} bytes [{start}, {end})"

        call_with_retry(read_pending, op="ranged read of", path=where)
        final: list[bytes] = []
        for i, data in enumerate(results):
            assert data is not None
            _, start, end = requests[i]
            final.append(check_length(data, path=self._full(paths[i]), start=start, end=end))
        return final

    def map_ranges(self, requests: list[tuple[str, int, int]]) -> list[bytes | memoryview]:
        """The bytes of ranged reads ``(name, start, end)``, as :meth:`read_ranges`, but
        possibly without copying them: local storage maps the files. A result is read-only
        and valid for as long as the caller holds it. Here, a plain :meth:`read_ranges`.
        """
        return list(self.read_ranges(requests))

    # -- writes -----------------------------------------------------------------------

    def makedirs(self, name: str = "") -> None:
        """Create directory ``name`` and its parents (a no-op where directories are
        implicit)."""
        path = self._path(name)
        if self.protocol in _FLAT_PROTOCOLS:
            return
        call_with_retry(
            lambda: self.fs.makedirs(path, exist_ok=True), op="makedirs", path=self._full(path)
        )

    def open_writer(self, name: str) -> DataWriter:
        """A writer for new file ``name`` (parent directories are created).

        Fails if the file exists: data files carry a fresh save-id, so an existing one
        means two writers were given the same name. On object stores this is a check
        before the upload, not an atomic guarantee (two racing writers both pass it).
        """
        path = self._path(name)
        full = self._full(path)
        if call_with_retry(lambda: self.fs.exists(path), op="exists", path=full):
            raise StorageError(
                f"open for writing {full}: the file already exists; data files are never "
                "overwritten (each save writes under a new save-id)"
            )
        call_with_retry(lambda: self._ensure_parent(path), op="makedirs for", path=full)
        return FsspecWriter(self.fs, path, full)

    def write_atomic(self, name: str, data: bytes) -> None:
        """Replace ``name`` with ``data`` so that readers see the old or the new content,
        never a mix: the commit primitive. Here: one ``fs.pipe_file`` (a single PUT)."""
        path = self._path(name)
        full = self._full(path)

        def put() -> None:
            self._ensure_parent(path)
            self.fs.pipe_file(path, bytes(data))

        call_with_retry(put, op="atomic write", path=full)

    def write_exclusive(self, name: str, data: bytes) -> bool:
        """Create ``name`` with ``data`` only if it does not exist; ``False`` if it did.

        Here: ``fs.pipe_file(mode="create")``. Filesystems with conditional writes (s3fs
        against S3, which honours If-None-Match) make that atomic; the fsspec default is an
        exists-check followed by a PUT, so two racing creators may both succeed there (the
        last one wins). Use it for advisory locks, not for mutual exclusion.
        """
        path = self._path(name)
        full = self._full(path)

        def create() -> bool:
            self._ensure_parent(path)
            if self.fs.exists(path):
                return False
            try:
                self.fs.pipe_file(path, bytes(data), mode="create")
            except FileExistsError:
                return False
            return True

        return bool(call_with_retry(create, op="exclusive create", path=full))

    # -- deletes ----------------------------------------------------------------------

    def remove(self, names: Iterable[str]) -> None:
        """Delete files; missing ones are fine."""
        paths = [self._path(n) for n in names]
        if not paths:
            return

        def rm() -> None:
            try:
                self.fs.rm(paths)  # one bulk request on object stores
            except FileNotFoundError:
                for p in paths:  # some filesystems refuse the whole batch for one miss
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm(p)

        call_with_retry(rm, op="remove", path=self._full(paths[0]))

    def remove_tree(self, name: str = "") -> None:
        """Delete directory ``name`` and everything under it; missing is fine."""
        path = self._path(name)

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)

        call_with_retry(rm, op="remove tree", path=self._full(path))
