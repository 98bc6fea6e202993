"""Golden checkpoints written by earlier versions must keep loading bitwise.

Each ``tests/golden/v<MAJOR>_<MINOR>/`` folder was written once by
``scripts/make_golden.py``; a change in the format that breaks reading them fails here.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import shardsave as ss

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
import golden_state as gs  # noqa: E402

VERSIONS = sorted(p for p in GOLDEN.iterdir() if p.is_dir() and p.name.startswith("v"))


def same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return (isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
                and torch.equal(got.contiguous().reshape(-1).view(torch.uint8),
                                want.contiguous().reshape(-1).view(torch.uint8)))
    if isinstance(want, np.ndarray):
        return isinstance(got, np.ndarray) and got.dtype == want.dtype and got.tobytes() == want.tobytes()
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    return bool(got == want) and type(got) is type(want)


def test_there_are_golden_checkpoints() -> None:
    assert VERSIONS, "tests/golden holds no version folder; run scripts/make_golden.py"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("version", VERSIONS, ids=lambda p: p.name)
def test_golden_single_process_checkpoints_load_bitwise(version: Path) -> None:
    want = gs.single_process_state()
    for ckpt in sorted(version.glob("single-*")):
        assert ss.verify(str(ckpt)).ok, ckpt
        assert same(ss.load_full(str(ckpt)), want), ckpt


@pytest.mark.timeout(120)
@pytest.mark.parametrize("version", VERSIONS, ids=lambda p: p.name)
def test_golden_sharded_checkpoint_loads_bitwise(version: Path) -> None:
    path = str(version / "sharded-2ranks")
    assert ss.verify(path).ok
    full = ss.load_full(path)
    assert same(full["model"], gs.sharded_full_tensors())
    assert same(full["replicated"], gs.pattern(torch.float16, (6, 2), 42))
    assert same(full["per_rank"], [gs.per_rank_value(0), gs.per_rank_value(1)])
    assert full["step"] == 99 and ss.info(path).metadata == {"golden": True}
    # In place, into plain tensors of one process (a 2 -> 1 reshard).
    target = {"model": {k: torch.zeros_like(v) for k, v in gs.sharded_full_tensors().items()},
              "replicated": torch.zeros(6, 2, dtype=torch.float16), "step": 0}
    result = ss.load(target, path, strict=False)
    assert result.unexpected == ["per_rank.rng", "per_rank.pos"]
    assert same(target["model"], gs.sharded_full_tensors()) and target["step"] == 99


ENCRYPTED = sorted(p for v in VERSIONS for p in v.glob("encrypted-*"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ckpt", ENCRYPTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden_encrypted_checkpoints_decrypt_bitwise(ckpt: Path) -> None:
    """The encryption format (FORMAT.md section 10) must keep decrypting: key derivation,
    nonce layout, associated data and MACs are all fixed by these files."""
    report = ss.verify(str(ckpt), encryption_key=gs.GOLDEN_KEY)
    assert report.ok and report.authenticated, report.problems
    assert same(ss.load_full(str(ckpt), encryption_key=gs.GOLDEN_KEY), gs.single_process_state())
    with pytest.raises(ss.ShardsaveError, match="encrypted"):
        ss.load_full(str(ckpt))
