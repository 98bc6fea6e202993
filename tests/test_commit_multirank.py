"""The commit protocol across real processes: all-or-nothing, errors from every rank,
lost ranks, replicated dedup, and per-rank values on other world sizes."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from multirank import run_multirank

import shardsave as ss
from shardsave.format.names import INDEX_NAME

# `shardsave.save` the attribute is the function; the module is only in sys.modules.
save_module = importlib.import_module("shardsave.save")


def _failing_write_worker(path: str) -> str:
    rank = dist.get_rank()
    if rank == 1:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise OSError(28, "No space left on device (injected)")

        save_module.write_rank_file = broken  # type: ignore[assignment]
    try:
        ss.save({"w": torch.ones(1000), "r": ss.PerRank(rank)}, path)
    except ss.CheckpointError as exc:
        return str(exc)
    return "no error"


@pytest.mark.multirank
@pytest.mark.timeout(120)
def test_write_failure_on_one_rank_commits_nothing_and_every_rank_raises(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    messages = run_multirank(_failing_write_worker, 3, path, timeout=100)
    for msg in messages:
        assert "rank 1" in msg and "No space left on device" in msg
    assert not os.path.exists(os.path.join(path, INDEX_NAME))
    assert os.listdir(os.path.join(path, "data")) == []  # the other ranks' files were removed


def _bad_value_worker(path: str) -> str:
    rank = dist.get_rank()
    state: dict[str, Any] = {"w": torch.ones(4)}
    if rank == 2:
        state["bad"] = {1, 2}
    try:
        ss.save(state, path)
    except ss.CheckpointError as exc:
        return str(exc)
    return "no error"


@pytest.mark.multirank
@pytest.mark.timeout(120)
def test_bad_value_on_one_rank_is_refused_everywhere_before_writing(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    messages = run_multirank(_bad_value_worker, 3, path, timeout=100)
    assert all("rank 2" in m and "state_dict['bad']" in m and "set" in m for m in messages)
    assert not os.path.exists(path) or not os.listdir(path)


def _dying_worker(path: str) -> tuple[str, float]:
    rank = dist.get_rank()
    if rank == 1:
        def die(*args: Any, **kwargs: Any) -> Any:
            os._exit(17)

        save_module.write_rank_file = die  # type: ignore[assignment]
    start = time.perf_counter()
    try:
        ss.save({"w": torch.ones(100)}, path)
    except ss.CheckpointError as exc:
        return str(exc), time.perf_counter() - start
    return "no error", 0.0


@pytest.mark.multirank
@pytest.mark.timeout(180)
def test_a_dead_rank_is_reported_lost_within_the_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    results = run_multirank(_dying_worker, 2, path, timeout=150, allow_death={1},
                            env={"SHARDSAVE_COLLECTIVE_TIMEOUT_S": "20"})
    message, seconds = results[0]
    assert "lost or timed out" in message, message
    assert seconds < 60
    assert not os.path.exists(os.path.join(path, INDEX_NAME))


def _replicated_worker(path: str, identical: bool) -> Any:
    rank = dist.get_rank()
    state = {f"w{i}": torch.arange(1000 * (i + 1), dtype=torch.float32) for i in range(6)}
    if not identical:
        state["rng"] = torch.tensor([rank])
    try:
        info = ss.save(state, path)
    except ss.CheckpointError as exc:
        return str(exc)
    return [(e.key, e.layout.writer if e.layout else None) for e in info.entries], [f.size for f in info.files]


@pytest.mark.multirank
@pytest.mark.timeout(120)
def test_replicated_tensors_are_stored_once_with_writes_spread(tmp_path: Path) -> None:
    entries, sizes = run_multirank(_replicated_worker, 2, str(tmp_path / "a"), True, timeout=100)[0]
    assert len(entries) == 6
    assert {writer for _, writer in entries} == {0, 1}
    # One copy of every tensor on storage in total, split roughly evenly.
    assert max(sizes) < 0.75 * sum(sizes)
    full = ss.load_full(str(tmp_path / "a"))
    assert all(torch.equal(full[f"w{i}"], torch.arange(1000 * (i + 1), dtype=torch.float32)) for i in range(6))
    messages = run_multirank(_replicated_worker, 2, str(tmp_path / "b"), False, timeout=100)
    assert all("state_dict['rng']" in m and "ss.PerRank" in m for m in messages)


def _per_rank_save(path: str) -> None:
    rank = dist.get_rank()
    ss.save({"rng": ss.PerRank({"t": torch.full((3,), rank), "pos": rank * 10}), "step": 5}, path)


def _per_rank_load(path: str, strict: bool) -> Any:
    target = {"rng": ss.PerRank({"t": torch.full((3,), -1), "pos": -1}), "step": 0}
    try:
        result = ss.load(target, path, strict=strict)
    except ss.ShardsaveError as exc:
        return type(exc).__name__
    return target["rng"].value["t"].tolist(), target["rng"].value["pos"], target["step"], result.missing


@pytest.mark.multirank
@pytest.mark.timeout(180)
def test_per_rank_values_on_a_larger_world(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    run_multirank(_per_rank_save, 2, path, timeout=100)
    full = ss.load_full(path)
    assert [v["pos"] for v in full["rng"]] == [0, 10]
    strict = run_multirank(_per_rank_load, 3, path, True, timeout=100)
    assert strict[2] == "StateDictMismatchError" and strict[0] == "CheckpointError"
    loose = run_multirank(_per_rank_load, 3, path, False, timeout=100)
    assert loose[0][:3] == ([0, 0, 0], 0, 5) and loose[1][:3] == ([1, 1, 1], 10, 5)
    assert loose[2][:3] == ([-1, -1, -1], -1, 5) and len(loose[2][3]) == 2
