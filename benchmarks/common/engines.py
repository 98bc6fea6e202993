"""The contenders, behind one small interface: shardsave, DCP and per-rank torch.save.

Every engine is called collectively on every rank with the same state dict (DTensor
``Shard`` weights; torch.save gets each rank's local tensors) and the same storage, and
every engine makes its files durable before it returns:

* shardsave: ``ss.save`` (fsync of data files, index, directories);
* DCP: ``dcp.save`` with ``FileSystemWriter`` (local) or ``FsspecWriter`` (any other URL),
  defaults otherwise (``sync_files=True``, one writer thread per rank);
* torch.save: one file per rank, then ``fsync`` of the file and of its directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import throttle  # noqa: F401  (registers throttled:// in every rank)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def local_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """What a per-rank torch.save stores: each DTensor's local shard, other values as they are."""
    from torch.distributed.tensor import DTensor

    return {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in state.items()}


@dataclass
class Engine:
    name: str
    save: Callable[..., None]
    """``save(state, url, group=None)``: collective over ``group``; durable on return."""
    load: Callable[..., None] | None = None
    """``load(state, url, group=None)``: in place, collective over ``group``."""
    async_save: Callable[..., Any] | None = None
    """Returns a waitable; ``wait_async`` finishes it."""
    family: str = field(default="")


# -- shardsave ---------------------------------------------------------------------------


def shardsave_engine(codec: str = "auto", storage_options: dict[str, Any] | None = None,
                     name: str | None = None) -> Engine:
    import shardsave as ss

    opts = storage_options or None

    def save(state: dict[str, Any], url: str, group: Any = None) -> None:
        ss.save(state, url, process_group=group, codec=codec, storage_options=opts)

    def load(state: dict[str, Any], url: str, group: Any = None) -> None:
        ss.load(state, url, process_group=group, storage_options=opts)

    def asave(state: dict[str, Any], url: str, group: Any = None) -> Any:
        return ss.async_save(state, url, process_group=group, codec=codec,  # type: ignore[attr-defined]
                             storage_options=opts)

    return Engine(name or ("shardsave" if codec == "auto" else f"shardsave[{codec}]"), save, load,
                  asave if hasattr(ss, "async_save") else None, family="shardsave")


# -- DCP ---------------------------------------------------------------------------------


def _dcp_writer(url: str, opts: dict[str, Any] | None) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter

    if is_local(url) and not opts:
        return FileSystemWriter(local_path(url))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url, **(opts or {}))


def _dcp_reader(url: str, opts: dict[str, Any] | None) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    if is_local(url) and not opts:
        return FileSystemReader(local_path(url))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url, **(opts or {}))


def dcp_engine(storage_options: dict[str, Any] | None = None) -> Engine:
    import torch.distributed.checkpoint as dcp

    def save(state: dict[str, Any], url: str, group: Any = None) -> None:
        dcp.save(state, storage_writer=_dcp_writer(url, storage_options), process_group=group)

    def load(state: dict[str, Any], url: str, group: Any = None) -> None:
        dcp.load(state, storage_reader=_dcp_reader(url, storage_options), process_group=group)

    def asave(state: dict[str, Any], url: str, group: Any = None) -> Any:
        return dcp.async_save(state, storage_writer=_dcp_writer(url, storage_options), process_group=group)

    return Engine("dcp", save, load, asave, family="dcp")


def wait_async(handle: Any) -> None:
    """Block until an async save (a shardsave handle or DCP's Future / response) is durable."""
    if hasattr(handle, "upload_completion"):  # DCP AsyncSaveResponse
        handle.upload_completion.result()
    elif hasattr(handle, "result"):
        handle.result()
    else:
        handle.wait()


# -- torch.save --------------------------------------------------------------------------


def torch_save_engine(storage_options: dict[str, Any] | None = None) -> Engine:
    def save(state: dict[str, Any], url: str, group: Any = None) -> None:
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        payload = local_tensors(state)
        if is_local(url) and not storage_options:
            d = local_path(url)
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, f"rank{rank}.pt")
            with open(path, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        import fsspec

        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/rank{rank}.pt", "wb") as f:  # closing makes it durable
            torch.save(payload, f)

    def load(state: dict[str, Any], url: str, group: Any = None) -> None:
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        loaded = torch.load(os.path.join(local_path(url), f"rank{rank}.pt"), weights_only=True)
        for k, v in local_tensors(state).items():
            if isinstance(v, torch.Tensor):
                v.copy_(loaded[k])

    return Engine("torch.save", save, load, family="torch.save")


def bytes_on_storage(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Total size of every file under ``url``."""
    if is_local(url) and not storage_options:
        total = 0
        for dirpath, _dirs, files in os.walk(local_path(url)):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return int(sum(fs.info(p)["size"] for p in fs.find(root)))


def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    import shutil

    if is_local(url) and not storage_options:
        shutil.rmtree(local_path(url), ignore_errors=True)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.exists(root):
        fs.rm(root, recursive=True)


def evict_page_cache(url: str) -> None:
    """Drop a local checkpoint's pages from the page cache, so a load reads the disk
    (``posix_fadvise(DONTNEED)`` on each file; no privileges needed; clean pages only, so
    run it after the save's fsync)."""
    if not is_local(url):
        return
    for dirpath, _dirs, files in os.walk(local_path(url)):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
