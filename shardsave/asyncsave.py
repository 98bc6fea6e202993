"""``ss.async_save``: stage the state in host memory, then save it from a background thread.

Call order, and which ranks run each step (all ranks call ``async_save`` collectively)::

    (each rank, main thread)  wait for this process's previous save; raise its failure if
                              nobody has seen it yet (then this save does not start)
    (all ranks, main thread)  Comm(process_group): the dedicated gloo checkpoint group is
                              created here on first use -- new_group is a collective over
                              the parent group and must run on every rank in the same order,
                              which only the main thread can promise
    (each rank, main thread)  stage: copy every tensor into reused host buffers (staging.py)
    (all ranks, main thread)  exchange staging outcomes (one small gather on the checkpoint
                              group): a value one rank cannot stage fails the call on every
                              rank, before anything runs in the background
    -- async_save returns here; the caller may now change its tensors in place --
    (all ranks, background)   the same protocol as ``ss.save`` (save._save) on the staged
                              copy: plan, write, commit. Its collectives run on the
                              checkpoint group only, so they never interleave with training
                              collectives on other groups.

At most one save is in flight per process: ``async_save`` and ``save`` first wait for the
previous one, and every other checkpoint collective started on another thread (``ss.load``,
``CheckpointManager.restore``) waits for it too, through ``Comm`` -- two threads issuing
collectives on the same gloo group could pair up the wrong messages across ranks.

A background failure is never lost: ``handle.wait()`` raises it, and if nobody called
``wait()`` (or ``exception()``), the next ``save``/``async_save`` in this process raises it
instead of starting. Whether a failure was "seen" is per process, so call ``wait()`` on
every rank or on none -- otherwise ranks disagree about whether the next save starts. A
failed save never commits (the protocol writes the index last, only
when every rank succeeded).

The background thread is not a daemon: an interpreter that reaches its end with a save in
flight waits for the save to commit. Call ``handle.wait()`` before
``dist.destroy_process_group()``: destroying the group under a running save fails it.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from shardsave.codec import validate_codec_name
from shardsave.dist import comm as comm_module
from shardsave.dist.comm import Comm, describe_error
from shardsave.errors import CheckpointError
from shardsave.format.index import CheckpointInfo
from shardsave.save import _check_metadata, _save
from shardsave.staging import Stager, StagingStats
from shardsave.storage import Storage

__all__ = ["AsyncSaveHandle", "async_save", "wait_for_pending_save"]

BeforeHook = Callable[[Comm, Storage], None]
AfterHook = Callable[[Comm, Storage, CheckpointInfo], None]


class AsyncSaveHandle:
    """The running (or finished) background part of one ``async_save``.

    ``wait()`` blocks until the checkpoint is committed and returns its CheckpointInfo, or
    raises the background failure (usually a CheckpointError carrying every rank's failure).
    """

    def __init__(self, path: str, rank: int, stall_s: float, waited_s: float, staging: StagingStats) -> None:
        self.path = path
        """The checkpoint's URL."""
        self.rank = rank
        """This process's rank in the checkpoint's process group."""
        self.stall_s = stall_s
        """Seconds ``async_save`` blocked the caller (waiting, staging, the staging check)."""
        self.waited_s = waited_s
        """Of ``stall_s``, seconds spent waiting for the previous save to finish."""
        self.staging = staging
        """What staging copied and allocated."""
        self._start = time.perf_counter() - stall_s
        self._end: float | None = None
        self._done = threading.Event()
        self._info: CheckpointInfo | None = None
        self._error: BaseException | None = None
        self._observed = False
        self._thread: threading.Thread | None = None

    def done(self) -> bool:
        """Whether the background save has finished (committed or failed)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        """Block until committed; return the CheckpointInfo or raise the background failure.

        Raises TimeoutError if ``timeout`` seconds pass first (the save keeps running).
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"async save to {self.path} still running after {timeout} s; call wait() again")
        if self._error is not None:
            self._observed = True
            raise self._error
        assert self._info is not None
        return self._info

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The background failure (None if it committed), waiting up to ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"async save to {self.path} still running after {timeout} s")
        self._observed = True
        return self._error

    @property
    def info(self) -> CheckpointInfo | None:
        """The committed checkpoint's CheckpointInfo; None while running or after a failure."""
        return self._info if self._done.is_set() else None

    @property
    def total_s(self) -> float | None:
        """Seconds from the ``async_save`` call to the end of the background save (None: running)."""
        return None if self._end is None else self._end - self._start

    def __repr__(self) -> str:
        state = "running" if not self.done() else "failed" if self._error else "committed"
        return f"AsyncSaveHandle({self.path!r}, {state}, stall {self.stall_s:.3f} s)"

    # -- background side ------------------------------------------------------------

    def _run(self, job: Callable[[], CheckpointInfo]) -> None:
        try:
            self._info = job()
        except BaseException as exc:
            self._error = exc
        finally:
            self._end = time.perf_counter()
            self._done.set()


_lock = threading.Lock()
_inflight: AsyncSaveHandle | None = None
_stager = Stager()


def _current() -> AsyncSaveHandle | None:
    with _lock:
        return _inflight


def _wait_quietly() -> None:
    """Comm's hook: a checkpoint collective on another thread waits for the save in flight."""
    h = _current()
    if h is not None and h._thread is not threading.current_thread():
        h._done.wait()


comm_module.add_before_use_hook(_wait_quietly)


def wait_for_pending_save() -> None:
    """Wait for this process's save in flight, if any; raise its failure if nobody saw it.

    ``ss.save`` and ``ss.async_save`` call this first. The failure is raised once: as a
    CheckpointError that says the new save was not started, chained to the original.
    """
    global _inflight
    h = _current()
    if h is None:
        return
    h._done.wait()
    with _lock:
        if _inflight is h:
            _inflight = None
    if h._error is not None and not h._observed:
        h._observed = True
        err = h._error
        failures = err.failures if isinstance(err, CheckpointError) else {h.rank: describe_error(err)}
        raise CheckpointError(
            f"the previous async save to {h.path} failed and committed nothing; this save was not started "
            "(call handle.wait() after async_save to handle such failures where they happen):",
            failures,
        ) from err


def async_save(
    state_dict: dict[str, Any],
    path: str,
    *,
    process_group: Any = None,
    codec: str = "auto",
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    encryption_key: bytes | None = None,
) -> AsyncSaveHandle:
    """Save ``state_dict`` to ``path`` in the background; return once it is staged in host memory.

    Same arguments and on-storage result as :func:`shardsave.save`, and collective in the
    same way: every rank of ``process_group`` calls it with the same path and options.
    After it returns, the caller may modify its tensors in place: the checkpoint holds the
    values they had during the call. See the module docstring for the protocol.
    """
    return start_async_save(state_dict, path, process_group=process_group, codec=codec, metadata=metadata,
                            storage_options=storage_options, overwrite=overwrite, encryption_key=encryption_key)


def start_async_save(
    state_dict: dict[str, Any],
    path: str,
    *,
    process_group: Any = None,
    codec: str = "auto",
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    encryption_key: bytes | None = None,
    before: BeforeHook | None = None,
    after: AfterHook | None = None,
) -> AsyncSaveHandle:
    """``async_save`` with hooks run in the background thread (for CheckpointManager).

    ``before(comm, storage)`` runs on every rank before the protocol's first collective;
    ``after(comm, storage, info)`` after the commit. Hooks are best effort: an exception in
    one becomes a warning, because a rank that left the protocol early would leave the
    others waiting in a collective, and after the commit the checkpoint is good anyway.
    Hooks must not run collectives.
    """
    global _inflight
    t0 = time.perf_counter()
    wait_for_pending_save()
    waited = time.perf_counter() - t0

    codec = validate_codec_name(codec)
    checked = _check_metadata(metadata)
    # (all ranks, main thread) the dedicated checkpoint group is created here on first use.
    comm = Comm(process_group)
    storage = Storage.from_url(path, storage_options)

    error: BaseException | None = None
    staged: dict[str, Any] = {}
    stats = StagingStats(0, 0, 0.0)
    try:
        staged, stats = _stager.stage(state_dict)
    except Exception as exc:
        error = exc
    # (all ranks) one rank that cannot stage fails the call everywhere, before any
    # background collective could wait for it.
    outcomes = comm.all_gather(describe_error(error) if error else None, "exchange staging outcomes")
    failures = {r: o for r, o in enumerate(outcomes) if o}
    if failures:
        raise CheckpointError(f"async save to {storage.url} failed while staging (nothing was written):",
                              failures) from error

    handle = AsyncSaveHandle(storage.url, comm.rank, time.perf_counter() - t0, waited, stats)

    def job() -> CheckpointInfo:
        _run_hook("before", before, comm, storage)
        info = _save(staged, storage, comm, codec=codec, metadata=checked, overwrite=overwrite,
                     encryption_key=encryption_key)
        _run_hook("after", after, comm, storage, info)
        return info

    thread = threading.Thread(target=handle._run, args=(job,), name="shardsave-async-save", daemon=False)
    handle._thread = thread
    with _lock:
        _inflight = handle
    thread.start()
    # Measured after the thread started: starting it is part of what the caller waits for.
    handle.stall_s = time.perf_counter() - t0
    handle._start = t0
    return handle


def _run_hook(name: str, hook: Callable[..., None] | None, *args: Any) -> None:
    if hook is None:
        return
    try:
        hook(*args)
    except Exception as exc:
        warnings.warn(f"shardsave async save: the {name}-hook failed ({describe_error(exc)}); "
                      "the save itself is unaffected", RuntimeWarning, stacklevel=1)


def staging_buffer_bytes() -> int:
    """Host memory the async-save stager holds for reuse across saves."""
    return _stager.buffer_bytes


def release_staging_buffers() -> None:
    """Free the stager's reusable buffers (waits for the save in flight first)."""
    h = _current()
    if h is not None:
        h._done.wait()
    _stager.clear()
