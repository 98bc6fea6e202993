"""Tiered save: commit to fast local disk first, upload to object storage in the background.

Training stalls only for the local save (page cache and NVMe take gigabytes per second;
an object store over the network often ten times less). The upload then runs in a
background thread on every rank, and the remote copy becomes a checkpoint -- is
*committed remotely* -- only when its ``index.json`` is written, last::

    handle = ss.tiered_save(state, "/nvme/run/step-100", "s3://bucket/run/step-100",
                            storage_options={...})
    ...                                   # training goes on; the local checkpoint is complete
    handle.wait()                         # on the coordinator: remote index committed

Who uploads what, and why: on several nodes the local tier is node-local, so each rank
uploads the data files it wrote itself (data never goes through the coordinator). The
coordinator then waits until every data file the index names is on the remote store at
its full size -- an object store makes an upload visible only once it is complete -- and
only then PUTs the index, in one request. A rank whose upload fails leaves a small marker
(``<data file>.failed``, holding the error) so the coordinator fails at once instead of
waiting out ``upload_timeout_s``. The background threads use no collectives, so they
cannot interleave with the training job's (or the next save's) collectives.

``ss.upload(local, remote)`` copies an already committed local checkpoint the same way from
one process (index last).

Overwrite protection applies to both tiers: a committed remote checkpoint is refused up
front, before anything is written, unless ``overwrite``; the replaced remote checkpoint's
data files are deleted only after the new remote index is in place.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import replace
from typing import Any

from shardsave import knobs
from shardsave.claim import NO_INDEX, commit_claim, index_base
from shardsave.dist.comm import Comm, describe_error
from shardsave.errors import (
    CheckpointError,
    CheckpointExistsError,
    MissingFileError,
    ShardsaveError,
    StorageError,
)
from shardsave.format.index import CheckpointInfo, FileInfo
from shardsave.format.names import INDEX_NAME
from shardsave.load import read_index
from shardsave.storage import Storage
from shardsave.storage.retry import backoff_s

__all__ = ["TieredSaveHandle", "tiered_save", "upload"]

COPY_BLOCK_BYTES = 16 * 1024 * 1024
"""Bytes read from the local file per write to the remote one (bounds upload memory)."""
UPLOAD_ATTEMPTS = 3
"""Whole-file attempts per data file: a failed streamed upload is never resumed (see retry)."""
FAILED_SUFFIX = ".failed"
"""Marker ``<data file>.failed`` a rank leaves on the remote store when its upload failed."""
DEFAULT_UPLOAD_TIMEOUT_S = 3600.0


def _copy_file(src: Storage, dst: Storage, f: FileInfo) -> None:
    """Copy one data file, whole-file retries; the remote object appears only when complete.

    A data file already there at its full size is skipped: files are immutable under their
    save id, so it is this very file (an earlier upload of the same save) -- and removing
    it could break a remote checkpoint that already names it.
    """
    if dst.exists(f.name) and dst.size(f.name) == f.size:
        return
    last: BaseException | None = None
    for attempt in range(UPLOAD_ATTEMPTS):
        try:
            with contextlib.suppress(ShardsaveError):
                dst.remove([f.name])  # a previous attempt's leftover (object stores: none visible)
            with dst.open_writer(f.name) as w:
                for start in range(0, f.size, COPY_BLOCK_BYTES):
                    w.write(src.read_range(f.name, start, min(f.size, start + COPY_BLOCK_BYTES)))
            return
        except MissingFileError:
            raise  # the local file is gone: repeating cannot help
        except StorageError as exc:
            last = exc
            if attempt + 1 < UPLOAD_ATTEMPTS:
                time.sleep(backoff_s(attempt))
    assert last is not None
    raise last


def _remote_state(dst: Storage, overwrite: bool) -> tuple[tuple[str, ...], str]:
    """Names of the remote checkpoint's files that a commit would replace, and the save id
    its index names (the commit claim's base, see ``shardsave.claim``); refuses an existing
    remote checkpoint unless ``overwrite``."""
    base = index_base(dst)
    if base == NO_INDEX:
        return (), base
    if not overwrite:
        raise CheckpointExistsError(
            f"{dst.full_path(INDEX_NAME)} already holds a committed checkpoint; pass overwrite=True to "
            "replace it, or upload to another path (nothing was written)"
        )
    try:
        return tuple(f.name for f in read_index(dst).files), base
    except ShardsaveError:
        return (), base  # an unreadable old index: its files are left for gc


def _commit(src: Storage, dst: Storage, info: CheckpointInfo, overwrite: bool, base: str) -> CheckpointInfo:
    """(coordinator) Every data file is up: PUT the index (the remote commit), then clean up.

    Conditional on the remote index still naming ``base``, the save id it named before the
    upload began: of two uploads racing to one remote path, one commits and the other
    raises ``ConcurrentSaveError`` (``shardsave.claim``)."""
    old, _ = _remote_state(dst, overwrite)
    blob = src.read_bytes(INDEX_NAME, max_bytes=knobs.max_index_bytes())
    with commit_claim(dst, base, info.save_id):
        dst.write_atomic(INDEX_NAME, blob)
    new = {f.name for f in info.files}
    stale = [n for n in old if n not in new]
    if stale:
        with contextlib.suppress(Exception):  # harmless leftovers; gc removes them
            dst.remove(stale)
    return replace(info, path=dst.url)


def upload(
    local_path: str,
    remote_path: str,
    *,
    storage_options: dict[str, Any] | None = None,
    local_storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> CheckpointInfo:
    """Copy the committed checkpoint at ``local_path`` to ``remote_path``, index last.

    One process, no process group. Returns the remote CheckpointInfo once the remote index
    is written; on failure nothing is committed remotely (copied data files are left for
    gc, or reused by nothing: a retry writes them again).
    """
    src = Storage.from_url(local_path, local_storage_options)
    dst = Storage.from_url(remote_path, storage_options)
    info = read_index(src)
    _, base = _remote_state(dst, overwrite)
    for f in info.files:
        _copy_file(src, dst, f)
    return _commit(src, dst, info, overwrite, base)


class TieredSaveHandle:
    """The background upload of one :func:`tiered_save` on this rank.

    ``local`` is the committed local checkpoint (usable at once). ``wait()`` returns, on the
    coordinator, the remote CheckpointInfo once the remote index is committed; on the other
    ranks once their own data files are uploaded. It raises :class:`CheckpointError` if the
    upload failed (on the coordinator: if any rank's did).
    """

    def __init__(self, local: CheckpointInfo, remote_url: str, is_coordinator: bool) -> None:
        self.local = local
        self.remote_url = remote_url
        self.is_coordinator = is_coordinator
        self.result: CheckpointInfo | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def committed(self) -> bool:
        """Whether this rank saw the remote index committed (only the coordinator can)."""
        return self.done() and self.error is None and self.is_coordinator

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        if not self._done.wait(timeout):
            raise TimeoutError(f"the upload to {self.remote_url} is still running after {timeout}s")
        if self.error is not None:
            raise CheckpointError(f"tiered save: upload to {self.remote_url} failed; the remote checkpoint "
                                  f"was not committed (the local one at {self.local.path} is)",
                                  {0 if self.is_coordinator else -1: describe_error(self.error)}) from self.error
        return self.result

    def _run(self, fn: Any) -> None:
        def body() -> None:
            try:
                self.result = fn()
            except BaseException as exc:
                self.error = exc
            finally:
                self._done.set()

        self._thread = threading.Thread(target=body, name="shardsave-upload", daemon=True)
        self._thread.start()


def tiered_save(
    state_dict: dict[str, Any],
    local_path: str,
    remote_path: str,
    *,
    process_group: Any = None,
    codec: str = "auto",
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    local_storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    upload_timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S,
) -> TieredSaveHandle:
    """(all ranks) ``ss.save`` to ``local_path``, then upload to ``remote_path`` in the background.

    Returns once the local checkpoint is committed. ``storage_options`` are for the remote
    store, ``local_storage_options`` for the local one; ``overwrite`` applies to both.
    """
    from shardsave.save import save

    comm = Comm(process_group)
    dst = Storage.from_url(remote_path, storage_options)
    # (coordinator -> all ranks) refuse a committed remote checkpoint before writing anything.
    verdict: tuple[str | None] | None = None
    base = NO_INDEX  # (coordinator) what the remote commit must still find
    if comm.is_coordinator:
        try:
            _, base = _remote_state(dst, overwrite)
            verdict = (None,)
        except CheckpointExistsError as exc:
            verdict = (str(exc),)
        except Exception as exc:
            verdict = (f"cannot reach {dst.url}: {describe_error(exc)} (nothing was written)",)
    (problem,) = comm.broadcast(verdict, "broadcast remote check")
    if problem is not None:
        raise CheckpointExistsError(problem) if "already holds" in problem else CheckpointError(problem, {0: problem})
    info = save(state_dict, local_path, process_group=process_group, codec=codec, metadata=metadata,
                storage_options=local_storage_options, overwrite=overwrite)
    src = Storage.from_url(local_path, local_storage_options)
    rank = comm.rank
    handle = TieredSaveHandle(info, dst.url, comm.is_coordinator)

    def run() -> CheckpointInfo | None:
        mine = [f for f in info.files if f.rank == rank]
        try:
            for f in mine:
                _copy_file(src, dst, f)
        except BaseException as exc:
            for f in mine:  # tell the coordinator now rather than after upload_timeout_s
                with contextlib.suppress(Exception):
                    dst.write_atomic(f.name + FAILED_SUFFIX, describe_error(exc).encode())
            raise
        if not handle.is_coordinator:
            return replace(info, path=dst.url)
        _wait_for_files(dst, info, upload_timeout_s)
        return _commit(src, dst, info, overwrite, base)

    handle._run(run)
    return handle


def _wait_for_files(dst: Storage, info: CheckpointInfo, timeout_s: float) -> None:
    """(coordinator) Poll until every data file is on ``dst`` at its full size."""
    pending = {f.name: f for f in info.files}
    deadline = time.monotonic() + timeout_s
    attempt = 0
    invalidate = getattr(dst.fs, "invalidate_cache", None)
    while pending:
        for name, f in list(pending.items()):
            if callable(invalidate):  # s3fs caches listings; other ranks' uploads are news to it
                invalidate(dst.fs._strip_protocol(dst.full_path(name)))
            if dst.exists(name + FAILED_SUFFIX):
                why = dst.read_bytes(name + FAILED_SUFFIX, max_bytes=64 * 1024).decode(errors="replace")
                raise CheckpointError(f"rank {f.rank} failed to upload {dst.full_path(name)}", {f.rank: why})
            if dst.exists(name) and dst.size(name) == f.size:
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"tiered save: after {timeout_s:.0f}s, {len(pending)} data file(s) are still not on {dst.url}",
                {f.rank: f"{dst.full_path(n)} not uploaded" for n, f in pending.items()},
            )
        time.sleep(min(1.0, backoff_s(min(attempt, 6))))
        attempt += 1
