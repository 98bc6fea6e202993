"""Writing and reading the single-file formats: safetensors, torch, HDF5, JSON.

Writers take :class:`~shardsave.convert._items.Item` streams; readers return items (and
the manifest's metadata). No pickle is read here: the torch format is only *written*
(``torch.save`` of a plain dict); reading one is :mod:`shardsave.convert.foreign`'s job.

Per format:

* **safetensors**: one tensor per data leaf, named by its key; numpy arrays and bytes
  become tensors (bytes as uint8). The manifest (``_items``) goes into the header
  metadata under ``"shardsave"``, beside ``"format": "pt"``. Dtypes safetensors has no
  code for (complex128, complex32, float8_e8m0fnu, ...) are refused, naming the key.
* **torch**: ``torch.save`` of the plain nested dict ``ss.load_full`` returns, numpy arrays
  converted to tensors so that ``torch.load(weights_only=True)`` reads it back.
* **HDF5** (h5py): one dataset per data leaf, in groups following the key's path
  (``model/layers/0/weight``), with attributes ``key``, ``path`` (JSON), ``kind``,
  ``dtype`` (torch's name) and ``shape``. HDF5 has no bfloat16, float8 or complex32 type:
  those are stored as the unsigned integers of their bit patterns (same shape, uint16 /
  uint8 / uint32) with ``raw_bits = True``; read them as ``dtype`` by viewing the bits.
  The manifest is the root attribute ``shardsave``.
* **JSON**: the manifest with each entry's ``dtype``, ``shape`` and ``data`` (nested lists
  of numbers, exact: :mod:`shardsave.convert.jsonfmt`), one entry per line.

Every writer writes ``OUT.tmp-<hex>`` and renames it onto ``OUT`` when complete, so an
interrupted export never leaves a plausible-looking partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shardsave.convert._items import (
    Item,
    check_manifest,
    items_from_manifest,
    items_from_state,
    manifest,
    restore,
)
from shardsave.convert.jsonfmt import encoding_of, tensor_from_json, tensor_to_json
from shardsave.errors import FormatError, UnsupportedValueError
from shardsave.format.dtypes import dtype_name, is_known_dtype, torch_dtype
from shardsave.format.index import CheckpointInfo
from shardsave.format.names import TMP_INFIX
from shardsave.plan.flatten import unflatten


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike[str]) -> Iterator[str]:
    """A temporary name beside ``out``, renamed onto it only if the block succeeds."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}{TMP_INFIX}{secrets.token_hex(4)}")
    try:
        yield str(tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        dist = {"safetensors.torch": "safetensors", "h5py": "h5py"}.get(module, module)
        raise UnsupportedValueError(
            f"this format needs the {dist!r} package, which is not installed: pip install {dist} "
            "(or pip install 'shardsave[convert]')"
        ) from None


def _export_tensor(it: Item) -> torch.Tensor:
    t: torch.Tensor = it.value
    return t.contiguous()


# --------------------------------------------------------------------------- safetensors


def safetensors_dtypes() -> frozenset[torch.dtype]:
    st = _need("safetensors.torch")
    known = getattr(st, "_TYPES", None)
    if isinstance(known, dict):
        return frozenset(known.values())
    return frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                      torch.bfloat16, torch.float32, torch.float64})


def write_safetensors(out: str, items: Iterable[Item], ckpt: CheckpointInfo | None) -> None:
    st = _need("safetensors.torch")
    supported = safetensors_dtypes()
    all_items = list(items)
    tensors: dict[str, torch.Tensor] = {}
    for it in all_items:
        if not it.is_data:
            continue
        t = _export_tensor(it)
        if t.dtype not in supported:
            names = sorted(dtype_name(d) for d in supported)
            raise UnsupportedValueError(
                f"key {it.key!r} is {dtype_name(t.dtype)}, which safetensors cannot store (it stores {names}); "
                "export it with --to hdf5 or --to torch, or leave it out with --keys"
            )
        tensors[it.key] = t
    md = {"format": "pt", "shardsave": json.dumps(manifest(ckpt, all_items), allow_nan=False)}
    with atomic_output(out) as tmp:
        st.save_file(tensors, tmp, metadata=md)


def read_safetensors(src: str) -> tuple[list[Item], dict[str, Any]]:
    st = _need("safetensors.torch")
    safetensors = _need("safetensors")
    with safetensors.safe_open(src, framework="pt") as f:
        header = f.metadata() or {}
    tensors = st.load_file(src)
    if "shardsave" in header:
        doc = check_manifest(_json(header["shardsave"], f"{src}: header metadata 'shardsave'"), src)
        return items_from_manifest(doc, tensors, src), dict(doc.get("metadata") or {})
    state = {k: tensors[k] for k in sorted(tensors)}
    return items_from_state(state), ({"safetensors_metadata": dict(header)} if header else {})


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{where} is not valid JSON ({exc})") from None


# --------------------------------------------------------------------------- torch


def write_torch(out: str, items: Iterable[Item]) -> None:
    def value(it: Item) -> Any:
        return it.value if it.kind == "numpy" else restore(it)

    state = unflatten((it.path, value(it)) for it in items)
    with atomic_output(out) as tmp:
        torch.save(state, tmp)


# --------------------------------------------------------------------------- HDF5

_H5_RAW = {torch.bfloat16, torch.complex32, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
           torch.float8_e5m2fnuz, torch.float8_e8m0fnu}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _h5_component(c: Any) -> str:
    s = str(c[1]) if isinstance(c, tuple) else str(c)
    s = s.replace("%", "%25").replace("/", "%2F")
    return {"": "%", ".": "%2E", "..": "%2E%2E"}.get(s, s)


def _h5_array(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """(array to store, whether it holds raw bits)."""
    if t.dtype in _H5_RAW or encoding_of(t.dtype) == "bits":
        return t.view(_UINT_TORCH[t.dtype.itemsize]).numpy(), True
    return t.numpy(), False


_UINT_TORCH = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


def write_hdf5(out: str, items: Iterable[Item], ckpt: CheckpointInfo | None) -> None:
    """Streams ``items`` into an HDF5 file (each tensor is written as it arrives)."""
    h5py = _need("h5py")
    kept: list[Item] = []  # for the manifest: keys and paths, not the tensors
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as f:
        for it in items:
            if not it.is_data:
                kept.append(it)
                continue
            kept.append(Item(it.key, it.path, it.kind, None))
            t = _export_tensor(it)
            arr, raw = _h5_array(t)
            ds = f.create_dataset("/".join(_h5_component(c) for c in it.path), data=arr)
            ds.attrs["key"] = it.key
            ds.attrs["path"] = json.dumps(manifest(None, [it])["entries"][0]["path"])
            ds.attrs["kind"] = it.kind
            ds.attrs["dtype"] = dtype_name(t.dtype)
            ds.attrs["shape"] = np.asarray(t.shape, dtype=np.int64)
            ds.attrs["raw_bits"] = raw
        f.attrs["shardsave"] = json.dumps(manifest(ckpt, kept), allow_nan=False)


def read_hdf5(src: str) -> tuple[list[Item], dict[str, Any]]:
    h5py = _need("h5py")
    with h5py.File(src, "r") as f:
        datasets: dict[str, Any] = {}
        f.visititems(lambda name, obj: datasets.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
        text = f.attrs.get("shardsave")
        if text is not None:
            tensors: dict[str, torch.Tensor] = {}
            for name, ds in datasets.items():
                key = ds.attrs.get("key", name)
                tensors[key.decode() if isinstance(key, bytes) else str(key)] = _tensor_of_dataset(ds, f"{src}:/{name}")
            doc = check_manifest(_json(text.decode() if isinstance(text, bytes) else str(text), f"{src}: attribute "
                                       "'shardsave'"), src)
            return items_from_manifest(doc, tensors, src), dict(doc.get("metadata") or {})
        # A foreign HDF5 file: one tensor per dataset, nested like its groups.
        return [Item(name.replace("/", "."), tuple(name.split("/")), "tensor",
                     _tensor_of_dataset(ds, f"{src}:/{name}")) for name, ds in sorted(datasets.items())], {}


def _tensor_of_dataset(ds: Any, where: str) -> torch.Tensor:
    arr = np.asarray(ds[()])
    dtype_attr = ds.attrs.get("dtype")
    if ds.attrs.get("raw_bits", False):
        name = dtype_attr.decode() if isinstance(dtype_attr, bytes) else str(dtype_attr)
        if not is_known_dtype(name):
            raise FormatError(f"{where}: raw_bits dataset has unknown dtype attribute {name!r}")
        dtype = torch_dtype(name)
        if arr.dtype != _UINT[dtype.itemsize]:
            raise FormatError(f"{where}: {name} bits must be stored as {np.dtype(_UINT[dtype.itemsize]).name}, "
                              f"found {arr.dtype}")
        return torch.from_numpy(np.array(arr, order="C")).view(dtype)
    try:
        return torch.from_numpy(np.array(arr, order="C"))
    except TypeError:
        raise UnsupportedValueError(f"{where}: HDF5 type {arr.dtype} has no torch dtype") from None


# --------------------------------------------------------------------------- JSON


def write_json(out: str, items: Iterable[Item], ckpt: CheckpointInfo | None) -> None:
    all_items = list(items)
    doc = manifest(ckpt, all_items)
    lines: list[str] = []
    for entry, it in zip(doc["entries"], all_items):
        if it.is_data:
            t = _export_tensor(it)
            entry = {**entry, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
            if encoding_of(t.dtype) != "number":
                entry["encoding"] = encoding_of(t.dtype)
            entry["data"] = tensor_to_json(t)
        lines.append(json.dumps(entry, allow_nan=False, ensure_ascii=False, separators=(",", ":")))
    head = json.dumps({k: v for k, v in doc.items() if k != "entries"}, allow_nan=False, ensure_ascii=False)
    text = head[:-1] + ', "entries": [\n' + ",\n".join(lines) + "\n]}\n"
    with atomic_output(out) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def read_json(src: str) -> tuple[list[Item], dict[str, Any]]:
    doc = check_manifest(_json(Path(src).read_text(encoding="utf-8"), src), src)
    tensors: dict[str, torch.Tensor] = {}
    for i, e in enumerate(doc["entries"]):
        where = f"{src}: entries[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("key"), str):
            raise FormatError(f"{where} needs a string 'key'")
        if e.get("kind") == "json":
            continue
        name = e.get("dtype")
        if not isinstance(name, str) or not is_known_dtype(name):
            raise FormatError(f"{where}: dtype {name!r} is not a torch dtype name such as 'float32'")
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        tensors[e["key"]] = tensor_from_json(e.get("data"), torch_dtype(name), tuple(shape), where=where)
    return items_from_manifest(doc, tensors, src), dict(doc.get("metadata") or {})
