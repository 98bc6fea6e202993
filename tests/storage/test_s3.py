"""shardsave on S3 (s3fs against moto's server mode on loopback, tests/s3_server.py):
save, load, resharding load on 2 ranks, commit by one PUT, ranged reads, overwrite
protection, listing and gc of partial checkpoints, retries and permanent failures."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fsspec.asyn import sync_wrapper
from multirank import run_multirank
from s3_server import S3Bucket
from storage_fakes import FlakyFS

import shardsave as ss
from shardsave import knobs
from shardsave.errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError
from shardsave.manager import CheckpointManager
from shardsave.storage import Storage
from shardsave.storage import retry as retry_mod

pytestmark = pytest.mark.timeout(90)


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(96, 64, generator=g), "b": torch.randn(64, generator=g).half()},
            "optim": {"m": torch.randn(96, 64, generator=g)}, "step": seed, "rng": ss.PerRank(b"\x01\x02")}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (torch.equal(a["model"]["w"], b["model"]["w"]) and torch.equal(a["model"]["b"], b["model"]["b"])
            and torch.equal(a["optim"]["m"], b["optim"]["m"]) and a["step"] == b["step"])


@pytest.fixture
def s3_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every S3 API call s3fs makes (operation name, parameters), in order."""
    import s3fs

    calls: list[tuple[str, dict[str, Any]]] = []
    original = s3fs.S3FileSystem._call_s3

    async def spy(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        params = dict(args[0]) if args and isinstance(args[0], dict) else {}
        params.update(kwargs)
        calls.append((method, params))
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", spy)
    # the sync twin was bound to the original at class creation (s3fs' file objects use it)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", sync_wrapper(spy))
    yield calls


def test_save_load_and_commit_by_one_put(s3_bucket: S3Bucket, s3_calls: list[tuple[str, dict[str, Any]]]) -> None:
    path, opts = f"{s3_bucket.url}/run/ck", s3_bucket.storage_options
    saved = _state(1)
    info = ss.save(saved, path, storage_options=opts)
    assert info.path == path
    ops = collections.Counter(m for m, _ in s3_calls)
    # no rename or copy anywhere: object stores have none that is atomic
    assert not {m for m in ops if "copy" in m.lower() or "rename" in m.lower()}, ops
    index_puts = [p for m, p in s3_calls if m == "put_object" and str(p.get("Key", "")).endswith("index.json")]
    assert len(index_puts) == 1  # the commit: one PUT of the whole index
    assert not [p for m, p in s3_calls if "multipart" in m and str(p.get("Key", "")).endswith("index.json")]
    # ... and it came after every data file was complete
    last_data = max(i for i, (m, p) in enumerate(s3_calls) if str(p.get("Key", "")).endswith(".bin")
                    and m in ("put_object", "complete_multipart_upload"))
    first_index = min(i for i, (m, p) in enumerate(s3_calls) if m == "put_object"
                      and str(p.get("Key", "")).endswith("index.json"))
    assert last_data < first_index

    target = _state(2)
    ss.load(target, path, storage_options=opts)
    assert _same(target, saved)
    assert _same(ss.load_full(path, storage_options=opts), saved)
    assert ss.verify(path, storage_options=opts).ok


def test_partial_load_uses_ranged_reads(s3_bucket: S3Bucket, s3_calls: list[tuple[str, dict[str, Any]]]) -> None:
    path, opts = f"{s3_bucket.url}/ck", s3_bucket.storage_options
    with knobs.override(CHUNK_BYTES=8192):
        ss.save(_state(1), path, storage_options=opts, codec="raw")
    s3_calls.clear()
    with knobs.override(READ_COALESCE_GAP=0):
        got = ss.load_full(path, keys=["model.b"], storage_options=opts)
    assert torch.equal(got["model"]["b"], _state(1)["model"]["b"])
    data_gets = [p for m, p in s3_calls if m == "get_object" and str(p.get("Key", "")).endswith(".bin")]
    assert data_gets and all(str(p.get("Range", "")).startswith("bytes=") for p in data_gets)
    fetched = sum(int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1
                  for r in (str(p["Range"]) for p in data_gets))
    assert fetched < 64 * 2 + 4096  # model.b (128 bytes) and the table of contents, not the 48 KiB tensors


def test_overwrite_protection(s3_bucket: S3Bucket) -> None:
    path, opts = f"{s3_bucket.url}/ck", s3_bucket.storage_options
    ss.save(_state(1), path, storage_options=opts)
    before = s3_bucket.fs.find(f"{s3_bucket.name}/ck")
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        ss.save(_state(2), path, storage_options=opts)
    assert s3_bucket.fs.find(f"{s3_bucket.name}/ck") == before  # nothing written
    ss.save(_state(2), path, storage_options=opts, overwrite=True)
    assert _same(ss.load_full(path, storage_options=opts), _state(2))
    assert len(s3_bucket.fs.find(f"{s3_bucket.name}/ck/data")) == 1  # the old save's file is gone


def test_listing_and_gc_of_partial_checkpoints(s3_bucket: S3Bucket) -> None:
    root, opts = f"{s3_bucket.url}/run", s3_bucket.storage_options
    mgr = CheckpointManager(root, keep_last=None, storage_options=opts)
    mgr.save(10, _state(1))
    mgr.save(20, _state(2))
    # an interrupted save of step 30: data, no index
    partial = Storage.from_url(mgr.path(30), opts)
    with partial.open_writer("data/20260101T000000-00000000-r0.bin") as w:
        w.write(b"x" * 100)
    assert mgr.steps() == [10, 20] and mgr.latest_step() == 20
    with pytest.raises(CheckpointNotFoundError, match="interrupted or failed save"):
        ss.load_full(mgr.path(30), storage_options=opts)
    assert mgr.gc() == [30]
    assert not s3_bucket.fs.exists(f"{s3_bucket.name}/run/step-000000030/data/20260101T000000-00000000-r0.bin")
    target = _state(0)
    assert mgr.restore(target) == 20 and _same(target, _state(2))


@pytest.fixture
def flaky_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FlakyFS]]:
    """Storage.from_url wraps the filesystem in FlakyFS (configure via the yielded list)."""
    made: list[FlakyFS] = []
    settings: dict[str, Any] = {}
    original = Storage.from_url.__func__  # type: ignore[attr-defined]

    def from_url(cls: type[Storage], url: str, storage_options: dict[str, Any] | None = None) -> Storage:
        plain = original(cls, url, storage_options)
        fs = FlakyFS(plain.fs, **settings)
        made.append(fs)
        return Storage.from_filesystem(fs, plain.root, storage_options=storage_options)

    monkeypatch.setattr(Storage, "from_url", classmethod(from_url))
    made.append(settings)  # type: ignore[arg-type]  # the first item: settings for later instances
    yield made


def test_transient_errors_are_retried_with_bounded_backoff(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(retry_mod.time, "sleep", waits.append)  # no real waiting; record it
    store = Storage.from_url(f"{s3_bucket.url}/ck", s3_bucket.storage_options)
    flaky = FlakyFS(store.fs, fail=4, methods={"pipe_file", "cat_file", "cat_ranges"})
    st = Storage.from_filesystem(flaky, store.root)
    with knobs.override(STORAGE_RETRIES=5, STORAGE_RETRY_BASE_S=0.1):
        st.write_atomic("index.json", b"{}")          # fails 4 times, then lands
        assert st.read_bytes("index.json") == b"{}"
    assert flaky.failures == 4 and flaky.calls["pipe_file"] == 5
    assert len(waits) == 4
    for i, w in enumerate(waits):  # exponential: base * 2**i, half fixed and half jitter, capped
        assert 0.1 * 2**i / 2 <= w <= min(retry_mod.MAX_BACKOFF_S, 0.1 * 2**i)
    # too many failures: bounded, and the error says how many attempts
    flaky.remaining = 10
    with knobs.override(STORAGE_RETRIES=2), pytest.raises(ss.ShardsaveError, match="after 3 attempt"):
        st.read_bytes("index.json")


def test_save_and_load_through_transient_failures(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch,
                                                  flaky_s3: list[Any]) -> None:
    monkeypatch.setattr(retry_mod.time, "sleep", lambda s: None)
    flaky_s3[0].update(fail=2, methods={"pipe_file", "cat_file", "cat_ranges", "exists"})
    path, opts = f"{s3_bucket.url}/ck", s3_bucket.storage_options
    ss.save(_state(3), path, storage_options=opts)
    assert _same(ss.load_full(path, storage_options=opts), _state(3))
    assert sum(fs.failures for fs in flaky_s3[1:]) >= 4


class _DenyIndexPut:
    """Wraps a filesystem; every PUT of index.json is refused (a permission problem)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.denied = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def pipe_file(self, path: str, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("/index.json"):
            self.denied += 1
            raise PermissionError(13, "Access Denied")
        return self.inner.pipe_file(path, *args, **kwargs)


def test_permanent_failure_is_clear_and_commits_nothing(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    wrappers: list[_DenyIndexPut] = []
    original = Storage.from_url.__func__  # type: ignore[attr-defined]

    def from_url(cls: type[Storage], url: str, storage_options: dict[str, Any] | None = None) -> Storage:
        plain = original(cls, url, storage_options)
        wrappers.append(_DenyIndexPut(plain.fs))
        return Storage.from_filesystem(wrappers[-1], plain.root, storage_options=storage_options)

    monkeypatch.setattr(Storage, "from_url", classmethod(from_url))
    path, opts = f"{s3_bucket.url}/ck", s3_bucket.storage_options
    with pytest.raises(CheckpointError, match="permanent error") as info:
        ss.save(_state(1), path, storage_options=opts)
    assert "index.json" in str(info.value) and "Access Denied" in str(info.value)
    assert not s3_bucket.fs.exists(f"{s3_bucket.name}/ck/index.json")
    assert not [p for p in s3_bucket.fs.find(f"{s3_bucket.name}/ck") if p.endswith(".bin")]  # data removed
    assert sum(w.denied for w in wrappers) == 1  # not retried


def _reshard_on_s3(path: str, options: dict[str, Any]) -> bool:
    """(2 ranks) Save a Shard(0) DTensor to S3, load it as Shard(1); each rank has its own s3fs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(11 * 6, dtype=torch.float32).reshape(11, 6)
    ss.save({"w": distribute_tensor(full, mesh, [Shard(0)]), "step": 7}, path, storage_options=options)
    target = {"w": distribute_tensor(torch.zeros(11, 6), mesh, [Shard(1)]), "step": 0}
    ss.load(target, path, storage_options=options)
    ok = torch.equal(target["w"].full_tensor(), full) and target["step"] == 7
    dist.barrier()
    return ok


@pytest.mark.multirank
@pytest.mark.timeout(120)
def test_resharding_load_on_two_ranks(s3_bucket: S3Bucket) -> None:
    path = f"{s3_bucket.url}/dist"
    assert run_multirank(_reshard_on_s3, 2, path, s3_bucket.storage_options, timeout=100) == [True, True]
    assert len(s3_bucket.fs.find(f"{s3_bucket.name}/dist/data")) == 2
    full = ss.load_full(path, storage_options=s3_bucket.storage_options)
    assert torch.equal(full["w"], torch.arange(66, dtype=torch.float32).reshape(11, 6))
