"""Import from DCP checkpoints, torch.save files and safetensors files -- and refusal of
pickles that would run code."""

from __future__ import annotations

import datetime
import io
import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from multirank import run_multirank
from test_convert import pattern, same

import shardsave as ss
from shardsave.convert import import_checkpoint
from shardsave.convert.foreign import (
    UnsafePickleError,
    _legacy_container,
    _to_protocol_2,
    read_dcp_metadata,
)

# dcp.save / dcp.load without a process group say they assume a single process: they may.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class Evil:
    """Unpickling this runs a shell command that creates the file named ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def dcp_state() -> dict[str, Any]:
    return {
        "model": {"w": pattern(torch.bfloat16, (8, 4), 1), "b": torch.arange(4, dtype=torch.int64),
                  "f8": pattern(torch.float8_e4m3fn, (6,), 2)},
        "opt": {"state": {0: {"exp_avg": pattern(torch.float32, (8, 4), 3), "step": torch.tensor(3.0)}},
                "param_groups": [{"lr": 0.1, "betas": [0.9, 0.99], "params": [0]}]},
        "layers": [torch.zeros(2), torch.ones(3)],
        "step": 1000,
        "name": "run-1",
        "blob": b"\x00raw",
    }


@pytest.mark.timeout(180)
def test_import_dcp_checkpoint_written_by_dcp_save(tmp_path: Path) -> None:
    src = tmp_path / "dcp"
    sd = dcp_state()
    dcp.save(sd, checkpoint_id=str(src), no_dist=True)
    info, fmt = import_checkpoint(str(src), str(tmp_path / "ck"))
    assert fmt == "dcp" and info.metadata["import"]["format"] == "dcp"
    got = ss.load_full(str(tmp_path / "ck"))
    # DCP itself turns integer dict keys into strings ("opt.state.0.exp_avg").
    want = dict(sd)
    want["opt"] = {"state": {"0": sd["opt"]["state"][0]}, "param_groups": sd["opt"]["param_groups"]}
    same(got, want)
    assert ss.verify(str(tmp_path / "ck")).ok


def _dcp_save_sharded(path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(11 * 6, dtype=torch.float32).reshape(11, 6)
    sd = {"w": distribute_tensor(full, mesh, [Shard(0)]), "v": distribute_tensor(full.t(), mesh, [Shard(1)]),
          "r": distribute_tensor(torch.ones(3), mesh, [Replicate()]), "step": 9}
    dcp.save(sd, checkpoint_id=path)


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_import_dcp_checkpoint_of_dtensors_saved_by_two_ranks(tmp_path: Path) -> None:
    src = str(tmp_path / "dcp")
    run_multirank(_dcp_save_sharded, 2, src, timeout=240)
    import_checkpoint(src, str(tmp_path / "ck"))
    got = ss.load_full(str(tmp_path / "ck"))
    full = torch.arange(11 * 6, dtype=torch.float32).reshape(11, 6)
    same(got, {"w": full, "v": full.t().contiguous(), "r": torch.ones(3), "step": 9})


@pytest.mark.timeout(120)
def test_import_torch_save_file(tmp_path: Path) -> None:
    lin = torch.nn.Linear(3, 2)
    sd = {"model": lin.state_dict(), "param": torch.nn.Parameter(torch.ones(2)), "epoch": 4,
          "hist": OrderedDict(a=1.5), "sizes": torch.Size([2, 3])}
    torch.save(sd, tmp_path / "m.pt")
    _, fmt = import_checkpoint(str(tmp_path / "m.pt"), str(tmp_path / "ck"))
    assert fmt == "torch"
    got = ss.load_full(str(tmp_path / "ck"))
    same(got, {"model": {"weight": lin.weight.detach(), "bias": lin.bias.detach()}, "param": torch.ones(2),
               "epoch": 4, "hist": {"a": 1.5}, "sizes": [2, 3]})
    torch.save(torch.arange(5), tmp_path / "t.pt")  # not a dict: stored under "state"
    import_checkpoint(str(tmp_path / "t.pt"), str(tmp_path / "ck2"))
    same(ss.load_full(str(tmp_path / "ck2")), {"state": torch.arange(5)})


@pytest.mark.timeout(120)
def test_import_foreign_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"model.embed.weight": pattern(torch.bfloat16, (5, 4), 1), "lm_head.bias": torch.zeros(5)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt", "origin": "hf"})
    info, fmt = import_checkpoint(str(tmp_path / "m.safetensors"), str(tmp_path / "ck"))
    assert fmt == "safetensors"
    assert info.metadata["safetensors_metadata"] == {"format": "pt", "origin": "hf"}
    got = ss.load_full(str(tmp_path / "ck"))
    assert sorted(got) == ["lm_head.bias", "model.embed.weight"]  # flat names, as in the file
    for k, t in tensors.items():
        same(got[k], t, k)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["torch.save", "pickle-proto2", "pickle-proto5", "dcp-metadata", "dcp-value"])
def test_import_refuses_pickles_that_run_code(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    evil = Evil(str(marker))
    if kind == "torch.save":
        src = tmp_path / "evil.pt"
        torch.save({"w": torch.ones(1), "x": evil}, src)
    elif kind.startswith("pickle-proto"):
        src = tmp_path / "evil.pkl"
        src.write_bytes(pickle.dumps({"x": evil}, protocol=int(kind[-1])))
    elif kind == "dcp-metadata":
        src = tmp_path / "dcp"
        dcp.save({"w": torch.ones(2)}, checkpoint_id=str(src), no_dist=True)
        (src / ".metadata").write_bytes(pickle.dumps(evil, protocol=4))
    else:  # DCP stores non-tensor values as torch.save blobs inside its data files
        src = tmp_path / "dcp"
        dcp.save({"w": torch.ones(2), "x": evil}, checkpoint_id=str(src), no_dist=True)
    with pytest.raises(UnsafePickleError, match=r"refusing to import .*(posix\.system|Unsupported operand)"):
        import_checkpoint(str(src), str(tmp_path / "ck"), fmt="dcp" if kind.startswith("dcp") else "torch")
    assert not marker.exists(), "the pickle ran code"
    assert not (tmp_path / "ck").exists()


@pytest.mark.timeout(60)
def test_protocol_rewrite_reads_what_pickle_reads() -> None:
    value = {"s": "x" * 300, "again": ["abc", "abc", "abc"], "b": b"\x00\xffbytes", "big": 2**100, "neg": -5,
             "f": 1.25, "t": (1, (2, 3), ()), "none": None, "flags": [True, False], "nested": [{"k": [1, 2]}] * 2}
    for proto in (2, 3, 4, 5):
        blob = _legacy_container(_to_protocol_2(pickle.dumps(value, protocol=proto), "test"))
        assert torch.load(io.BytesIO(blob), weights_only=True) == value, proto


@pytest.mark.timeout(120)
def test_dcp_metadata_reads_through_the_allow_list_only(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import Metadata

    src = tmp_path / "dcp"
    dcp.save({"w": torch.ones(2), "n": 3}, checkpoint_id=str(src), no_dist=True)
    md = read_dcp_metadata(str(src))
    assert isinstance(md, Metadata) and set(md.state_dict_metadata) == {"w", "n"}
    # A global outside the allow-list is refused even when it is harmless.
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / ".metadata").write_bytes(pickle.dumps(datetime.date(2020, 1, 1), protocol=4))
    with pytest.raises(UnsafePickleError, match=r"datetime\.date"):
        read_dcp_metadata(str(bad))


@pytest.mark.timeout(120)
def test_import_foreign_hdf5_file_nests_by_group(tmp_path: Path) -> None:
    import h5py
    import numpy as np

    with h5py.File(tmp_path / "m.h5", "w") as f:
        f.create_dataset("encoder/layer.0/w", data=np.arange(6, dtype=np.float32).reshape(2, 3))
        f.create_dataset("steps", data=np.arange(3, dtype=np.int64))
    import_checkpoint(str(tmp_path / "m.h5"), str(tmp_path / "ck"))
    same(ss.load_full(str(tmp_path / "ck")), {"encoder": {"layer.0": {"w": torch.arange(6.0).reshape(2, 3)}},
                                               "steps": torch.arange(3)})
