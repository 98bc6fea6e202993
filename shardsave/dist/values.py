"""Turning live leaves (tensors, DTensors, arrays, bytes, JSON) into plan metadata and bytes.

This is the one module that looks inside DTensors. It maps a DTensor's mesh onto ranks of
the checkpoint's process group and its placements onto the format's placements, and
checks that the layout arithmetic in ``plan.layout`` reproduces the DTensor's local shape
(so a layout we do not understand is refused at save, naming the key, instead of being
stored wrong).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from shardsave.errors import UnsupportedValueError
from shardsave.format.dtypes import dtype_name
from shardsave.format.index import Placement
from shardsave.plan.dtypes import numpy_to_dtype_name
from shardsave.plan.flatten import Leaf, json_type_of, path_repr
from shardsave.plan.layout import ShardedLayout
from shardsave.plan.save_plan import LeafMeta, ShardSpec

try:  # private in torch; FSDP2 + TP produce it
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - older torch
    _StridedShard = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class DTensorInfo:
    spec: ShardSpec
    coord: tuple[int, ...] | None
    """This rank's mesh coordinate (None: not in the mesh)."""
    local: torch.Tensor


def kind_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (np.ndarray, np.generic)):
        return "numpy"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    return "json"


def placements_of(dt: DTensor, path: tuple[Any, ...]) -> tuple[Placement, ...]:
    out: list[Placement] = []
    ndim = dt.dim()
    for p in dt.placements:
        if _StridedShard is not None and isinstance(p, _StridedShard):
            out.append(Placement("strided_shard", dim=p.dim % ndim, split_factor=int(p.split_factor)))
        elif isinstance(p, Shard):
            out.append(Placement("shard", dim=p.dim % ndim))
        elif isinstance(p, Replicate):
            out.append(Placement("replicate"))
        elif isinstance(p, Partial):
            raise UnsupportedValueError(
                f"{path_repr(path)}: DTensor with a Partial placement holds unreduced values; "
                "call .redistribute(placements=[Replicate()]) (or .full_tensor()) before saving"
            )
        else:
            raise UnsupportedValueError(f"{path_repr(path)}: DTensor placement {p!r} is not supported")
    return tuple(out)


def dtensor_info(
    dt: DTensor,
    path: tuple[Any, ...],
    to_group_rank: Callable[[int], int],
    specs: dict[Any, ShardSpec] | None = None,
) -> DTensorInfo:
    """``specs`` interns ShardSpecs across leaves: one mesh-rank list per mesh, not per leaf."""
    mesh = dt.device_mesh
    placements = placements_of(dt, path)
    cache_key = (id(mesh), placements)
    spec = specs.get(cache_key) if specs is not None else None
    if spec is None:
        ranks = tuple(to_group_rank(int(r)) for r in mesh.mesh.reshape(-1).tolist())
        spec = ShardSpec(tuple(mesh.mesh.shape), ranks, placements)
        if specs is not None:
            specs[cache_key] = spec
    coord_list = mesh.get_coordinate()
    coord = tuple(coord_list) if coord_list is not None else None
    local = dt.to_local()
    if coord is not None:
        expected = ShardedLayout(tuple(dt.shape), _mesh(spec), placements).local_shape(coord)
        if tuple(local.shape) != expected:
            raise UnsupportedValueError(
                f"{path_repr(path)}: DTensor local shape {tuple(local.shape)} on mesh coordinate {coord} does not "
                f"match the layout {placements} of global shape {tuple(dt.shape)} (expected {expected}); "
                "this layout is not supported -- redistribute to Shard/Replicate placements before saving"
            )
    return DTensorInfo(spec, coord, local)


def _mesh(spec: ShardSpec) -> Any:
    from shardsave.format.index import Mesh

    return Mesh(spec.mesh_shape, spec.mesh_ranks)


def plain_tensor(value: Any) -> torch.Tensor:
    """A leaf's data as a torch tensor (numpy arrays and bytes too), sharing memory where possible."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        return t
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        arr = value if value.flags.c_contiguous or value.size == 0 else np.ascontiguousarray(value)
        if value.dtype == np.bool_:
            return torch.from_numpy(arr.view(np.uint8)).view(torch.bool)
        return torch.from_numpy(arr) if arr.size else torch.empty(arr.shape, dtype=_torch_dtype_np(arr.dtype))
    if isinstance(value, (bytes, bytearray, memoryview)):
        buf = bytes(value) if isinstance(value, memoryview) else value
        if len(buf) == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(buf) if isinstance(buf, bytes) else buf, dtype=torch.uint8)
    raise TypeError(type(value))


def _torch_dtype_np(dtype: np.dtype) -> torch.dtype:
    from shardsave.format.dtypes import torch_dtype

    name = numpy_to_dtype_name(dtype)
    assert name is not None
    return torch_dtype(name)


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a 1-D uint8 numpy array (no copy when possible)."""
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


def describe(
    leaf: Leaf,
    *,
    checksum: Callable[[np.ndarray], int] | None,
    to_group_rank: Callable[[int], int],
    specs: dict[Any, ShardSpec] | None = None,
) -> tuple[LeafMeta, DTensorInfo | None]:
    """The plan metadata of one leaf (``checksum`` set: prove replicated copies identical)."""
    value = leaf.value
    kind = kind_of(value)
    base = LeafMeta(leaf.key, leaf.path, kind, per_rank_root=leaf.per_rank_root)
    if kind == "json":
        jt = json_type_of(value)
        v = {} if jt == "dict" else [] if jt == "list" else value
        return replace(base, json_type=jt, value=v), None
    if isinstance(value, DTensor):
        if leaf.per_rank_root is not None:
            raise UnsupportedValueError(f"{path_repr(leaf.path)}: a DTensor inside ss.PerRank; save it unwrapped")
        info = dtensor_info(value, leaf.path, to_group_rank, specs)
        nbytes = info.local.numel() * info.local.element_size()
        return replace(base, dtype=dtype_name(value.dtype), shape=tuple(value.shape), shard=info.spec,
                       nbytes=nbytes), info
    t = plain_tensor(value)
    dtype = dtype_name(t.dtype)
    nbytes = t.numel() * t.element_size()
    crc = None
    if checksum is not None and leaf.per_rank_root is None:
        crc = checksum(as_bytes(t))
    return replace(base, dtype=dtype, shape=tuple(t.shape), checksum=crc, nbytes=nbytes), None


def total_elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
