"""The local fast path: URL handling, fsync of files and directories, short writes."""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from storage_fakes import FlakyFS

from shardsave import knobs
from shardsave.errors import StorageError
from shardsave.storage import Storage

pytestmark = pytest.mark.timeout(60)

needs_proc_fd = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="maps fds to paths through /proc/self/fd"
)


def test_local_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = Storage.from_url("ckpts/run1/")
    assert store.is_local
    assert store.protocol == "file"
    assert store.root == str(tmp_path / "ckpts" / "run1")
    assert store.url == store.root
    assert store.full_path("index.json") == str(tmp_path / "ckpts" / "run1" / "index.json")
    from_uri = Storage.from_url((tmp_path / "ckpts" / "run1").as_uri())
    assert from_uri.is_local and from_uri.root == store.root


def test_memory_url() -> None:
    store = Storage.from_url("memory://shardsave-tests/url/")
    assert store.protocol == "memory"
    assert not store.is_local
    assert store.url.startswith("memory://")
    assert store.full_path("x").startswith("memory://") and store.full_path("x").endswith("/x")


def test_wrapped_local_filesystem_takes_the_generic_path(tmp_path: Path) -> None:
    store = Storage.from_filesystem(FlakyFS(LocalFileSystem()), str(tmp_path))
    assert not store.is_local
    assert store.protocol == "file"


def test_unknown_protocol() -> None:
    with pytest.raises(StorageError, match="no-such-proto"):
        Storage.from_url("no-such-proto://bucket/x")


@pytest.mark.skipif(
    importlib.util.find_spec("s3fs") is not None, reason="tests the message when s3fs is absent"
)
def test_s3_without_s3fs_says_what_to_install() -> None:
    with pytest.raises(StorageError, match="s3fs"):
        Storage.from_url("s3://bucket/prefix")


# -- fsync ----------------------------------------------------------------------------


class FsyncRecorder:
    """Replaces os.fsync and os.replace; records ("fsync", path) / ("replace", src, dst)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, ...]] = []
        real_fsync: Callable[[int], None] = os.fsync
        real_replace: Callable[..., None] = os.replace

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            self.events.append(("replace", str(src), str(dst)))
            real_replace(src, dst, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def fsynced(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "fsync"]


@needs_proc_fd
def test_writer_fsyncs_file_then_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Storage.from_url(str(tmp_path))
    store.makedirs("data")
    rec = FsyncRecorder(monkeypatch)
    with store.open_writer("data/r0.bin") as w:
        w.write(b"x" * 100)
        assert rec.events == []  # no fsync per write
    assert rec.fsynced() == [str(tmp_path / "data" / "r0.bin"), str(tmp_path / "data")]


@needs_proc_fd
def test_writer_not_durable_skips_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Storage.from_url(str(tmp_path))
    store.makedirs("data")
    rec = FsyncRecorder(monkeypatch)
    w = store.open_writer("data/r0.bin")
    w.write(b"x")
    w.close(durable=False)
    assert rec.events == []


@needs_proc_fd
def test_new_directories_are_fsynced_into_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = FsyncRecorder(monkeypatch)
    Storage.from_url(str(tmp_path)).makedirs("a/b")
    assert rec.fsynced() == [str(tmp_path), str(tmp_path / "a")]


@needs_proc_fd
def test_write_atomic_fsyncs_temp_file_renames_then_fsyncs_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage.from_url(str(tmp_path))
    store.write_atomic("index.json", b"old")
    rec = FsyncRecorder(monkeypatch)
    store.write_atomic("index.json", b"new")
    final = str(tmp_path / "index.json")
    assert len(rec.events) == 3, rec.events
    (kind1, tmp), (kind2, src, dst), (kind3, directory) = rec.events
    assert (kind1, kind2, kind3) == ("fsync", "replace", "fsync")
    assert tmp.startswith(final + ".tmp-")
    assert (src, dst) == (tmp, final)
    assert directory == str(tmp_path)
    assert store.read_bytes("index.json") == b"new"
    assert store.listdir() == ["index.json"]


@needs_proc_fd
def test_write_exclusive_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Storage.from_url(str(tmp_path))
    rec = FsyncRecorder(monkeypatch)
    assert store.write_exclusive("lock", b"me")
    assert rec.fsynced() == [str(tmp_path / "lock"), str(tmp_path)]


def test_write_atomic_failure_keeps_old_content_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage.from_url(str(tmp_path))
    store.write_atomic("index.json", b"old")

    def deny(src: Any, dst: Any, **kw: Any) -> None:
        raise PermissionError(errno.EACCES, "denied", str(dst))

    monkeypatch.setattr(os, "replace", deny)
    with pytest.raises(StorageError, match="atomic write") as info:
        store.write_atomic("index.json", b"new")
    assert str(tmp_path / "index.json") in str(info.value)
    assert store.read_bytes("index.json") == b"old"
    assert store.listdir() == ["index.json"]


def test_write_atomic_retries_with_a_fresh_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage.from_url(str(tmp_path))
    real_replace = os.replace
    sources: list[str] = []

    def flaky(src: Any, dst: Any, **kw: Any) -> None:
        sources.append(str(src))
        if len(sources) == 1:
            raise OSError(errno.EIO, "i/o error")
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", flaky)
    with knobs.override(STORAGE_RETRY_BASE_S=0.0):
        store.write_atomic("index.json", b"data")
    assert len(sources) == 2 and sources[0] != sources[1]
    assert store.read_bytes("index.json") == b"data"
    assert store.listdir() == ["index.json"]


def test_failed_fsync_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Storage.from_url(str(tmp_path))
    w = store.open_writer("r0.bin")
    w.write(b"abc")
    calls: list[int] = []

    def broken_fsync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "writeback failed")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with knobs.override(STORAGE_RETRY_BASE_S=0.0), pytest.raises(StorageError) as info:
        w.close()
    assert len(calls) == 1
    assert "not retried" in str(info.value) and "fsync" in str(info.value)
    assert str(tmp_path / "r0.bin") in str(info.value)
    w.abort()  # still removes the file after a failed close
    assert not store.exists("r0.bin")


# -- writes ---------------------------------------------------------------------------


def test_short_and_interrupted_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pwrite may write less than asked, or fail transiently: nothing is lost or doubled."""
    real_pwrite = os.pwrite
    calls = [0]

    def stingy(fd: int, data: Any, offset: int) -> int:
        calls[0] += 1
        if calls[0] % 5 == 0:
            raise BlockingIOError(errno.EAGAIN, "try again")
        return real_pwrite(fd, memoryview(data)[:7], offset)

    store = Storage.from_url(str(tmp_path))
    payload = np.arange(100, dtype=np.int64)
    monkeypatch.setattr(os, "pwrite", stingy)
    with knobs.override(STORAGE_RETRY_BASE_S=0.0), store.open_writer("r.bin") as w:
        assert w.write(b"head") == 0
        assert w.write(payload) == 4
    monkeypatch.undo()
    assert store.read_bytes("r.bin") == b"head" + payload.tobytes()


def test_writer_does_not_copy_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arr = np.arange(1 << 16, dtype=np.float32)
    seen: list[Any] = []
    real_pwrite = os.pwrite

    def spy(fd: int, data: Any, offset: int) -> int:
        seen.append(data)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    store = Storage.from_url(str(tmp_path))
    with store.open_writer("a.bin") as w:
        w.write(arr)
    assert len(seen) == 1
    assert isinstance(seen[0], memoryview)
    assert np.shares_memory(np.frombuffer(seen[0], dtype=np.uint8), arr)


def test_read_of_a_directory_fails_clearly(tmp_path: Path) -> None:
    store = Storage.from_url(str(tmp_path))
    store.makedirs("sub")
    with pytest.raises(StorageError, match="IsADirectoryError"):
        store.read_bytes("sub")


# -- background flushes while a durable file is streamed ----------------------------------


def _local_module() -> Any:
    return sys.modules["shardsave.storage.local"]


def test_writeback_flushes_in_the_background_every_early_sync_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    local = _local_module()
    flushed: list[tuple[str, int]] = []

    def fake_fdatasync(fd: int) -> None:
        flushed.append((threading.current_thread().name, os.fstat(fd).st_size))

    monkeypatch.setattr(local, "_fdatasync", fake_fdatasync)
    store = Storage.from_url(str(tmp_path))
    with knobs.override(EARLY_SYNC_BYTES=1000), store.open_writer("r0.bin") as w:
        for i in range(5):
            off = w.write(bytes([i]) * 600)
            w.start_writeback(off, off + 600)  # type: ignore[attr-defined]
            w._join_syncer()  # type: ignore[attr-defined]  # make the count deterministic
    # 600, 1200 -> flush, 600, 1200 -> flush, 600: two flushes, off the writing thread,
    # each seeing at least the bytes written before it was started.
    assert [n for _, n in flushed] == [1200, 2400]
    assert all(name == "shardsave-fdatasync" for name, _ in flushed)
    assert (tmp_path / "r0.bin").read_bytes() == b"".join(bytes([i]) * 600 for i in range(5))


def test_no_background_flush_when_early_sync_bytes_is_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = _local_module()
    calls: list[int] = []
    monkeypatch.setattr(local, "_fdatasync", calls.append)
    store = Storage.from_url(str(tmp_path))
    with knobs.override(EARLY_SYNC_BYTES=0), store.open_writer("r0.bin") as w:
        off = w.write(b"x" * 5000)
        w.start_writeback(off, off + 5000)  # type: ignore[attr-defined]
    assert calls == []


def test_failed_background_flush_fails_close_without_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = _local_module()

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(local, "_fdatasync", failing)
    rec = FsyncRecorder(monkeypatch) if os.path.isdir("/proc/self/fd") else None
    store = Storage.from_url(str(tmp_path))
    w = store.open_writer("r0.bin")
    with knobs.override(EARLY_SYNC_BYTES=10):
        off = w.write(b"x" * 100)
        w.start_writeback(off, off + 100)  # type: ignore[attr-defined]
    with pytest.raises(StorageError, match=r"r0\.bin.*Input/output error.*write the whole file again"):
        w.close()
    if rec is not None:
        assert rec.fsynced() == []  # the final fsync is not trusted after a failed flush either
    w.abort()  # what the save does next: the partial file goes
    assert not (tmp_path / "r0.bin").exists()


def test_abort_waits_for_a_running_background_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    local = _local_module()
    started = threading.Event()
    seen: list[bool] = []

    def slow(fd: int) -> None:
        started.set()
        time.sleep(0.2)
        seen.append(os.fstat(fd).st_size == 100)  # the descriptor is still this file's

    monkeypatch.setattr(local, "_fdatasync", slow)
    store = Storage.from_url(str(tmp_path))
    w = store.open_writer("r0.bin")
    with knobs.override(EARLY_SYNC_BYTES=10):
        off = w.write(b"x" * 100)
        w.start_writeback(off, off + 100)  # type: ignore[attr-defined]
    assert started.wait(5)
    w.abort()
    assert seen == [True]
