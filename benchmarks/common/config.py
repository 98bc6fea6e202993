"""The benchmark's run configuration, shared by every scenario (and sent to every rank)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from benchmarks.common.state import DataSpec

T = TypeVar("T")

GIB = 1 << 30


@dataclass(frozen=True)
class RunConfig:
    size_bytes: int = GIB
    """Logical bytes of the whole (global) state, summed over ranks."""
    world_size: int = 2
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    reps: int = 5
    """Warm repetitions per engine (after one cold run)."""
    storage: str = "/tmp/shardsave-bench"
    """Root URL; every save goes to a fresh directory under it, removed afterwards."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str = ""
    tiny: bool = False
    run_id: str = "run"
    throttle_rate: float = 200e6
    """Bytes/s of the throttled scenario's node-wide bucket."""
    train_steps: int = 40
    ab: tuple[str, ...] = ()
    """Extra shardsave variants under other knobs (``--ab KNOB=V``), run interleaved with the rest."""

    def spec(self, dtype: str | None = None, size_bytes: int | None = None) -> DataSpec:
        return DataSpec(size_bytes or self.size_bytes, dtype or self.dtypes[0], self.cache_dir, self.tiny,
                        self.train_steps)

    def engines(self, names: list[str]) -> list[str]:
        """``names`` plus one ``shardsave@...`` variant per ``--ab`` (after plain shardsave)."""
        out = list(names)
        if "shardsave" in out:
            i = out.index("shardsave") + 1
            out[i:i] = [f"shardsave@{v}" for v in self.ab]
        return out

    def url(self, *parts: str) -> str:
        return "/".join([self.storage.rstrip("/"), self.run_id, *parts])

    def with_(self, **kw: Any) -> RunConfig:
        return replace(self, **kw)


def rotate(items: list[T], k: int) -> list[T]:
    """``items`` rotated by ``k``: every engine takes every position across reps."""
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def machine() -> str:
    import platform

    import torch

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    from shardsave import knobs
    from shardsave.codec import _native, _zstd_cffi
    from shardsave.codec.checksum import IMPLEMENTATION as crc

    grouping = "numba" if knobs.native_kernels() and _native.wait() else "numpy"
    zstd = "cffi" if knobs.zstd_cffi() and _zstd_cffi.binding() is not None else "C"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__}, CRC-32 by {crc}, byte grouping by {grouping}, "
            f"zstd through its {zstd} binding, "
            f"load avg {os.getloadavg()[0]:.1f} at start")
