"""The compiled byte-grouping kernels (``codec/_native.py``) write exactly what the numpy
versions write, refuse (return False, write nothing) whatever they do not handle, and can be
turned off; the other codec tests run both ways through the ``native`` fixture."""

from __future__ import annotations

import numpy as np
import pytest

from shardsave import knobs
from shardsave.codec import _native
from shardsave.codec._boxes import ungroup_boxes
from shardsave.codec._bytegroup import group_into, ungroup_into

numba = pytest.importorskip("numba")


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    assert _native.wait(120), f"numba is installed but the kernels failed: {_native._error!r}"
    assert _native.status() == "ready"


def _numpy(fn, *args) -> None:  # type: ignore[no-untyped-def]
    with knobs.override(NATIVE_KERNELS=0):
        fn(*args)


@pytest.mark.parametrize("k", [2, 4, 8])  # 8: numpy's version, through the same entry points
@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 65537])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_group_and_ungroup_equal_numpy(k: int, n: int, offset: int) -> None:
    rng = np.random.default_rng(k * 1000 + n + offset)
    # Misaligned views (offset bytes into a buffer): torch tensors of a storage offset look so.
    buf = rng.integers(0, 256, n * k + offset, dtype=np.uint8)
    raw = buf[offset:]
    compiled = np.full(n * k + offset, 7, np.uint8)[offset:]
    expected = np.empty(n * k, np.uint8)
    group_into(raw, compiled, k)
    _numpy(group_into, raw, expected, k)
    assert np.array_equal(compiled, expected)
    assert np.array_equal(expected.reshape(k, n), raw.reshape(n, k).T)
    streams = [compiled[j * n : (j + 1) * n] for j in range(k)]
    out = np.full(n * k + offset, 9, np.uint8)[offset:]
    ungroup_into(streams, out, k)
    assert np.array_equal(out, raw)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_two_dimensional_boxes_into_strided_destinations(k: int) -> None:
    rng = np.random.default_rng(k)
    shape = (37, 53)
    raw = rng.integers(0, 256, 37 * 53 * k, dtype=np.uint8)
    elements = raw.reshape(*shape, k)
    grouped = np.ascontiguousarray(elements.reshape(-1, k).T)
    # Read-only streams, as those mapped from the page cache are.
    streams = [grouped[j] for j in range(k)]
    for s in streams:
        s.flags.writeable = False
    for _ in range(40):
        r0, c0 = int(rng.integers(0, 37)), int(rng.integers(0, 53))
        rows, cols = int(rng.integers(0, 38 - r0)), int(rng.integers(0, 54 - c0))
        big = np.full((rows + 4, cols + 6, k), 0xAB, np.uint8)
        dst = big[2 : 2 + rows, 3 : 3 + cols]
        ungroup_boxes(streams, shape, k, [(((r0, c0), (rows, cols)), dst)])
        assert np.array_equal(dst, elements[r0 : r0 + rows, c0 : c0 + cols])
        outside = np.ones(big.shape[:2], bool)
        outside[2 : 2 + rows, 3 : 3 + cols] = False
        assert np.all(big[outside] == 0xAB), "bytes outside the destination were written"


def test_what_the_kernels_do_not_handle_is_refused_untouched() -> None:
    s = [np.arange(8, dtype=np.uint8) for _ in range(4)]
    dst = np.zeros((2, 4, 4), np.uint8)
    assert _native.ungroup_box(s, 4, 0, 4, dst)
    refused = [
        (s, 3, 0, 4, np.zeros((2, 4, 3), np.uint8)),  # no kernel for 3-byte elements
        ([*s, *s], 8, 0, 4, np.zeros((2, 4, 8), np.uint8)),  # nor for 8-byte ones
        (s[:3], 4, 0, 4, dst.copy()),  # a stream missing
        (s, 4, 1, 4, dst.copy()),  # the box runs past the end of the streams
        (s, 4, -1, 4, dst.copy()),  # negative offset
        ([x[::2] for x in [np.arange(16, dtype=np.uint8)] * 4], 4, 0, 4, dst.copy()),  # strided streams
        (s, 4, 0, 4, np.zeros((4, 2, 4), np.uint8).transpose(1, 0, 2)),  # elements not adjacent in a row
        (s, 4, 0, 4, np.zeros((2, 4, 4), np.uint8)[::-1]),  # rows backwards
        ([x.astype(np.uint16) for x in s], 4, 0, 4, dst.copy()),  # not bytes
    ]
    for streams, k, off, rs, out in refused:
        before = out.copy()
        assert not _native.ungroup_box(streams, k, off, rs, out)
        assert np.array_equal(out, before)
    src = np.arange(12, dtype=np.uint8)
    out = np.zeros(12, np.uint8)
    assert not _native.group(src, out, 3)
    assert not _native.group(np.arange(16, dtype=np.uint8), np.zeros(16, np.uint8), 8)
    assert not _native.group(src[:10], out, 4)  # not whole elements
    assert not _native.group(src, out[:8], 4)  # destination too small
    assert not out.any()


def test_knob_turns_the_kernels_off() -> None:
    out = np.zeros(8, np.uint8)
    with knobs.override(NATIVE_KERNELS=0):
        assert not _native.group(np.arange(8, dtype=np.uint8), out, 4)
    assert _native.group(np.arange(8, dtype=np.uint8), out, 4)
