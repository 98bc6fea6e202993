"""Tiered save against S3 (moto): local commit first, background upload, remote index last."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from multirank import run_multirank
from s3_server import S3Bucket

import shardsave as ss
from shardsave import tiered
from shardsave.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    StorageError,
)

pytestmark = pytest.mark.timeout(90)


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(128, 64, generator=g), "step": seed}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return torch.equal(a["w"], b["w"]) and a["step"] == b["step"]


def test_remote_commit_comes_last(tmp_path: Path, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    original = tiered._copy_file

    def held_copy(src: Any, dst: Any, f: Any) -> None:
        assert release.wait(30)  # the upload waits until the test has looked at the remote
        original(src, dst, f)

    monkeypatch.setattr(tiered, "_copy_file", held_copy)
    local, remote, opts = str(tmp_path / "ck"), f"{s3_bucket.url}/run/ck", s3_bucket.storage_options
    handle = ss.tiered_save(_state(1), local, remote, storage_options=opts)
    assert _same(ss.load_full(local), _state(1))  # the local tier is committed on return
    assert not handle.done() and not handle.committed
    with pytest.raises(CheckpointNotFoundError):  # not committed remotely while uploading
        ss.load_full(remote, storage_options=opts)
    release.set()
    info = handle.wait(timeout=60)
    assert info is not None and info.path == remote and handle.committed
    assert _same(ss.load_full(remote, storage_options=opts), _state(1))
    assert ss.verify(remote, storage_options=opts).ok


def test_failed_upload_commits_nothing_remotely(tmp_path: Path, s3_bucket: S3Bucket,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(src: Any, dst: Any, f: Any) -> None:
        raise StorageError(f"upload of {f.name} denied")

    monkeypatch.setattr(tiered, "_copy_file", broken)
    local, remote, opts = str(tmp_path / "ck"), f"{s3_bucket.url}/ck", s3_bucket.storage_options
    handle = ss.tiered_save(_state(1), local, remote, storage_options=opts)
    with pytest.raises(CheckpointError, match="was not committed") as info:
        handle.wait(timeout=60)
    assert "denied" in str(info.value)
    assert not s3_bucket.fs.exists(f"{s3_bucket.name}/ck/index.json")
    assert _same(ss.load_full(local), _state(1))


def test_overwrite_protection_and_upload(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    remote, opts = f"{s3_bucket.url}/ck", s3_bucket.storage_options
    ss.save(_state(1), remote, storage_options=opts)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        ss.tiered_save(_state(2), str(tmp_path / "a"), remote, storage_options=opts)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    ss.tiered_save(_state(2), str(tmp_path / "a"), remote, storage_options=opts, overwrite=True).wait(60)
    assert _same(ss.load_full(remote, storage_options=opts), _state(2))
    assert len(s3_bucket.fs.find(f"{s3_bucket.name}/ck/data")) == 1  # the replaced save's file is gone
    # ss.upload: an already committed local checkpoint, index last
    ss.save(_state(3), str(tmp_path / "b"))
    with pytest.raises(CheckpointExistsError):
        ss.upload(str(tmp_path / "b"), remote, storage_options=opts)
    info = ss.upload(str(tmp_path / "b"), remote, storage_options=opts, overwrite=True)
    assert info.path == remote and _same(ss.load_full(remote, storage_options=opts), _state(3))


def _tiered_two_ranks(local: str, remote: str, options: dict[str, Any]) -> bool:
    """(2 ranks) each rank uploads its own data file; the coordinator commits when both are up."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(40 * 8, dtype=torch.float32).reshape(40, 8)
    handle = ss.tiered_save({"w": distribute_tensor(full, mesh, [Shard(0)])}, local, remote, storage_options=options)
    handle.wait(timeout=60)
    dist.barrier()
    target = {"w": distribute_tensor(torch.zeros(40, 8), mesh, [Shard(1)])}
    ss.load(target, remote, storage_options=options)
    return torch.equal(target["w"].full_tensor(), full) and handle.committed == (dist.get_rank() == 0)


@pytest.mark.multirank
@pytest.mark.timeout(120)
def test_tiered_save_on_two_ranks(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    remote = f"{s3_bucket.url}/dist"
    results = run_multirank(_tiered_two_ranks, 2, str(tmp_path / "local"), remote, s3_bucket.storage_options,
                            timeout=100)
    assert results == [True, True]
    assert len(s3_bucket.fs.find(f"{s3_bucket.name}/dist/data")) == 2


def test_two_uploads_racing_to_one_remote_path_commit_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another job commits the remote path while this upload copies its files: this upload
    commits nothing (the commit claim finds the remote index changed) and says so."""
    a, b, remote = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "remote")
    ss.save(_state(1), a)
    ss.save(_state(2), b)
    original = tiered._copy_file
    raced: list[bool] = []

    def copy_while_b_commits(src: Any, dst: Any, f: Any) -> None:
        if not raced:
            raced.append(True)
            ss.upload(b, remote)  # job B, start to finish, while job A is uploading
        original(src, dst, f)

    monkeypatch.setattr(tiered, "_copy_file", copy_while_b_commits)
    with pytest.raises(ss.CheckpointExistsError, match=r"another save .* committed"):
        ss.upload(a, remote, overwrite=True)
    assert _same(ss.load_full(remote), _state(2))
