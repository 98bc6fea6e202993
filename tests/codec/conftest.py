"""Codec fixtures: ``native`` runs a test once with numpy's byte grouping and once with the
compiled kernels (``codec/_native.py``) when numba is installed."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from shardsave import knobs
from shardsave.codec import _native

_HAVE_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.fixture(params=["numpy", "compiled"])
def native(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "compiled":
        if not _HAVE_NUMBA:
            pytest.skip("numba is not installed")
        assert _native.wait(120), f"the compiled kernels failed: {_native._error!r}"
    with knobs.override(NATIVE_KERNELS=int(request.param == "compiled")):
        yield request.param
