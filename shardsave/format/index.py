"""The checkpoint index (``index.json``): dataclasses and their JSON form.

The index is O(keys + files): per key it records kind, dtype, global shape and a layout
descriptor from which every stored piece, its chunks and the data file holding each follow
by arithmetic (``shardsave.plan.layout`` / ``shardsave.plan.chunking``). Where a chunk sits
inside its file is in that file's table of contents (``toc.py``). docs/FORMAT.md specifies
the JSON byte for byte.

Parsing never executes anything: plain ``json.loads`` then strict type checks; every
malformed field raises :class:`FormatError` naming the field. An index is untrusted input:
file names must stay inside the checkpoint's ``data/`` directory, and declared sizes are
bounded so that what a reader derives from them (layout arrays, element counts) stays
small; what loading may *allocate* is bounded again by the loader (``knobs.max_load_bytes``).

Since format 1.1 the index ends with a digest of everything before it (section 3 of
docs/FORMAT.md): ``"index_sha256"`` for plain checkpoints, so that corruption of the index
is detected like corruption of a chunk, or ``"index_mac"`` (HMAC-SHA256, checked by
:mod:`shardsave.crypto`) for encrypted ones, so that tampering is detected too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from shardsave.errors import CorruptionError, FormatError

FORMAT_NAME = "shardsave"
FORMAT_VERSION = (1, 1)
"""(major, minor). A reader accepts any minor of its major; a newer major is refused.
1.1 added the index digest, ``encryption`` and ``files[].toc_mac``."""

DIGEST_FIELDS = ("index_sha256", "index_mac")
"""The last member of a 1.1+ index: a digest of every byte before it (see ``split_trailer``)."""
_TRAILER_RE = re.compile(rb',"(index_sha256|index_mac)":"([0-9a-f]{64})"}\Z')

MAX_WORLD_SIZE = 1 << 24
"""Ranks of a saving group an index may declare (16 M)."""
MAX_LAYOUT_CELLS = 1 << 24
"""Mesh size times split factors of one sharded entry: bounds the layout arrays a reader builds."""
_MAX_INT = (1 << 63) - 1
_MAX_ELEMENTS = 1 << 62
_FILE_NAME_RE = re.compile(r"^data(/[A-Za-z0-9_][A-Za-z0-9._-]{0,254})+$")

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
    ``boxes``: pieces listed one by one (``pieces``), for writers whose shards follow no
    mesh arithmetic (the DCP adapter, ``shardsave.dcp``); piece i is ``pieces[i]``.
    """

    type: Literal["replicated", "sharded", "per_rank", "boxes"]
    writer: int = -1
    mesh: int = -1
    placements: tuple[Placement, ...] = ()
    pieces: tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...] = ()
    """Only for boxes: (global offsets, sizes, writer rank) of each piece, disjoint, covering
    the tensor."""


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
    toc_mac: str | None = None
    """Encrypted checkpoints: HMAC-SHA256 (hex) of the table of contents (``shardsave.crypto``)."""


@dataclass(frozen=True)
class EncryptionInfo:
    """How an encrypted checkpoint's chunks, tables of contents and index are protected.

    Nothing here is secret: ``salt`` and the save id feed the key derivation, ``key_id``
    tells a wrong key from a tampered checkpoint (docs/FORMAT.md, section 10).
    """

    algorithm: str
    """Chunk cipher descriptor: ``"aes-256-gcm/1"``."""
    kdf: str
    """Key derivation descriptor: ``"hkdf-sha256/1"``."""
    salt: str
    """32 lowercase hex digits: 16 random bytes drawn for this save."""
    key_id: str
    """32 lowercase hex digits identifying the master key (a one-way function of it)."""


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
    encryption: EncryptionInfo | None = None
    """Set for encrypted checkpoints (format 1.1+): loading needs the key."""

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

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
    if layout.type == "boxes":
        return {"type": "boxes", "pieces": [[list(o), list(n), w] for o, n, w in layout.pieces]}
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


def _file_to_json(f: FileInfo) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": f.name,
        "rank": f.rank,
        "size": f.size,
        "toc_offset": f.toc_offset,
        "toc_length": f.toc_length,
        "toc_checksum": f.toc_checksum,
        "chunks": f.chunks,
    }
    if f.toc_mac is not None:
        out["toc_mac"] = f.toc_mac
    return out


def index_to_json(info: CheckpointInfo, *, mac: Callable[[bytes], str] | None = None) -> bytes:
    """Serialise an index. Keys in a fixed order, UTF-8, no NaN literals (strict JSON).

    The document ends with its digest (``split_trailer``): ``index_mac`` = ``mac(signed)``
    for an encrypted checkpoint (``mac`` is then required), else ``index_sha256``.
    """
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
        "files": [_file_to_json(f) for f in info.files],
        "entries": [_entry_to_json(e) for e in info.entries],
    }
    if info.encryption is not None:
        enc = info.encryption
        doc["encryption"] = {"algorithm": enc.algorithm, "kdf": enc.kdf, "salt": enc.salt, "key_id": enc.key_id}
    body = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    # Signed part: the document without its closing brace; the digest member closes it.
    signed = body[:-1]
    if info.encryption is not None:
        if mac is None:
            raise ValueError("an encrypted checkpoint's index needs a mac function")
        field_name, digest = "index_mac", mac(signed)
    else:
        field_name, digest = "index_sha256", hashlib.sha256(signed).hexdigest()
    return signed + f',"{field_name}":"{digest}"}}'.encode("ascii")


def split_trailer(data: bytes) -> tuple[bytes, str, str] | None:
    """``(signed bytes, digest field, hex digest)`` of an index ending with its digest, else None.

    The digest member is the document's last, written without whitespace:
    ``<signed>,"index_sha256":"<64 hex>"}`` -- so any reader can recompute it from the
    stored bytes without re-serialising JSON.
    """
    m = _TRAILER_RE.search(data, max(0, len(data) - 100))
    if m is None:
        return None
    return data[: m.start()], m.group(1).decode("ascii"), m.group(2).decode("ascii")


# --------------------------------------------------------------------------- from JSON


def _fail(what: str, got: Any, want: str) -> FormatError:
    text = repr(got)
    if len(text) > 80:
        text = text[:77] + "..."
    return FormatError(f"index.json: {what} is {text}, expected {want}")


def _int(obj: Mapping[str, Any], name: str, where: str, *, minimum: int = 0, maximum: int = _MAX_INT) -> int:
    v = obj.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum or v > maximum:
        raise _fail(f"{where}.{name}", v, f"an integer in [{minimum}, {maximum}]")
    return v


def _hex(obj: Mapping[str, Any], name: str, where: str, digits: int) -> str:
    v = obj.get(name)
    if not isinstance(v, str) or len(v) != digits or v.strip("0123456789abcdef"):
        raise _fail(f"{where}.{name}", v, f"{digits} lowercase hex digits")
    return v


def _file_name(obj: Mapping[str, Any], where: str) -> str:
    """A data file's name: relative, under ``data/``, of plain characters -- never '..', an
    absolute path, a URL, a backslash or anything else that could leave the checkpoint."""
    v = _str(obj, "name", where)
    if len(v) > 1024 or not _FILE_NAME_RE.match(v):
        raise _fail(f"{where}.name", v, "a relative name under data/ made of letters, digits, '.', '_' and '-' "
                                        "(no '..', absolute path, URL or backslash: it must stay inside the checkpoint)")
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
    if math.prod(dims) > _MAX_ELEMENTS:
        raise _fail(where, v, "a shape of at most 2**62 elements")
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


def _layout_from_json(v: Any, where: str, meshes: Sequence[Mesh]) -> Layout:
    obj = _obj(v, where)
    kind = obj.get("type")
    if kind == "replicated":
        return Layout("replicated", writer=_int(obj, "writer", where))
    if kind == "per_rank":
        return Layout("per_rank")
    if kind == "boxes":
        return _boxes_from_json(obj, where)
    if kind != "sharded":
        raise _fail(f"{where}.type", kind, "'replicated', 'sharded', 'boxes' or 'per_rank'")
    mesh = _int(obj, "mesh", where)
    if mesh >= len(meshes):
        raise _fail(f"{where}.mesh", mesh, f"a mesh index below {len(meshes)}")
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
            placements.append(Placement("strided_shard", dim=_int(p, "dim", pw),
                                        split_factor=_int(p, "split_factor", pw, minimum=1, maximum=MAX_LAYOUT_CELLS)))
        else:
            raise _fail(f"{pw}.type", pk, "'shard', 'strided_shard' or 'replicate'")
    if len(placements) != len(meshes[mesh].shape):
        raise _fail(f"{where}.placements", f"{len(placements)} placements",
                    f"one per dimension of mesh {mesh} ({len(meshes[mesh].shape)})")
    cells = math.prod(meshes[mesh].shape) * math.prod(p.split_factor for p in placements)
    if cells > MAX_LAYOUT_CELLS:
        raise _fail(f"{where}", f"mesh size x split factors = {cells}", f"at most {MAX_LAYOUT_CELLS}")
    return Layout("sharded", mesh=mesh, placements=tuple(placements))


def _boxes_from_json(obj: Mapping[str, Any], where: str) -> Layout:
    pieces: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []
    for i, p in enumerate(_list(obj.get("pieces"), f"{where}.pieces")):
        pw = f"{where}.pieces[{i}]"
        if not isinstance(p, list) or len(p) != 3:
            raise _fail(pw, p, "[offsets, sizes, writer]")
        writer = _int({"writer": p[2]}, "writer", pw, maximum=MAX_WORLD_SIZE)
        pieces.append((_shape(p[0], f"{pw}[0]"), _shape(p[1], f"{pw}[1]"), writer))
    if len(pieces) > MAX_LAYOUT_CELLS:
        raise _fail(f"{where}.pieces", f"{len(pieces)} pieces", f"at most {MAX_LAYOUT_CELLS}")
    return Layout("boxes", pieces=tuple(pieces))


def _check_boxes(layout: Layout, shape: tuple[int, ...], where: str, world_size: int) -> None:
    """Pieces inside the tensor whose volumes add up to it: with the writer's promise that
    they are disjoint, they cover it (pairwise disjointness is not checked: quadratic)."""
    total = 0
    for i, (off, size, writer) in enumerate(layout.pieces):
        pw = f"{where}.layout.pieces[{i}]"
        if len(off) != len(shape) or len(size) != len(shape) or any(o + n > d for o, n, d in zip(off, size, shape)):
            raise _fail(pw, [list(off), list(size)], f"a box inside the shape {list(shape)}")
        if writer >= world_size:
            raise _fail(pw, writer, f"a writer rank below the world size {world_size}")
        total += math.prod(size)
    if total != math.prod(shape):
        raise _fail(f"{where}.layout.pieces", f"{total} elements", f"pieces covering all {math.prod(shape)}")


def _entry_from_json(v: Any, i: int, meshes: Sequence[Mesh], world_size: int) -> Entry:
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
    layout = _layout_from_json(obj.get("layout"), f"{where}.layout", meshes)
    if layout.type == "per_rank":
        raise _fail(f"{where}.layout.type", "per_rank", "'replicated' or 'sharded' outside per_rank entries")
    if layout.type == "replicated" and layout.writer >= world_size:
        raise _fail(f"{where}.layout.writer", layout.writer, f"a rank below the world size {world_size}")
    if layout.type == "boxes":
        _check_boxes(layout, shape, where, world_size)
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
    where = path or "index.json"
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError) as exc:
        # ValueError covers JSONDecodeError and integers past Python's digit limit.
        raise FormatError(f"{where}: not valid JSON ({str(exc)[:200]})") from exc
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
    _check_digest(data, doc, (major, minor), where)
    world_size = _int(doc, "world_size", "index", minimum=1, maximum=MAX_WORLD_SIZE)
    meshes: list[Mesh] = []
    for i, m in enumerate(_list(doc.get("meshes", []), "meshes")):
        m = _obj(m, f"meshes[{i}]")
        shape = _shape(m.get("shape"), f"meshes[{i}].shape")
        ranks = _ranks(m.get("ranks"), f"meshes[{i}].ranks")
        if math.prod(shape) != len(ranks) or any(r >= world_size for r in ranks):
            raise _fail(f"meshes[{i}].ranks", f"{len(ranks)} ranks", f"{math.prod(shape)} ranks below {world_size}")
        meshes.append(Mesh(shape, ranks))
    encryption = _encryption_from_json(doc)
    files: list[FileInfo] = []
    seen_ranks: set[int] = set()
    seen_names: set[str] = set()
    for i, f in enumerate(_list(doc.get("files"), "files")):
        w = f"files[{i}]"
        f = _obj(f, w)
        fi = FileInfo(
            name=_file_name(f, w),
            rank=_int(f, "rank", w),
            size=_int(f, "size", w),
            toc_offset=_int(f, "toc_offset", w),
            toc_length=_int(f, "toc_length", w),
            toc_checksum=_int(f, "toc_checksum", w, maximum=0xFFFFFFFF),
            chunks=_int(f, "chunks", w),
            toc_mac=_hex(f, "toc_mac", w, 64) if encryption is not None else None,
        )
        if fi.rank >= world_size or fi.rank in seen_ranks:
            raise _fail(f"{w}.rank", fi.rank, f"a distinct rank below {world_size}")
        if fi.name in seen_names:
            raise _fail(f"{w}.name", fi.name, "a name no other file record uses")
        if fi.toc_offset + fi.toc_length > fi.size:
            raise _fail(f"{w}.toc_offset", fi.toc_offset, f"a table of contents inside the file's {fi.size} bytes")
        seen_ranks.add(fi.rank)
        seen_names.add(fi.name)
        files.append(fi)
    codecs = _list(doc.get("codecs"), "codecs")
    if not all(isinstance(c, str) for c in codecs):
        raise _fail("codecs", codecs, "a list of codec descriptors")
    entries = tuple(
        _entry_from_json(e, i, meshes, world_size) for i, e in enumerate(_list(doc.get("entries"), "entries"))
    )
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise FormatError(f"{path or 'index.json'}: duplicate entry keys")
    _check_tree(entries, path or "index.json")
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
        encryption=encryption,
    )


_RANKS = ("per-rank slot",)
"""Stands for the list level a per-rank entry's values sit in (one slot per saved rank)."""


def _check_tree(entries: Sequence[Entry], where: str) -> None:
    """The entries' paths must describe one tree of dicts and lists, as the saver flattened
    it: no path twice or below another entry, every node either a dict (string and
    ``{"int": n}`` keys) or a list (indices), the root a dict, and list indices below the
    number of entries (each list slot holds at least one entry). Rebuilding nested values
    from a forged index is then bounded and cannot fail on a type clash."""
    root: dict[Any, Any] = {}
    kinds: dict[int, str] = {id(root): "dict"}
    leaf = object()
    for i, e in enumerate(entries):
        comps: list[Any] = list(e.path)
        if e.per_rank_root is not None:
            comps.insert(e.per_rank_root, _RANKS)
        node = root
        for j, c in enumerate(comps):
            kind = "list" if isinstance(c, int) or c is _RANKS else "dict"
            if kinds.setdefault(id(node), kind) != kind or (isinstance(c, int) and c >= len(entries)):
                raise FormatError(f"{where}: entries[{i}].path {list(e.path)} does not fit the tree of the "
                                  "other entries' paths (mixes dict keys and list indices, or a list index past "
                                  "the number of entries)")
            child = node.get(c)
            if j == len(comps) - 1:
                if child is not None:
                    raise FormatError(f"{where}: entries[{i}].path {list(e.path)} repeats or contains another "
                                      "entry's path")
                node[c] = leaf
            else:
                if child is leaf:
                    raise FormatError(f"{where}: entries[{i}].path {list(e.path)} lies below another entry")
                if child is None:
                    child = node[c] = {}
                node = child


def _check_digest(data: bytes, doc: Mapping[str, Any], version: tuple[int, int], where: str) -> None:
    """Check the index's trailing digest: required from 1.1 on, and whenever one is present
    (a flipped version string must not switch the check off). A plain checkpoint's SHA-256
    is verified here; an encrypted one's MAC needs the key (``shardsave.crypto``)."""
    present = [f for f in DIGEST_FIELDS if f in doc]
    if not present and version < (1, 1):
        return
    split = split_trailer(data)
    if split is None or len(present) != 1 or present[0] != split[1] or doc[present[0]] != split[2]:
        raise FormatError(
            f"{where}: the index does not end with its digest (\"index_sha256\" or \"index_mac\"), as format "
            f"{version[0]}.{version[1]} requires: it was truncated, modified or corrupted"
        )
    signed, field_name, digest = split
    encrypted = "encryption" in doc
    if encrypted != (field_name == "index_mac"):
        raise FormatError(
            f"{where}: an {'encrypted' if encrypted else 'unencrypted'} checkpoint's index must end with "
            f"{'index_mac' if encrypted else 'index_sha256'}, not {field_name}: it was modified"
        )
    if field_name == "index_sha256" and hashlib.sha256(signed).hexdigest() != digest:
        raise CorruptionError(
            f"{where}: the index fails its SHA-256 digest (stored bytes are corrupt); restore the checkpoint "
            "from another copy or load an earlier one"
        )


def _encryption_from_json(doc: Mapping[str, Any]) -> EncryptionInfo | None:
    if "encryption" not in doc:
        return None
    enc = _obj(doc["encryption"], "encryption")
    info = EncryptionInfo(
        algorithm=_str(enc, "algorithm", "encryption"),
        kdf=_str(enc, "kdf", "encryption"),
        salt=_hex(enc, "salt", "encryption", 32),
        key_id=_hex(enc, "key_id", "encryption", 32),
    )
    return info
