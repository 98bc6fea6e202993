"""Save on N ranks, load on M ranks with other layouts -- every dtype, compared bitwise.

One spawn of 4 ranks runs every case through sub-groups (spawning costs seconds; see
multirank.py). DTensors are built with ``DTensor.from_local`` from local shards cut by
torch's own placement code, because gloo cannot scatter int16/uint16/uint32/float8 and
because the expectation must not come from shardsave's layout arithmetic.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from multirank import run_multirank
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

import shardsave as ss

DTYPES = [
    torch.bool, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2,
]
SHAPE = (11, 6)  # uneven on 2, 3 and 4 ranks; 4 ranks on 11 rows leaves one short shard


def full_value(dtype: torch.dtype, shape: tuple[int, ...] = SHAPE, seed: int = 0) -> torch.Tensor:
    """Deterministic bytes of every pattern (NaNs and odd fp8 codes included)."""
    g = torch.Generator().manual_seed(seed + DTYPES.index(dtype))
    n = math.prod(shape)
    if dtype == torch.bool:
        return (torch.randint(0, 2, (n,), generator=g) == 1).reshape(shape)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def local_of(full: torch.Tensor, mesh: DeviceMesh, placements: list[Any]) -> torch.Tensor:
    """This rank's local shard, cut by torch's own placement code (left to right)."""
    coord = mesh.get_coordinate()
    assert coord is not None
    local = full
    for m, p in enumerate(placements):
        if isinstance(p, (Shard, _StridedShard)):
            parts, _ = p._split_tensor(local, mesh.size(m), with_padding=False)
            local = parts[coord[m]]
    return local.contiguous()


def make_dtensor(full: torch.Tensor, mesh: DeviceMesh, placements: list[Any]) -> DTensor:
    local = local_of(full, mesh, placements)
    if local.dim() == 2:
        # A non-contiguous local shard (a transposed view into a larger, padded buffer), as
        # FSDP's padded flat buffers produce: save must not serialise the whole storage, and
        # load must write through the view.
        padded = torch.zeros(local.shape[1], local.shape[0] + 3, dtype=local.dtype)
        view = padded[:, 1 : 1 + local.shape[0]].t()
        view.copy_(local)
        local = view
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=full.shape, stride=full.stride())


def state(mesh: DeviceMesh | None, placements: list[Any] | None, seed: int, zero: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dt in DTYPES:
        full = full_value(dt, seed=seed)
        if zero:
            full = torch.zeros_like(full)
        out[str(dt).removeprefix("torch.")] = full if mesh is None else make_dtensor(full, mesh, placements or [])
    return {"model": out, "step": seed, "scalar": torch.tensor(float(seed)), "empty": torch.empty(0, 4)}


def check(loaded: dict[str, Any], seed: int, mesh: DeviceMesh | None, placements: list[Any] | None) -> list[str]:
    bad = []
    for dt in DTYPES:
        name = str(dt).removeprefix("torch.")
        want = full_value(dt, seed=seed)
        got = loaded["model"][name]
        if isinstance(got, DTensor):
            assert mesh is not None and placements is not None
            want = local_of(want, mesh, placements)
            got = got.to_local()
        if got.dtype != dt or not torch.equal(as_bytes(got), as_bytes(want)):
            bad.append(name)
    if loaded["step"] != seed or float(loaded["scalar"]) != float(seed):
        bad.append("step/scalar")
    return bad


def _mesh(group: Any, shape: tuple[int, ...]) -> DeviceMesh:
    ranks = dist.get_process_group_ranks(group)
    return DeviceMesh("cpu", torch.tensor(ranks).reshape(shape), _init_backend=False)


CASES: list[tuple[int, tuple[int, ...], list[Any], int, tuple[int, ...] | None, list[Any] | None]] = [
    # (save ranks, save mesh, save placements, load ranks, load mesh (None: plain tensors), load placements)
    (2, (2,), [Shard(0)], 2, (2,), [Shard(0)]),
    (2, (2,), [Shard(0)], 2, (2,), [Shard(1)]),
    (2, (2,), [Shard(0)], 3, (3,), [Shard(0)]),
    (4, (4,), [Shard(0)], 2, (2,), [Shard(0)]),
    (3, (3,), [Shard(-1)], 1, (1,), [Shard(0)]),
    (1, (1,), [Replicate()], 4, (4,), [Shard(0)]),
    (2, (2,), [Shard(0)], 4, (2, 2), [Shard(0), Shard(1)]),
    (4, (2, 2), [Replicate(), Shard(0)], 3, (3,), [Replicate()]),
    (4, (2, 2), [_StridedShard(0, split_factor=2), Shard(0)], 2, (2,), [Shard(1)]),
    (2, (2,), [Shard(1)], 4, (2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    (3, (3,), [Shard(0)], 2, None, None),
    # The remaining N -> M pairs of 1..4 (plain Shard(0) -> Shard(0)).
    (1, (1,), [Shard(0)], 1, (1,), [Shard(0)]),
    (1, (1,), [Shard(0)], 2, (2,), [Shard(0)]),
    (1, (1,), [Shard(0)], 3, (3,), [Shard(0)]),
    (2, (2,), [Shard(0)], 1, (1,), [Shard(0)]),
    (3, (3,), [Shard(0)], 3, (3,), [Shard(0)]),
    (3, (3,), [Shard(0)], 4, (4,), [Shard(0)]),
    (4, (4,), [Shard(0)], 1, (1,), [Shard(0)]),
    (4, (4,), [Shard(0)], 3, (3,), [Shard(0)]),
    (4, (4,), [Shard(0)], 4, (4,), [Shard(0)]),
]


def _reshard_worker(root: str) -> list[str]:
    rank = dist.get_rank()
    failures: list[str] = []
    for i, (n_save, save_shape, save_pl, n_load, load_shape, load_pl) in enumerate(CASES):
        save_pg = dist.new_group(list(range(n_save)))  # (all ranks, same order)
        load_pg = dist.new_group(list(range(n_load)))
        path = os.path.join(root, f"case{i}")
        if rank < n_save:
            mesh = _mesh(save_pg, save_shape)
            ss.save(state(mesh, save_pl, seed=i), path, process_group=save_pg)
        dist.barrier()
        if rank < n_load:
            lmesh = _mesh(load_pg, load_shape) if load_shape is not None else None
            target = state(lmesh, load_pl, seed=i, zero=True)
            ss.load(target, path, process_group=load_pg)
            bad = check(target, i, lmesh, load_pl)
            if bad:
                failures.append(f"case {i} {CASES[i]} rank {rank}: {bad}")
        dist.barrier()
    # A Partial placement holds unreduced values: refused on every rank, naming the key.
    from torch.distributed.tensor import Partial

    world_mesh = _mesh(dist.group.WORLD, (dist.get_world_size(),))
    partial = DTensor.from_local(torch.ones(3), world_mesh, [Partial()], run_check=False)
    try:
        ss.save({"grad": partial}, os.path.join(root, "partial"))
        failures.append("Partial was saved")
    except ss.CheckpointError as exc:
        if "state_dict['grad']" not in str(exc) or "Partial" not in str(exc):
            failures.append(f"unclear Partial error: {exc}")
    if rank == 0:
        # One process, no process group: plain full tensors.
        full = ss.load_full(os.path.join(root, "case3"))
        if check(full, 3, None, None):
            failures.append("load_full")
    return failures


@pytest.mark.multirank
@pytest.mark.timeout(600)
def test_reshard_every_dtype_bitwise(tmp_path: Any) -> None:
    results = run_multirank(_reshard_worker, 4, str(tmp_path), timeout=500)
    assert results == [[], [], [], []]
