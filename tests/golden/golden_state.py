"""The deterministic state behind the golden checkpoints in this folder.

``scripts/make_golden.py`` saved these values with the format version in the folder name;
``tests/test_golden.py`` loads every golden checkpoint and compares it bitwise with what
this module builds. Never change what an existing version's functions return: add a new
function for new content, and keep old checkpoints loading.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

DTYPES = [
    torch.bool, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


def pattern(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Smooth-ish values (compressible, like weights) for floats, raw bytes for the rest."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return (torch.randint(0, 2, (n,), generator=g) == 1).reshape(shape)
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return (torch.randn(n, generator=g, dtype=torch.float64) * 0.02).to(dtype).reshape(shape)
    return torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


GOLDEN_KEY = bytes(range(32))
"""The master key of the golden ``encrypted-*`` checkpoints (format 1.1 on)."""


def single_process_state() -> dict[str, Any]:
    return {
        "model": {str(dt).removeprefix("torch."): pattern(dt, (13, 7), i) for i, dt in enumerate(DTYPES)},
        "big": pattern(torch.bfloat16, (64, 96), 99),
        "scalar": torch.tensor(1.25, dtype=torch.float64),
        "empty": torch.empty(0, 5, dtype=torch.float16),
        "numpy": np.arange(12, dtype=np.int32).reshape(3, 4),
        "blob": b"\x00\xffgolden",
        "meta": {"step": 1234, "lr": 3e-4, "nan": float("nan"), "name": "golden", "none": None, "flags": [True, False],
                 "empty": {}},
        "opt": {"state": {0: {"step": torch.tensor(7.0)}}},
    }


def sharded_full_tensors() -> dict[str, torch.Tensor]:
    """Full values of the tensors saved sharded over 2 ranks (uneven on purpose)."""
    return {
        "w_row": pattern(torch.float32, (9, 6), 1),
        "w_col": pattern(torch.bfloat16, (4, 11), 2),
        "w_i16": pattern(torch.int16, (5, 3), 3),
    }


def per_rank_value(rank: int) -> dict[str, Any]:
    return {"rng": torch.full((4,), rank, dtype=torch.uint8), "pos": 100 + rank}
