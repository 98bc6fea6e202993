"""The common currency of export and import: a checkpoint's leaves as :class:`Item` objects,
and the *manifest* that lets a foreign file carry what its own format cannot.

safetensors and HDF5 hold named tensors only. A shardsave checkpoint also holds JSON
values (step, config, ...), numpy arrays and bytes, and a nesting (``opt.state.0.step`` is
``{"opt": {"state": {0: {"step": ...}}}}`` with an *integer* key ``0``). Exports therefore
carry a manifest, one JSON object::

    {"format": "shardsave-export", "format_version": 1, "source": URL, "save_id": ...,
     "metadata": {...the index metadata...},
     "entries": [{"key": k, "path": [...], "kind": "tensor"|"numpy"|"bytes"},
                 {"key": k, "path": [...], "kind": "json", "type": json type, "value": v}, ...]}

in the checkpoint's order (paths and JSON values use the encoding of ``index.json``,
docs/FORMAT.md section 3), so
importing an export rebuilds the original state exactly. Files without a manifest import
as flat ``{name: tensor}`` dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import shardsave as ss
from shardsave.errors import FormatError, StateDictMismatchError
from shardsave.format.dtypes import itemsize_of
from shardsave.format.index import (
    CheckpointInfo,
    Entry,
    PathComponent,
    _json_value_from_json,
    _json_value_to_json,
    _path_from_json,
    _path_to_json,
)
from shardsave.load import read_index
from shardsave.plan.flatten import flatten, json_type_of, unflatten
from shardsave.storage import Storage

MANIFEST_FORMAT = "shardsave-export"
MANIFEST_VERSION = 1
DATA_ITEM_KINDS = ("tensor", "numpy", "bytes")


@dataclass
class Item:
    """One leaf: data kinds carry a CPU tensor (bytes as uint8), JSON kinds their value."""

    key: str
    path: tuple[PathComponent, ...]
    kind: str
    """``tensor``, ``numpy``, ``bytes`` or ``json``."""
    value: Any
    json_type: str | None = None

    @property
    def is_data(self) -> bool:
        return self.kind != "json"


def items_from_state(state: dict[str, Any]) -> list[Item]:
    """The leaves of a state dict (as ``ss.load_full`` returns it, or a foreign one)."""
    out: list[Item] = []
    for leaf in flatten(state):
        v = leaf.value
        if isinstance(v, torch.Tensor):
            out.append(Item(leaf.key, leaf.path, "tensor", v.detach().cpu()))
        elif isinstance(v, (np.ndarray, np.generic)):
            arr = np.array(v, order="C")
            out.append(Item(leaf.key, leaf.path, "numpy", torch.from_numpy(arr)))
        elif isinstance(v, (bytes, bytearray, memoryview)):
            out.append(Item(leaf.key, leaf.path, "bytes", torch.frombuffer(bytearray(v), dtype=torch.uint8)
                            if len(v) else torch.empty(0, dtype=torch.uint8)))
        else:
            out.append(Item(leaf.key, leaf.path, "json", v, json_type_of(v)))
    return out


def restore(item: Item) -> Any:
    """The item's value as its own kind (numpy array, bytes, JSON value, tensor)."""
    if item.kind == "tensor":
        return item.value
    if item.kind == "numpy":
        t: torch.Tensor = item.value
        return t.numpy()
    if item.kind == "bytes":
        return item.value.contiguous().numpy().tobytes()
    if item.json_type == "dict":
        return {}
    if item.json_type == "list":
        return []
    return item.value


def state_from_items(items: Iterable[Item]) -> dict[str, Any]:
    return unflatten((it.path, restore(it)) for it in items)


# --------------------------------------------------------------------------- reading a checkpoint


def _matches(key: str, keys: Sequence[str] | None) -> bool:
    return keys is None or any(key == k or key.startswith(k + ".") for k in keys)


def entry_raw_bytes(e: Entry) -> int:
    if e.is_per_rank:
        return sum(math.prod(rv.shape) * itemsize_of(rv.dtype) for rv in e.per_rank
                   if rv is not None and rv.shape is not None and rv.dtype is not None)
    if e.shape is None or e.dtype is None:
        return 0
    return math.prod(e.shape) * itemsize_of(e.dtype)


def select(path: str, keys: Sequence[str] | None, storage_options: dict[str, Any] | None = None
           ) -> tuple[CheckpointInfo, list[Entry]]:
    """The index and the entries ``keys`` select (by key or key prefix, like ``load_full``)."""
    ckpt = read_index(Storage.from_url(path, storage_options))
    if keys is not None:
        unknown = [k for k in keys if not any(_matches(e.key, [k]) for e in ckpt.entries)]
        if unknown:
            tops = sorted({e.key.split(".")[0] for e in ckpt.entries})
            raise StateDictMismatchError(
                f"{ckpt.path} holds no key matching {unknown}; its keys start with {tops[:20]}"
                f"{' ...' if len(tops) > 20 else ''} (run `shardsave info` to list them)", missing=unknown)
    return ckpt, [e for e in ckpt.entries if _matches(e.key, keys)]


def iter_items(
    path: str,
    entries: Sequence[Entry],
    *,
    batch_bytes: int,
    storage_options: dict[str, Any] | None = None,
    on_bytes: Any = None,
) -> Iterator[Item]:
    """The leaves of ``entries``, loaded ``batch_bytes`` (raw) at a time with ``ss.load_full``
    so that a streaming writer never holds the whole checkpoint. ``on_bytes(n)`` is called
    after each batch with the raw bytes it loaded (progress)."""
    seen: set[str] = set()
    batch: list[Entry] = []
    size = 0

    def flush() -> Iterator[Item]:
        state = ss.load_full(path, keys=[e.key for e in batch], storage_options=storage_options)
        for it in items_from_state(state):
            if it.key not in seen:  # a key that prefixes another selects both
                seen.add(it.key)
                yield it
        if on_bytes is not None:
            on_bytes(size)

    for e in entries:
        batch.append(e)
        size += entry_raw_bytes(e)
        if size >= batch_bytes:
            yield from flush()
            batch, size = [], 0
    if batch:
        yield from flush()


# --------------------------------------------------------------------------- manifest


def manifest(ckpt: CheckpointInfo | None, items: Iterable[Item]) -> dict[str, Any]:
    """The manifest of an export (see the module docstring)."""
    entries: list[dict[str, Any]] = []
    for it in items:
        entry: dict[str, Any] = {"key": it.key, "path": _path_to_json(it.path), "kind": it.kind}
        if not it.is_data:
            entry.update(type=it.json_type, value=_json_value_to_json(it.json_type, it.value))
        entries.append(entry)
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "source": ckpt.path if ckpt else None,
        "save_id": ckpt.save_id if ckpt else None,
        "metadata": dict(ckpt.metadata) if ckpt else {},
        "entries": entries,
    }


def check_manifest(doc: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise FormatError(f"{where}: not a shardsave export (no \"format\": \"{MANIFEST_FORMAT}\")")
    version = doc.get("format_version")
    if version != MANIFEST_VERSION:
        raise FormatError(f"{where}: export format version {version!r}; this shardsave reads version "
                          f"{MANIFEST_VERSION} (upgrade shardsave)")
    if not isinstance(doc.get("entries"), list):
        raise FormatError(f"{where}: manifest field 'entries' must be a list")
    if not isinstance(doc.get("metadata", {}), dict):
        raise FormatError(f"{where}: manifest field 'metadata' must be an object")
    return doc


def items_from_manifest(doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str) -> list[Item]:
    """Rebuild the items of an export from its manifest and its tensors by key."""
    out: list[Item] = []
    for i, e in enumerate(doc["entries"]):
        w = f"{where}: entries[{i}]"
        kinds = (*DATA_ITEM_KINDS, "json")
        if not isinstance(e, dict) or not isinstance(e.get("key"), str) or e.get("kind") not in kinds:
            raise FormatError(f"{w} needs a string 'key' and a 'kind' in {list(kinds)}")
        path = _path_from_json(e.get("path"), w)
        if e["kind"] == "json":
            jt, value = _json_value_from_json(e.get("type"), e.get("value"), w)
            out.append(Item(e["key"], path, "json", value, jt))
        elif e["key"] not in tensors:
            raise FormatError(f"{w}: the file holds no tensor named {e['key']!r}")
        else:
            out.append(Item(e["key"], path, e["kind"], tensors[e["key"]]))
    return out
