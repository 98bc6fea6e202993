"""Dtype names as stored in the index, and their element sizes.

The index names dtypes the way torch does, without the ``torch.`` prefix ("bfloat16",
"float8_e4m3fn"). A name read from an untrusted index is only ever looked up in the
table built here from torch's own dtype objects -- never ``getattr``'d blindly.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _table() -> dict[str, torch.dtype]:
    table: dict[str, torch.dtype] = {}
    for name in dir(torch):
        obj = getattr(torch, name)
        if isinstance(obj, torch.dtype):
            canonical = str(obj).removeprefix("torch.")
            if _storable(canonical, obj):
                table.setdefault(canonical, obj)
    return table


def _storable(name: str, dtype: torch.dtype) -> bool:
    # Quantized dtypes carry scale/zero-point outside their bytes; the sub-byte int1..int7 /
    # uint1..uint7 placeholders have no storage of their own. Neither round-trips as bytes.
    if name.startswith(("q", "int", "uint")) and name not in _WHOLE_INTS:
        return False
    return dtype.itemsize >= 1


_WHOLE_INTS = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical stored name of a torch dtype ('float32', not 'float')."""
    return str(dtype).removeprefix("torch.")


def is_known_dtype(name: str) -> bool:
    return name in _table()


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a stored name; KeyError for an unknown one."""
    return _table()[name]


def itemsize_of(name: str) -> int:
    return torch_dtype(name).itemsize


def is_floating_name(name: str) -> bool:
    dt = torch_dtype(name)
    return dt.is_floating_point or dt.is_complex
