"""``ss.async_save``: staged copies, background commit, failures never lost, one save in flight."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from multirank import run_multirank

import shardsave as ss
from shardsave.asyncsave import staging_buffer_bytes
from shardsave.staging import Stager


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(256, 64, generator=g),
        "view": torch.arange(40.0).reshape(8, 5)[:, 1:4],  # non-contiguous
        "half": torch.randn(33, generator=g).to(torch.bfloat16),
        "arr": np.arange(12, dtype=np.int32).reshape(3, 4),
        "blob": bytearray(b"abc"),
        "cfg": {"lr": 0.1, "names": ["a", "b"]},
        "rng": ss.PerRank(torch.get_rng_state()),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.timeout(60)
def test_checkpoint_holds_values_of_the_call_not_later_updates(tmp_path: Path) -> None:
    state = _state()
    expected = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    arr_before = state["arr"].copy()
    handle = ss.async_save(state, str(tmp_path / "c"))
    # The training loop goes on at once, updating everything in place.
    for k in expected:
        state[k].add_(1) if state[k].dtype != torch.bfloat16 else state[k].mul_(3)
    state["arr"] += 100
    state["blob"][0:1] = b"X"
    state["cfg"]["names"].append("c")
    state["cfg"]["lr"] = 7.0
    info = handle.wait()
    assert handle.done() and handle.info is info and handle.exception() is None
    assert handle.total_s is not None and 0 < handle.stall_s <= handle.total_s
    got = ss.load_full(str(tmp_path / "c"))
    for k, v in expected.items():
        assert torch.equal(_bits(got[k]), _bits(v)), k
    np.testing.assert_array_equal(got["arr"], arr_before)
    assert got["blob"] == b"abc"
    assert got["cfg"] == {"lr": 0.1, "names": ["a", "b"]}


@pytest.mark.timeout(60)
def test_staging_buffers_are_reused_and_released() -> None:
    stager = Stager()
    state = {"a": torch.ones(1000), "b": np.zeros(100), "c": torch.ones(10)}
    staged, first = stager.stage(state)
    assert first.bytes_allocated == first.bytes_copied == 4000 + 800 + 40
    staged2, second = stager.stage(state)
    assert second.bytes_allocated == 0 and second.bytes_copied == first.bytes_copied
    assert staged2["a"].data_ptr() == staged["a"].data_ptr()  # the same buffer, refilled
    state["a"] = torch.ones(5, 5)  # shape changed: a new buffer; "c" gone: released
    del state["c"]
    _, third = stager.stage(state)
    assert third.bytes_allocated == 100
    assert stager.buffer_bytes == 100 + 800


@pytest.mark.timeout(60)
def test_background_failure_is_raised_by_wait_and_never_commits(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    handle = ss.async_save({"w": torch.ones(3)}, str(blocker / "ckpt"))
    with pytest.raises(ss.CheckpointError) as err:
        handle.wait()
    assert "ckpt" in str(err.value) or "file" in str(err.value)
    assert handle.info is None and handle.exception() is err.value
    ss.save({"w": torch.ones(3)}, str(tmp_path / "ok"))  # the failure was seen: saving goes on


@pytest.mark.timeout(60)
def test_unseen_background_failure_is_raised_by_the_next_save(tmp_path: Path) -> None:
    ss.save({"w": torch.zeros(3)}, str(tmp_path / "c"))
    ss.async_save({"w": torch.ones(3)}, str(tmp_path / "c"))  # exists, no overwrite: fails in the background
    with pytest.raises(ss.CheckpointError, match=r"previous async save .* failed") as err:
        ss.async_save({"w": torch.ones(3)}, str(tmp_path / "d"))
    assert isinstance(err.value.__cause__, ss.CheckpointExistsError)
    assert not (tmp_path / "d").exists()  # the new save never started
    assert torch.equal(ss.load_full(str(tmp_path / "c"))["w"], torch.zeros(3))  # the old one untouched
    ss.async_save({"w": torch.ones(3)}, str(tmp_path / "d")).wait()  # raised once only


@pytest.mark.timeout(60)
def test_one_save_in_flight_and_loads_wait_for_it(tmp_path: Path) -> None:
    first = ss.async_save({"w": torch.full((1000,), 1.0)}, str(tmp_path / "a"))
    ss.save({"w": torch.full((10,), 2.0)}, str(tmp_path / "b"))  # waits for "a" first
    assert first.done()
    second = ss.async_save({"w": torch.full((1000,), 3.0)}, str(tmp_path / "c"))
    target = {"w": torch.zeros(1000)}
    ss.load(target, str(tmp_path / "c"))  # the checkpoint collective waits for the save in flight
    assert second.done() and torch.equal(target["w"], torch.full((1000,), 3.0))


@pytest.mark.timeout(60)
def test_unsupported_value_fails_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(ss.CheckpointError, match="object"):
        ss.async_save({"bad": object()}, str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()
    assert staging_buffer_bytes() >= 0


# --------------------------------------------------------------------------- multi-rank


def _async_worker(root: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(1024 * 1024, dtype=torch.float32).reshape(1024, 1024)  # 4 MiB
    state: dict[str, Any] = {
        "w": distribute_tensor(full.clone(), mesh, [Shard(0)]),
        "odd": distribute_tensor(torch.arange(15.0).reshape(5, 3), mesh, [Shard(0)]),  # uneven shards
        "bias": torch.ones(7),
        "rank": ss.PerRank(torch.tensor([rank])),
    }
    out: dict[str, Any] = {}
    stalls, totals = [], []
    for i in range(3):
        path = os.path.join(root, f"c{i}")
        h = ss.async_save(state, path)
        # Right away: update everything in place, and keep training collectives going on
        # the default group while the background save runs its own on the checkpoint group.
        state["w"].to_local().add_(1.0)
        state["odd"].to_local().mul_(-1.0)
        state["bias"].add_(1.0)
        t = torch.ones(1)
        for _ in range(20):
            dist.all_reduce(t)  # (all ranks, default group)
        h.wait()
        stalls.append(h.stall_s)
        totals.append(h.total_s)
    out["stalls"], out["totals"] = stalls, totals

    # A save that fails in the background on every rank: differing "replicated" values.
    h = ss.async_save({"x": torch.tensor([float(rank)])}, os.path.join(root, "bad"))
    try:
        h.wait()
        out["bad"] = "no error"
    except ss.CheckpointError as exc:
        out["bad"] = str(exc)
    out["bad_committed"] = os.path.exists(os.path.join(root, "bad", "index.json"))
    # Unseen failures are raised by the next save on every rank.
    ss.async_save({"x": torch.tensor([float(rank)])}, os.path.join(root, "bad2"))
    try:
        ss.save({"y": torch.ones(2)}, os.path.join(root, "after"))
        out["next"] = "no error"
    except ss.CheckpointError as exc:
        out["next"] = str(exc)
    return out


@pytest.mark.multirank
@pytest.mark.timeout(180)
def test_async_save_two_ranks_dtensors_in_place_updates_and_failures(tmp_path: Path) -> None:
    results = run_multirank(_async_worker, 2, str(tmp_path), timeout=150)
    full = torch.arange(1024 * 1024, dtype=torch.float32).reshape(1024, 1024)
    for i in range(3):
        got = ss.load_full(str(tmp_path / f"c{i}"))
        assert torch.equal(got["w"], full + i), i
        assert torch.equal(got["odd"], torch.arange(15.0).reshape(5, 3) * (-1) ** i), i
        assert torch.equal(got["bias"], torch.full((7,), 1.0 + i)), i
        assert [int(t) for t in got["rank"]] == [0, 1]
    for r in results:
        assert "ss.PerRank" in r["bad"] or "differ" in r["bad"], r["bad"]
        assert not r["bad_committed"]
        assert "previous async save" in r["next"], r["next"]
        assert all(s <= t for s, t in zip(r["stalls"], r["totals"]))
    assert not (tmp_path / "after").exists()
    print(f"\nasync save of 4 MiB on 2 ranks: stall {results[0]['stalls']} s, total {results[0]['totals']} s")
