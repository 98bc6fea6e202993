"""Codec fixtures: ``native`` runs a test once with numpy's byte grouping and once with the
compiled kernels (``codec/_native.py``) when numba is installed; ``zstd_binding`` once with
each of zstandard's bindings."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from shardsave import knobs
from shardsave.codec import _native, _zstd_cffi

_HAVE_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.fixture(params=["numpy", "compiled"])
def native(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "compiled":
        if not _HAVE_NUMBA:
            pytest.skip("numba is not installed")
        assert _native.wait(120), f"the compiled kernels failed: {_native._error!r}"
    with knobs.override(NATIVE_KERNELS=int(request.param == "compiled")):
        yield request.param


@pytest.fixture(params=["c", "cffi"])
def zstd_binding(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test with zstandard's C binding and with its cffi binding (``_zstd_cffi``)."""
    if request.param == "cffi" and _zstd_cffi.binding() is None:
        pytest.skip("zstandard's cffi binding is not available (no cffi)")
    with knobs.override(ZSTD_CFFI=int(request.param == "cffi")):
        yield request.param
