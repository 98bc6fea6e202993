"""Export to safetensors / torch / HDF5 / JSON and back: bit-exact round trips, format
limits, and files the rest of the ecosystem reads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import shardsave as ss
from shardsave.convert import detect_format, export_checkpoint, import_checkpoint
from shardsave.convert.files import safetensors_dtypes
from shardsave.convert.jsonfmt import tensor_from_json, tensor_to_json
from shardsave.errors import CheckpointExistsError, StateDictMismatchError, UnsupportedValueError
from shardsave.format.dtypes import dtype_name

# complex32 tensors make torch warn that ComplexHalf is experimental; storing them is fine.
pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

GOLDEN_SHARDED = Path(__file__).parent / "golden" / "v1_0" / "sharded-2ranks"

ALL_DTYPES = [
    torch.bool, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex32, torch.complex64,
    torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]


def pattern(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns: every NaN payload, infinity and negative zero the dtype has."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return (torch.randint(0, 2, (n,), generator=g) == 1).reshape(shape)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def state_with(dtypes: list[torch.dtype]) -> dict[str, Any]:
    return {
        "dtypes": {dtype_name(dt): pattern(dt, (7, 5), i) for i, dt in enumerate(dtypes)},
        "shapes": {"scalar": torch.tensor(2.5, dtype=torch.bfloat16), "empty": torch.empty(0, 3),
                   "empty_inner": torch.empty(4, 0, dtype=torch.int64), "transposed": torch.arange(12.0).reshape(3, 4).t()},
        "numpy": {"i16": np.arange(9, dtype=np.int16).reshape(3, 3), "f": np.float32(1.5),
                  "bool": np.array([True, False])},
        "bytes": b"\x00\x01binary",
        "json": {"int": 2**70, "nan": float("nan"), "inf": float("-inf"), "s": "é", "none": None, "t": True,
                 "empty_d": {}, "empty_l": []},
        "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "step": 1000,
    }


def same(got: Any, want: Any, path: str = "") -> None:
    """Assert bitwise equality of two loaded states, naming the first difference."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), (path, type(got))
        assert (got.dtype, tuple(got.shape)) == (want.dtype, tuple(want.shape)), (path, got.dtype, want.dtype)
        a = got.contiguous().reshape(-1).view(torch.uint8)
        b = want.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), path
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (path, got if not isinstance(got, dict) else list(got))
        for k in want:
            same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (x, y) in enumerate(zip(got, want)):
            same(x, y, f"{path}.{i}")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), path
    else:
        assert type(got) is type(want) and got == want, (path, got, want)


def numpy_as_tensors(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    if isinstance(v, dict):
        return {k: numpy_as_tensors(x) for k, x in v.items()}
    if isinstance(v, list):
        return [numpy_as_tensors(x) for x in v]
    return v


def _supported(fmt: str) -> list[torch.dtype]:
    return [dt for dt in ALL_DTYPES if dt in safetensors_dtypes()] if fmt == "safetensors" else ALL_DTYPES


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fmt,suffix", [("safetensors", "safetensors"), ("torch", "pt"), ("hdf5", "h5"),
                                        ("json", "json")])
def test_export_then_import_is_bitwise(tmp_path: Path, fmt: str, suffix: str) -> None:
    ckpt = str(tmp_path / "ckpt")
    ss.save(state_with(_supported(fmt)), ckpt, metadata={"run": "r1", "step": 1000})
    want = ss.load_full(ckpt)
    out = str(tmp_path / f"model.{suffix}")
    info, n = export_checkpoint(ckpt, out, fmt)
    assert n == len(info.entries) and Path(out).is_file()
    assert detect_format(out) == fmt
    back_info, got_fmt = import_checkpoint(out, str(tmp_path / "back"))
    assert got_fmt == fmt
    got = ss.load_full(str(tmp_path / "back"))
    same(got, numpy_as_tensors(want) if fmt == "torch" else want)
    md = dict(back_info.metadata)
    assert md["import"]["format"] == fmt
    if fmt != "torch":  # the manifest carries the original metadata
        assert md["run"] == "r1" and md["step"] == 1000


@pytest.mark.timeout(120)
def test_every_safetensors_dtype_reads_back_in_safetensors_itself(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    dtypes = _supported("safetensors")
    assert {torch.bfloat16, torch.float8_e4m3fn, torch.uint64, torch.bool} <= set(dtypes)
    ckpt = str(tmp_path / "ckpt")
    state = {"dtypes": {dtype_name(dt): pattern(dt, (3, 4), i) for i, dt in enumerate(dtypes)}}
    ss.save(state, ckpt)
    out = tmp_path / "m.safetensors"
    export_checkpoint(ckpt, str(out), "safetensors")
    flat = load_file(str(out))
    assert sorted(flat) == sorted(f"dtypes.{dtype_name(dt)}" for dt in dtypes)
    for dt in dtypes:
        same(flat[f"dtypes.{dtype_name(dt)}"], state["dtypes"][dtype_name(dt)], dtype_name(dt))


@pytest.mark.timeout(120)
def test_hdf5_keeps_dtype_and_shape_and_stores_bf16_as_bits(tmp_path: Path) -> None:
    import h5py

    ckpt = str(tmp_path / "ckpt")
    w = pattern(torch.bfloat16, (4, 6), 1)
    f8 = pattern(torch.float8_e5m2, (5,), 2)
    ss.save({"model": {"w": w, "f8": f8, "f32": torch.arange(6.0).reshape(2, 3)}, "step": 3}, ckpt)
    out = tmp_path / "m.h5"
    export_checkpoint(ckpt, str(out), "hdf5")
    with h5py.File(out, "r") as f:
        ds = f["model/w"]
        assert ds.dtype == np.uint16 and ds.shape == (4, 6)
        assert ds.attrs["dtype"] == "bfloat16" and ds.attrs["raw_bits"] and list(ds.attrs["shape"]) == [4, 6]
        assert torch.equal(torch.from_numpy(ds[()]).view(torch.bfloat16).view(torch.int16), w.view(torch.int16))
        assert f["model/f8"].dtype == np.uint8 and f["model/f8"].attrs["dtype"] == "float8_e5m2"
        assert f["model/f32"].dtype == np.float32 and not f["model/f32"].attrs["raw_bits"]
        np.testing.assert_array_equal(f["model/f32"][()], np.arange(6.0, dtype=np.float32).reshape(2, 3))
        assert json.loads(f.attrs["shardsave"])["format"] == "shardsave-export"


@pytest.mark.timeout(120)
def test_torch_export_is_a_plain_dict_for_weights_only_load(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    ss.save({"model": {"w": torch.ones(2, 2)}, "np": np.arange(3), "step": 5, "blob": b"ab"}, ckpt)
    out = tmp_path / "m.pt"
    export_checkpoint(ckpt, str(out), "torch")
    obj = torch.load(out, weights_only=True)
    assert type(obj) is dict and obj["step"] == 5 and obj["blob"] == b"ab"
    assert torch.equal(obj["model"]["w"], torch.ones(2, 2)) and torch.equal(obj["np"], torch.arange(3))


@pytest.mark.timeout(120)
def test_json_export_is_strict_readable_json(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    ss.save({"w": torch.tensor([1.5, float("nan"), float("-inf"), -0.0]), "step": 7}, ckpt)
    out = tmp_path / "m.json"
    export_checkpoint(ckpt, str(out), "json")

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads(out.read_text(), parse_constant=no_constants)
    w = next(e for e in doc["entries"] if e["key"] == "w")
    assert w["dtype"] == "float32" and w["shape"] == [4] and w["data"] == [1.5, "nan", "-inf", -0.0]
    assert next(e for e in doc["entries"] if e["key"] == "step")["value"] == 7


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [*ALL_DTYPES, torch.bits16, torch.float4_e2m1fn_x2], ids=dtype_name)
@pytest.mark.parametrize("shape", [(9, 4), (), (0, 3), (2, 0)], ids=str)
def test_json_numbers_are_exact_for_every_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = pattern(dtype, shape, 3)
    text = json.dumps(tensor_to_json(t), allow_nan=False)
    same(tensor_from_json(json.loads(text), dtype, shape, where="test"), t)


@pytest.mark.timeout(60)
def test_json_keeps_nan_payloads_and_signed_zero() -> None:
    t = torch.tensor([0x7FC00001, 0xFFC00000, 0x80000000, 0x7FC00000], dtype=torch.int64).to(torch.uint32)
    t = t.view(torch.float32)
    data = tensor_to_json(t)
    assert data == ["nan:0x7fc00001", "nan:0xffc00000", -0.0, "nan"]
    same(tensor_from_json(data, torch.float32, (4,), where="t"), t)


@pytest.mark.timeout(120)
def test_json_export_refuses_large_selections_naming_size_and_limit(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    ss.save({"big": torch.zeros(1000), "small": torch.zeros(10)}, ckpt)
    with pytest.raises(UnsupportedValueError) as exc:
        export_checkpoint(ckpt, str(tmp_path / "m.json"), "json", max_json_bytes=1000)
    msg = str(exc.value)
    assert "3.9 KiB (4040 bytes)" in msg and "1000 bytes" in msg and "--keys" in msg
    assert not (tmp_path / "m.json").exists()
    export_checkpoint(ckpt, str(tmp_path / "m.json"), "json", keys=["small"], max_json_bytes=1000)
    keys = [e["key"] for e in json.loads((tmp_path / "m.json").read_text())["entries"]]
    assert keys == ["small"]


@pytest.mark.timeout(120)
def test_export_refusals(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    ss.save({"c": torch.zeros(2, dtype=torch.complex128), "w": torch.ones(2)}, ckpt)
    with pytest.raises(UnsupportedValueError, match=r"'c' is complex128, which safetensors cannot store"):
        export_checkpoint(ckpt, str(tmp_path / "a.safetensors"))
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]  # no partial output, no temporary file
    with pytest.raises(StateDictMismatchError, match="no key matching"):
        export_checkpoint(ckpt, str(tmp_path / "a.pt"), keys=["model"])
    with pytest.raises(UnsupportedValueError, match="cannot tell the export format"):
        export_checkpoint(ckpt, str(tmp_path / "a.xyz"))
    export_checkpoint(ckpt, str(tmp_path / "a.pt"))
    with pytest.raises(CheckpointExistsError, match="--overwrite"):
        export_checkpoint(ckpt, str(tmp_path / "a.pt"))
    export_checkpoint(ckpt, str(tmp_path / "a.pt"), keys=["w"], overwrite=True)
    assert list(torch.load(tmp_path / "a.pt", weights_only=True)) == ["w"]


@pytest.mark.timeout(120)
def test_export_consolidates_a_sharded_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    want = ss.load_full(str(GOLDEN_SHARDED))
    out = tmp_path / "full.safetensors"
    export_checkpoint(str(GOLDEN_SHARDED), str(out))
    flat = load_file(str(out))
    assert ss.info(str(GOLDEN_SHARDED)).world_size == 2
    for key, t in flat.items():
        node: Any = want
        for part in key.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part] if part in node else node[int(part)]
        if isinstance(node, np.ndarray):
            node = torch.from_numpy(node)
        elif isinstance(node, bytes):
            node = torch.frombuffer(bytearray(node), dtype=torch.uint8)
        same(t, node, key)


@pytest.mark.timeout(60)
def test_detect_format(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(1)}, tmp_path / "x.bin")
    assert detect_format(str(tmp_path / "x.bin")) == "torch"
    (tmp_path / "d").mkdir()
    with pytest.raises(UnsupportedValueError, match=r"without a DCP \.metadata"):
        detect_format(str(tmp_path / "d"))
    ss.save({"a": torch.ones(1)}, str(tmp_path / "ck"))
    with pytest.raises(UnsupportedValueError, match="already a shardsave checkpoint"):
        detect_format(str(tmp_path / "ck"))
    (tmp_path / "blob").write_bytes(b"\x01\x02")
    with pytest.raises(UnsupportedValueError, match="--format"):
        detect_format(str(tmp_path / "blob"))
