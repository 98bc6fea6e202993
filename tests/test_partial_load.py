"""Partial and adapted loads: key filters that read only the selected bytes, key renaming
(wrapper prefixes, prefix maps, callables), and ``load_full(dtype=, device=)``."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
import torch
from counting_fs import CountingMemoryFS

import shardsave as ss
from shardsave import knobs
from shardsave.errors import StateDictMismatchError
from shardsave.pipeline.read import load_tocs
from shardsave.plan.rename import rename_keys, renamed_path, renamed_root, strip_wrappers
from shardsave.storage import Storage

pytestmark = pytest.mark.timeout(60)


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w1": torch.randn(64, 256, generator=g), "w2": torch.randn(300, generator=g).to(torch.bfloat16)},
        "optim": {"state": {"w1": {"exp_avg": torch.randn(64, 256, generator=g), "step": torch.tensor(7)}},
                  "param_groups": [{"lr": 0.1, "params": ["w1"]}]},
        "extra": torch.randn(128, 128, generator=g),
        "step": 7,
    }


def _zeros_like(sd: Any) -> Any:
    if isinstance(sd, dict):
        return {k: _zeros_like(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_zeros_like(v) for v in sd]
    return torch.zeros_like(sd) if isinstance(sd, torch.Tensor) else sd


def _stored_bytes(path: str, selected: list[str]) -> tuple[int, int]:
    """(stored bytes of the selected keys' chunks + the TOCs of files holding them, total data bytes)."""
    storage = Storage.from_url(path)
    info = ss.info(path)
    tocs = load_tocs(storage, list(info.files))
    chosen = 0
    files_used = set()
    for rank, toc in tocs.items():
        for row in toc.rows:
            key = info.entries[int(row["entry"])].key
            if any(key == k or key.startswith(k + ".") for k in selected):
                chosen += int(row["length"])
                files_used.add(rank)
    chosen += sum(info.file_of_rank(r).toc_length for r in files_used)
    return chosen, info.stored_bytes


# -- key filters read only the selected bytes -------------------------------------------


def test_load_full_keys_reads_only_selected_bytes() -> None:
    path = f"countmem://ck-{uuid.uuid4().hex}"
    with knobs.override(CHUNK_BYTES=16 * 1024):  # several chunks per tensor
        ss.save(_state(), path)
    want, total = _stored_bytes(path, ["model"])
    index_size = len(Storage.from_url(path).read_bytes("index.json"))
    CountingMemoryFS.reset()
    with knobs.override(READ_COALESCE_GAP=0):  # no surplus bytes between selected ranges
        got = ss.load_full(path, keys=["model"])
    assert set(got) == {"model"}
    assert torch.equal(got["model"]["w1"], _state()["model"]["w1"])
    root = CountingMemoryFS._strip_protocol(path)
    assert CountingMemoryFS.read_under(root + "/data/") == want
    assert CountingMemoryFS.read_under(root + "/index.json") == index_size
    assert want < total / 2


def test_load_keys_in_place_reads_only_selected_bytes() -> None:
    path = f"countmem://ck-{uuid.uuid4().hex}"
    saved = _state()
    with knobs.override(CHUNK_BYTES=16 * 1024):
        ss.save(saved, path)
    want, _ = _stored_bytes(path, ["optim"])
    target = _zeros_like(_state(seed=1))
    CountingMemoryFS.reset()
    with knobs.override(READ_COALESCE_GAP=0):
        result = ss.load(target, path, keys=["optim"])  # strict within the selection
    assert result.missing == result.unexpected == result.mismatched == []
    root = CountingMemoryFS._strip_protocol(path)
    assert CountingMemoryFS.read_under(root + "/data/") == want
    assert torch.equal(target["optim"]["state"]["w1"]["exp_avg"], saved["optim"]["state"]["w1"]["exp_avg"])
    assert not target["model"]["w1"].any()  # not selected: untouched
    # ... and the rest later, into the same state.
    ss.load(target, path, keys=["model", "extra", "step"])
    assert torch.equal(target["model"]["w1"], saved["model"]["w1"])
    assert torch.equal(target["extra"], saved["extra"])


def test_load_keys_strictness_applies_within_the_selection(tmp_path: Any) -> None:
    path = str(tmp_path / "ck")
    ss.save(_state(), path)
    target = {"model": {"w1": torch.zeros(64, 256)}, "other": torch.zeros(3)}
    with pytest.raises(StateDictMismatchError, match=r"model\.w2") as info:
        ss.load(target, path, keys=["model"])
    assert info.value.unexpected == ["model.w2"] and info.value.missing == []
    result = ss.load(target, path, keys=["model"], strict=False)
    assert result.unexpected == ["model.w2"]
    with pytest.raises(StateDictMismatchError, match="selects nothing"):
        ss.load(target, path, keys=["nope"])
    with pytest.raises(TypeError, match="list of non-empty key prefixes"):
        ss.load(target, path, keys="model")  # type: ignore[arg-type]


# -- renaming ------------------------------------------------------------------------


def test_strip_wrappers_and_prefix_maps() -> None:
    assert strip_wrappers("model.module._orig_mod.fc.weight") == "model.fc.weight"
    assert strip_wrappers("module.fc.weight") == "fc.weight"
    assert strip_wrappers("modules.fc") == "modules.fc"
    keys = ["model.module.a", "model.module.b.c", "models.x", "model", "opt.state"]
    assert rename_keys(keys, {"model.module": "model", "model": "net"}) == {
        "model.a": 0, "model.b.c": 1, "models.x": 2, "net": 3, "opt.state": 4}
    assert rename_keys(keys, {"model.module": ""}) == {"a": 0, "b.c": 1, "models.x": 2, "model": 3, "opt.state": 4}
    assert rename_keys(keys, lambda k: None if k.startswith("opt") else k.upper()) == {
        "MODEL.MODULE.A": 0, "MODEL.MODULE.B.C": 1, "MODELS.X": 2, "MODEL": 3}
    with pytest.raises(ValueError, match=r"both 'model\.module\.a' and 'model\.a'"):
        rename_keys(["model.module.a", "model.a"], strip_wrappers)
    with pytest.raises(ValueError, match="without leading or trailing"):
        rename_keys(keys, {"model.": "x"})
    with pytest.raises(TypeError, match="rename must be"):
        rename_keys(keys, 3)  # type: ignore[arg-type]


def test_renamed_path_keeps_what_survived() -> None:
    # a DDP model's keys are single components with dots in them
    assert renamed_path(("model", "module.fc.weight"), "model.fc.weight") == ("model", "fc.weight")
    assert renamed_path(("model", "module", "fc", "weight"), "model.fc.weight") == ("model", "fc", "weight")
    assert renamed_path(("model", "w"), "net.w") == ("net", "w")
    assert renamed_path(("opt", "groups", 0, "lr"), "o.groups.0.lr") == ("o", "groups", 0, "lr")
    assert renamed_path(("a", ("int", 3), "x"), "b.3.x") == ("b", ("int", 3), "x")
    assert renamed_path(("a", "b"), "something.else") == ("something", "else")
    assert renamed_root(("rng", "module", 0, "s"), ("rng", 0, "s"), 2) == 1


def test_load_ddp_and_compiled_checkpoints_into_a_plain_model(tmp_path: Any) -> None:
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    # What DDP's and torch.compile's modules return from state_dict() (torch.compile itself
    # costs ~14 s of imports here, for the same keys).
    compiled_keys = {f"_orig_mod.{k}": v for k, v in plain.state_dict().items()}
    ddp_keys = {f"module.{k}": v for k, v in plain.state_dict().items()}
    ss.save({"model": compiled_keys}, str(tmp_path / "compiled"))
    ss.save({"model": ddp_keys}, str(tmp_path / "ddp"))
    for name in ("compiled", "ddp"):
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        target = {"model": fresh.state_dict()}
        with pytest.raises(StateDictMismatchError):
            ss.load(target, str(tmp_path / name))
        ss.load(target, str(tmp_path / name), rename=ss.strip_wrappers)
        for k, v in plain.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), (name, k)
        full = ss.load_full(str(tmp_path / name), rename=ss.strip_wrappers)
        assert set(full["model"]) == set(plain.state_dict())
        fresh.load_state_dict(full["model"])
    # the other way: a plain checkpoint into a DDP-style target, by a prefix map
    ss.save({"model": plain.state_dict()}, str(tmp_path / "plain"))
    target = {"model": {f"module.{k}": torch.zeros_like(v) for k, v in plain.state_dict().items()}}
    ss.load(target, str(tmp_path / "plain"), rename={"model": "model.module"})
    assert torch.equal(target["model"]["module.0.weight"], plain.state_dict()["0.weight"])


def test_load_full_rename_keys_and_per_rank(tmp_path: Any) -> None:
    path = str(tmp_path / "ck")
    ss.save({"net": {"module.w": torch.arange(4.0)}, "rng": ss.PerRank({"seed": 5}), "n": 1}, path)
    out = ss.load_full(path, rename={"net.module": "model", "rng": "rng_state"}, keys=["model", "rng_state"])
    assert set(out) == {"model", "rng_state"}
    assert torch.equal(out["model"]["w"], torch.arange(4.0))
    assert out["rng_state"] == [{"seed": 5}]
    dropped = ss.load_full(path, rename=lambda k: None if k == "n" else k)
    assert "n" not in dropped
    with pytest.raises(StateDictMismatchError, match="no key matching"):
        ss.load_full(path, keys=["net"], rename={"net": "model"})


# -- dtype and device ------------------------------------------------------------------


def test_load_full_dtype_and_device(tmp_path: Any) -> None:
    path = str(tmp_path / "ck")
    sd = {"w": torch.randn(5, 3, dtype=torch.float64), "h": torch.randn(4).half(), "step": torch.tensor(3),
          "mask": torch.tensor([True, False]), "np": np.arange(3, dtype=np.float64)}
    ss.save(sd, path)
    out = ss.load_full(path, dtype=torch.bfloat16, device="cpu")
    assert out["w"].dtype == torch.bfloat16 and out["h"].dtype == torch.bfloat16
    assert torch.equal(out["w"], sd["w"].to(torch.bfloat16))
    assert out["step"].dtype == torch.int64 and out["mask"].dtype == torch.bool  # not floating: kept
    assert isinstance(out["np"], np.ndarray) and out["np"].dtype == np.float64
    meta = ss.load_full(path, keys=["w"], device="meta")
    assert meta["w"].device.type == "meta"
    with pytest.raises(TypeError, match="floating-point"):
        ss.load_full(path, dtype=torch.int32)
