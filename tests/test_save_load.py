"""Single-process save/load/load_full/info/verify: round trips, refusals, corruption."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import shardsave as ss
from shardsave import knobs
from shardsave.errors import CorruptionError, FormatError

DTYPES = [
    torch.bool, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
]


def pattern(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return (torch.randint(0, 2, (n,), generator=g) == 1).reshape(shape)
    return torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().contiguous().reshape(-1).view(torch.uint8))


def full_state() -> dict[str, Any]:
    base = torch.arange(120, dtype=torch.float32).reshape(10, 12)
    return {
        "dtypes": {str(dt).removeprefix("torch."): pattern(dt, (7, 5), i) for i, dt in enumerate(DTYPES)},
        "shapes": {
            "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
            "empty": torch.empty(0, 3),
            "empty_inner": torch.empty(4, 0, dtype=torch.int64),
            "transposed": base.t(),
            "strided_view": base[1:8:2, ::3],
            "expanded": torch.ones(3, 1).expand(3, 4),
            "conj": torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(1)).conj(),
        },
        "numpy": {"i16": np.arange(9, dtype=np.int16).reshape(3, 3), "f": np.float32(1.5),
                  "bool": np.array([True, False])},
        "bytes": b"\x00\x01binary",
        "json": {"int": 2**70, "neg": -3, "nan": float("nan"), "inf": float("-inf"), "s": "é", "none": None,
                 "t": True, "list": [1, "a", None], "empty_d": {}, "empty_l": []},
        "opt": {"state": {0: {"step": torch.tensor(3.0)}, 1: {"step": torch.tensor(4.0)}},
                "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
    }


def assert_same(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert same_bytes(got, want.resolve_conj() if want.is_conj() else want), where
    elif isinstance(want, np.ndarray | np.generic):
        got_a, want_a = np.asarray(got), np.asarray(want)
        assert got_a.dtype == want_a.dtype and got_a.shape == want_a.shape, where
        assert got_a.tobytes() == want_a.tobytes(), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), where
    else:
        assert got == want and type(got) is type(want), where


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec", ["auto", "raw", "zstd", "zstd-shuffle"])
def test_round_trip_every_dtype_shape_and_kind(tmp_path: Path, codec: str) -> None:
    state = full_state()
    with knobs.override(CHUNK_BYTES=64):  # many chunks even for tiny tensors
        info = ss.save(state, str(tmp_path / "ck"), codec=codec, metadata={"run": "t"})
        assert info.metadata == {"run": "t"}
        assert_same(ss.load_full(str(tmp_path / "ck")), state)
    assert ss.verify(str(tmp_path / "ck")).ok


@pytest.mark.timeout(120)
def test_load_in_place_keeps_tensor_identity(tmp_path: Path) -> None:
    state = full_state()
    ss.save(state, str(tmp_path / "ck"))
    target = full_state()
    for t in target["dtypes"].values():
        t.zero_()
    ids = {k: id(v) for k, v in target["dtypes"].items()}
    target["json"]["int"] = 0
    target["bytes"] = b""
    result = ss.load(target, str(tmp_path / "ck"))
    assert result == ss.LoadResult()
    assert {k: id(v) for k, v in target["dtypes"].items()} == ids
    assert_same(target["dtypes"], state["dtypes"])
    assert target["json"]["int"] == 2**70 and target["bytes"] == state["bytes"]


@pytest.mark.timeout(60)
def test_memory_url_and_file_url(tmp_path: Path) -> None:
    state = {"w": torch.arange(10.0), "n": 3}
    for url in ("memory://shardsave-test/ck", f"file://{tmp_path}/ck"):
        ss.save(state, url)
        assert_same(ss.load_full(url), state)
        assert ss.info(url).keys == ["w", "n"]


@pytest.mark.timeout(60)
def test_strict_mismatch_lists_everything_and_non_strict_reports(tmp_path: Path) -> None:
    ss.save({"a": torch.zeros(3), "b": torch.zeros(2), "c": 1}, str(tmp_path / "ck"))
    target = {"a": torch.ones(4), "b": torch.ones(2, dtype=torch.int32), "d": torch.ones(1)}
    with pytest.raises(ss.StateDictMismatchError) as err:
        ss.load(target, str(tmp_path / "ck"))
    text = str(err.value)
    assert "d" in err.value.missing and "c" in err.value.unexpected
    assert "float32[3]" in text and "int32[2]" in text
    assert torch.equal(target["a"], torch.ones(4))  # nothing was touched
    result = ss.load(target, str(tmp_path / "ck"), strict=False)
    assert result.missing == ["d"] and result.unexpected == ["c"] and len(result.mismatched) == 2


@pytest.mark.timeout(60)
def test_unsupported_value_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ss.CheckpointError, match=r"state_dict\['bad'\].*object"):
        ss.save({"ok": torch.ones(2), "bad": object()}, str(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists()


@pytest.mark.timeout(60)
def test_overwrite_protection_and_overwrite(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    first = ss.save({"w": torch.zeros(4)}, path)
    with pytest.raises(ss.CheckpointExistsError, match="overwrite=True"):
        ss.save({"w": torch.ones(4)}, path)
    assert torch.equal(ss.load_full(path)["w"], torch.zeros(4))
    second = ss.save({"w": torch.ones(4)}, path, overwrite=True)
    assert second.save_id != first.save_id
    assert torch.equal(ss.load_full(path)["w"], torch.ones(4))
    # The old save's data files are gone once the new index is committed.
    assert sorted(os.listdir(tmp_path / "ck" / "data")) == [f"{second.save_id}-r0.bin"]


@pytest.mark.timeout(60)
def test_missing_index_is_not_found(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    ss.save({"w": torch.zeros(4)}, str(path))
    (path / "index.json").unlink()
    with pytest.raises(ss.CheckpointNotFoundError, match="interrupted or failed save"):
        ss.load_full(str(path))
    with pytest.raises(FileNotFoundError):
        ss.info(str(path))
    assert not ss.verify(str(path)).ok


def _data_file(path: Path) -> Path:
    (f,) = list((path / "data").iterdir())
    return f


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", ["raw", "zstd-shuffle"])
def test_every_flipped_byte_is_detected(tmp_path: Path, codec: str) -> None:
    path = tmp_path / "ck"
    state = {"model": {"w": pattern(torch.float32, (16, 8), 3)}}
    ss.save(state, str(path), codec=codec)
    data = _data_file(path)
    original = data.read_bytes()
    for pos in range(0, len(original)):
        corrupted = bytearray(original)
        corrupted[pos] ^= 0x40
        data.write_bytes(bytes(corrupted))
        with pytest.raises(CorruptionError) as err:
            ss.load_full(str(path))
        assert data.name in str(err.value)
        assert not ss.verify(str(path)).ok
    data.write_bytes(original)
    assert ss.verify(str(path)).ok


@pytest.mark.timeout(60)
def test_corruption_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    ss.save({"model": {"w": torch.arange(64.0)}}, str(path), codec="raw")
    data = _data_file(path)
    blob = bytearray(data.read_bytes())
    blob[10] ^= 1
    data.write_bytes(bytes(blob))
    with pytest.raises(CorruptionError, match=r"'model\.w'") as err:
        ss.load({"model": {"w": torch.zeros(64)}}, str(path))
    assert str(data) in str(err.value) or data.name in str(err.value)


@pytest.mark.timeout(60)
def test_truncated_and_missing_data_files(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    ss.save({"w": torch.arange(1000.0)}, str(path))
    data = _data_file(path)
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ss.ShardsaveError):
        ss.load_full(str(path))
    assert not ss.verify(str(path)).ok
    data.unlink()
    with pytest.raises(FileNotFoundError):
        ss.load_full(str(path))
    report = ss.verify(str(path))
    assert not report.ok and "missing" in report.problems[0]


@pytest.mark.timeout(60)
def test_newer_major_format_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    ss.save({"w": torch.zeros(1)}, str(path))
    index = path / "index.json"
    index.write_text(re.sub(r'"format_version":"[0-9.]+"', '"format_version":"2.0"', index.read_text()))
    with pytest.raises(FormatError, match="upgrade shardsave"):
        ss.info(str(path))


@pytest.mark.timeout(60)
def test_load_full_key_filter_reads_only_selected(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    ss.save({"model": {"w": torch.ones(3)}, "optim": {"m": torch.zeros(3)}}, str(path))
    assert set(ss.load_full(str(path), keys=["model"])) == {"model"}
    with pytest.raises(ss.StateDictMismatchError, match="no key matching"):
        ss.load_full(str(path), keys=["nope"])


@pytest.mark.timeout(60)
def test_info_reports_sizes_and_environment(tmp_path: Path) -> None:
    info = ss.save({"w": torch.zeros(10_000)}, str(tmp_path / "ck"))  # over MIN_COMPRESS_BYTES
    assert info.raw_bytes == 40_000 and 0 < info.stored_bytes < 40_000
    read = ss.info(str(tmp_path / "ck"))
    assert read.save_id == info.save_id and read.environment["torch"] == torch.__version__
    assert read.world_size == 1
