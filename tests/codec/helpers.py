"""Test data for the codec tests: every torch dtype as raw chunk bytes."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from shardsave.codec import decode_chunk

# Every dtype a checkpoint may hold, with whether the save path calls it a float.
DTYPES: list[torch.dtype] = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
]
for _name in (
    "uint16",
    "uint32",
    "uint64",
    "complex32",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
):
    if hasattr(torch, _name):
        DTYPES.append(getattr(torch, _name))


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def sample(dtype: torch.dtype, numel: int, seed: int = 0) -> np.ndarray:
    """``numel`` elements of ``dtype`` (weights-like for floats) as a 1-D uint8 array."""
    if numel == 0:
        return np.empty(0, dtype=np.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
            t = _make(dtype, numel, seed)
    except (RuntimeError, TypeError):  # dtypes torch cannot convert to: random bit patterns
        itemsize = dtype.itemsize
        return np.random.default_rng(seed).integers(0, 256, numel * itemsize, dtype=np.uint8)
    return t.contiguous().view(torch.uint8).numpy().copy()


def _make(dtype: torch.dtype, numel: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.rand(numel, generator=gen) > 0.5
    elif is_float(dtype):
        base = torch.randn(numel, generator=gen, dtype=torch.float64) * 0.02
        if numel > 4:
            base[:: max(1, numel // 5)] = 0.0  # some exact zeros, as in real tensors
        t = torch.complex(base, base.flip(0)) if dtype.is_complex else base
        t = t.to(dtype)
    else:
        info = torch.iinfo(dtype)
        hi = min(info.max, 1 << 20)
        t = torch.randint(max(info.min, -(1 << 20)), hi, (numel,), generator=gen, dtype=torch.int64)
        t = t.to(dtype)
    return t


def roundtrip(descriptor: str, payload: object, raw: np.ndarray, itemsize: int) -> np.ndarray:
    out = np.full(raw.size, 0xA5, dtype=np.uint8)
    decode_chunk(descriptor, payload, raw_length=raw.size, itemsize=itemsize, out=out)  # type: ignore[arg-type]
    return out
