"""Append-only writers of one data file.

A rank streams its encoded chunks into one data file and records, for each chunk, the offset
where it starts; :meth:`DataWriter.write` returns that offset so the caller never has to
track it. The table of contents is written last into the same file, so a writer only ever
appends.

Two implementations: the local one (in :mod:`shardsave.storage.local`) writes through an
os-level file descriptor so that it can fsync; the fsspec one here streams through
``fs.open(path, "wb")``, which on object stores becomes a multipart upload that is only
visible once :meth:`close` completes it. Writes on the fsspec path are not retried
mid-stream (see :mod:`shardsave.storage.retry`): a failed part leaves the upload in an
unknown state, so the caller aborts and writes the file again.
"""

from __future__ import annotations

import abc
import contextlib
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from shardsave.errors import StorageError
from shardsave.storage.retry import call_with_retry

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Buffer", "DataWriter", "FsspecWriter", "as_byte_view"]

Buffer: TypeAlias = bytes | bytearray | memoryview | np.ndarray
"""Anything :meth:`DataWriter.write` accepts: a C-contiguous buffer."""


def as_byte_view(data: Buffer) -> memoryview:
    """A flat, zero-copy view of ``data``'s bytes.

    Refuses non-contiguous buffers instead of copying them silently: a hidden copy of a
    multi-GB tensor is exactly the cost the caller must see.
    """
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ValueError(
                f"cannot write a non-contiguous array (shape {data.shape}, strides "
                f"{data.strides}); pass np.ascontiguousarray(x) to copy it first"
            )
        if data.dtype.hasobject:
            raise TypeError(f"cannot write an array of dtype {data.dtype} (holds objects)")
        # reshape(-1) of a C-contiguous array is a view; viewing as uint8 also covers dtypes
        # that the buffer protocol cannot describe (datetime64, …).
        return data.reshape(-1).view(np.uint8).data
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("cannot write a non-contiguous buffer; copy it with bytes(x) first")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class DataWriter(abc.ABC):
    """Append-only writer of one data file.

    Use as a context manager: a clean exit closes (durably), an exception aborts, which
    deletes the partial file. ``path`` is the full path, for messages.
    """

    path: str

    @abc.abstractmethod
    def write(self, data: Buffer) -> int:
        """Append ``data``; returns the offset at which it starts."""

    @abc.abstractmethod
    def tell(self) -> int:
        """Bytes written so far (the offset the next write will start at)."""

    @abc.abstractmethod
    def close(self, *, durable: bool = True) -> int:
        """Finish the file and return its size.

        ``durable``: on filesystems that have fsync, the data (and the directory entry) are
        on stable storage when this returns. Object stores are durable once the upload
        completes, whatever the flag. Closing twice returns the size again.
        """

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop without making anything durable and delete the partial file (best effort)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FsspecWriter(DataWriter):
    """A data file streamed through an fsspec file object (object stores, memory://, …)."""

    def __init__(self, fs: Any, fs_path: str, full_path: str) -> None:
        self._fs = fs
        self._fs_path = fs_path
        self.path = full_path
        self._offset = 0
        self._closed = False
        self._file: Any = call_with_retry(
            lambda: fs.open(fs_path, "wb"), op="open for writing", path=full_path
        )

    def write(self, data: Buffer) -> int:
        if self._closed:
            raise StorageError(f"write to {self.path}: the writer is already closed")
        view = as_byte_view(data)
        start = self._offset
        if view.nbytes:
            call_with_retry(
                lambda: self._file.write(view), op="write", path=self.path, idempotent=False
            )
            self._offset += view.nbytes
        return start

    def tell(self) -> int:
        return self._offset

    def close(self, *, durable: bool = True) -> int:
        if not self._closed:
            self._closed = True
            # Completing an upload is not idempotent either (the final part may or may not
            # have landed), so it is not retried; the caller rewrites the file on failure.
            call_with_retry(self._file.close, op="close", path=self.path, idempotent=False)
        return self._offset

    def abort(self) -> None:
        f = self._file
        self._closed = True
        with contextlib.suppress(Exception):  # best effort: the file is removed below anyway
            discard = getattr(f, "discard", None)
            if callable(discard):
                discard()  # s3fs: aborts the multipart upload
            try:
                # AbstractBufferedFile: marking it closed keeps close() and __del__ from
                # uploading the partial buffer.
                f.closed = True
            except AttributeError:
                f.close()  # plain file objects (local, memory) have nothing to upload
        with contextlib.suppress(Exception):
            self._fs.rm(self._fs_path)

    def __del__(self) -> None:
        # A writer dropped without close/abort must not publish a partial object: fsspec's
        # buffered files upload whatever they hold when garbage-collected. Marking the file
        # closed prevents that without doing I/O in a finalizer (an unfinished multipart
        # upload is left for the bucket's lifecycle rule).
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self._file.closed = True
