"""DCP drop-in: ``dcp.save(sd, storage_writer=ss.DCPWriter(path))`` / ``dcp.load(sd,
storage_reader=ss.DCPReader(path))`` -- single process, and FSDP2 model + optimizer state on
2 gloo ranks, resharded on load, and readable by ``ss.load_full``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from multirank import run_multirank

import shardsave as ss
from shardsave import knobs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model_and_optim(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (seed + 1))
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.timeout(60)
def test_single_process_round_trip_and_json_values(tmp_path: Path) -> None:
    model, opt = _model_and_optim(0)
    sd = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 5,
          "extra": {"t": (1, 2.5, [3, ("x",)]), "empty": [], "none": None}}
    path = str(tmp_path / "ck")
    with knobs.override(CHUNK_BYTES=64):  # several chunks per tensor
        dcp.save(sd, storage_writer=ss.DCPWriter(path, codec="zstd"))
    assert sorted(os.listdir(path)) == ["data", "index.json"]
    assert not any(n.endswith(".metadata") for n in os.listdir(path))  # no pickled metadata
    index = json.loads((tmp_path / "ck" / "index.json").read_bytes())
    assert "dcp" in index["metadata"]
    assert ss.verify(path).ok

    full = ss.load_full(path)
    assert torch.equal(full["model"]["0.weight"], model.state_dict()["0.weight"])
    assert full["step"] == 5 and full["extra"]["t"] == [1, 2.5, [3, ["x"]]]

    model2, opt2 = _model_and_optim(1)
    target = {"model": model2.state_dict(), "optim": opt2.state_dict(), "step": 0,
              "extra": {"t": None, "empty": None, "none": 1}}
    dcp.load(target, storage_reader=ss.DCPReader(path))
    assert target["step"] == 5
    assert target["extra"] == {"t": (1, 2.5, [3, ("x",)]), "empty": [], "none": None}  # tuples kept
    for k, v in model.state_dict().items():
        assert torch.equal(target["model"][k], v)
    assert target["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert target["optim"]["param_groups"][0]["lr"] == 0.01
    assert torch.equal(target["optim"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.timeout(60)
def test_overwrite_protection_and_refusals_commit_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    dcp.save({"a": torch.ones(3)}, storage_writer=ss.DCPWriter(path))
    with pytest.raises(BaseException, match="already holds a committed checkpoint"):  # DCP's CheckpointException
        dcp.save({"a": torch.zeros(3)}, storage_writer=ss.DCPWriter(path))
    assert torch.equal(ss.load_full(path)["a"], torch.ones(3))
    dcp.save({"a": torch.zeros(3)}, storage_writer=ss.DCPWriter(path, overwrite=True))
    assert torch.equal(ss.load_full(path)["a"], torch.zeros(3))
    assert len(os.listdir(tmp_path / "ck" / "data")) == 1  # the replaced save's file is gone

    bad = str(tmp_path / "bad")
    with pytest.raises(BaseException, match="'b' holds a ndarray"):
        dcp.save({"a": torch.ones(2), "b": np.ones(3)}, storage_writer=ss.DCPWriter(bad))
    assert not os.path.exists(os.path.join(bad, "index.json"))
    with pytest.raises(ValueError, match="reserved"):
        ss.DCPWriter(bad, metadata={"dcp": 1})


@pytest.mark.timeout(60)
def test_a_save_committing_in_between_makes_the_dcp_commit_fail(tmp_path: Path) -> None:
    """Another save commits the path between DCP's planning and its commit: the DCPWriter
    commits nothing, removes its own files and says so (the commit claim of ss.save)."""
    path = str(tmp_path / "ck")
    ss.save({"a": torch.ones(3)}, path)

    class Racing(ss.DCPWriter):
        def finish(self, metadata: Any, results: Any) -> None:
            ss.save({"a": torch.full((3,), 7.0)}, path, overwrite=True)  # job B commits first
            super().finish(metadata, results)

    from torch.distributed.checkpoint.api import CheckpointException

    # DCP wraps the coordinator's exception in its CheckpointException, message included.
    with pytest.raises(CheckpointException, match=r"ConcurrentSaveError: another save .* committed"):
        dcp.save({"a": torch.zeros(3)}, storage_writer=Racing(path, overwrite=True))
    assert torch.equal(ss.load_full(path)["a"], torch.full((3,), 7.0))
    report = ss.verify(path)
    assert report.ok and not report.extra_files, report


def test_reader_loads_checkpoints_of_ss_save(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    ss.save({"model": {"w": torch.arange(12.0).reshape(3, 4)}, "lr": 0.5}, path)
    target = {"model": {"w": torch.zeros(3, 4)}, "lr": 0.0}
    dcp.load(target, storage_reader=ss.DCPReader(path))
    assert torch.equal(target["model"]["w"], torch.arange(12.0).reshape(3, 4)) and target["lr"] == 0.5


def _fsdp2_case(path: str) -> dict[str, Any]:
    """(2 ranks) FSDP2 model + Adam through DCPWriter, then back through DCPReader into a
    freshly built FSDP2 model, and into plain full tensors (DCP reshards)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.Adam(model.parameters(), lr=0.01 * (seed + 1))
        model(torch.randn(4, 5)).sum().backward()
        opt.step()
        return model, opt

    rank = dist.get_rank()
    model, opt = build(0)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "step": 3}, storage_writer=ss.DCPWriter(path))
    # (all ranks) full tensors of what was saved, for the comparisons
    expected = {k: v.full_tensor() for k, v in msd.items()}
    expected_avg = {k: v["exp_avg"].full_tensor() for k, v in osd["state"].items()}

    model2, opt2 = build(1)
    msd2, osd2 = get_state_dict(model2, opt2)
    target = {"model": msd2, "optim": osd2, "step": 0}
    dcp.load(target, storage_reader=ss.DCPReader(path))
    set_state_dict(model2, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"])
    msd3, osd3 = get_state_dict(model2, opt2)
    out: dict[str, Any] = {
        "model_equal": all(torch.equal(v.full_tensor(), expected[k]) for k, v in msd3.items()),
        "avg_equal": all(torch.equal(v["exp_avg"].full_tensor(), expected_avg[k]) for k, v in osd3["state"].items()),
        "lr": opt2.param_groups[0]["lr"],
        "step": target["step"],
        "sharded": type(msd3["0.weight"]).__name__,
    }
    # resharding by DCP: every rank asks for whole tensors (reads pieces from both files)
    plain = {"model": {k: torch.zeros(v.shape) for k, v in expected.items()}}
    dcp.load(plain, storage_reader=ss.DCPReader(path))
    out["plain_equal"] = all(torch.equal(plain["model"][k], expected[k]) for k in expected)
    dist.barrier()
    if rank == 0:
        full = ss.load_full(path)
        out["load_full_equal"] = all(torch.equal(full["model"][k], expected[k]) for k in expected)
        out["load_full_avg"] = all(torch.equal(full["optim"]["state"][k]["exp_avg"], expected_avg[k])
                                   for k in expected_avg)
        out["verify"] = ss.verify(path).ok
        out["files"] = sorted(os.listdir(os.path.join(path, "data")))
        out["layouts"] = sorted({e.layout.type for e in ss.info(path).entries if e.layout is not None})
    dist.barrier()
    return out


@pytest.mark.multirank
@pytest.mark.timeout(120)
def test_fsdp2_model_and_optimizer_through_dcp(tmp_path: Path) -> None:
    results = run_multirank(_fsdp2_case, 2, str(tmp_path / "ck"), timeout=100)
    for r in results:
        assert r["model_equal"] and r["avg_equal"] and r["plain_equal"], r
        assert r["lr"] == 0.01 and r["step"] == 3 and r["sharded"] == "DTensor"
    r0 = results[0]
    assert r0["load_full_equal"] and r0["load_full_avg"] and r0["verify"], r0
    assert len(r0["files"]) == 2  # one data file per rank
    assert r0["layouts"] == ["boxes", "replicated"]  # FSDP shards, and the deduplicated step counters


@pytest.mark.timeout(30)
def test_reader_refuses_ranks_that_read_different_saves() -> None:
    """DCP has every rank read the metadata itself; an overwrite between two ranks' reads
    must fail the load on all ranks, not load two checkpoints side by side."""
    from torch.distributed.checkpoint.planner import LoadPlan

    reader = ss.DCPReader("unused")
    same = [LoadPlan([], storage_data="20260101T000000-aaaaaaaa")] * 2
    assert reader.prepare_global_plan(same) == same
    with pytest.raises(ss.CheckpointError, match="changed while loading"):
        reader.prepare_global_plan([LoadPlan([], storage_data="20260101T000000-aaaaaaaa"),
                                    LoadPlan([], storage_data="20260101T000001-bbbbbbbb")])
