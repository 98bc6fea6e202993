"""Per-rank benchmark state: the trained tensors cut into DTensor shards, as FSDP holds them.

Each rank reads the cached full tensors (memory-mapped, so only its own slices are paged
in), cuts its ``Shard(dim)`` slice with torch.chunk semantics (what DTensor uses: ceil-sized
parts, trailing ones short or empty), casts it to the benchmark dtype and copies it into
its own memory. 1-D tensors (biases, LayerNorm) are always sharded on dim 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import data


@dataclass(frozen=True)
class DataSpec:
    """What state to build: the same on every rank and in the parent."""

    total_bytes: int
    dtype: str
    cache_dir: str
    tiny: bool = False
    steps: int = 40

    def full(self) -> dict[str, torch.Tensor]:
        return data.trained_state(self.total_bytes, self.dtype, cache_dir=Path(self.cache_dir),
                                  steps=self.steps, tiny=self.tiny)


def bounds(n: int, parts: int, i: int) -> tuple[int, int]:
    c = -(-n // parts) if n else 0
    lo = min(i * c, n)
    return lo, min(lo + c, n)


def _local(full: torch.Tensor, mesh: Any, dim: int, dtype: torch.dtype) -> torch.Tensor:
    ws = mesh.size()
    coord = mesh.get_coordinate()[0]
    lo, hi = bounds(full.shape[dim], ws, coord)
    return full.narrow(dim, lo, hi - lo).to(dtype).contiguous().clone()


def sharded_state(spec: DataSpec, mesh: Any, dim: int = 0, *, zeros: bool = False) -> dict[str, Any]:
    """This rank's state dict: every tensor a DTensor ``Shard(dim)`` on ``mesh``, plus ``step``.

    ``zeros``: same layout, filled with zeros (a load target, pages already touched).
    """
    from torch.distributed.tensor import DTensor, Shard

    dtype = data.DTYPES[spec.dtype]
    out: dict[str, Any] = {}
    for name, full in spec.full().items():
        d = dim if full.dim() > dim else 0
        if zeros:
            lo, hi = bounds(full.shape[d], mesh.size(), mesh.get_coordinate()[0])
            shape = list(full.shape)
            shape[d] = hi - lo
            local = torch.zeros(shape, dtype=dtype)
        else:
            local = _local(full, mesh, d, dtype)
        out[name] = DTensor.from_local(local, mesh, [Shard(d)], run_check=False, shape=full.shape,
                                       stride=torch.empty(full.shape, device="meta").stride())
    out["step"] = 40
    return out


def local_bytes(state: dict[str, Any]) -> int:
    from torch.distributed.tensor import DTensor

    return sum(v.to_local().nbytes if isinstance(v, DTensor) else v.nbytes
               for v in state.values() if isinstance(v, torch.Tensor))


def global_bytes(state: dict[str, Any]) -> int:
    return sum(math.prod(v.shape) * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def check_equal(got: dict[str, Any], spec: DataSpec, mesh: Any, dim: int) -> list[str]:
    """Keys whose local shard differs from what it should hold (bitwise)."""
    from torch.distributed.tensor import DTensor

    dtype = data.DTYPES[spec.dtype]
    bad = []
    for name, full in spec.full().items():
        d = dim if full.dim() > dim else 0
        v = got[name]
        local = v.to_local() if isinstance(v, DTensor) else v
        if not torch.equal(_bytes(local), _bytes(_local(full, mesh, d, dtype))):
            bad.append(name)
    return bad


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def barrier(group: Any = None) -> None:
    dist.barrier(group=group)


def timed(fn: Any, group: Any = None) -> float:
    """Wall time of a collective call, from a barrier before to a barrier after (all ranks)."""
    barrier(group)
    t0 = time.perf_counter()
    fn()
    barrier(group)
    return time.perf_counter() - t0
