"""The storage conformance suite: every backend in conftest.BACKENDS must pass all of it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shardsave.errors import MissingFileError, StorageError
from shardsave.storage import DataWriter, Storage

pytestmark = pytest.mark.timeout(60)


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _write(storage: Storage, name: str, data: bytes) -> None:
    with storage.open_writer(name) as w:
        w.write(data)


# -- identity -------------------------------------------------------------------------


def test_identity(storage: Storage) -> None:
    assert storage.protocol in ("file", "memory", "s3")
    assert storage.is_local == (type(storage).__name__ == "LocalStorage")
    assert storage.url
    full = storage.full_path("data/x.bin")
    assert full.endswith("/data/x.bin")
    assert storage.root.rstrip("/").split("/")[-1] in full


def test_child_is_a_subdirectory(storage: Storage) -> None:
    child = storage.child("step-10")
    assert type(child) is type(storage)
    assert child.is_local == storage.is_local
    child.write_atomic("index.json", b"{}")
    assert storage.read_bytes("step-10/index.json") == b"{}"
    assert child.listdir() == ["index.json"]
    assert child.full_path("index.json") == storage.full_path("step-10/index.json")


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "a/./b", "a/..", "."])
def test_invalid_names_are_refused(storage: Storage, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid storage name"):
        storage.exists(bad)


# -- DataWriter -----------------------------------------------------------------------


def test_writer_round_trip_with_offsets(storage: Storage) -> None:
    big = _random_bytes(3 * 1024 * 1024 + 17)
    arr = np.arange(1000, dtype=np.float32).reshape(10, 100)
    view = np.arange(7, dtype=np.int16).data  # a memoryview of format 'h'
    pieces: list[bytes] = []
    with storage.open_writer("data/r0.bin") as w:
        assert isinstance(w, DataWriter)
        assert w.tell() == 0
        assert w.write(big) == 0
        pieces.append(big)
        assert w.write(b"") == len(big)  # empty writes return the current offset
        assert w.write(arr) == len(big)
        pieces.append(arr.tobytes())
        offset = w.write(view)
        assert offset == len(big) + arr.nbytes
        pieces.append(view.tobytes())
        assert w.write(bytearray(b"tail")) == offset + view.nbytes
        pieces.append(b"tail")
        assert w.tell() == sum(len(p) for p in pieces)
    expected = b"".join(pieces)
    assert storage.size("data/r0.bin") == len(expected)
    assert storage.read_bytes("data/r0.bin") == expected
    start = len(big)
    got = storage.read_range("data/r0.bin", start, start + arr.nbytes)
    assert np.array_equal(np.frombuffer(got, dtype=np.float32).reshape(10, 100), arr)


def test_close_returns_size_and_is_idempotent(storage: Storage) -> None:
    w = storage.open_writer("a.bin")
    w.write(b"12345")
    assert w.close() == 5
    assert w.close() == 5
    with pytest.raises(StorageError, match="closed"):
        w.write(b"x")


def test_close_not_durable(storage: Storage) -> None:
    w = storage.open_writer("a.bin")
    w.write(b"abc")
    assert w.close(durable=False) == 3
    assert storage.read_bytes("a.bin") == b"abc"


def test_empty_file(storage: Storage) -> None:
    with storage.open_writer("empty.bin") as w:
        pass
    assert w.tell() == 0
    assert storage.exists("empty.bin")
    assert storage.size("empty.bin") == 0
    assert storage.read_bytes("empty.bin") == b""
    assert storage.read_range("empty.bin", 0, 0) == b""


def test_writer_exception_aborts_and_deletes(storage: Storage) -> None:
    with pytest.raises(RuntimeError, match="boom"), storage.open_writer("d/partial.bin") as w:
        w.write(b"x" * 1000)
        raise RuntimeError("boom")
    assert not storage.exists("d/partial.bin")
    assert storage.listdir() == []


def test_abort(storage: Storage) -> None:
    w = storage.open_writer("p.bin")
    w.write(b"partial")
    w.abort()
    assert not storage.exists("p.bin")


def test_open_writer_refuses_existing_file(storage: Storage) -> None:
    _write(storage, "r0.bin", b"old")
    with pytest.raises(StorageError, match="already exists") as info:
        storage.open_writer("r0.bin")
    assert storage.full_path("r0.bin") in str(info.value)
    assert storage.read_bytes("r0.bin") == b"old"


def test_writer_refuses_non_contiguous(storage: Storage) -> None:
    with storage.open_writer("nc.bin") as w:
        with pytest.raises(ValueError, match="non-contiguous"):
            w.write(np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2])
        w.write(b"ok")
    assert storage.read_bytes("nc.bin") == b"ok"


def test_concurrent_writers(storage: Storage) -> None:
    """Ranks write their own files into one directory at the same time."""
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            with storage.open_writer(f"data/s-r{r}.bin") as w:
                for i in range(20):
                    w.write(_random_bytes(1000, seed=r * 100 + i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert storage.listdir("data") == sorted(f"data/s-r{r}.bin" for r in range(8))
    for r in range(8):
        expected = b"".join(_random_bytes(1000, seed=r * 100 + i) for i in range(20))
        assert storage.read_bytes(f"data/s-r{r}.bin") == expected


# -- reads ----------------------------------------------------------------------------


def test_read_range(storage: Storage) -> None:
    data = _random_bytes(10_000)
    _write(storage, "f.bin", data)
    assert storage.read_range("f.bin", 0, 10_000) == data
    assert storage.read_range("f.bin", 123, 4567) == data[123:4567]
    assert storage.read_range("f.bin", 9_999, 10_000) == data[-1:]
    assert storage.read_range("f.bin", 500, 500) == b""
    assert storage.read_range("f.bin", 10_000, 10_000) == b""


@pytest.mark.parametrize(("start", "end"), [(9_000, 10_001), (10_000, 10_001), (20_000, 20_010)])
def test_read_range_past_end(storage: Storage, start: int, end: int) -> None:
    _write(storage, "f.bin", _random_bytes(10_000))
    with pytest.raises(StorageError) as info:
        storage.read_range("f.bin", start, end)
    assert not isinstance(info.value, MissingFileError)
    assert storage.full_path("f.bin") in str(info.value)
    assert f"[{start}, {end})" in str(info.value)


def test_empty_range_past_end(storage: Storage) -> None:
    _write(storage, "f.bin", b"abc")
    with pytest.raises(StorageError, match="past the end"):
        storage.read_range("f.bin", 4, 4)


@pytest.mark.parametrize(("start", "end"), [(-1, 3), (5, 4)])
def test_read_range_invalid(storage: Storage, start: int, end: int) -> None:
    _write(storage, "f.bin", b"abcdefgh")
    with pytest.raises(ValueError, match="invalid byte range"):
        storage.read_range("f.bin", start, end)


def test_read_ranges_across_files(storage: Storage) -> None:
    a = _random_bytes(50_000, seed=1)
    b = _random_bytes(30_000, seed=2)
    _write(storage, "data/a.bin", a)
    _write(storage, "data/b.bin", b)
    requests = [
        ("data/b.bin", 100, 200),
        ("data/a.bin", 0, 50_000),
        ("data/b.bin", 0, 0),
        ("data/a.bin", 49_990, 50_000),
        ("data/b.bin", 100, 200),  # the same range twice
        ("data/b.bin", 29_000, 30_000),
    ]
    got = storage.read_ranges(requests)
    assert got == [b[100:200], a, b"", a[49_990:], b[100:200], b[29_000:]]
    assert storage.read_ranges([]) == []


def test_read_ranges_many(storage: Storage) -> None:
    data = _random_bytes(64 * 1024)
    _write(storage, "f.bin", data)
    requests = [("f.bin", i * 1000, i * 1000 + 777) for i in range(60)]
    assert storage.read_ranges(requests) == [data[s:e] for _, s, e in requests]


def test_read_ranges_out_of_range(storage: Storage) -> None:
    _write(storage, "a.bin", b"a" * 100)
    _write(storage, "b.bin", b"b" * 100)
    with pytest.raises(StorageError) as info:
        storage.read_ranges([("a.bin", 0, 10), ("b.bin", 90, 110)])
    assert storage.full_path("b.bin") in str(info.value)
    assert "[90, 110)" in str(info.value)


def test_read_ranges_missing_file(storage: Storage) -> None:
    _write(storage, "a.bin", b"a" * 100)
    with pytest.raises(MissingFileError) as info:
        storage.read_ranges([("a.bin", 0, 10), ("nope.bin", 0, 10)])
    assert storage.full_path("nope.bin") in str(info.value)


def test_missing_file(storage: Storage) -> None:
    for call in (
        lambda: storage.size("nope.bin"),
        lambda: storage.read_bytes("nope.bin"),
        lambda: storage.read_bytes("nope.bin", max_bytes=10),
        lambda: storage.read_range("nope.bin", 0, 1),
        lambda: storage.read_range("nope.bin", 0, 0),
        lambda: storage.read_ranges([("nope.bin", 0, 1)]),
    ):
        with pytest.raises(MissingFileError) as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
        assert isinstance(info.value, StorageError)
        assert storage.full_path("nope.bin") in str(info.value)
    assert not storage.exists("nope.bin")
    assert not storage.exists("no/such/dir/file")


def test_read_bytes_max_bytes(storage: Storage) -> None:
    _write(storage, "index.json", b"x" * 1000)
    assert storage.read_bytes("index.json", max_bytes=1000) == b"x" * 1000
    assert storage.read_bytes("index.json", max_bytes=5000) == b"x" * 1000
    with pytest.raises(StorageError, match="over the limit of 999 bytes") as info:
        storage.read_bytes("index.json", max_bytes=999)
    assert storage.full_path("index.json") in str(info.value)
    assert "1000 bytes" in str(info.value)
    _write(storage, "empty", b"")
    assert storage.read_bytes("empty", max_bytes=0) == b""


# -- commit primitives ----------------------------------------------------------------


def test_write_atomic_creates_and_replaces(storage: Storage) -> None:
    storage.write_atomic("index.json", b'{"v": 1}')
    assert storage.read_bytes("index.json") == b'{"v": 1}'
    big = _random_bytes(2 * 1024 * 1024)
    storage.write_atomic("index.json", big)
    assert storage.read_bytes("index.json") == big
    storage.write_atomic("index.json", b"")
    assert storage.read_bytes("index.json") == b""
    assert storage.listdir() == ["index.json"]  # no temporary files left behind


def test_write_atomic_nested(storage: Storage) -> None:
    storage.write_atomic("a/b/c/meta.json", b"{}")
    assert storage.listdir() == ["a/b/c/meta.json"]


def test_write_exclusive(storage: Storage) -> None:
    assert storage.write_exclusive("locks/save.lock", b"rank0") is True
    assert storage.write_exclusive("locks/save.lock", b"rank1") is False
    assert storage.read_bytes("locks/save.lock") == b"rank0"
    storage.remove(["locks/save.lock"])
    assert storage.write_exclusive("locks/save.lock", b"rank1") is True
    assert storage.read_bytes("locks/save.lock") == b"rank1"


# -- listing and deleting -------------------------------------------------------------


def test_listdir(storage: Storage) -> None:
    assert storage.listdir() == []
    assert storage.listdir("nope") == []
    names = ["index.json", "data/s1-r0.bin", "data/s1-r1.bin", "data/sub/deep.bin", "z"]
    for n in names:
        storage.write_atomic(n, n.encode())
    assert storage.listdir() == sorted(names)
    assert storage.listdir("data") == ["data/s1-r0.bin", "data/s1-r1.bin", "data/sub/deep.bin"]
    assert storage.listdir("data/sub") == ["data/sub/deep.bin"]
    assert storage.listdir("index.json") == ["index.json"]


def test_remove(storage: Storage) -> None:
    for n in ("a", "b", "d/c"):
        storage.write_atomic(n, b"1")
    storage.remove(["a", "d/c", "missing", "no/such/file"])
    assert storage.listdir() == ["b"]
    storage.remove([])
    storage.remove(iter(["b"]))
    assert storage.listdir() == []


def test_remove_tree(storage: Storage) -> None:
    for n in ("keep", "step-1/index.json", "step-1/data/r0.bin", "step-2/index.json"):
        storage.write_atomic(n, b"1")
    storage.remove_tree("step-1")
    assert storage.listdir() == ["keep", "step-2/index.json"]
    storage.remove_tree("step-1")  # already gone
    storage.remove_tree("never-existed")
    storage.remove_tree()
    assert storage.listdir() == []
    assert not storage.exists("keep")
    storage.remove_tree()  # the root itself is gone now: still fine


def test_makedirs(storage: Storage) -> None:
    storage.makedirs()
    storage.makedirs("a/b")
    storage.makedirs("a/b")  # exists already: fine
    assert storage.listdir() == []
    storage.write_atomic("a/b/f", b"1")
    assert storage.listdir("a") == ["a/b/f"]


# -- map_ranges: read_ranges' contract, possibly without a copy ------------------------


@pytest.mark.parametrize("mmap_on", [1, 0])
def test_map_ranges_matches_read_ranges(storage: Storage, mmap_on: int) -> None:
    from shardsave import knobs

    a = _random_bytes(300_000, seed=3)
    b = _random_bytes(70_000, seed=4)
    _write(storage, "data/a.bin", a)
    _write(storage, "data/b.bin", b)
    requests = [
        ("data/a.bin", 65_537, 200_001),  # starts off a page / allocation boundary
        ("data/b.bin", 0, 0),
        ("data/a.bin", 0, 1),
        ("data/b.bin", 70_000, 70_000),
        ("data/a.bin", 299_999, 300_000),
        ("data/b.bin", 1, 70_000),
        ("data/a.bin", 65_537, 200_001),  # the same range twice
    ]
    with knobs.override(LOCAL_MMAP=mmap_on):
        got = storage.map_ranges(requests)
        assert [bytes(g) for g in got] == [(a if n.endswith("a.bin") else b)[s:e] for n, s, e in requests]
        assert storage.map_ranges([]) == []


def test_map_ranges_errors_name_the_file(storage: Storage) -> None:
    _write(storage, "a.bin", b"a" * 100)
    with pytest.raises(StorageError) as info:
        storage.map_ranges([("a.bin", 0, 10), ("a.bin", 90, 110)])
    assert not isinstance(info.value, MissingFileError)
    assert storage.full_path("a.bin") in str(info.value)
    assert "[90, 110)" in str(info.value)
    with pytest.raises(MissingFileError) as missing:
        storage.map_ranges([("nope.bin", 0, 10)])
    assert storage.full_path("nope.bin") in str(missing.value)
    with pytest.raises(ValueError, match="invalid byte range"):
        storage.map_ranges([("a.bin", 5, 4)])
