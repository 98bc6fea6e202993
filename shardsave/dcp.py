"""A drop-in ``StorageWriter`` / ``StorageReader`` pair for ``torch.distributed.checkpoint``.

A DCP-based trainer switches to shardsave's format in one line::

    dcp.save(state_dict, storage_writer=ss.DCPWriter("s3://bucket/run/step-100"))
    dcp.load(state_dict, storage_reader=ss.DCPReader("s3://bucket/run/step-100"))

DCP keeps its planners (flattening, deduplication of replicated items, resharding plans);
shardsave provides the storage: compressed, checksummed chunks in one data file per rank,
and an ``index.json`` committed last in one atomic write. The result is an ordinary
shardsave checkpoint: ``ss.load_full`` reads it into one process, ``ss.verify`` checks it,
``ss.load`` reshards it into DTensors.

Why DCP's ``Metadata`` is not stored: DCP pickles it into ``.metadata``, and unpickling an
untrusted file runs code. The reader rebuilds ``Metadata`` from the JSON index instead:
tensors from the entries (dtype, shape; each offered as one chunk, since shardsave cuts
any requested box out of whatever pieces it stored), non-tensor values from JSON. Those
values -- what DCP writes as BYTE_IO, e.g. optimizer ``param_groups`` and a step counter --
are stored as JSON entries, not as DCP's ``torch.save`` pickles; ``index.metadata["dcp"]``
records which entries make up each of them and which containers were tuples. On load the
reader rebuilds each value from JSON and hands DCP's planner a ``torch.save`` of it; that
pickle is made here from plain JSON values, so nothing in the checkpoint can make the
planner's ``torch.load`` run code.

Save, which rank runs what (DCP drives the calls):

1. (all ranks) ``set_up_storage_writer``, ``prepare_local_plan``: nothing to do.
2. (coordinator) ``prepare_global_plan``: refuses to replace a committed checkpoint unless
   ``overwrite``; picks the save id; numbers the tensor entries and lists every stored
   chunk of each (explicit ``boxes`` layouts: DCP's chunks need follow no mesh
   arithmetic) with the rank writing it; tells each rank which (entry, piece) its items are.
3. (all ranks) ``write_data``: non-tensor values are checked to be JSON first (a refusal
   names the key before this rank writes a byte); tensors stream through the usual write
   path (chunking, codec, checksums, fsync) into ``data/<save-id>-r<rank>.bin``.
4. (coordinator) ``finish``: builds the index from the plan and every rank's file record
   and commits it atomically; then deletes a replaced checkpoint's files. If any rank
   failed, DCP never calls ``finish``: nothing is committed (``gc`` removes the leftovers).

Load: every rank reads the index itself (DCP calls ``read_metadata`` on each rank), so the
coordinator's ``prepare_global_plan`` checks that all ranks read the same save -- a load
racing an overwrite fails clearly instead of mixing two checkpoints across ranks.

Not supported: DCP's plan caching (a cached plan would carry a stale save id) and
``no_collectives`` mode (a commit needs a coordinator).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from shardsave import knobs
from shardsave.claim import NO_INDEX, ConcurrentSaveError, commit_claim, index_base
from shardsave.codec import CODEC_DESCRIPTORS, validate_codec_name
from shardsave.errors import (
    CheckpointError,
    CheckpointExistsError,
    FormatError,
    ShardsaveError,
    UnsupportedModeError,
    UnsupportedValueError,
)
from shardsave.format.dtypes import dtype_name, torch_dtype
from shardsave.format.index import (
    FORMAT_VERSION,
    CheckpointInfo,
    Entry,
    FileInfo,
    Layout,
    PathComponent,
    index_to_json,
)
from shardsave.format.names import INDEX_NAME, data_file_name, new_save_id
from shardsave.load import _reads_of_index, read_index
from shardsave.pipeline.write import PieceWrite, write_rank_file
from shardsave.plan.flatten import display_key, flatten, json_type_of, unflatten
from shardsave.plan.load_plan import Region, plan_reads
from shardsave.storage import Storage

__all__ = ["DCP_METADATA_KEY", "DCPReader", "DCPWriter"]

DCP_METADATA_KEY = "dcp"
"""Key of ``index.metadata`` under which DCPWriter records its non-tensor values."""
_RECORD_VERSION = 1

Box = tuple[tuple[int, ...], tuple[int, ...]]


# -- JSON paths --------------------------------------------------------------------------


def _path_to_json(path: Sequence[PathComponent]) -> list[Any]:
    return [{"int": c[1]} if isinstance(c, tuple) else c for c in path]


def _path_from_json(items: Any, where: str) -> tuple[PathComponent, ...]:
    out: list[PathComponent] = []
    for c in items if isinstance(items, list) else [None]:
        if isinstance(c, str) or (isinstance(c, int) and not isinstance(c, bool)):
            out.append(c)
        elif isinstance(c, dict) and isinstance(c.get("int"), int):
            out.append(("int", c["int"]))
        else:
            raise FormatError(f"index.json: metadata.{DCP_METADATA_KEY} {where} has a bad path {items!r}")
    return tuple(out)


def _dcp_path(fqn: str, mappings: Any) -> tuple[PathComponent, ...]:
    """The nested path DCP flattened ``fqn`` from (its planner's mappings), else ``(fqn,)``."""
    path = mappings.get(fqn) if isinstance(mappings, Mapping) else None
    if isinstance(path, (tuple, list)) and path and all(isinstance(c, (str, int)) for c in path):
        out = tuple(c if isinstance(c, str) else int(c) for c in path)
        if display_key(out) == fqn:
            return out
    return (fqn,)


# -- non-tensor values as JSON ------------------------------------------------------------


@dataclass(frozen=True)
class _JsonValue:
    """A BYTE_IO value as JSON leaves (sub-path, type, value) plus the sub-paths of tuples."""

    leaves: tuple[tuple[tuple[PathComponent, ...], str, Any], ...]
    tuples: tuple[tuple[PathComponent, ...], ...]


def _tuple_paths(obj: Any, path: tuple[PathComponent, ...]) -> Iterator[tuple[PathComponent, ...]]:
    if isinstance(obj, tuple):
        yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tuple_paths(v, (*path, ("int", k) if isinstance(k, int) and not isinstance(k, bool) else k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tuple_paths(v, (*path, i))


def _to_json(fqn: str, obj: Any) -> _JsonValue:
    """Refuses, naming ``fqn``, anything but JSON values (dicts with str/int keys, lists,
    tuples, None, bool, int, float, str)."""
    try:
        leaves = flatten({"v": obj})
    except UnsupportedValueError as exc:
        raise UnsupportedValueError(f"DCPWriter: the value of {fqn!r} cannot be stored: {exc}") from None
    out: list[tuple[tuple[PathComponent, ...], str, Any]] = []
    for leaf in leaves:
        jt = json_type_of(leaf.value)
        if jt is None or leaf.per_rank_root is not None:
            raise UnsupportedValueError(
                f"DCPWriter: {fqn!r} holds a {type(leaf.value).__name__} at {list(leaf.path[1:])}; values "
                "DCP writes as bytes are stored as JSON here (None, bool, int, float, str, and lists, tuples "
                "and dicts of them) -- store arrays as tensors, or encode the value as JSON"
            )
        out.append((leaf.path[1:], jt, leaf.value))
    return _JsonValue(tuple(out), tuple(_tuple_paths(obj, ())))


def _from_json(entries: Sequence[Entry], base: int, tuples: Sequence[tuple[PathComponent, ...]]) -> Any:
    """Rebuild a BYTE_IO value from its JSON entries (paths relative to ``base`` components)."""
    items = []
    for e in entries:
        value: Any = {} if e.json_type == "dict" else [] if e.json_type == "list" else e.value
        items.append((("v", *e.path[base:]), value))
    root = unflatten(items)["v"]
    for sub in sorted(tuples, key=len, reverse=True):  # innermost first
        if not sub:
            root = tuple(root)
            continue
        parent = root
        for c in sub[:-1]:
            parent = parent[c[1] if isinstance(c, tuple) else c]
        last = sub[-1]
        slot = last[1] if isinstance(last, tuple) else last
        parent[slot] = tuple(parent[slot])
    return root


# -- the writer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Assignment:
    """What the coordinator tells one rank in ``prepare_global_plan``."""

    save_id: str
    rank: int
    pieces: dict[tuple[str, tuple[int, ...]], tuple[int, int]]
    """(fqn, chunk offsets) -> (entry index, piece id) of each tensor item of this rank."""
    chunk_bytes: int
    """The coordinator's chunking parameter: every rank cuts pieces the way the index says."""


@dataclass(frozen=True)
class _ItemResult:
    """``WriteResult.storage_data``: a rank's file record (on one item) or a JSON value."""

    file: FileInfo | None = None
    json: _JsonValue | None = None


@dataclass
class _TensorEntry:
    fqn: str
    dtype: str
    shape: tuple[int, ...]
    pieces: list[tuple[tuple[int, ...], tuple[int, ...], int]] = field(default_factory=list)


class DCPWriter(StorageWriter):
    """``torch.distributed.checkpoint`` StorageWriter that writes a shardsave checkpoint.

    ``path``: any fsspec URL (``checkpoint_id`` given to ``dcp.save`` replaces it).
    ``codec``, ``storage_options``, ``overwrite`` and ``metadata`` mean what they mean for
    ``ss.save``; ``metadata`` may not use the key ``"dcp"``. See the module docstring for
    the protocol.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        codec: str = "auto",
        storage_options: dict[str, Any] | None = None,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.path = None if path is None else str(path)
        self.codec = validate_codec_name(codec)
        self.storage_options = dict(storage_options or {})
        self.overwrite = overwrite
        if metadata is not None and DCP_METADATA_KEY in metadata:
            raise ValueError(f"metadata key {DCP_METADATA_KEY!r} is reserved by DCPWriter; rename it")
        from shardsave.save import _check_metadata

        self.metadata = _check_metadata(metadata)
        self.is_coordinator = False
        self.rank = 0
        self._save_id: str | None = None
        self._chunk_bytes = knobs.chunk_bytes()
        self._tensors: list[_TensorEntry] = []
        self._old_files: tuple[str, ...] = ()
        self._base = NO_INDEX

    # -- identity ---------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = str(checkpoint_id)
        self._save_id = None
        self._tensors = []
        self._old_files = ()
        self._base = NO_INDEX

    @property
    def checkpoint_id(self) -> str | None:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike)) and bool(str(checkpoint_id))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self._save_id)

    def _storage(self) -> Storage:
        if not self.path:
            raise ValueError("DCPWriter has no path: pass DCPWriter(path) or dcp.save(..., checkpoint_id=path)")
        return Storage.from_url(self.path, self.storage_options)

    # -- planning -----------------------------------------------------------------------

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise UnsupportedModeError("DCPWriter needs DCP's collectives (a coordinator commits the index); "
                                       "call dcp.save without no_dist / use_collectives=False")
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """(coordinator) Overwrite check, save id, and every tensor chunk's entry and piece."""
        storage = self._storage()
        self._base = index_base(storage)  # what the commit must still find (shardsave.claim)
        if self._base != NO_INDEX:
            if not self.overwrite:
                raise CheckpointExistsError(
                    f"{storage.full_path(INDEX_NAME)} already holds a committed checkpoint; pass "
                    "DCPWriter(..., overwrite=True) to replace it (nothing was written)"
                )
            with contextlib.suppress(ShardsaveError):  # an unreadable old index: its files go to gc
                self._old_files = tuple(f.name for f in read_index(storage).files)
        storage.makedirs("data")
        self._save_id = new_save_id()
        self._chunk_bytes = knobs.chunk_bytes()
        by_fqn: dict[str, _TensorEntry] = {}
        order: dict[str, int] = {}
        assigned: list[dict[tuple[str, tuple[int, ...]], tuple[int, int]]] = []
        for rank, plan in enumerate(plans):
            mine: dict[tuple[str, tuple[int, ...]], tuple[int, int]] = {}
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    continue
                td = item.tensor_data
                if td is None:
                    raise UnsupportedValueError(f"DCPWriter: tensor item {item.index.fqn!r} has no tensor_data")
                fqn = item.index.fqn
                entry = by_fqn.get(fqn)
                if entry is None:
                    entry = by_fqn[fqn] = _TensorEntry(fqn, dtype_name(td.properties.dtype), tuple(td.size))
                    order[fqn] = len(order)
                offsets, sizes = tuple(td.chunk.offsets), tuple(td.chunk.sizes)
                mine[(fqn, offsets)] = (order[fqn], len(entry.pieces))
                entry.pieces.append((offsets, sizes, rank))
            assigned.append(mine)
        self._tensors = list(by_fqn.values())
        return [replace(plan, storage_data=_Assignment(self._save_id, rank, assigned[rank], self._chunk_bytes))
                for rank, plan in enumerate(plans)]

    # -- writing --------------------------------------------------------------------------

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """(all ranks) JSON values first (refusals before any byte), then this rank's file."""
        assignment = plan.storage_data
        if not isinstance(assignment, _Assignment):
            raise CheckpointError(
                "DCPWriter: the plan carries no shardsave assignment (DCP plan caching is not supported)"
            )
        results: list[WriteResult] = []
        pieces: list[tuple[WriteItem, PieceWrite]] = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                value = _to_json(item.index.fqn, _lookup(planner, item))
                results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=_ItemResult(json=value)))
                continue
            assert item.tensor_data is not None
            key = (item.index.fqn, tuple(item.tensor_data.chunk.offsets))
            entry, piece = assignment.pieces[key]
            data = planner.resolve_data(item)
            if not isinstance(data, torch.Tensor):
                raise UnsupportedValueError(f"DCPWriter: the planner resolved {item.index.fqn!r} to a "
                                            f"{type(data).__name__}, not a tensor")
            pieces.append((item, PieceWrite(entry, piece, data.detach())))
        if pieces:
            pieces.sort(key=lambda p: (p[1].entry, p[1].piece))
            name = data_file_name(assignment.save_id, assignment.rank)
            codec_ids = {d: i for i, d in enumerate(CODEC_DESCRIPTORS)}
            info, _ = write_rank_file(self._storage(), name, assignment.rank, [p for _, p in pieces],
                                      codec=self.codec, codec_ids=codec_ids, chunk_bytes=assignment.chunk_bytes)
            for i, (item, p) in enumerate(pieces):
                results.append(WriteResult(index=item.index, size_in_bytes=p.data.numel() * p.data.element_size(),
                                           storage_data=_ItemResult(file=info if i == 0 else None)))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """(coordinator) Build the index and commit it; then drop a replaced checkpoint's files."""
        if self._save_id is None:
            raise CheckpointError("DCPWriter.finish without prepare_global_plan on this instance")
        files = sorted((r.storage_data.file for rs in results for r in rs
                        if isinstance(r.storage_data, _ItemResult) and r.storage_data.file is not None),
                       key=lambda f: f.rank)
        mappings = metadata.planner_data
        entries: list[Entry] = []
        for t in self._tensors:
            whole = len(t.pieces) == 1 and not any(t.pieces[0][0]) and t.pieces[0][1] == t.shape
            layout = Layout("replicated", writer=t.pieces[0][2]) if whole else Layout("boxes", pieces=tuple(t.pieces))
            entries.append(Entry(t.fqn, _dcp_path(t.fqn, mappings), "tensor", dtype=t.dtype, shape=t.shape,
                                 layout=layout))
        record: list[dict[str, Any]] = []
        for rs in results:
            for r in rs:
                value = r.storage_data.json if isinstance(r.storage_data, _ItemResult) else None
                if value is None:
                    continue
                fqn = r.index.fqn
                base = _dcp_path(fqn, mappings)
                first = len(entries)
                for sub, jt, v in value.leaves:
                    path = (*base, *sub)
                    entries.append(Entry(display_key(path), path, "json", json_type=jt, value=v))
                record.append({"fqn": fqn, "path": _path_to_json(base), "first": first,
                               "count": len(value.leaves), "tuples": [_path_to_json(t) for t in value.tuples]})
        keys = [e.key for e in entries]
        if len(set(keys)) != len(keys):
            dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
            raise UnsupportedValueError(f"DCPWriter: keys {dupes} occur twice once values are stored as JSON "
                                        "(nothing was committed)")
        info = CheckpointInfo(
            save_id=self._save_id,
            world_size=len(results),
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            chunk_bytes=self._chunk_bytes,
            codecs=tuple(CODEC_DESCRIPTORS),
            meshes=(),
            files=tuple(files),
            entries=tuple(entries),
            metadata={**self.metadata, DCP_METADATA_KEY: {"version": _RECORD_VERSION, "bytes": record}},
            environment=_environment(len(results)),
            format_version=FORMAT_VERSION,
        )
        storage = self._storage()
        try:
            # Conditional on the index still being the one planned against (shardsave.claim).
            with commit_claim(storage, self._base, self._save_id):
                # The commit point: before this line nothing is visible, after it everything is.
                storage.write_atomic(INDEX_NAME, index_to_json(info))
        except ConcurrentSaveError:
            with contextlib.suppress(Exception):  # this save's files are garbage now
                storage.remove([f.name for f in files])
            raise
        stale = [n for n in self._old_files if n not in {f.name for f in files}]
        if stale:
            with contextlib.suppress(Exception):  # leftovers are harmless; gc removes them
                storage.remove(stale)


def _lookup(planner: SavePlanner, item: WriteItem) -> Any:
    """The object behind a BYTE_IO item, without DCP's pickling where the planner allows."""
    lookup = getattr(planner, "lookup_object", None)
    if callable(lookup):
        return lookup(item.index)
    # Any other planner: undo its torch.save of our own process's object (no foreign data).
    data = planner.resolve_data(item)
    buf = data if isinstance(data, io.BytesIO) else io.BytesIO(bytes(data))
    buf.seek(0)
    try:
        return torch.load(buf, weights_only=True)
    except Exception as exc:
        raise UnsupportedValueError(f"DCPWriter: cannot recover the value of {item.index.fqn!r} from the "
                                    f"planner ({type(exc).__name__}); store JSON values") from exc


def _environment(world_size: int) -> dict[str, Any]:
    from shardsave.dist.comm import hostname
    from shardsave.save import _environment as env

    out = env([hostname()], world_size)
    out["writer"] = "shardsave.DCPWriter"
    return out


# -- the reader ---------------------------------------------------------------------------


class DCPReader(StorageReader):
    """``torch.distributed.checkpoint`` StorageReader of a shardsave checkpoint.

    Rebuilds DCP's ``Metadata`` from the JSON index (never unpickles the checkpoint) and
    serves every read through shardsave's resharding read path: only the chunks
    overlapping each requested box are fetched, verified and decoded.

    Checkpoints written by ``ss.save`` load too: tensor keys are DCP's fully qualified
    names; their JSON values are offered one leaf per key.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.path = None if path is None else str(path)
        self.storage_options = dict(storage_options or {})
        self.load_id = uuid.uuid4().hex
        self._info: CheckpointInfo | None = None
        self._storage: Storage | None = None
        self._bytes: dict[str, tuple[list[Entry], int, list[tuple[PathComponent, ...]]]] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = str(checkpoint_id)
        self._info = None
        self._bytes = {}
        self.load_id = uuid.uuid4().hex

    @property
    def checkpoint_id(self) -> str | None:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike)) and bool(str(checkpoint_id))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """(each rank) Read the index once and rebuild DCP's Metadata from it."""
        if kwargs.get("rank") is not None:
            raise UnsupportedModeError("DCPReader reads one global index, not per-rank metadata; "
                                       "call dcp.load without a per-rank metadata request")
        if not self.path:
            raise ValueError("DCPReader has no path: pass DCPReader(path) or dcp.load(..., checkpoint_id=path)")
        self._storage = Storage.from_url(self.path, self.storage_options)
        info = self._info = read_index(self._storage)
        md: dict[str, Any] = {}
        mappings: dict[str, tuple[str | int, ...]] = {}
        in_record: set[int] = set()
        self._bytes = {}
        record = info.metadata.get(DCP_METADATA_KEY) if isinstance(info.metadata, Mapping) else None
        for i, r in enumerate(record.get("bytes", []) if isinstance(record, Mapping) else []):
            fqn, first, count = r.get("fqn"), r.get("first"), r.get("count")
            if not (isinstance(fqn, str) and isinstance(first, int) and isinstance(count, int)
                    and first >= 0 and first + count <= len(info.entries)):
                raise FormatError(f"{self._storage.url}: index.json metadata.{DCP_METADATA_KEY}.bytes[{i}] is malformed")
            base = _path_from_json(r.get("path"), f"bytes[{i}].path")
            tuples = [_path_from_json(t, f"bytes[{i}].tuples") for t in r.get("tuples", [])]
            entries = list(info.entries[first : first + count])
            if any(e.kind != "json" or e.path[: len(base)] != base for e in entries):
                raise FormatError(f"{self._storage.url}: index.json metadata.{DCP_METADATA_KEY}.bytes[{i}] "
                                  f"names entries that are not the JSON leaves of {fqn!r}")
            self._bytes[fqn] = (entries, len(base), tuples)
            in_record.update(range(first, first + count))
            md[fqn] = BytesStorageMetadata()
            mappings[fqn] = _dcp_obj_path(base)
        for i, e in enumerate(info.entries):
            if i in in_record:
                continue
            if e.kind == "json" or e.is_per_rank:
                if e.kind == "json" and not e.is_per_rank:
                    self._bytes[e.key] = ([e], len(e.path), [])
                    md[e.key] = BytesStorageMetadata()
                    mappings[e.key] = _dcp_obj_path(e.path)
                continue
            assert e.dtype is not None and e.shape is not None
            md[e.key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=torch_dtype(e.dtype)),
                size=torch.Size(e.shape),
                # One chunk: any box DCP asks for is cut out of the stored pieces on read.
                chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(e.shape)), sizes=torch.Size(e.shape))],
            )
            mappings[e.key] = _dcp_obj_path(e.path)
        return Metadata(
            state_dict_metadata=md,
            planner_data=mappings,
            storage_data=None,
            storage_meta=StorageMeta(checkpoint_id=self.path, save_id=info.save_id, load_id=self.load_id),
        )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self._info is None:
            raise CheckpointError("DCPReader: read_metadata must run before set_up_storage_reader")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        assert self._info is not None
        return replace(plan, storage_data=self._info.save_id)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """(coordinator) Every rank must have read the same save: no mix across ranks."""
        seen = {p.storage_data for p in plans}
        if len(seen) > 1:
            raise CheckpointError(
                f"the checkpoint at {self.path} changed while loading: ranks read the indices of different "
                f"saves {sorted(str(s) for s in seen)}; nothing was loaded from it -- retry the load"
            )
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """(all ranks) JSON values from the index; tensors through the resharding read path."""
        info, storage = self._info, self._storage
        assert info is not None and storage is not None
        tensor_items: list[ReadItem] = []
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                fqn = item.storage_index.fqn
                if fqn not in self._bytes:
                    raise CheckpointError(f"DCPReader: {storage.url} holds no value {fqn!r}")
                entries, base, tuples = self._bytes[fqn]
                buf = io.BytesIO()
                torch.save(_from_json(entries, base, tuples), buf)  # JSON values only: see module doc
                buf.seek(0)
                planner.load_bytes(item, buf)
            else:
                tensor_items.append(item)
        if tensor_items:
            self._read_tensors(info, storage, tensor_items, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_tensors(self, info: CheckpointInfo, storage: Storage, items: list[ReadItem],
                      planner: LoadPlanner) -> None:
        targets: list[torch.Tensor] = []
        staging: list[torch.Tensor] = []
        requests: list[tuple[int, int, list[Region]]] = []
        dtypes: list[str] = []
        for item in items:
            fqn = item.storage_index.fqn
            try:
                idx = info.entry_index(fqn)
            except KeyError:
                raise CheckpointError(f"DCPReader: {storage.url} holds no tensor {fqn!r}") from None
            e = info.entries[idx]
            assert e.dtype is not None
            chunk_offset = tuple(item.storage_index.offset or ())
            start = tuple(c + o for c, o in zip(chunk_offset or (0,) * len(item.storage_offsets),
                                                item.storage_offsets))
            lengths = tuple(item.lengths)
            target = planner.resolve_tensor(item).detach()
            if tuple(target.shape) != lengths:
                raise CheckpointError(f"DCPReader: {fqn!r} target of shape {list(target.shape)} for a read of "
                                      f"{list(lengths)}")
            # Decoded chunks are copied into the target; a device target gets a host copy first.
            stage = target if target.device.type == "cpu" else torch.empty(lengths, dtype=target.dtype)
            targets.append(target)
            staging.append(stage)
            requests.append((idx, 0, [Region((start, lengths), (0,) * len(lengths))]))
            dtypes.append(e.dtype)
        with torch.no_grad():
            _reads_of_index(storage, info, plan_reads(info, requests), staging, dtypes)
            for item, target, stage in zip(items, targets, staging):
                if stage is not target:
                    target.copy_(stage)
                planner.commit_tensor(item, target)


def _dcp_obj_path(path: Sequence[PathComponent]) -> tuple[str | int, ...]:
    """A shardsave path as DCP's OBJ_PATH (DCP keys dicts by str, lists by int)."""
    return tuple(str(c[1]) if isinstance(c, tuple) else c for c in path)

