"""Tensors as JSON numbers, exactly: what ``convert --to json`` writes and import reads.

The point of the JSON export is that a person (or any language) can read the values, so
data are nested lists of plain numbers in the tensor's shape, not base64. It is still
bit-exact, because every dtype shardsave stores converts exactly:

* integers and bools are JSON integers / ``true`` / ``false`` (uint64 included: JSON
  integers are unbounded);
* floating-point values of every width (float8 ... float64) convert exactly to float64,
  whose shortest ``repr`` reads back to the same float64, which converts back exactly;
  ``-0.0`` keeps its sign;
* JSON has no non-finite numbers, so they are strings: ``"inf"``, ``"-inf"``, ``"nan"``
  (the dtype's canonical NaN), or ``"nan:0x7fc1"`` with the exact bits of any other NaN;
* complex values are ``[real, imag]`` pairs (one more trailing dimension of 2);
* dtypes that are not numbers torch can convert (the ``bits*`` placeholders, packed
  ``float4_e2m1fn_x2``) are written as the unsigned integers of their bit patterns, and
  their entry says ``"encoding": "bits"``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from shardsave.errors import FormatError
from shardsave.format.dtypes import dtype_name

_UINT_OF_SIZE = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


_COMPONENT = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}
_NUMERIC = frozenset({
    torch.bool, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu, *_COMPONENT,
})


def encoding_of(dtype: torch.dtype) -> str:
    """``"number"`` for dtypes written as their values, ``"bits"`` for the rest."""
    return "number" if dtype in _NUMERIC else "bits"


def _canonical_nan_bits(dtype: torch.dtype) -> int:
    return int(torch.full((), math.nan, dtype=dtype).view(_UINT_OF_SIZE[dtype.itemsize]).item())


def _nest(flat: list[Any], shape: tuple[int, ...]) -> Any:
    if not shape:
        return flat[0]
    arr = np.empty(len(flat), dtype=object)
    arr[:] = flat
    return arr.reshape(shape).tolist()


def tensor_to_json(t: torch.Tensor) -> Any:
    """Nested lists of numbers (see the module docstring)."""
    t = t.detach().cpu().contiguous()
    if encoding_of(t.dtype) == "bits":
        return _nest(t.reshape(-1).view(_UINT_OF_SIZE[t.dtype.itemsize]).numpy().tolist(), tuple(t.shape))
    if t.dtype.is_complex:
        t = torch.view_as_real(t).contiguous()
    shape = tuple(t.shape)
    if t.dtype == torch.bool or not t.dtype.is_floating_point:
        flat: list[Any] = t.reshape(-1).numpy().tolist()
        return _nest(flat, shape)
    wide = t.reshape(-1).to(torch.float64).numpy()
    flat = wide.tolist()
    bad = np.flatnonzero(~np.isfinite(wide))
    if bad.size:
        bits = t.reshape(-1).view(_UINT_OF_SIZE[t.dtype.itemsize])
        canonical = _canonical_nan_bits(t.dtype)
        for i in bad.tolist():
            v = flat[i]
            if math.isnan(v):
                b = int(bits[i].item())
                flat[i] = "nan" if b == canonical else f"nan:0x{b:0{2 * t.dtype.itemsize}x}"
            else:
                flat[i] = "inf" if v > 0 else "-inf"
    return _nest(flat, shape)


def _flatten(value: Any, shape: tuple[int, ...], out: list[Any], where: str) -> None:
    if not shape:
        out.append(value)
        return
    if not isinstance(value, list) or len(value) != shape[0]:
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise FormatError(f"{where}: data does not match shape {list(shape)}: found {got} where {shape[0]} items belong")
    for item in value:
        _flatten(item, shape[1:], out, where)


def tensor_from_json(data: Any, dtype: torch.dtype, shape: tuple[int, ...], *, where: str) -> torch.Tensor:
    """The tensor :func:`tensor_to_json` wrote; FormatError names ``where`` on bad input."""
    if encoding_of(dtype) == "bits":
        return tensor_from_json(data, _UINT_OF_SIZE[dtype.itemsize], shape, where=where).view(dtype)
    real = _COMPONENT.get(dtype, dtype)
    full = (*shape, 2) if dtype.is_complex else shape
    flat: list[Any] = []
    _flatten(data, full, flat, where)
    if real == torch.bool or not real.is_floating_point:
        want: type = bool if real == torch.bool else int
        if not all(type(v) is want for v in flat):
            raise FormatError(f"{where}: {dtype_name(dtype)} data must be JSON {'booleans' if want is bool else 'integers'}")
        arr = np.array(flat, dtype=torch.empty((), dtype=real).numpy().dtype if real != torch.bool else np.bool_)
        out = torch.from_numpy(arr.reshape(full)) if arr.size else torch.empty(full, dtype=real)
    else:
        nan_bits: dict[int, int] = {}
        values = np.empty(len(flat), dtype=np.float64)
        for i, v in enumerate(flat):
            if type(v) in (int, float):
                values[i] = v
            elif v in ("inf", "-inf", "nan"):
                values[i] = float(v)
            elif isinstance(v, str) and v.startswith("nan:0x"):
                values[i] = math.nan
                try:
                    nan_bits[i] = int(v[6:], 16)
                except ValueError:
                    raise FormatError(f"{where}: {v!r} is not a NaN bit pattern like 'nan:0x7fc1'") from None
            else:
                raise FormatError(f"{where}: {v!r} is not a number, 'inf', '-inf', 'nan' or 'nan:0x<bits>'")
        out = torch.from_numpy(values).to(real)
        if nan_bits:
            raw = out.view(_UINT_OF_SIZE[real.itemsize])
            for i, b in nan_bits.items():
                raw[i] = b
        out = out.reshape(full)
    if dtype.is_complex:
        return torch.view_as_complex(out.contiguous())
    return out
