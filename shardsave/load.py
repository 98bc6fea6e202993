"""``ss.load`` (in place, resharding), ``ss.load_full`` (one process), ``ss.info``.

Loading never unpickles or evaluates anything: the index is JSON, chunks are raw bytes
decoded by a codec named in the index and checked against a checksum before use.

In-place load, on each rank:

1. (coordinator -> all ranks) read ``index.json`` once and broadcast its bytes, so every
   rank plans against the same checkpoint even if it is being overwritten meanwhile.
2. (each rank) match its targets against the index: missing / unexpected keys and
   shape / dtype differences raise StateDictMismatchError under ``strict=True``.
3. (each rank) plan the chunk reads its targets need -- the targets' own layout decides
   the resharding -- then fetch, verify, decode and copy them in place.
4. (all ranks) exchange outcomes, so a failure on one rank fails the load on all.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from shardsave import knobs
from shardsave.crypto import SaveCipher, open_index
from shardsave.dist.comm import Comm, describe_error
from shardsave.dist.values import kind_of
from shardsave.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    LimitExceededError,
    MissingFileError,
    ShardsaveError,
    StateDictMismatchError,
)
from shardsave.format.dtypes import dtype_name, itemsize_of, torch_dtype
from shardsave.format.index import DATA_KINDS, CheckpointInfo, Entry, PathComponent, index_from_json
from shardsave.format.names import INDEX_NAME
from shardsave.pipeline.read import execute_reads, prepare_reads
from shardsave.plan.dtypes import numpy_dtype
from shardsave.plan.flatten import Leaf, PerRank, flatten, unflatten
from shardsave.plan.layout import ShardedLayout
from shardsave.plan.load_plan import Region
from shardsave.plan.rename import Rename, matches, rename_keys, renamed_path, renamed_root
from shardsave.storage import Storage


@dataclass
class LoadResult:
    """What a non-strict load could not load (all empty after a strict load)."""

    missing: list[str] = field(default_factory=list)
    """Target keys the checkpoint does not hold (left unchanged)."""
    unexpected: list[str] = field(default_factory=list)
    """Checkpoint keys the target does not have (not loaded)."""
    mismatched: list[str] = field(default_factory=list)
    """Keys whose shape, dtype or kind differ (left unchanged), with the difference."""


def read_index(storage: Storage) -> CheckpointInfo:
    """Read and parse a committed index (CheckpointNotFoundError if there is none).

    An encrypted checkpoint's index is parsed but not authenticated here (that needs the
    key: :func:`open_checkpoint`); a plain one's digest is checked.
    """
    return index_from_json(_read_index_bytes(storage), path=storage.url)


def _read_index_bytes(storage: Storage) -> bytes:
    try:
        return storage.read_bytes(INDEX_NAME, max_bytes=knobs.max_index_bytes())
    except MissingFileError:
        hint = " (data files exist: an interrupted or failed save)" if _has_data(storage) else ""
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {storage.url}: {INDEX_NAME} is missing{hint}"
        ) from None


def open_checkpoint(storage: Storage, encryption_key: bytes | None = None) -> tuple[CheckpointInfo, SaveCipher | None]:
    """Read, parse and (encrypted checkpoints) authenticate the index with ``encryption_key``.

    Returns the index and the save's cipher (None for a plain checkpoint); raises
    KeyRequiredError / WrongKeyError / AuthenticationError, or EncryptionError for a plain
    checkpoint opened with a key (see :func:`shardsave.crypto.open_index`).
    """
    data = _read_index_bytes(storage)
    ckpt = index_from_json(data, path=storage.url)
    return ckpt, open_index(data, ckpt, encryption_key)


def _has_data(storage: Storage) -> bool:
    try:
        return bool(storage.listdir("data"))
    except ShardsaveError:
        return False


def info(path: str, *, storage_options: dict[str, Any] | None = None,
         encryption_key: bytes | None = None) -> CheckpointInfo:
    """The committed checkpoint's index, parsed.

    An encrypted checkpoint's index is readable without the key (names, shapes and
    metadata are not secret) but then unauthenticated; with ``encryption_key`` it is
    authenticated first.
    """
    storage = Storage.from_url(path, storage_options)
    if encryption_key is None:
        return read_index(storage)
    return open_checkpoint(storage, encryption_key)[0]


def _entry_dtype(e: Entry, rank: int) -> tuple[str | None, tuple[int, ...] | None]:
    if e.is_per_rank:
        rv = e.per_rank[rank] if rank < len(e.per_rank) else None
        return (rv.dtype, rv.shape) if rv is not None else (None, None)
    return e.dtype, e.shape


@dataclass
class _Target:
    """One target leaf to fill: where the bytes go and how to hand them back."""

    leaf: Leaf
    entry_index: int
    rank: int
    local: torch.Tensor
    regions: list[Region]
    dtype: str
    assign: Any = None
    """Callable run after the reads (None: the data landed in place)."""


def _set(leaf: Leaf, value: Any) -> None:
    if isinstance(leaf.container, PerRank):
        leaf.container.value = value
    else:
        leaf.container[leaf.slot] = value


def _whole(shape: tuple[int, ...]) -> list[Region]:
    return [Region(((0,) * len(shape), shape), (0,) * len(shape))]


def _match(
    leaves: list[Leaf], info: CheckpointInfo, rank: int, by_key: dict[str, int] | None = None
) -> tuple[list[_Target], list[tuple[Leaf, Entry]], LoadResult]:
    """Pair targets with entries; the rest is reported.

    ``by_key`` maps target keys to entry indices (after renaming and key filters); by
    default every entry under its own key.
    """
    if by_key is None:
        by_key = {e.key: i for i, e in enumerate(info.entries)}
    result = LoadResult()
    targets: list[_Target] = []
    json_sets: list[tuple[Leaf, Entry]] = []
    seen: set[str] = set()
    meshes: dict[int, Any] = {}  # DeviceMesh.mesh is rebuilt on every access: once per mesh
    for leaf in leaves:
        idx_or_none = by_key.get(leaf.key)
        if idx_or_none is None:
            result.missing.append(leaf.key)
            continue
        idx = idx_or_none
        seen.add(leaf.key)
        e = info.entries[idx]
        tkind = kind_of(leaf.value)
        if e.kind == "json":
            # JSON values are replaced in their container, whatever the target held.
            if e.is_per_rank and (rank >= len(e.per_rank) or e.per_rank[rank] is None):
                result.missing.append(f"{leaf.key} (saved by {info.world_size} ranks; none for rank {rank})")
            else:
                json_sets.append((leaf, e))
            continue
        dtype, shape = _entry_dtype(e, rank)
        if dtype is None or shape is None:
            result.missing.append(f"{leaf.key} (saved by {info.world_size} ranks; none for rank {rank})")
            continue
        value = leaf.value
        if tkind == "json":
            # A JSON placeholder (e.g. None) receiving stored data: replace it.
            out = _fresh(e, dtype, shape)
            targets.append(_Target(leaf, idx, rank, out, _whole(shape), dtype,
                                   assign=lambda leaf=leaf, out=out, e=e: _set(leaf, _as_kind(e.kind, out))))
            continue
        if isinstance(value, torch.Tensor):  # DTensor too: its global dtype and shape
            mine = (dtype_name(value.dtype), tuple(value.shape))
        elif isinstance(value, (np.ndarray, np.generic)):
            from shardsave.plan.dtypes import numpy_to_dtype_name

            arr = np.asarray(value)
            mine = (numpy_to_dtype_name(arr.dtype) or str(arr.dtype), tuple(arr.shape))
        else:  # bytes: any length is acceptable, replaced whole
            mine = (dtype, shape) if dtype == "uint8" else ("uint8", (len(value),))
        if mine != (dtype, shape):
            result.mismatched.append(
                f"{leaf.key}: checkpoint has {dtype}{list(shape)}, target has {mine[0]}{list(mine[1])}"
            )
            continue
        targets.append(_target_for(leaf, idx, rank, e, dtype, shape, meshes))
    result.unexpected = [k for k in by_key if k not in seen]
    return targets, json_sets, result


def _fresh(e: Entry, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    check_allocation(math.prod(shape) * itemsize_of(dtype), f"key {e.key!r}")
    return torch.empty(shape, dtype=torch_dtype(dtype))


def check_allocation(nbytes: int, what: str) -> None:
    """Refuse to allocate more than ``knobs.max_load_bytes()`` for what a checkpoint declares."""
    limit = knobs.max_load_bytes()
    if nbytes > limit:
        raise LimitExceededError(
            f"{what}: the checkpoint declares {nbytes} bytes to load, over the limit of {limit} "
            "(SHARDSAVE_MAX_LOAD_BYTES; default: this machine's memory); load fewer keys, or raise the "
            "limit if the checkpoint is genuine"
        )


def _as_kind(kind: str, t: torch.Tensor) -> Any:
    """A loaded tensor as the kind it was saved as."""
    if kind == "tensor":
        return t
    if kind == "bytes":
        return t.numpy().tobytes()
    name = dtype_name(t.dtype)
    if name == "bool":
        return t.view(torch.uint8).numpy().view(np.bool_)
    return t.numpy().view(numpy_dtype(name))


def _target_for(leaf: Leaf, idx: int, rank: int, e: Entry, dtype: str, shape: tuple[int, ...],
                meshes: dict[int, Any]) -> _Target:
    from torch.distributed.tensor import DTensor

    value = leaf.value
    if isinstance(value, DTensor):
        from shardsave.dist.values import placements_of
        from shardsave.format.index import Mesh

        coord = value.device_mesh.get_coordinate()
        local = value.to_local()
        if coord is None:
            return _Target(leaf, idx, rank, local, [], dtype)
        mesh = meshes.get(id(value.device_mesh))
        if mesh is None:
            m = value.device_mesh.mesh
            mesh = meshes[id(value.device_mesh)] = Mesh(tuple(m.shape), tuple(m.reshape(-1).tolist()))
        layout = ShardedLayout(shape, mesh, placements_of(value, leaf.path))
        regions = [Region(box, off) for _, box, off in layout.local_pieces(tuple(coord)) if 0 not in box[1]]
        return _Target(leaf, idx, rank, local, regions, dtype)
    if isinstance(value, torch.Tensor) and _writable_in_place(value):
        return _Target(leaf, idx, rank, value.detach(), _whole(shape), dtype)
    if isinstance(value, np.ndarray) and value.flags.writeable and value.dtype != np.bool_:
        return _Target(leaf, idx, rank, torch.from_numpy(value) if value.size else torch.empty(shape,
                       dtype=torch_dtype(dtype)), _whole(shape), dtype)
    out = _fresh(e, dtype, shape)
    return _Target(leaf, idx, rank, out, _whole(shape), dtype,
                   assign=lambda: _set(leaf, _as_kind(e.kind if e.kind != "tensor" else kind_of(value), out)
                                       if not isinstance(value, np.ndarray) else _copy_np(value, out, leaf)))


def _writable_in_place(t: torch.Tensor) -> bool:
    """An expanded tensor (elements sharing memory) or a lazy conj/neg view cannot take
    loaded bytes in place; such targets are replaced in their container instead."""
    overlapping = any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))
    return not (overlapping or t.is_conj() or t.is_neg())


def _copy_np(arr: np.ndarray, t: torch.Tensor, leaf: Leaf) -> Any:
    loaded = _as_kind("numpy", t)
    if arr.flags.writeable:
        np.copyto(arr, loaded)
        return arr
    return loaded


def _mismatch_error(result: LoadResult, path: str) -> StateDictMismatchError:
    lines = [f"state dict does not match the checkpoint at {path}:"]
    for title, items in (("missing from the checkpoint", result.missing),
                         ("in the checkpoint but not in the target", result.unexpected),
                         ("different shape/dtype", result.mismatched)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    lines.append("  pass strict=False to load what matches and get the rest reported")
    return StateDictMismatchError("\n".join(lines), missing=result.missing, unexpected=result.unexpected,
                                  mismatched=result.mismatched)


def _json_value(e: Entry, rank: int) -> Any:
    if e.is_per_rank:
        rv = e.per_rank[rank]
        assert rv is not None
        jt, v = rv.json_type, rv.value
    else:
        jt, v = e.json_type, e.value
    return {} if jt == "dict" else [] if jt == "list" else v


def load(
    state_dict: dict[str, Any],
    path: str,
    *,
    process_group: Any = None,
    strict: bool = True,
    storage_options: dict[str, Any] | None = None,
    keys: list[str] | None = None,
    rename: Rename = None,
    encryption_key: bytes | None = None,
) -> LoadResult:
    """Load a checkpoint into ``state_dict`` in place, resharding onto the targets' layout.

    Tensors (plain or DTensor) are filled in place; numpy arrays in place when writable;
    bytes and JSON values are replaced in their containers. Collective over
    ``process_group`` when torch.distributed is initialised.

    ``keys`` loads only the target keys equal to or under these prefixes (``["model"]``:
    weights now, ``["optim"]`` later) and reads only their bytes; the rest of the target
    and of the checkpoint is neither missing nor unexpected. ``rename`` maps checkpoint
    keys to target keys before matching: a callable (None drops a key), a dict of key
    prefixes (``{"model.module": "model"}``) or ``ss.strip_wrappers`` for DDP's
    ``module.`` and torch.compile's ``_orig_mod.`` (see :mod:`shardsave.plan.rename`).

    ``encryption_key``: the 32-byte key an encrypted checkpoint was saved with (a missing
    or wrong key raises KeyRequiredError / WrongKeyError before any target is touched).
    """
    comm = Comm(process_group)
    storage = Storage.from_url(path, storage_options)
    # 1. (coordinator -> all ranks) one read of the index.
    blob: tuple[bytes | None, str | None] | None = None
    if comm.is_coordinator:
        try:
            blob = (storage.read_bytes(INDEX_NAME, max_bytes=knobs.max_index_bytes()), None)
        except MissingFileError:
            blob = (None, "missing")
        except Exception as exc:
            blob = (None, describe_error(exc))
    data, problem = comm.broadcast(blob, "broadcast index")
    if data is None:
        if problem == "missing":
            read_index(storage)  # raises CheckpointNotFoundError with the right hint
        raise CheckpointError(f"cannot read the index of {storage.url}", {0: problem or "unknown"})
    ckpt = index_from_json(data, path=storage.url)

    error: BaseException | None = None
    result = LoadResult()
    try:
        cipher = open_index(data, ckpt, encryption_key)
        result = _load_local(state_dict, ckpt, storage, comm.rank, strict, keys=keys, rename=rename,
                             cipher=cipher)
    except Exception as exc:
        error = exc
    # 4. (all ranks) a failure anywhere fails the load everywhere.
    outcomes = comm.all_gather(describe_error(error) if error else None, "exchange load outcomes")
    if error is not None:
        raise error
    failures = {r: o for r, o in enumerate(outcomes) if o}
    if failures:
        raise CheckpointError(f"load from {storage.url} failed on other ranks:", failures)
    return result


def _load_local(
    state_dict: Any,
    ckpt: CheckpointInfo,
    storage: Storage,
    rank: int,
    strict: bool,
    *,
    keys: list[str] | None = None,
    rename: Rename = None,
    cipher: SaveCipher | None = None,
) -> LoadResult:
    _check_keys(keys)
    leaves = [leaf for leaf in flatten(state_dict) if matches(leaf.key, keys)]
    by_key = {k: i for k, i in rename_keys(ckpt.keys, rename).items() if matches(k, keys)}
    targets, json_sets, result = _match(leaves, ckpt, rank, by_key)
    if keys is not None:
        result.missing += [f"{k} (the keys filter selects nothing)" for k in keys
                           if not any(matches(x, [k]) for x in by_key) and not any(matches(x.key, [k]) for x in leaves)]
    if strict and (result.missing or result.unexpected or result.mismatched):
        raise _mismatch_error(result, storage.url)
    requests = [(t.entry_index, t.rank, t.regions) for t in targets]
    with _data_files_must_stay(storage, ckpt):
        reads, tocs, _ = prepare_reads(storage, ckpt, requests, cipher=cipher)
    with torch.no_grad():
        _reads_of_index(storage, ckpt, reads, [t.local for t in targets], [t.dtype for t in targets],
                        tocs=tocs, cipher=cipher)
    for t in targets:
        if t.assign is not None:
            t.assign()
    for leaf, e in json_sets:
        _set(leaf, _json_value(e, rank))
    return result


def _check_keys(keys: Any) -> None:
    if keys is not None and (isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys)):
        raise TypeError(f"keys must be a list of non-empty key prefixes such as ['model'], got {keys!r}")


def _reads_of_index(
    storage: Storage, ckpt: CheckpointInfo, reads: Any, targets: list[torch.Tensor], dtypes: list[str],
    **kwargs: Any,
) -> None:
    """``execute_reads`` under :func:`_data_files_must_stay`."""
    with _data_files_must_stay(storage, ckpt):
        execute_reads(storage, ckpt, reads, targets, dtypes, **kwargs)


@contextlib.contextmanager
def _data_files_must_stay(storage: Storage, ckpt: CheckpointInfo) -> Iterator[None]:
    """Turn a data file that vanished after the index was read into an error that says
    what happened and what to do.

    The index is read once and names data files by save id; an overwrite writes new files
    and deletes the old ones only after its new index is in place, and ``gc`` deletes files
    no index names. So a file missing here was deleted while this load ran: loading on
    would mix checkpoints, and retrying reads the new index.
    """
    try:
        yield
    except MissingFileError as exc:
        raise MissingFileError(
            f"{exc}\n  the checkpoint at {storage.url} changed while loading: a data file of save "
            f"{ckpt.save_id} vanished (overwritten or garbage-collected after the index was read); "
            "nothing from another save was used -- retry the load to read the current checkpoint"
        ) from exc


def load_full(
    path: str,
    keys: list[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    rename: Rename = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    encryption_key: bytes | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into one process as plain full values (no process group needed).

    Tensors come back as full CPU tensors, numpy arrays as arrays, bytes as bytes, JSON
    values as saved (tuples as lists). A ``ss.PerRank`` value comes back as a list indexed
    by saved rank. ``keys`` selects entries by key or key prefix (``["model"]``) and
    reads only their bytes. ``rename`` maps checkpoint keys to the keys (and nesting) of
    the result, as for ``ss.load``; ``keys`` then selects among the renamed keys.
    ``dtype`` casts floating-point tensors (integer and bool tensors, such as step
    counters, keep theirs); ``device`` moves tensors there (e.g. ``"cuda"``).
    ``encryption_key``: the 32-byte key of an encrypted checkpoint.

    Nothing is allocated for what the index declares until the data files' tables of
    contents back it, and never more than ``knobs.max_load_bytes()`` in all.
    """
    _check_keys(keys)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    storage = Storage.from_url(path, storage_options)
    ckpt, cipher = open_checkpoint(storage, encryption_key)
    names = {i: k for k, i in rename_keys(ckpt.keys, rename).items()}
    if keys is not None:
        unknown = [k for k in keys if not any(matches(n, [k]) for n in names.values())]
        if unknown:
            raise StateDictMismatchError(
                f"{storage.url} holds no key matching {unknown}; its keys start with "
                f"{sorted({n.split('.')[0] for n in names.values()})[:20]}",
                missing=unknown,
            )
    outputs: list[tuple[tuple[PathComponent, ...], Entry, int | None, Any]] = []
    requests: list[tuple[int, int, list[Region]]] = []
    shapes: list[tuple[int, ...]] = []
    dtypes: list[str] = []
    for idx, e in enumerate(ckpt.entries):
        name = names.get(idx)
        if name is None or not matches(name, keys):
            continue
        if name != e.key:
            new_path = renamed_path(e.path, name)
            root = None if e.per_rank_root is None else renamed_root(e.path, new_path, e.per_rank_root)
            e = replace(e, key=name, path=new_path, per_rank_root=root)
        ranks = range(ckpt.world_size) if e.is_per_rank else [0]
        for r in ranks:
            p = _full_path(e, r)
            if e.kind == "json":
                if not e.is_per_rank or e.per_rank[r] is not None:
                    outputs.append((p, e, None, _json_value(e, r)))
                continue
            stored, shape = _entry_dtype(e, r)
            if stored is None or shape is None:
                continue
            requests.append((idx, r, _whole(shape)))
            outputs.append((p, e, len(shapes), None))
            shapes.append(shape)
            dtypes.append(stored)
    # Allocate only what the tables of contents back, and within the limit.
    with _data_files_must_stay(storage, ckpt):
        reads, tocs, covered = prepare_reads(storage, ckpt, requests, cipher=cipher)
    check_allocation(covered, storage.url)
    targets = [torch.empty(shape, dtype=torch_dtype(d)) for shape, d in zip(shapes, dtypes)]
    _reads_of_index(storage, ckpt, reads, targets, dtypes, tocs=tocs, cipher=cipher)
    return unflatten(
        (p, _as_kind(e.kind, _convert(targets[t], e.kind, dtype, device)) if t is not None and e.kind in DATA_KINDS
         else v)
        for p, e, t, v in outputs
    )


def _convert(t: torch.Tensor, kind: str, dtype: torch.dtype | None, device: str | torch.device | None) -> torch.Tensor:
    """``load_full``'s dtype/device, for tensor entries only (numpy and bytes stay on the host)."""
    if kind != "tensor":
        return t
    if dtype is not None and t.dtype.is_floating_point and t.dtype != dtype:
        t = t.to(dtype)
    if device is not None:
        t = t.to(device)
    return t


def _full_path(e: Entry, rank: int) -> tuple[PathComponent, ...]:
    if not e.is_per_rank:
        return e.path
    root = e.per_rank_root or 0
    return (*e.path[:root], rank, *e.path[root:])
