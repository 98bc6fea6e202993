"""The checkpoint index (``index.json``): dataclasses and their JSON form.

The index is O(keys + files): per key it records kind, dtype, global shape and a layout
descriptor from which every stored piece, its chunks and the data file holding each follow
by arithmetic (``shardsave.plan.layout`` / ``shardsave.plan.chunking``). Where a chunk sits
inside its file is in that file's table of contents (``toc.py``). docs/FORMAT.md specifies
the JSON byte for byte.

Parsing never executes anything: plain ``json.loads`` then strict type checks; every
malformed field raises :class:`FormatError` naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from shardsave.errors import FormatError

FORMAT_NAME = "shardsave"
FORMAT_VERSION = (1, 0)
"""(major, minor). A reader accepts any minor of its major; a newer major is refused."""

PathComponent = Union[str, int, tuple[Literal["int"], int]]  # noqa: UP007 - a runtime alias on 3.10
"""str: dict key; int: list index; ("int", n): an integer dict key (optimizer state)."""

EntryKind = Literal["tensor", "numpy", "bytes", "json"]
DATA_KINDS = ("tensor", "numpy", "bytes")
JSON_TYPES = ("none", "bool", "int", "float", "str", "dict", "list")


@dataclass(frozen=True)
class Placement:
    """How one mesh dimension places a tensor."""

    kind: Literal["shard", "strided_shard", "replicate"]
    """``shard``: torch.chunk along ``dim``; ``strided_shard``: FSDP2+TP's right-to-left
    split (``split_factor`` parts first); ``replicate``: every coordinate holds the same data."""
    dim: int = 0
    """Tensor dimension cut (non-negative); 0 for replicate."""
    split_factor: int = 1
    """Only for strided_shard: parts the dimension is cut into before this mesh dim's split."""


@dataclass(frozen=True)
class Mesh:
    """A device mesh shared by the sharded entries that use it."""

    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    """Global ranks of the mesh in row-major order (len == prod(shape))."""


@dataclass(frozen=True)
class Layout:
    """How an entry's bytes are cut into pieces and which rank's file holds each piece.

    ``replicated``: one piece (the whole value) in the file of rank ``writer``.
    ``sharded``: a DTensor layout: pieces follow from ``mesh`` and ``placements``; each
    piece is written by one of its replicas, chosen by ``plan.layout.writer_rank``.
    ``per_rank``: rank r's own value is piece 0 in rank r's file.
    """

    type: Literal["replicated", "sharded", "per_rank"]
    writer: int = -1
    mesh: int = -1
    placements: tuple[Placement, ...] = ()


@dataclass(frozen=True)
class RankValue:
    """One saved rank's value of a per-rank entry."""

    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    json_type: str | None = None
    value: Any = None


@dataclass(frozen=True)
class Entry:
    """One leaf of the saved state dict."""

    key: str
    """Display key: path components joined by '.'; unique within a checkpoint."""
    path: tuple[PathComponent, ...]
    kind: EntryKind
    dtype: str | None = None
    """torch dtype name without 'torch.' (data kinds)."""
    shape: tuple[int, ...] | None = None
    """Global shape (data kinds, not per-rank)."""
    layout: Layout | None = None
    json_type: str | None = None
    value: Any = None
    """The value itself for a json entry (not per-rank)."""
    per_rank_root: int | None = None
    """For values under ss.PerRank: how many path components lead to the wrapper."""
    per_rank: tuple[RankValue | None, ...] = ()
    """For per-rank entries: each saved rank's dtype/shape or JSON value (None: absent)."""

    @property
    def is_per_rank(self) -> bool:
        return self.per_rank_root is not None


@dataclass(frozen=True)
class FileInfo:
    """One data file: its size and where its table of contents sits."""

    name: str
    rank: int
    size: int
    toc_offset: int
    toc_length: int
    toc_checksum: int
    chunks: int


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint's index, parsed (what ``ss.info(path)`` returns)."""

    save_id: str
    world_size: int
    created_at: str
    chunk_bytes: int
    codecs: tuple[str, ...]
    meshes: tuple[Mesh, ...]
    files: tuple[FileInfo, ...]
    entries: tuple[Entry, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    environment: Mapping[str, Any] = field(default_factory=dict)
    format_version: tuple[int, int] = FORMAT_VERSION
    path: str = ""
    """Where it was read from (not stored in the index)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {e.key: i for i, e in enumerate(self.entries)})
        object.__setattr__(self, "_file_by_rank", {f.rank: i for i, f in enumerate(self.files)})

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    def entry_index(self, key: str) -> int:
        idx: dict[str, int] = self._by_key  # type: ignore[attr-defined]
        return idx[key]

    def entry(self, key: str) -> Entry:
        return self.entries[self.entry_index(key)]

    def file_of_rank(self, rank: int) -> FileInfo:
        idx: dict[int, int] = self._file_by_rank  # type: ignore[attr-defined]
        if rank not in idx:
            raise FormatError(f"index lists no data file for rank {rank} (world size {self.world_size})")
        return self.files[idx[rank]]

    @property
    def stored_bytes(self) -> int:
        """Bytes of all data files on storage (the index itself excluded)."""
        return sum(f.size for f in self.files)

    @property
    def raw_bytes(self) -> int:
        """Logical bytes of every stored value (each replicated value once)."""
        from shardsave.format.dtypes import itemsize_of

        total = 0
        for e in self.entries:
            if e.is_per_rank:
                for rv in e.per_rank:
                    if rv is not None and rv.shape is not None and rv.dtype is not None:
                        total += math.prod(rv.shape) * itemsize_of(rv.dtype)
            elif e.shape is not None and e.dtype is not None:
                total += math.prod(e.shape) * itemsize_of(e.dtype)
        return total

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)


# --------------------------------------------------------------------------- to JSON


def _path_to_json(path: Sequence[PathComponent]) -> list[Any]:
    return [{"int": c[1]} if isinstance(c, tuple) else c for c in path]


def _layout_to_json(layout: Layout) -> dict[str, Any]:
    if layout.type == "replicated":
        return {"type": "replicated", "writer": layout.writer}
    if layout.type == "per_rank":
        return {"type": "per_rank"}
    placements: list[dict[str, Any]] = []
    for p in layout.placements:
        if p.kind == "replicate":
            placements.append({"type": "replicate"})
        elif p.kind == "shard":
            placements.append({"type": "shard", "dim": p.dim})
        else:
            placements.append({"type": "strided_shard", "dim": p.dim, "split_factor": p.split_factor})
    return {"type": "sharded", "mesh": layout.mesh, "placements": placements}


def _json_value_to_json(json_type: str | None, value: Any) -> Any:
    if json_type == "float" and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _entry_to_json(e: Entry) -> dict[str, Any]:
    out: dict[str, Any] = {"key": e.key, "path": _path_to_json(e.path), "kind": e.kind}
    if e.is_per_rank:
        ranks: list[Any] = []
        for rv in e.per_rank:
            if rv is None:
                ranks.append(None)
            elif e.kind == "json":
                ranks.append({"type": rv.json_type, "value": _json_value_to_json(rv.json_type, rv.value)})
            else:
                assert rv.shape is not None
                ranks.append({"dtype": rv.dtype, "shape": list(rv.shape)})
        out["per_rank"] = {"root": e.per_rank_root, "ranks": ranks}
    elif e.kind == "json":
        out["type"] = e.json_type
        out["value"] = _json_value_to_json(e.json_type, e.value)
    else:
        assert e.shape is not None and e.layout is not None
        out["dtype"] = e.dtype
        out["shape"] = list(e.shape)
        out["layout"] = _layout_to_json(e.layout)
    return out


def index_to_json(info: CheckpointInfo) -> bytes:
    """Serialise an index. Keys in a fixed order, UTF-8, no NaN literals (strict JSON)."""
    doc = {
        "format": FORMAT_NAME,
        "format_version": f"{info.format_version[0]}.{info.format_version[1]}",
        "save_id": info.save_id,
        "world_size": info.world_size,
        "created_at": info.created_at,
        "chunk_bytes": info.chunk_bytes,
        "codecs": list(info.codecs),
        "metadata": dict(info.metadata),
        "environment": dict(info.environment),
        "meshes": [{"shape": list(m.shape), "ranks": list(m.ranks)} for m in info.meshes],
        "files": [
            {
                "name": f.name,
                "rank": f.rank,
                "size": f.size,
                "toc_offset": f.toc_offset,
                "toc_length": f.toc_length,
                "toc_checksum": f.toc_checksum,
                "chunks": f.chunks,
            }
            for f in info.files
        ],
        "entries": [_entry_to_json(e) for e in info.entries],
    }
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------- from JSON


def _fail(what: str, got: Any, want: str) -> FormatError:
    text = repr(got)
    if len(text) > 80:
        text = text[:77] + "..."
    return FormatError(f"index.json: {what} is {text}, expected {want}")


def _int(obj: Mapping[str, Any], name: str, where: str, *, minimum: int = 0) -> int:
    v = obj.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise _fail(f"{where}.{name}", v, f"an integer >= {minimum}")
    return v


def _str(obj: Mapping[str, Any], name: str, where: str) -> str:
    v = obj.get(name)
    if not isinstance(v, str):
        raise _fail(f"{where}.{name}", v, "a string")
    return v


def _obj(v: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(v, dict):
        raise _fail(where, v, "an object")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise _fail(where, v, "a list")
    return v


def _shape(v: Any, where: str) -> tuple[int, ...]:
    dims = _list(v, where)
    if len(dims) > 64 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in dims):
        raise _fail(where, v, "a list of at most 64 non-negative integers")
    return tuple(dims)


def _ranks(v: Any, where: str) -> tuple[int, ...]:
    items = _list(v, where)
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in items):
        raise _fail(where, v, "a list of non-negative ranks")
    return tuple(items)


def _path_from_json(v: Any, where: str) -> tuple[PathComponent, ...]:
    out: list[PathComponent] = []
    for c in _list(v, where):
        if isinstance(c, str) or (isinstance(c, int) and not isinstance(c, bool) and c >= 0):
            out.append(c)
        elif isinstance(c, dict) and set(c) == {"int"} and isinstance(c["int"], int) and not isinstance(c["int"], bool):
            out.append(("int", c["int"]))
        else:
            raise _fail(where, c, "a path component (string, list index, or {\"int\": n})")
    if not out:
        raise _fail(where, v, "a non-empty path")
    return tuple(out)


def _json_value_from_json(json_type: Any, value: Any, where: str) -> tuple[str, Any]:
    if json_type not in JSON_TYPES:
        raise _fail(f"{where}.type", json_type, f"one of {list(JSON_TYPES)}")
    ok = {
        "none": value is None,
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": (isinstance(value, (int, float)) and not isinstance(value, bool))
        or value in ("nan", "inf", "-inf"),
        "str": isinstance(value, str),
        "dict": value == {},
        "list": value == [],
    }[json_type]
    if not ok:
        raise _fail(f"{where}.value", value, f"a value of type {json_type}")
    if json_type == "float":
        value = float(value)
    return json_type, value


def _layout_from_json(v: Any, where: str, n_meshes: int) -> Layout:
    obj = _obj(v, where)
    kind = obj.get("type")
    if kind == "replicated":
        return Layout("replicated", writer=_int(obj, "writer", where))
    if kind == "per_rank":
        return Layout("per_rank")
    if kind != "sharded":
        raise _fail(f"{where}.type", kind, "'replicated', 'sharded' or 'per_rank'")
    mesh = _int(obj, "mesh", where)
    if mesh >= n_meshes:
        raise _fail(f"{where}.mesh", mesh, f"a mesh index below {n_meshes}")
    placements: list[Placement] = []
    for i, p in enumerate(_list(obj.get("placements"), f"{where}.placements")):
        pw = f"{where}.placements[{i}]"
        p = _obj(p, pw)
        pk = p.get("type")
        if pk == "replicate":
            placements.append(Placement("replicate"))
        elif pk == "shard":
            placements.append(Placement("shard", dim=_int(p, "dim", pw)))
        elif pk == "strided_shard":
            placements.append(
                Placement("strided_shard", dim=_int(p, "dim", pw), split_factor=_int(p, "split_factor", pw, minimum=1))
            )
        else:
            raise _fail(f"{pw}.type", pk, "'shard', 'strided_shard' or 'replicate'")
    return Layout("sharded", mesh=mesh, placements=tuple(placements))


def _entry_from_json(v: Any, i: int, n_meshes: int, world_size: int) -> Entry:
    where = f"entries[{i}]"
    obj = _obj(v, where)
    key = _str(obj, "key", where)
    path = _path_from_json(obj.get("path"), f"{where}.path")
    kind = obj.get("kind")
    if kind not in ("tensor", "numpy", "bytes", "json"):
        raise _fail(f"{where}.kind", kind, "'tensor', 'numpy', 'bytes' or 'json'")
    if "per_rank" in obj:
        pr = _obj(obj["per_rank"], f"{where}.per_rank")
        root = _int(pr, "root", f"{where}.per_rank")
        if root > len(path):
            raise _fail(f"{where}.per_rank.root", root, f"at most the path length {len(path)}")
        ranks = _list(pr.get("ranks"), f"{where}.per_rank.ranks")
        if len(ranks) != world_size:
            raise _fail(f"{where}.per_rank.ranks", f"{len(ranks)} items", f"{world_size} (the world size)")
        values: list[RankValue | None] = []
        for r, rv in enumerate(ranks):
            rw = f"{where}.per_rank.ranks[{r}]"
            if rv is None:
                values.append(None)
                continue
            rv = _obj(rv, rw)
            if kind == "json":
                jt, jv = _json_value_from_json(rv.get("type"), rv.get("value"), rw)
                values.append(RankValue(json_type=jt, value=jv))
            else:
                values.append(RankValue(dtype=_dtype(rv.get("dtype"), rw), shape=_shape(rv.get("shape"), f"{rw}.shape")))
        return Entry(key, path, kind, per_rank_root=root, per_rank=tuple(values), layout=Layout("per_rank"))
    if kind == "json":
        jt, jv = _json_value_from_json(obj.get("type"), obj.get("value"), where)
        return Entry(key, path, "json", json_type=jt, value=jv)
    dtype = _dtype(obj.get("dtype"), where)
    shape = _shape(obj.get("shape"), f"{where}.shape")
    layout = _layout_from_json(obj.get("layout"), f"{where}.layout", n_meshes)
    if layout.type == "per_rank":
        raise _fail(f"{where}.layout.type", "per_rank", "'replicated' or 'sharded' outside per_rank entries")
    if layout.type == "replicated" and layout.writer >= world_size:
        raise _fail(f"{where}.layout.writer", layout.writer, f"a rank below the world size {world_size}")
    for p in layout.placements:
        if p.kind != "replicate" and p.dim >= len(shape):
            raise _fail(f"{where}.layout.placements", p.dim, f"a dimension below the tensor's {len(shape)}")
    return Entry(key, path, kind, dtype=dtype, shape=shape, layout=layout)


def _dtype(v: Any, where: str) -> str:
    from shardsave.format.dtypes import is_known_dtype

    if not isinstance(v, str) or not is_known_dtype(v):
        raise _fail(f"{where}.dtype", v, "a torch dtype name such as 'float32'")
    return v


def index_from_json(data: bytes, *, path: str = "") -> CheckpointInfo:
    """Parse and validate an index. Raises FormatError for anything malformed."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{path or 'index.json'}: not valid JSON ({exc})") from exc
    doc = _obj(doc, "the document")
    if doc.get("format") != FORMAT_NAME:
        raise _fail("format", doc.get("format"), repr(FORMAT_NAME))
    version = doc.get("format_version")
    try:
        major, minor = (int(x) for x in str(version).split("."))
    except ValueError:
        raise _fail("format_version", version, "'MAJOR.MINOR'") from None
    if major != FORMAT_VERSION[0]:
        raise FormatError(
            f"{path or 'index.json'}: format version {version} is not readable by this shardsave "
            f"(reads {FORMAT_VERSION[0]}.x); upgrade shardsave to load it"
        )
    world_size = _int(doc, "world_size", "index", minimum=1)
    meshes: list[Mesh] = []
    for i, m in enumerate(_list(doc.get("meshes", []), "meshes")):
        m = _obj(m, f"meshes[{i}]")
        shape = _shape(m.get("shape"), f"meshes[{i}].shape")
        ranks = _ranks(m.get("ranks"), f"meshes[{i}].ranks")
        if math.prod(shape) != len(ranks) or any(r >= world_size for r in ranks):
            raise _fail(f"meshes[{i}].ranks", f"{len(ranks)} ranks", f"{math.prod(shape)} ranks below {world_size}")
        meshes.append(Mesh(shape, ranks))
    files: list[FileInfo] = []
    seen_ranks: set[int] = set()
    for i, f in enumerate(_list(doc.get("files"), "files")):
        w = f"files[{i}]"
        f = _obj(f, w)
        fi = FileInfo(
            name=_str(f, "name", w),
            rank=_int(f, "rank", w),
            size=_int(f, "size", w),
            toc_offset=_int(f, "toc_offset", w),
            toc_length=_int(f, "toc_length", w),
            toc_checksum=_int(f, "toc_checksum", w),
            chunks=_int(f, "chunks", w),
        )
        if fi.rank >= world_size or fi.rank in seen_ranks:
            raise _fail(f"{w}.rank", fi.rank, f"a distinct rank below {world_size}")
        if fi.toc_offset + fi.toc_length > fi.size:
            raise _fail(f"{w}.toc_offset", fi.toc_offset, f"a table of contents inside the file's {fi.size} bytes")
        seen_ranks.add(fi.rank)
        files.append(fi)
    codecs = _list(doc.get("codecs"), "codecs")
    if not all(isinstance(c, str) for c in codecs):
        raise _fail("codecs", codecs, "a list of codec descriptors")
    entries = tuple(
        _entry_from_json(e, i, len(meshes), world_size) for i, e in enumerate(_list(doc.get("entries"), "entries"))
    )
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise FormatError(f"{path or 'index.json'}: duplicate entry keys")
    return CheckpointInfo(
        save_id=_str(doc, "save_id", "index"),
        world_size=world_size,
        created_at=_str(doc, "created_at", "index"),
        chunk_bytes=_int(doc, "chunk_bytes", "index", minimum=1),
        codecs=tuple(codecs),
        meshes=tuple(meshes),
        files=tuple(files),
        entries=entries,
        metadata=_obj(doc.get("metadata", {}), "metadata"),
        environment=_obj(doc.get("environment", {}), "environment"),
        format_version=(major, minor),
        path=path,
    )
