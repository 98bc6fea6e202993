"""SIGKILL one rank of a 2-rank save at every named fault point (shardsave.faults), and at
seeded random moments: no partial checkpoint is ever committed, the previous checkpoint
loads bitwise until the new one is committed whole, and a CheckpointManager's latest step
always loads.

Each case costs one spawn of a gloo group (a killed rank cannot take part in another
save), so the cases are few and chosen: an overwrite at each of the six points (the
strongest case: an old checkpoint exists and must survive), a fresh save at the two
points where a kill leaves the most debris, and two random timings through the manager.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from multirank import run_multirank

import shardsave as ss
from shardsave import faults
from shardsave.format.names import INDEX_NAME

WORLD = 2
# Small chunks so that every rank writes several (mid-data-write #2 exists); a short
# collective timeout in case a lost peer is not noticed at once.
CHILD_ENV = {"SHARDSAVE_CHUNK_BYTES": "1024", "SHARDSAVE_COLLECTIVE_TIMEOUT_S": "30"}


def full_state(version: int) -> dict[str, Any]:
    """What load_full must return for the checkpoint of ``version`` (a pure function of it)."""
    g = torch.Generator().manual_seed(version)
    return {
        "model": {"w": torch.randn(64, 32, generator=g)},
        "b": torch.randn(100, generator=g).bfloat16(),
        "rng": [torch.full((4,), version * 10 + r, dtype=torch.int64) for r in range(WORLD)],
        "step": version,
    }


_MESH: list[Any] = []


def rank_state(version: int) -> dict[str, Any]:
    """This rank's share of ``full_state(version)``: w as a DTensor Shard(0), the rest replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    rank = dist.get_rank()
    full = full_state(version)
    if not _MESH:  # (all ranks) made once: creating a mesh is a collective
        _MESH.append(init_device_mesh("cpu", (WORLD,)))
    mesh = _MESH[0]
    w = full["model"]["w"]
    local = torch.chunk(w, WORLD, dim=0)[rank].contiguous()
    dw = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=w.shape, stride=w.stride())
    return {"model": {"w": dw}, "b": full["b"], "rng": ss.PerRank(full["rng"][rank]), "step": version}


def same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(
            got.view(torch.uint8) if got.dtype == torch.bfloat16 else got,
            want.view(torch.uint8) if want.dtype == torch.bfloat16 else want)
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    return bool(got == want)


KEY = bytes(range(32))


def _encryption_checks(path: str) -> str:
    """(all ranks) An encrypted 2-rank save and in-place load; ranks holding different keys
    are refused on every rank before anything is written. Runs in a spawn a kill test
    makes anyway."""
    mine = KEY if dist.get_rank() == 0 else bytes(32)
    try:
        ss.save(rank_state(3), path + "-mixed-keys", encryption_key=mine)
        mixed = "no error"
    except ss.CheckpointError as exc:
        mixed = str(exc)
    ss.save(rank_state(3), path + "-enc", encryption_key=KEY)
    target = rank_state(0)
    ss.load(target, path + "-enc", encryption_key=KEY)
    want = rank_state(3)
    assert torch.equal(target["model"]["w"].to_local(), want["model"]["w"].to_local())
    assert torch.equal(target["rng"].value, want["rng"].value) and target["step"] == 3
    return mixed


def _overwrite_worker(path: str, fresh: bool, point: str, rank_to_kill: int, hit: int,
                      encryption_checks: bool = False) -> str:
    if encryption_checks:
        mixed = _encryption_checks(path)
        assert "encryption key differs" in mixed, mixed
    if not fresh:
        ss.save(rank_state(1), path)  # the previous checkpoint, committed whole
    dist.barrier()
    state = rank_state(2)
    armed = [faults.Fault(point, "kill", None, hit)] if dist.get_rank() == rank_to_kill else []
    try:
        with faults.arm(*armed):
            ss.save(state, path, overwrite=True)
    except ss.CheckpointError as exc:
        return f"failed: {exc}"
    return "committed"


# (point, killed rank, hit, whether the new checkpoint is committed when the rank dies)
POINTS = [
    ("after-plan", 1, 1, False),
    ("mid-data-write", 1, 2, False),
    ("after-data", 1, 1, False),
    ("mid-index-write", 0, 1, False),
    ("after-rename", 0, 1, True),
    ("mid-cleanup", 0, 1, True),
]


def _check_after_kill(path: str, committed_new: bool, fresh: bool) -> None:
    if committed_new:
        assert same(ss.load_full(path), full_state(2))
    elif fresh:
        with pytest.raises(ss.CheckpointNotFoundError):
            ss.load_full(path)
        return
    else:
        assert same(ss.load_full(path), full_state(1))  # the previous checkpoint, bitwise
    report = ss.verify(path)
    assert report.ok, report.problems  # leftovers may be extra files, never a broken commit


@pytest.mark.multirank
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("point", "rank", "hit", "committed"), POINTS, ids=[p[0] for p in POINTS])
def test_sigkill_during_overwrite_never_commits_a_partial_checkpoint(
    tmp_path: Path, point: str, rank: int, hit: int, committed: bool
) -> None:
    path = str(tmp_path / "ck")
    checks = point == "after-plan"
    results = run_multirank(_overwrite_worker, WORLD, path, False, point, rank, hit, checks, timeout=150,
                            allow_death={rank}, env=CHILD_ENV)
    assert results[rank] is None, f"rank {rank} was not killed at {point}: {results[rank]}"
    survivor = results[1 - rank]
    assert survivor.startswith("failed:") and "lost" in survivor, survivor
    _check_after_kill(path, committed, fresh=False)
    if checks:  # the encrypted 2-rank checkpoint, resharded into one process
        assert same(ss.load_full(path + "-enc", encryption_key=KEY), full_state(3))
        assert ss.verify(path + "-enc", encryption_key=KEY).ok
        assert not os.path.exists(os.path.join(path + "-mixed-keys", INDEX_NAME))


@pytest.mark.multirank
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("point", "rank", "hit"), [("mid-data-write", 1, 2), ("mid-index-write", 0, 1)])
def test_sigkill_during_a_fresh_save_leaves_no_checkpoint(tmp_path: Path, point: str, rank: int, hit: int) -> None:
    path = str(tmp_path / "ck")
    results = run_multirank(_overwrite_worker, WORLD, path, True, point, rank, hit, timeout=150,
                            allow_death={rank}, env=CHILD_ENV)
    assert results[rank] is None
    _check_after_kill(path, committed_new=False, fresh=True)
    assert not os.path.exists(os.path.join(path, INDEX_NAME))


def _manager_worker(root: str, seed: int, rank_to_kill: int) -> list[int]:
    """Save steps 1, 2, 3, ... through a manager until the seeded timer kills a rank."""
    mgr = ss.CheckpointManager(root, keep_last=2)
    saved: list[int] = []
    rank_state(0)  # the mesh, before the clock starts
    if dist.get_rank() == rank_to_kill:
        faults.kill_after(seed, 1.5)
    for step in range(1, 200):
        try:
            mgr.save(step, rank_state(step), force=True)
        except Exception:  # the other rank died (CheckpointError, or gloo in a collective)
            break
        saved.append(step)
    return saved


@pytest.mark.multirank
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("seed", "rank"), [(1, 1), (2, 0)])
def test_random_sigkill_under_a_manager_never_breaks_the_latest_step(tmp_path: Path, seed: int, rank: int) -> None:
    root = str(tmp_path / "run")
    results = run_multirank(_manager_worker, WORLD, root, seed, rank, timeout=150, allow_death={rank},
                            env=CHILD_ENV)
    assert results[rank] is None, "the timer should have killed the rank within the save loop"
    mgr = ss.CheckpointManager(root, keep_last=2)
    steps = mgr.steps()
    reported = results[1 - rank]
    assert reported is not None
    if reported:
        # Every step the survivor saw committed is still there (within retention) or newer.
        assert mgr.latest_step() is not None and mgr.latest_step() >= reported[-1]
    for step in steps:  # every committed step loads whole and bitwise
        assert same(ss.load_full(mgr.path(step)), full_state(step)), step
        assert ss.verify(mgr.path(step)).ok
