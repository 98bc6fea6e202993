"""Export a shardsave checkpoint to one file, and import foreign checkpoints.

Why: a trained model is handed to people who do not run shardsave. Export writes one
file in a universal format -- safetensors, torch (``torch.save``), HDF5 or JSON -- holding
the consolidated full tensors (``ss.load_full``), whatever layout and world size saved
them. Import goes the other way, from a DCP checkpoint, a ``torch.save`` file, a
safetensors file, or an HDF5/JSON file exported here, into a shardsave checkpoint.

Exports carry a manifest (``_items``) so that export followed by import rebuilds the
original state dict exactly: nesting, integer dict keys, JSON values, numpy arrays and
bytes, index metadata. Values are bit-exact in every format (JSON included:
``jsonfmt``); a dtype a format cannot hold is refused, naming the key.

Memory: HDF5 and JSON are written a batch of tensors at a time; safetensors and torch
need the whole selection in memory (their writers take one dict), as does import. Use
``keys`` to export part of a checkpoint.

Pickles: importing ``torch.save`` files and DCP checkpoints goes through
:mod:`shardsave.convert.foreign`, the one place shardsave reads a pickle, and only with
torch's ``weights_only`` unpickler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shardsave.convert import files
from shardsave.convert._items import (
    Item,
    entry_raw_bytes,
    items_from_state,
    iter_items,
    select,
    state_from_items,
)
from shardsave.errors import CheckpointExistsError, ShardsaveError, UnsupportedValueError
from shardsave.format.index import CheckpointInfo
from shardsave.format.names import INDEX_NAME

__all__ = [
    "EXPORT_FORMATS",
    "IMPORT_FORMATS",
    "JSON_MAX_BYTES",
    "detect_format",
    "export_checkpoint",
    "format_from_suffix",
    "import_checkpoint",
    "read_foreign",
]

EXPORT_FORMATS = ("safetensors", "torch", "hdf5", "json")
IMPORT_FORMATS = ("dcp", "torch", "safetensors", "hdf5", "json")

JSON_MAX_BYTES = 64 * 1024 * 1024
"""Default cap on the tensor bytes of a JSON export: JSON text is 3-20x larger than the
binary data and parsers hold all of it in memory, so large tensors belong in the binary
formats."""

BATCH_BYTES = 256 * 1024 * 1024
"""Raw bytes loaded per step of a streaming export (bounds its memory)."""

_SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch", ".h5": "hdf5",
             ".hdf5": "hdf5", ".hdf": "hdf5", ".json": "json"}


def format_from_suffix(path: str) -> str | None:
    return _SUFFIXES.get(Path(path).suffix.lower())


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def _local_path(path: str, what: str) -> str:
    if "://" in path and not path.startswith("file://"):
        raise UnsupportedValueError(f"{what} {path} must be a local path (exports and imports read and write "
                                    "local files; checkpoints themselves may be on any fsspec URL)")
    return path.removeprefix("file://")


def export_checkpoint(
    path: str,
    out: str,
    to: str | None = None,
    *,
    keys: Sequence[str] | None = None,
    overwrite: bool = False,
    max_json_bytes: int = JSON_MAX_BYTES,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> tuple[CheckpointInfo, int]:
    """Write the checkpoint at ``path`` (or the entries ``keys`` select) to file ``out``.

    ``to`` is one of :data:`EXPORT_FORMATS` (default: from ``out``'s suffix). Returns the
    index and the number of leaves written. ``progress(total_bytes, ...)`` may return a
    callable that is told the raw bytes of each batch as it is loaded.
    """
    to = to or format_from_suffix(out)
    if to not in EXPORT_FORMATS:
        raise UnsupportedValueError(f"cannot tell the export format of {out!r}; pass one of {list(EXPORT_FORMATS)} "
                                    "(--to)" if to is None else f"unknown export format {to!r}; "
                                    f"choose one of {list(EXPORT_FORMATS)}")
    out = _local_path(out, "output")
    if Path(out).exists() and not overwrite:
        raise CheckpointExistsError(f"{out} exists; pass --overwrite to replace it")
    if Path(out).is_dir():
        raise UnsupportedValueError(f"{out} is a directory; give a file name")
    ckpt, entries = select(path, keys, storage_options)
    total = sum(entry_raw_bytes(e) for e in entries)
    if to == "json" and total > max_json_bytes:
        raise UnsupportedValueError(
            f"the selected tensors hold {_human(total)} ({total} bytes), over the JSON export limit of "
            f"{_human(max_json_bytes)} ({max_json_bytes} bytes): JSON text is several times larger and slow to "
            "parse. Select fewer keys with --keys, export to safetensors or hdf5, or raise the limit with "
            "--max-json-bytes"
        )
    on_bytes = progress(total, len(entries)) if progress is not None else None
    items = iter_items(path, entries, batch_bytes=BATCH_BYTES, storage_options=storage_options, on_bytes=on_bytes)
    counted: list[Item] = []

    def count(source: Any) -> Any:
        for it in source:
            counted.append(Item(it.key, it.path, it.kind, None))
            yield it

    if to == "safetensors":
        files.write_safetensors(out, count(items), ckpt)
    elif to == "torch":
        files.write_torch(out, count(items))
    elif to == "hdf5":
        files.write_hdf5(out, count(items), ckpt)
    else:
        files.write_json(out, count(items), ckpt)
    return ckpt, len(counted)


# --------------------------------------------------------------------------- import

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def detect_format(src: str) -> str:
    """The format of ``src`` from its content (then its suffix): one of :data:`IMPORT_FORMATS`."""
    from shardsave.convert.foreign import DCP_METADATA_NAME

    p = Path(src)
    if p.is_dir():
        if (p / DCP_METADATA_NAME).is_file():
            return "dcp"
        if (p / INDEX_NAME).is_file():
            raise UnsupportedValueError(f"{src} is already a shardsave checkpoint; nothing to import")
        raise UnsupportedValueError(f"{src} is a directory without a DCP {DCP_METADATA_NAME} file; "
                                    "not a checkpoint this command can import")
    if not p.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    with open(p, "rb") as f:
        head = f.read(16)
    size = p.stat().st_size
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"  # torch.save's zip archive, or its legacy pickle stream
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.lstrip()[:1] == b"{":
        return "json"
    guess = format_from_suffix(src)
    if guess is None:
        raise UnsupportedValueError(f"cannot tell the format of {src}; pass --format with one of "
                                    f"{list(IMPORT_FORMATS)}")
    return guess


def read_foreign(src: str, fmt: str | None = None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(state dict, metadata, format) of a foreign checkpoint; see :func:`import_checkpoint`."""
    src = _local_path(src, "source")
    fmt = fmt or detect_format(src)
    if fmt not in IMPORT_FORMATS:
        raise UnsupportedValueError(f"unknown import format {fmt!r}; choose one of {list(IMPORT_FORMATS)}")
    if fmt in ("dcp", "torch"):
        from shardsave.convert import foreign  # the one module that reads pickles

        if fmt == "dcp":
            return foreign.read_dcp(src), {}, fmt
        obj = foreign.read_torch_file(src)
        state = obj if isinstance(obj, dict) and obj else {"state": obj}
        return state_from_items(items_from_state(state)), {}, fmt
    reader = {"safetensors": files.read_safetensors, "hdf5": files.read_hdf5, "json": files.read_json}[fmt]
    try:
        items, metadata = reader(src)
    except ShardsaveError:
        raise
    except (OSError, ValueError) as exc:
        raise UnsupportedValueError(f"{src} is not a readable {fmt} file: {exc}") from exc
    return state_from_items(items), metadata, fmt


def import_checkpoint(
    src: str,
    path: str,
    *,
    fmt: str | None = None,
    codec: str = "auto",
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> tuple[CheckpointInfo, str]:
    """Save the foreign checkpoint ``src`` as a shardsave checkpoint at ``path``.

    ``fmt`` is one of :data:`IMPORT_FORMATS` (default: detected). A ``torch.save`` file
    holding something other than a dict is stored under the key ``state``. The index
    metadata records where it came from (``import``), plus the metadata of a shardsave
    export or a safetensors header. Returns the new index and the format read.
    """
    import shardsave as ss
    from shardsave.storage import Storage

    # Fail before reading a possibly huge source; ss.save checks again at commit time.
    if not overwrite and Storage.from_url(path, storage_options).exists(INDEX_NAME):
        raise CheckpointExistsError(f"{path} already holds a committed checkpoint; pass --overwrite to replace it")
    state, metadata, fmt = read_foreign(src, fmt)
    metadata = {**metadata, "import": {"format": fmt, "source": str(Path(src).resolve())}}
    info = ss.save(state, path, codec=codec, metadata=metadata, storage_options=storage_options,
                   overwrite=overwrite)
    return info, fmt
