"""Retries of transient failures, immediate failure on permanent ones, and the messages."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fsspec.implementations.memory import MemoryFileSystem
from storage_fakes import FlakyFS

from shardsave import knobs
from shardsave.errors import MissingFileError, StorageError
from shardsave.storage import Storage
from shardsave.storage.retry import MAX_BACKOFF_S, backoff_s, call_with_retry, is_transient

pytestmark = pytest.mark.timeout(60)

MakeFlaky = Callable[..., tuple[Storage, FlakyFS]]


@pytest.fixture(autouse=True)
def _no_backoff() -> Iterator[None]:
    with knobs.override(STORAGE_RETRY_BASE_S=0.0, STORAGE_RETRIES=5):
        yield


class EndpointConnectionError(Exception):
    """Stands in for botocore's class of that name (matched by name, not imported)."""


class ServerDisconnectedError(Exception):
    """Stands in for aiohttp's."""


class ClientError(Exception):
    """Stands in for botocore's ClientError: the service's error code in ``response``."""

    def __init__(self, code: str) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}}


def _caused_by(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(errno.ECONNRESET, "reset"),
        ConnectionError("dropped"),
        BrokenPipeError(errno.EPIPE, "pipe"),
        TimeoutError("timed out"),
        OSError(errno.EAGAIN, "try again"),
        OSError(errno.EINTR, "interrupted"),
        OSError(errno.EIO, "i/o error"),
        OSError(errno.ETIMEDOUT, "timed out"),
        EndpointConnectionError("could not connect"),
        ServerDisconnectedError(),
        ClientError("SlowDown"),
        ClientError("InternalError"),
        # s3fs re-raises a ClientError as a plain OSError ``from`` it
        _caused_by(OSError("translated"), ClientError("ServiceUnavailable")),
    ],
    ids=repr,
)
def test_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError(errno.ENOENT, "missing"),
        PermissionError(errno.EACCES, "denied"),
        IsADirectoryError(errno.EISDIR, "dir"),
        ValueError("bad"),
        OSError(errno.ENOSPC, "disk full"),
        ClientError("AccessDenied"),
        RuntimeError("bug"),
        # permanent on top wins over a transient cause
        _caused_by(PermissionError("denied"), ConnectionResetError()),
        StorageError("already translated"),
    ],
    ids=repr,
)
def test_permanent(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_backoff_is_exponential_jittered_and_capped() -> None:
    with knobs.override(STORAGE_RETRY_BASE_S=0.1):
        for n in range(4):
            full = 0.1 * 2**n
            for _ in range(20):
                assert full / 2 <= backoff_s(n) <= full
        assert backoff_s(60) <= MAX_BACKOFF_S
    assert backoff_s(3) == 0.0  # base 0 (the fixture): no waiting at all


def test_transient_failures_are_retried(flaky_memory: MakeFlaky) -> None:
    store, fs = flaky_memory()
    store.write_atomic("f.bin", b"hello")
    fs.remaining, fs.methods = 3, frozenset({"cat_file"})
    assert store.read_bytes("f.bin") == b"hello"
    assert fs.calls["cat_file"] == 4
    assert fs.failures == 3
    fs.remaining = 2
    assert store.read_range("f.bin", 1, 3) == b"el"
    assert fs.calls["cat_file"] == 7


@pytest.mark.parametrize(
    "method",
    ["pipe_file", "exists", "size", "find", "rm", "cat_ranges", "open", "makedirs"],
)
def test_every_operation_retries(flaky_memory: MakeFlaky, method: str) -> None:
    store, fs = flaky_memory(fail=2, methods={method}, error=lambda: TimeoutError("slow"))
    store.write_atomic("a/f.bin", b"0123456789")
    with store.open_writer("a/g.bin") as w:
        w.write(b"xyz")
    assert store.exists("a/f.bin")
    assert store.size("a/f.bin") == 10
    assert store.listdir() == ["a/f.bin", "a/g.bin"]
    assert store.read_ranges([("a/f.bin", 0, 2), ("a/g.bin", 1, 3)]) == [b"01", b"yz"]
    store.makedirs("b")
    store.remove(["a/g.bin"])
    assert store.listdir() == ["a/f.bin"]
    assert fs.failures == 2
    assert fs.calls[method] >= 3


def test_persistent_transient_failure_gives_up(flaky_memory: MakeFlaky) -> None:
    store, fs = flaky_memory()
    store.write_atomic("index.json", b"{}")
    fs.remaining, fs.methods = 1000, frozenset({"cat_file"})
    with knobs.override(STORAGE_RETRIES=3), pytest.raises(StorageError) as info:
        store.read_bytes("index.json")
    assert fs.calls["cat_file"] == 4
    message = str(info.value)
    assert "4 attempt(s)" in message
    assert store.full_path("index.json") in message
    assert "read" in message
    assert "ConnectionResetError" in message and "reset by peer" in message
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert not isinstance(info.value, MissingFileError)


def test_no_retries_when_knob_is_zero(flaky_memory: MakeFlaky) -> None:
    store, fs = flaky_memory()
    store.write_atomic("f", b"1")
    fs.remaining, fs.methods = 1, frozenset({"cat_file"})
    with knobs.override(STORAGE_RETRIES=0), pytest.raises(StorageError, match="1 attempt"):
        store.read_bytes("f")
    assert fs.calls["cat_file"] == 1


def test_permanent_failure_is_not_retried(flaky_memory: MakeFlaky) -> None:
    store, fs = flaky_memory(
        fail=1000, methods={"pipe_file"}, error=lambda: PermissionError(errno.EACCES, "denied")
    )
    with pytest.raises(StorageError) as info:
        store.write_atomic("index.json", b"{}")
    assert fs.calls["pipe_file"] == 1
    message = str(info.value)
    assert "atomic write" in message
    assert store.full_path("index.json") in message
    assert "attempt 1" in message and "permanent" in message
    assert "PermissionError" in message
    assert isinstance(info.value.__cause__, PermissionError)


def test_permanent_after_transient_reports_attempts(flaky_memory: MakeFlaky) -> None:
    errors: list[BaseException] = [TimeoutError("t"), TimeoutError("t"), ValueError("bad path")]
    store, fs = flaky_memory(fail=3, methods={"size"}, error=lambda: errors.pop(0))
    with pytest.raises(StorageError, match=r"attempt 3 .*ValueError: bad path"):
        store.size("x")
    assert fs.calls["size"] == 3


def test_missing_file_is_not_retried(flaky_memory: MakeFlaky) -> None:
    store, fs = flaky_memory()
    with pytest.raises(MissingFileError) as info:
        store.read_bytes("nope")
    assert fs.calls["cat_file"] == 1
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_failed_ranges_alone_are_reread() -> None:
    """A batch where one range fails transiently re-reads that range only."""
    inner = MemoryFileSystem()
    store = Storage.from_filesystem(_FlakyRanges(inner), "/shardsave-tests/ranges")
    try:
        store.write_atomic("a", b"aaaa")
        store.write_atomic("b", b"bbbb")
        fs = store.fs
        assert isinstance(fs, _FlakyRanges)
        got = store.read_ranges([("a", 0, 2), ("b", 1, 4), ("a", 2, 4)])
        assert got == [b"aa", b"bbb", b"aa"]
        a, b = store.fs._strip_protocol(store.root + "/a"), store.root + "/b"
        assert fs.batches == [[a, b, a], [b]]
    finally:
        store.remove_tree()


class _FlakyRanges:
    """cat_ranges returns (not raises) a transient error for the second range, once."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def cat_ranges(self, paths: list[str], starts: list[int], ends: list[int], **kw: Any) -> Any:
        self.batches.append(list(paths))
        out = self.inner.cat_ranges(paths, starts, ends, **kw)
        if len(self.batches) == 1:
            out[1] = ConnectionResetError(errno.ECONNRESET, "reset")
        return out


def test_remote_append_is_not_retried(flaky_memory: MakeFlaky) -> None:
    store, _ = flaky_memory()
    w = store.open_writer("data.bin")
    calls = []

    def failing_write(data: Any) -> int:
        calls.append(bytes(data))
        raise ConnectionResetError(errno.ECONNRESET, "reset mid-upload")

    w._file.write = failing_write  # type: ignore[attr-defined]
    with pytest.raises(StorageError, match="not retried") as info:
        w.write(b"payload")
    assert calls == [b"payload"]
    assert store.full_path("data.bin") in str(info.value)
    w.abort()
    assert not store.exists("data.bin")


def test_call_with_retry_passes_shardsave_errors_through() -> None:
    err = StorageError("short read of x")
    attempts = []

    def fn() -> None:
        attempts.append(1)
        raise err

    with pytest.raises(StorageError) as info:
        call_with_retry(fn, op="read", path="/x")
    assert info.value is err
    assert len(attempts) == 1
