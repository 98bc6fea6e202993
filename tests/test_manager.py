"""``ss.CheckpointManager``: step directories, save_every, retention policies, gc, restore."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from multirank import run_multirank

import shardsave as ss
from shardsave.manager import (
    CheckpointRecord,
    KeepBest,
    KeepEvery,
    KeepLast,
    parse_step_dir,
    plan_deletions,
    step_dir_name,
)


def _state(v: float) -> dict[str, Any]:
    return {"w": torch.full((4, 3), v), "step": int(v)}


def _recs(*steps: int, loss: dict[int, float] | None = None) -> list[CheckpointRecord]:
    return [CheckpointRecord(s, {"loss": loss[s]} if loss and s in loss else {}) for s in steps]


# --------------------------------------------------------------------------- pure parts


def test_step_dir_names_sort_like_steps() -> None:
    names = [step_dir_name(s) for s in (1000, 2, 999_999_999, 30)]
    assert step_dir_name(1000) == "step-000001000"
    assert sorted(names) == [step_dir_name(s) for s in (2, 30, 1000, 999_999_999)]
    assert parse_step_dir("step-000001000") == 1000
    assert parse_step_dir("step-1000") is None and parse_step_dir("step-000001000.tmp") is None


def test_policies_compose_and_never_delete_newest_or_protected() -> None:
    recs = _recs(10, 20, 30, 40, 50, 60, loss={10: 0.5, 20: 0.1, 30: 0.9, 40: 0.3, 50: 0.8, 60: 0.7})
    assert plan_deletions(recs, [KeepLast(2)], protected=()) == [10, 20, 30, 40]
    assert plan_deletions(recs, [KeepLast(2), KeepBest(1, "loss")], protected=()) == [10, 30, 40]
    assert plan_deletions(recs, [KeepLast(1), KeepBest(2, "loss", "max")], protected=()) == [10, 20, 40]
    assert plan_deletions(recs, [KeepLast(1), KeepEvery(30)], protected=()) == [10, 20, 40, 50]
    assert plan_deletions(recs, [KeepLast(0)], protected=()) == [10, 20, 30, 40, 50]  # newest always stays
    assert plan_deletions(recs, [KeepLast(1)], protected={20}) == [10, 30, 40, 50]
    assert plan_deletions(recs, [], protected=()) == []  # no policy: keep everything
    assert plan_deletions(_recs(1, 2), [KeepLast(3)], protected=()) == []
    # A checkpoint without the metric is never "best".
    assert plan_deletions(_recs(1, 2, 3, loss={2: 1.0}), [KeepLast(1), KeepBest(5, "loss")], protected=()) == [1]


def test_bad_arguments_say_what_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last must be an int >= 0"):
        ss.CheckpointManager(str(tmp_path), keep_last=-1)
    with pytest.raises(ValueError, match="needs best_metric"):
        ss.CheckpointManager(str(tmp_path), keep_best=2)
    with pytest.raises(ValueError, match="mode must be"):
        ss.CheckpointManager(str(tmp_path), mode="best")
    with pytest.raises(ValueError, match="save_every"):
        ss.CheckpointManager(str(tmp_path), save_every=0)
    with pytest.raises(ValueError, match="keep_last=0"):
        ss.CheckpointManager(str(tmp_path), keep_last=None, keep_every=10)


# --------------------------------------------------------------------------- one process


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_async", [False, True])
def test_save_every_retention_and_restore(tmp_path: Path, use_async: bool) -> None:
    mgr = ss.CheckpointManager(str(tmp_path / "run"), keep_last=2, keep_best=1, best_metric="loss",
                               keep_every=40, save_every=10, async_save=use_async)
    losses = {10: 0.5, 20: 0.2, 30: 0.4, 40: 0.6, 50: 0.45, 60: 0.3}
    for step in range(1, 61):
        out = mgr.save(step, _state(step), metrics={"loss": losses.get(step, 1.0)})
        assert (out is None) == (step % 10 != 0)
        if use_async and out is not None:
            assert isinstance(out, ss.AsyncSaveHandle)
    mgr.wait()
    # last two (50, 60) + best loss (20) + every 40th (40); 10 and 30 are gone
    assert mgr.steps() == [20, 40, 50, 60]
    assert sorted(os.listdir(tmp_path / "run")) == [step_dir_name(s) for s in (20, 40, 50, 60)]
    assert mgr.latest_step() == 60 and mgr.metrics(20) == {"loss": 0.2}
    assert mgr.info(60).metadata["step"] == 60
    target = _state(0)
    assert mgr.restore(target) == 60 and torch.equal(target["w"], torch.full((4, 3), 60.0)) and target["step"] == 60
    assert mgr.restore(target, step=20) == 20 and target["step"] == 20
    with pytest.raises(ss.CheckpointNotFoundError, match="step 30"):
        mgr.restore(target, step=30)
    assert mgr.save(61, _state(61), force=True) is not None  # force ignores save_every
    mgr.wait()
    assert mgr.latest_step() == 61


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_async", [False, True])
def test_encrypted_checkpoints_through_the_manager(tmp_path: Path, use_async: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHARDSAVE_KEY_FILE", raising=False)
    key, other = bytes(range(32)), bytes(range(1, 33))
    root = str(tmp_path / "run")
    mgr = ss.CheckpointManager(root, keep_last=2, async_save=use_async, encryption_key=key)
    for step in (1, 2, 3):
        mgr.save(step, _state(step), metrics={"loss": 1.0 / step})
    mgr.wait()
    assert mgr.steps() == [2, 3] and mgr.metrics(3) == {"loss": 1.0 / 3}
    assert mgr.info(3).encryption is not None  # saved encrypted, index authenticated with the key
    target = _state(0)
    assert mgr.restore(target) == 3 and torch.equal(target["w"], torch.full((4, 3), 3.0))
    with pytest.raises(ss.KeyRequiredError):
        ss.CheckpointManager(root).restore(_state(0))
    with pytest.raises(ss.WrongKeyError):
        ss.CheckpointManager(root, encryption_key=other).restore(_state(0))
    with pytest.raises(ss.WrongKeyError):
        ss.CheckpointManager(root, encryption_key=other).info(3)
    with pytest.raises(ValueError, match="32"):
        ss.CheckpointManager(root, encryption_key=b"short")


@pytest.mark.timeout(60)
def test_uncommitted_directories_are_ignored_and_garbage_collected(tmp_path: Path) -> None:
    mgr = ss.CheckpointManager(str(tmp_path), keep_last=None)
    assert mgr.restore(_state(0)) is None and mgr.latest_step() is None and mgr.steps() == []
    mgr.save(5, _state(5))
    # An interrupted save: data but no index -- newer than the committed one.
    broken = tmp_path / step_dir_name(9) / "data"
    broken.mkdir(parents=True)
    (broken / "x-r0.bin").write_bytes(b"partial")
    (tmp_path / "not-a-step").mkdir()
    assert mgr.steps() == [5] and mgr.latest_step() == 5
    target = _state(0)
    assert mgr.restore(target) == 5 and target["step"] == 5
    assert mgr.gc() == [9]
    assert not (tmp_path / step_dir_name(9)).exists() and (tmp_path / "not-a-step").exists()
    # Saving into a step whose directory holds leftovers removes them first.
    leftovers = tmp_path / step_dir_name(7) / "data"
    leftovers.mkdir(parents=True)
    (leftovers / "old-r0.bin").write_bytes(b"junk")
    mgr.save(7, _state(7))
    assert not (leftovers / "old-r0.bin").exists() and mgr.steps() == [5, 7]


class _Counter:
    """A Stateful object: the manager calls state_dict()/load_state_dict() and the extras."""

    def __init__(self) -> None:
        self.value = torch.zeros(3)
        self.calls: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        self.calls.append("state_dict")
        return {"value": self.value}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.calls.append("load_state_dict")
        self.value = sd["value"]

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"owner": "counter"}


@pytest.mark.timeout(60)
def test_stateful_objects_and_metadata(tmp_path: Path) -> None:
    mgr = ss.CheckpointManager(str(tmp_path))
    c = _Counter()
    assert mgr.restore(c) is None and c.calls == []  # no checkpoint: state_dict() never called
    c.value += 4
    mgr.save(3, c, metrics={"acc": torch.tensor(0.5), "loss": float("nan")}, metadata={"note": "x"})
    md = mgr.info(3).metadata
    assert md["owner"] == "counter" and md["note"] == "x" and md["metrics"] == {"acc": 0.5, "loss": None}
    with pytest.raises(ValueError, match="reserved"):
        mgr.save(4, c, metadata={"step": 1})
    with pytest.raises(ss.UnsupportedValueError, match="metric 'loss'"):
        mgr.save(4, c, metrics={"loss": "low"})
    fresh = _Counter()
    assert mgr.restore(fresh) == 3 and torch.equal(fresh.value, torch.full((3,), 4.0))
    assert fresh.calls == ["state_dict", "load_state_dict"]


# --------------------------------------------------------------------------- two ranks


def _manager_worker(root: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    out: dict[str, Any] = {}
    for use_async in (False, True):
        run = os.path.join(root, "async" if use_async else "sync")
        mgr = ss.CheckpointManager(run, keep_last=2, save_every=2, async_save=use_async)
        w = distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)])
        for step in range(1, 9):
            w.to_local().add_(1.0)  # in place, right after the previous (maybe async) save
            mgr.save(step, {"w": w, "rank": ss.PerRank(rank * 100 + step)})
        mgr.wait()
        out[f"steps_{use_async}"] = mgr.steps()
        target: dict[str, Any] = {"w": distribute_tensor(torch.zeros(6, 4), mesh, [Shard(1)]), "rank": ss.PerRank(-1)}
        out[f"restored_{use_async}"] = mgr.restore(target)
        out[f"w_{use_async}"] = target["w"].full_tensor().tolist()  # tensors do not survive the pipe
        out[f"rank_{use_async}"] = target["rank"].value
    return out


@pytest.mark.multirank
@pytest.mark.timeout(180)
def test_manager_two_ranks_sync_and_async(tmp_path: Path) -> None:
    results = run_multirank(_manager_worker, 2, str(tmp_path), timeout=150)
    for rank, r in enumerate(results):
        for use_async in (False, True):
            # Only the coordinator deletes, after its own commit: other ranks may still list
            # a checkpoint that is about to go.
            assert r[f"steps_{use_async}"] == [6, 8] if rank == 0 else {6, 8} <= set(r[f"steps_{use_async}"])
            assert r[f"restored_{use_async}"] == 8
            assert r[f"w_{use_async}"] == torch.full((6, 4), 8.0).tolist()
            assert r[f"rank_{use_async}"] == rank * 100 + 8
    for sub in ("sync", "async"):
        assert sorted(os.listdir(tmp_path / sub)) == [step_dir_name(6), step_dir_name(8)]
