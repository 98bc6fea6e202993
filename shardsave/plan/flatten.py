"""Flattening nested state dicts into leaves, and rebuilding them.

A state dict is a nested structure of dicts (str or int keys) and lists/tuples whose
leaves are tensors, numpy arrays, bytes, JSON scalars, or empty containers. Each leaf gets
a *path* (its components) and a *display key* (the components joined by '.'), which must
be unique: ``{"a.b": x}`` and ``{"a": {"b": y}}`` together are refused, because both
would read back under the key ``a.b``.

Values that legitimately differ per rank are wrapped in :class:`PerRank`; the wrapper's
depth in the path is recorded so ``load_full`` can rebuild it as a list over saved ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shardsave.errors import UnsupportedValueError
from shardsave.format.index import PathComponent


@dataclass
class PerRank:
    """Marks a value that legitimately differs between ranks (RNG state, data position).

    Each rank stores its own value. Loading gives rank r the value saved by rank r; on a
    world size larger than the saved one, ranks without a saved value get a
    StateDictMismatchError under ``strict=True`` and keep their current value (reported as
    missing) under ``strict=False``. ``load_full`` returns a list indexed by saved rank.
    """

    value: Any


@dataclass
class Leaf:
    """One leaf of a state dict, with where it sits so a load can replace it in place."""

    key: str
    path: tuple[PathComponent, ...]
    value: Any
    per_rank_root: int | None
    container: Any
    slot: Any


def display_key(path: Iterable[PathComponent]) -> str:
    return ".".join(str(c[1]) if isinstance(c, tuple) else str(c) for c in path)


def path_repr(path: Iterable[PathComponent]) -> str:
    """How a path reads in error messages: state_dict['model']['w'][0]."""
    out = "state_dict"
    for c in path:
        out += f"[{c[1]}]" if isinstance(c, tuple) else f"[{c!r}]" if isinstance(c, str) else f"[{c}]"
    return out


def json_type_of(value: Any) -> str | None:
    """The JSON leaf type of a value, or None when it is not a JSON leaf."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, dict) and not value:
        return "dict"
    if isinstance(value, (list, tuple)) and not value:
        return "list"
    return None


def flatten(state: Any) -> list[Leaf]:
    """All leaves of ``state`` in traversal order; refuses what cannot be stored."""
    if not isinstance(state, dict):
        raise UnsupportedValueError(
            f"a state dict must be a dict at the top level, got {type(state).__name__}; wrap it: {{'state': value}}"
        )
    leaves = list(_walk(state, (), None, set()))
    seen: dict[str, tuple[PathComponent, ...]] = {}
    for leaf in leaves:
        other = seen.setdefault(leaf.key, leaf.path)
        if other != leaf.path:
            raise UnsupportedValueError(
                f"{path_repr(leaf.path)} and {path_repr(other)} both flatten to the key {leaf.key!r}; "
                "rename one of them so keys stay unique"
            )
    return leaves


def _children(node: Any, path: tuple[PathComponent, ...]) -> Iterator[tuple[PathComponent, Any, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, str):
                yield k, v, k
            elif isinstance(k, int) and not isinstance(k, bool):
                yield ("int", k), v, k
            else:
                raise UnsupportedValueError(
                    f"{path_repr(path)} has a key {k!r} of type {type(k).__name__}; "
                    "dict keys must be str or int"
                )
    else:
        for i, v in enumerate(node):
            yield i, v, i


def _walk(node: Any, path: tuple[PathComponent, ...], per_rank_root: int | None, active: set[int]) -> Iterator[Leaf]:
    if id(node) in active:
        raise UnsupportedValueError(f"{path_repr(path)} contains itself (a reference cycle)")
    active.add(id(node))
    try:
        for comp, child, slot in _children(node, path):
            child_path = (*path, comp)
            if isinstance(child, PerRank):
                if per_rank_root is not None:
                    raise UnsupportedValueError(f"{path_repr(child_path)}: ss.PerRank inside ss.PerRank; wrap once")
                yield from _leaf_or_walk(child.value, child_path, len(child_path), child, "value", active)
            else:
                yield from _leaf_or_walk(child, child_path, per_rank_root, node, slot, active)
    finally:
        active.discard(id(node))


def _leaf_or_walk(
    value: Any,
    path: tuple[PathComponent, ...],
    per_rank_root: int | None,
    container: Any,
    slot: Any,
    active: set[int],
) -> Iterator[Leaf]:
    if isinstance(value, (dict, list, tuple)) and len(value) > 0:
        yield from _walk(value, path, per_rank_root, active)
        return
    check_leaf(value, path)
    yield Leaf(display_key(path), path, value, per_rank_root, container, slot)


def check_leaf(value: Any, path: tuple[PathComponent, ...]) -> None:
    """Raise UnsupportedValueError unless ``value`` is a storable leaf."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise UnsupportedValueError(
                f"{path_repr(path)}: tensor layout {value.layout} is not supported; call .to_dense() first"
            )
        if value.is_quantized:
            raise UnsupportedValueError(f"{path_repr(path)}: quantized tensors are not supported; dequantize first")
        if value.device.type == "meta":
            raise UnsupportedValueError(f"{path_repr(path)}: a meta tensor has no data to save; materialise it first")
        return
    if isinstance(value, np.ndarray):
        from shardsave.plan.dtypes import numpy_to_dtype_name

        if numpy_to_dtype_name(value.dtype) is None:
            raise UnsupportedValueError(
                f"{path_repr(path)}: numpy dtype {value.dtype} is not supported; "
                "use a numeric or bool dtype (strings and objects: store them as JSON values or bytes)"
            )
        return
    if isinstance(value, (bytes, bytearray, memoryview)):
        return
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_, np.void, np.object_)):
        return  # stored as a 0-d numpy array
    jt = json_type_of(value)
    if jt is None:
        raise UnsupportedValueError(
            f"{path_repr(path)}: a value of type {type(value).__module__}.{type(value).__qualname__} cannot be saved; "
            "use tensors, numpy arrays, bytes or JSON values (None, bool, int, float, str), "
            "and wrap values that differ between ranks in ss.PerRank"
        )
    if jt == "float" and not isinstance(value, float):
        raise UnsupportedValueError(f"{path_repr(path)}: float subclass {type(value).__name__}; pass a plain float")
    if jt == "float":
        _ = math.isfinite(value)


def unflatten(items: Iterable[tuple[tuple[PathComponent, ...], Any]]) -> dict[Any, Any]:
    """Rebuild nested dicts/lists from (path, value) pairs; list indices become list slots."""
    root: dict[Any, Any] = {}
    for path, value in items:
        node: Any = root
        for i, comp in enumerate(path):
            last = i == len(path) - 1
            nxt = path[i + 1] if not last else None
            key: Any = comp[1] if isinstance(comp, tuple) else comp
            if isinstance(node, list):
                assert isinstance(key, int)
                while len(node) <= key:
                    node.append(None)
            if last:
                node[key] = value
            else:
                child = node[key] if isinstance(node, list) else node.get(key)
                if child is None:
                    child = [] if isinstance(nxt, int) else {}
                    node[key] = child
                node = child
    return root
