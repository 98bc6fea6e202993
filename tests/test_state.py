"""Training-state helpers: RNG capture/restore, the resumable sampler, TrainState, the record."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import shardsave as ss
from shardsave.load import LoadResult
from shardsave.state import (
    ResumableBatchSampler,
    TrainState,
    capture_rng,
    reproducibility_record,
    restore_rng,
)


def _draws(gens: dict[str, Any]) -> list[Any]:
    return [
        random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
        torch.rand(4).tolist(), torch.rand(2, generator=gens["tg"]).tolist(), gens["pcg"].random(3).tolist(),
        gens["py"].random(),
    ]


@pytest.mark.timeout(60)
def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    gens: dict[str, Any] = {"tg": torch.Generator().manual_seed(5), "pcg": np.random.default_rng(7), "py": random.Random(3)}
    random.gauss(0, 1)  # leaves a cached gauss_next: a float, not None
    np.random.randn()  # the same for numpy's legacy generator
    for _ in range(3):
        gens["pcg"].integers(0, 2**63)  # PCG64 state words are 128-bit integers
    state = {"rng": ss.PerRank(capture_rng(gens))}
    ss.save(state, str(tmp_path / "c"))
    pcg_before = dict(gens["pcg"].bit_generator.state["state"])
    expected = _draws(gens)
    target = {"rng": ss.PerRank(capture_rng(gens))}  # a template of the right kinds
    ss.load(target, str(tmp_path / "c"))
    saved = ss.load_full(str(tmp_path / "c"))["rng"][0]["generators"]["pcg"]["state"]
    assert saved == pcg_before and max(saved.values()) > 2**64  # exact big ints
    restore_rng(target["rng"].value, gens)
    assert _draws(gens) == expected


def test_sampler_is_deterministic_world_size_free_and_resumable() -> None:
    before = torch.get_rng_state()
    a = ResumableBatchSampler(50, 12, seed=3)
    batches = [a.next_batch() for _ in range(10)]  # 4 per epoch: crosses two epoch boundaries
    assert torch.equal(torch.get_rng_state(), before)  # never touches the global RNG
    assert all(len(b) == 12 for b in batches) and len(set(batches[0] + batches[1])) == 24
    assert batches[0] != batches[4]  # a new permutation per epoch
    b = ResumableBatchSampler(50, 12, seed=3)
    for _ in range(6):
        b.next_batch()
    c = ResumableBatchSampler(50, 12, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch() for _ in range(4)] == batches[6:]
    for world in range(1, 6):
        shares = [ResumableBatchSampler.local_slice(batches[0], r, world) for r in range(world)]
        assert [i for share in shares for i in share] == batches[0] and max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="batch_size=12, this one 10"):
        ResumableBatchSampler(50, 10, seed=3).load_state_dict(b.state_dict())


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.dropout(torch.relu(self.a(x)), 0.3, self.training))


def _job(seed: int = 0) -> tuple[TrainState, ResumableBatchSampler, torch.Tensor]:
    torch.manual_seed(seed)
    model = _Net()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    sampler = ResumableBatchSampler(64, 8, seed=seed)
    data = torch.randn(64, 9, generator=torch.Generator().manual_seed(99))
    ts = TrainState(model, optim, sched, sampler=sampler, seed=seed, config={"lr": 1e-2, "tags": ["x"]})
    return ts, sampler, data


def _train(ts: TrainState, sampler: ResumableBatchSampler, data: torch.Tensor, steps: int) -> list[float]:
    assert ts.optimizer is not None and ts.scheduler is not None
    losses = []
    for _ in range(steps):
        batch = data[sampler.next_batch()]
        loss = ((ts.model(batch[:, :8]).squeeze(1) - batch[:, 8]) ** 2).mean()
        loss.backward()
        ts.optimizer.step()
        ts.optimizer.zero_grad()
        ts.scheduler.step()
        ts.step += 1
        losses.append(loss.item())
    return losses


@pytest.mark.timeout(60)
def test_train_state_resumes_bitwise_with_dropout(tmp_path: Path) -> None:
    mgr = ss.CheckpointManager(str(tmp_path))
    ts, sampler, data = _job()
    assert ts.restore(mgr) is None  # a fresh start leaves the optimizer untouched
    assert ts.optimizer is not None and not ts.optimizer.state
    _train(ts, sampler, data, 5)
    mgr.save(ts.step, ts, metrics={"loss": 0.0})
    expected = _train(ts, sampler, data, 6)  # crosses an epoch boundary (8 batches per epoch)

    ts2, sampler2, data2 = _job(seed=0)
    torch.rand(10)  # whatever happened before the restore must not matter
    random.random()
    assert ts2.restore(mgr) == 5 and ts2.step == 5 and ts2.rng_restored
    assert _train(ts2, sampler2, data2, 6) == expected  # bitwise: dropout masks included
    record = mgr.info(5).metadata["reproducibility"]
    assert record["seed"] == 0 and record["config"] == {"lr": 1e-2, "tags": ["x"]}
    assert record["world_size"] == 1 and record["versions"]["torch"] == torch.__version__
    assert record["command_line"] == list(sys.argv)


def test_missing_rng_is_reseeded_but_other_gaps_fail() -> None:
    ts, _, _ = _job()
    with pytest.raises(ss.StateDictMismatchError, match=r"model\.a\.weight"):
        ts.check_load_result(LoadResult(missing=["model.a.weight"]))
    sd = ts.state_dict()
    ts.check_load_result(LoadResult(missing=["rng.torch (saved by 2 ranks; none for rank 2)"]))
    with pytest.warns(RuntimeWarning, match="no RNG state for this rank"):
        ts.load_state_dict(sd)
    assert not ts.rng_restored


def test_reproducibility_record_outside_git_and_bad_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "train.py"
    script.write_text("")
    monkeypatch.setattr(sys, "argv", [str(script), "--x"])
    record = reproducibility_record(seed=1)
    assert record["git_commit"] is None and record["git_dirty"] is None
    assert record["command_line"] == [str(script), "--x"] and record["hostnames"]
    with pytest.raises(ss.UnsupportedValueError, match="JSON"):
        reproducibility_record(config={"f": object()})
