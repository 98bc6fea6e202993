"""Mapping numpy dtypes onto the stored (torch-style) dtype names."""

from __future__ import annotations

import numpy as np

_NUMPY_TO_NAME = {
    np.dtype(np.bool_): "bool",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.uint64): "uint64",
    np.dtype(np.int8): "int8",
    np.dtype(np.int16): "int16",
    np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int64",
    np.dtype(np.float16): "float16",
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
    np.dtype(np.complex64): "complex64",
    np.dtype(np.complex128): "complex128",
}
_NAME_TO_NUMPY = {v: k for k, v in _NUMPY_TO_NAME.items()}


def numpy_to_dtype_name(dtype: np.dtype) -> str | None:
    """Stored name of a numpy dtype (native byte order only), or None if unsupported."""
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and np.little_endian is False):
        return None
    return _NUMPY_TO_NAME.get(dtype.newbyteorder("=") if dtype.byteorder == "<" else dtype)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a stored name (KeyError if numpy has none, e.g. bfloat16)."""
    return _NAME_TO_NUMPY[name]
