"""Reading pickle-based checkpoints (``torch.save`` files and DCP checkpoints) for import.

**This module is the one documented exception to "nothing is ever unpickled".** A
shardsave checkpoint never holds a pickle; but the formats people import *from* do:
a ``torch.save`` file is a pickle (in a zip archive), and a DCP checkpoint's ``.metadata``
is a plain ``pickle.dump`` of its ``Metadata`` dataclass, its non-tensor values are
``torch.save`` blobs. Unpickling runs whatever callables the pickle names, so a malicious
file runs code the moment it is read with ``pickle.load``.

Every pickle is therefore read *only* through torch's ``weights_only`` unpickler, which
constructs nothing but tensors, primitive containers and the classes on an explicit
allow-list, and refuses every other global before calling it:

* ``torch.save`` files and DCP's non-tensor values: ``torch.load(..., weights_only=True)``.
* DCP's ``.metadata``: torch's unpickler only understands pickle protocol 2 (what
  ``torch.save`` writes), while DCP writes protocol 4 or 5. :func:`_to_protocol_2` rewrites
  the opcode stream without executing any of it (``pickletools.genops`` only parses):
  framing is dropped, ``STACK_GLOBAL`` becomes ``GLOBAL`` and memo operations get explicit
  indices. The result goes through ``torch.load(weights_only=True)`` inside
  ``torch.serialization.safe_globals(_DCP_ALLOWED)``: DCP's metadata dataclasses, its
  memory-format enum, and path objects mapped to harmless ``str`` builders. Any opcode or
  global outside that set is refused.

DCP data files are read by DCP's own ``FileSystemReader`` (which already loads tensors
with ``weights_only=True``) with its ``read_metadata`` replaced, and a load planner whose
``load_bytes`` uses ``weights_only=True`` (DCP's default planner uses ``False``). No
process group is needed: the whole checkpoint is assembled in this one process, so
importing needs host memory for all of it.

Nothing else in shardsave may import this module except the ``import`` command.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shardsave.errors import ShardsaveError, UnsafePickleError, UnsupportedValueError
from shardsave.plan.flatten import unflatten

__all__ = ["UnsafePickleError", "read_dcp", "read_dcp_metadata", "read_torch_file"]

DCP_METADATA_NAME = ".metadata"


def _reason(exc: BaseException) -> str:
    """The one useful sentence of torch's weights_only error (it wraps it in advice on
    how to load the file anyway, which is not advice to repeat here)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    else:
        text = " ".join(line for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith(
            ("Weights only load failed", "Check the documentation", "(1)", "(2)")))
    text = " ".join(text.split()).split(" Please use `torch.serialization", 1)[0]
    return text[:300] or type(exc).__name__


def _refusal(src: str, exc: BaseException) -> UnsafePickleError:
    return UnsafePickleError(
        f"refusing to import {src}: it holds pickled objects outside torch's weights_only allow-list "
        f"({_reason(exc)}); shardsave never runs code from a checkpoint. If you trust the file, load it "
        "yourself with torch.load(..., weights_only=False) and save the result with ss.save"
    )


# --------------------------------------------------------------------------- torch.save


def read_torch_file(src: str) -> Any:
    """The object in a ``torch.save`` file, read with ``torch.load(weights_only=True)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices; the refusal below says what matters
            return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(src, exc) from None
    except RuntimeError as exc:
        if "weights_only" in str(exc) or "Unpickl" in str(exc):
            raise _refusal(src, exc) from None
        raise UnsupportedValueError(f"{src} is not a readable torch.save file: {' '.join(str(exc).split())}") from exc


# --------------------------------------------------------------------------- DCP .metadata


def _path_str(*parts: Any) -> str:
    """Stand-in for pathlib classes in DCP metadata (``storage_meta.checkpoint_id``): a
    path object is rebuilt as the plain string, so no pathlib constructor is run."""
    return "/".join(str(p) for p in parts).replace("//", "/")


def _dcp_allowed() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        metadata.Metadata,
        metadata.TensorStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.ChunkStorageMetadata,
        metadata.TensorProperties,
        metadata.MetadataIndex,
        metadata.StorageMeta,
        metadata._MEM_FORMAT_ENCODING,
        filesystem._StorageInfo,
    ]
    for cls in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path", "PurePath"):
        allowed.append((_path_str, f"pathlib.{cls}"))
        allowed.append((_path_str, f"pathlib._local.{cls}"))  # Python >= 3.13 moved them
    return allowed


_STR_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})
_BYTES_OPS = frozenset({"SHORT_BINBYTES", "BINBYTES", "BINBYTES8"})
# Opcodes torch's weights_only unpickler executes itself; copied through unchanged.
_PASS_OPS = frozenset({
    "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK",
    "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE",
    "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT",
    "SHORT_BINSTRING", "LONG1", "STOP",
})


def _unicode(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _to_protocol_2(data: bytes, src: str) -> bytes:
    """Rewrite a protocol 3-5 pickle as the protocol-2 opcodes torch's unpickler reads.

    Pure byte surgery on the parsed opcode stream: nothing is executed or imported.
    """
    ops = list(pickletools.genops(data))
    # (kind, bytes, value): kind "str" for a string push (value: the string), "put" for
    # a memo store (value: its index), "op" for anything else.
    out: list[tuple[str, bytes, Any]] = []
    memo_strings: dict[int, str] = {}
    next_memo = 0

    def pop_string() -> str:
        puts: list[int] = []
        while out:
            kind, _, value = out.pop()
            if kind == "put":
                puts.append(value)
                continue
            if kind == "str":
                for i in puts:
                    memo_strings[i] = value
                return str(value)
            break
        raise UnsafePickleError(f"refusing to import {src}: a STACK_GLOBAL whose module and name are not literal strings")

    for i, (op, arg_, pos) in enumerate(ops):
        arg: Any = arg_
        name = op.name
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        assert pos is not None and end is not None
        if name == "PROTO":
            out.append(("op", pickle.PROTO + b"\x02", None))
        elif name == "FRAME":
            continue
        elif name in _STR_OPS:
            out.append(("str", _unicode(arg), arg))
        elif name in _BYTES_OPS:
            # Protocol 2 spells bytes as _codecs.encode(latin-1 text, "latin1"), which the
            # weights_only unpickler allows.
            text = bytes(arg).decode("latin-1")
            out.append(("op", b"c_codecs\nencode\n" + _unicode(text) + _unicode("latin1") + pickle.TUPLE2
                        + pickle.REDUCE, None))
        elif name == "MEMOIZE" or name in ("BINPUT", "LONG_BINPUT", "PUT"):
            idx = next_memo if name == "MEMOIZE" else int(arg)
            next_memo = max(next_memo, idx + 1)
            if out and out[-1][0] == "str":
                memo_strings[idx] = out[-1][2]
            out.append(("put", pickle.LONG_BINPUT + struct.pack("<I", idx), idx))
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            idx = int(arg)
            if idx in memo_strings:  # strings are immutable: a fresh copy is the same value
                out.append(("str", _unicode(memo_strings[idx]), memo_strings[idx]))
            else:
                out.append(("op", pickle.LONG_BINGET + struct.pack("<I", idx), None))
        elif name == "STACK_GLOBAL":
            attr = pop_string()
            module = pop_string()
            if "\n" in attr or "\n" in module:
                raise UnsafePickleError(f"refusing to import {src}: a global name with a newline")
            out.append(("op", pickle.GLOBAL + f"{module}\n{attr}\n".encode(), None))
        elif name in _PASS_OPS:
            out.append(("op", data[pos:end], None))
        else:
            raise UnsafePickleError(
                f"refusing to import {src}: pickle opcode {name} (at byte {pos}) is not one torch's weights_only "
                "unpickler supports"
            )
    return b"".join(b for _, b, _ in out)


def _legacy_container(body: bytes) -> bytes:
    """Wrap one protocol-2 pickle in the legacy ``torch.save`` layout (magic number,
    protocol version, system info, the object, no storages) so that the public
    ``torch.load(weights_only=True)`` reads it."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return (pickle.dumps(MAGIC_NUMBER, protocol=2) + pickle.dumps(PROTOCOL_VERSION, protocol=2)
            + pickle.dumps(sys_info, protocol=2) + body + pickle.dumps([], protocol=2))


def read_dcp_metadata(src: str | os.PathLike[str]) -> Any:
    """A DCP checkpoint's ``Metadata``, read through torch's weights_only unpickler."""
    path = Path(src) / DCP_METADATA_NAME
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnsupportedValueError(f"{src} is not a DCP checkpoint: cannot read {path} ({exc.strerror})") from exc
    try:
        blob = _legacy_container(_to_protocol_2(data, str(path)))
    except (ValueError, struct.error) as exc:
        if isinstance(exc, UnsafePickleError):
            raise
        raise UnsupportedValueError(f"{path} is not a valid pickle ({exc})") from exc
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with torch.serialization.safe_globals(_dcp_allowed()):
            md = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise _refusal(str(path), exc) from None
    if not isinstance(md, Metadata):
        raise UnsupportedValueError(f"{path} holds a {type(md).__name__}, not DCP Metadata")
    return md


# --------------------------------------------------------------------------- DCP data


def read_dcp(src: str) -> dict[str, Any]:
    """Every value of the DCP checkpoint in directory ``src``, as full tensors and plain
    values in the nesting DCP recorded (no process group; all in this process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        StorageMeta,
        TensorStorageMetadata,
    )

    metadata = read_dcp_metadata(src)

    class _SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class _SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                self.state_dict[fqn] = torch.load(value, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError) as exc:
                raise _refusal(f"{src} (value {fqn!r})", exc) from None

    # A flat target, one slot per DCP key: tensors to fill, None for pickled values.
    flat: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            flat[fqn] = torch.empty(md.size, dtype=md.properties.dtype)
        elif isinstance(md, BytesStorageMetadata):
            flat[fqn] = None
        else:
            raise UnsupportedValueError(f"{src}: key {fqn!r} has DCP metadata of type {type(md).__name__}")
    try:
        with warnings.catch_warnings():
            # "assuming the intent is to load in a single process": exactly the intent.
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(flat, storage_reader=_SafeReader(src),
                     planner=_SafePlanner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=True)
    except CheckpointException as exc:  # a BaseException: DCP's wrapper of every rank's failure
        causes = [pair[0] if isinstance(pair, tuple) else pair for pair in exc.failures.values()]
        for cause in causes:
            if isinstance(cause, ShardsaveError):
                raise cause from None
        first = causes[0] if causes else exc
        raise UnsupportedValueError(f"cannot read the DCP checkpoint {src}: {type(first).__name__}: "
                                    f"{' '.join(str(first).split())}") from None
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    items = []
    for fqn, value in flat.items():
        path = planner_data.get(fqn)
        if not (isinstance(path, tuple) and path and all(isinstance(c, (str, int)) for c in path)):
            path = (fqn,)
        items.append((tuple(path), value))
    return unflatten(items)
