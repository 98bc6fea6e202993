"""``ss.CheckpointManager``: numbered checkpoints under one root, retention, and restore.

Layout: one ordinary shardsave checkpoint per step, in a directory whose name sorts::

    <root>/step-000001000/index.json   committed (the index is written last)
    <root>/step-000001000/data/...
    <root>/step-000002000/data/...     no index: an interrupted save -- ignored, removed by gc()

Whether a step exists is decided by its ``index.json`` alone, so a crash at any moment
leaves either a committed checkpoint or a directory that ``steps()``, ``latest_step()`` and
``restore()`` ignore. Each checkpoint's index metadata carries ``step`` and ``metrics``
(plus what the caller adds), so retention by metric needs nothing beside the checkpoints.

Who does what: every rank calls ``save`` and ``restore`` collectively (they run the
collective save/load protocols). Only the coordinator (rank 0 of the checkpoint's group)
deletes: retention after a commit and ``gc()``. Deleting a checkpoint removes its
``index.json`` first, so a deletion cut short leaves an uncommitted directory, never a
committed one with missing data. ``steps()`` and ``latest_step()`` list storage on the
calling rank, without a collective, so right after a save another rank may still list a
checkpoint the coordinator is deleting; ``restore()`` asks the coordinator instead.

Retention runs after the commit -- with ``async_save=True`` in the background thread, after
the background commit -- and deletes only committed checkpoints that no policy keeps, never
the newest and never the one just written. Policies are small objects (:class:`KeepLast`,
:class:`KeepBest`, :class:`KeepEvery`) and a checkpoint survives if any policy keeps it;
pass ``retention=[...]`` to compose your own (retention.py). SIGTERM handling for a final
checkpoint: :class:`PreemptionGuard` (preemption.py).

State objects: ``save``/``restore`` take a state dict, or any object with ``state_dict()``
and ``load_state_dict(sd)`` (DCP's Stateful protocol), such as :class:`shardsave.state.TrainState`.
For such an object ``restore`` calls ``state_dict()`` only once it knows a checkpoint
exists (building an optimizer's state dict initialises its state), loads into it in place
and hands it back through ``load_state_dict``. Two optional methods extend the protocol:
``checkpoint_metadata() -> dict`` (merged into the index metadata at save) and
``check_load_result(result)`` (the object judges a non-strict load itself, e.g. per-rank RNG
states missing after a resume on more ranks).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from shardsave.asyncsave import AsyncSaveHandle, start_async_save
from shardsave.dist.comm import Comm, describe_error
from shardsave.errors import CheckpointNotFoundError, UnsupportedValueError
from shardsave.format.index import CheckpointInfo
from shardsave.format.names import INDEX_NAME
from shardsave.load import LoadResult, load, open_checkpoint, read_index
from shardsave.manager.preemption import PreemptionGuard
from shardsave.manager.retention import (
    CheckpointRecord,
    KeepBest,
    KeepEvery,
    KeepLast,
    RetentionPolicy,
    plan_deletions,
)
from shardsave.save import save
from shardsave.storage import Storage

__all__ = [
    "CheckpointManager",
    "CheckpointRecord",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "PreemptionGuard",
    "RetentionPolicy",
    "parse_step_dir",
    "plan_deletions",
    "step_dir_name",
]

log = logging.getLogger("shardsave.manager")

STEP_PREFIX = "step-"
STEP_DIGITS = 9
_STEP_RE = re.compile(r"^step-(\d{9,})$")
RESERVED_METADATA = ("step", "metrics")


def step_dir_name(step: int) -> str:
    """``step-000001000``: zero-padded to 9 digits so names sort like steps (up to 10^9)."""
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step_dir(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


class CheckpointManager:
    """Numbered checkpoints of a training run under ``root`` (see the module docstring).

    ``keep_last``: keep the N newest (None: keep every checkpoint, no retention at all);
    ``keep_best`` with ``best_metric`` and ``mode``: also keep the N best by that metric;
    ``keep_every``: also keep every checkpoint whose step is a multiple of K;
    ``save_every``: ``save(step, ...)`` does nothing unless ``step % save_every == 0``
    (or ``force=True``); ``async_save``: saves return after staging and write in the
    background (at most one in flight). ``retention`` replaces the policies built from
    the keep_* arguments. ``encryption_key`` (32 bytes): every checkpoint is saved
    encrypted and authenticated with it, and restored and inspected with it (see
    ``ss.save``); without it, restoring an encrypted checkpoint uses ``SHARDSAVE_KEY_FILE``.
    """

    def __init__(
        self,
        root: str,
        keep_last: int | None = 3,
        keep_best: int = 0,
        best_metric: str | None = None,
        mode: str = "min",
        keep_every: int | None = None,
        save_every: int | None = None,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        *,
        codec: str = "auto",
        retention: Sequence[RetentionPolicy] | None = None,
        encryption_key: bytes | None = None,
    ) -> None:
        if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
            raise ValueError(f"save_every must be an int >= 1 (or None: save whenever asked), got {save_every!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if retention is None:
            policies: list[RetentionPolicy] = []
            if keep_last is not None:
                policies.append(KeepLast(keep_last))
                if keep_best:
                    policies.append(KeepBest(keep_best, best_metric or "", mode))
                if keep_every is not None:
                    policies.append(KeepEvery(keep_every))
            elif keep_best or keep_every is not None:
                raise ValueError("keep_last=None keeps every checkpoint, so keep_best/keep_every would have no "
                                 "effect; pass keep_last=0 to keep only the best / every K-th")
            retention = policies
        self.policies: tuple[RetentionPolicy, ...] = tuple(retention)
        self.save_every = save_every
        self.async_save = async_save
        self.storage_options = dict(storage_options or {})
        self.process_group = process_group
        self.codec = codec
        if encryption_key is not None:
            from shardsave.crypto import check_key

            check_key(encryption_key)
        self._key = encryption_key
        self.storage = Storage.from_url(root, self.storage_options)
        self.root = self.storage.url
        self._handle: AsyncSaveHandle | None = None
        self._handle_step: int | None = None
        self._metrics: dict[int, dict[str, float | None]] = {}
        self.last_save_blocked_s: float | None = None
        """Seconds the latest ``save`` call blocked the caller (staging only, when async)."""

    def __repr__(self) -> str:
        return f"CheckpointManager({self.root!r}, policies={list(self.policies)}, async_save={self.async_save})"

    # -- names ----------------------------------------------------------------------

    def path(self, step: int) -> str:
        """The checkpoint directory of ``step`` (a path or URL, whether or not it exists)."""
        return self.storage.full_path(step_dir_name(step))

    def _list_step_dirs(self) -> dict[int, str]:
        fs, root = self.storage.fs, self.storage.root
        # Object-store filesystems (s3fs, gcsfs) cache listings per process; another rank or
        # job may have committed or deleted a step since.
        with contextlib.suppress(Exception):
            fs.invalidate_cache(root)
        try:
            entries = fs.ls(root, detail=False)
        except FileNotFoundError:
            return {}
        out: dict[int, str] = {}
        for entry in entries:
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            step = parse_step_dir(name)
            if step is not None:
                out[step] = name
        return out

    def _committed(self, name: str) -> bool:
        return self.storage.exists(f"{name}/{INDEX_NAME}")

    # -- queries (each rank, no collective) --------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, oldest first. Directories without an index are not listed."""
        return sorted(s for s, name in self._list_step_dirs().items() if self._committed(name))

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def info(self, step: int) -> CheckpointInfo:
        """The committed checkpoint of ``step``, parsed (CheckpointNotFoundError if none)."""
        storage = self.storage.child(step_dir_name(step))
        if self._key is None:
            return read_index(storage)
        return open_checkpoint(storage, self._key)[0]  # authenticated with the key

    def metrics(self, step: int) -> dict[str, float | None]:
        """The metrics saved with ``step``."""
        if step not in self._metrics:
            raw = self.info(step).metadata.get("metrics") or {}
            self._metrics[step] = {str(k): (float(v) if isinstance(v, (int, float)) else None)
                                   for k, v in dict(raw).items()}
        return self._metrics[step]

    # -- save ---------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
        overwrite: bool = False,
    ) -> CheckpointInfo | AsyncSaveHandle | None:
        """(all ranks) Save ``state`` as checkpoint ``step``.

        Returns None without saving when ``save_every`` says this step is not a save step
        (unless ``force``); the CheckpointInfo when synchronous; the AsyncSaveHandle when
        ``async_save``. ``metrics`` (name -> number; non-finite numbers are stored as None)
        go into the index metadata and feed ``keep_best``.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self.save_every is not None and step % self.save_every != 0 and not force:
            return None
        clean = _clean_metrics(metrics)
        state_dict, extra = _state_for_save(state)
        md: dict[str, Any] = {}
        for source in (metadata or {}), extra:
            bad = [k for k in source if k in RESERVED_METADATA]
            if bad:
                raise ValueError(f"metadata keys {bad} are reserved by CheckpointManager; rename them")
            md.update(source)
        md["step"] = step
        md["metrics"] = clean
        path = self.path(step)
        name = step_dir_name(step)

        def before(comm: Comm, storage: Storage) -> None:
            # (coordinator) Leftovers of an interrupted save at this step would stay in the
            # new checkpoint's directory for good. Removing them here, without a barrier, is
            # safe: no rank writes before the coordinator broadcasts the plan (step 3 of
            # the save protocol), which comes after this on the coordinator.
            if comm.is_coordinator and not overwrite:
                self._remove_uncommitted(name)

        def after(comm: Comm, storage: Storage, info: CheckpointInfo) -> None:
            self._metrics[step] = clean
            if comm.is_coordinator:  # (coordinator only) retention; no collective
                self._apply_retention(just_saved=step)

        t0 = time.perf_counter()
        if self.async_save:
            handle = start_async_save(
                state_dict, path, process_group=self.process_group, codec=self.codec, metadata=md,
                storage_options=self.storage_options, overwrite=overwrite, before=before, after=after,
                encryption_key=self._key,
            )
            self._handle, self._handle_step = handle, step
            self.last_save_blocked_s = time.perf_counter() - t0
            return handle
        comm = Comm(self.process_group)  # also waits for any async save still in flight
        try:
            before(comm, self.storage)
        except Exception as exc:  # leftovers are harmless; leaving the protocol is not
            log.warning("could not remove leftovers of step %d: %s", step, describe_error(exc))
        info = save(state_dict, path, process_group=self.process_group, codec=self.codec, metadata=md,
                    storage_options=self.storage_options, overwrite=overwrite, encryption_key=self._key)
        try:
            after(comm, self.storage, info)
        except Exception as exc:  # the checkpoint is committed; retention is best effort
            log.warning("retention after saving step %d failed: %s", step, describe_error(exc))
        self.last_save_blocked_s = time.perf_counter() - t0
        return info

    def wait(self) -> CheckpointInfo | None:
        """Wait for this manager's save in flight; its CheckpointInfo, or None if none ran.

        Raises the background failure of an async save.
        """
        handle = self._handle
        if handle is None:
            return None
        return handle.wait()

    # -- restore ------------------------------------------------------------------------

    def restore(self, state: Any, step: int | None = None, *, strict: bool = True) -> int | None:
        """(all ranks) Load the newest committed checkpoint (or ``step``) into ``state`` in place.

        Returns the step loaded, or None when there is no committed checkpoint (``state``
        untouched). Which step is decided by the coordinator and broadcast, so every rank
        loads the same one even while another job writes into ``root``.
        """
        self.wait()
        comm = Comm(self.process_group)
        # (coordinator -> all ranks) the step to load, or why there is none.
        choice: tuple[int | None, str | None] | None = None
        if comm.is_coordinator:
            try:
                steps = self.steps()
                if step is None:
                    choice = (steps[-1] if steps else None, None)
                elif step in steps:
                    choice = (step, None)
                else:
                    choice = (None, f"no committed checkpoint for step {step} under {self.root}; "
                                    f"committed steps: {steps if len(steps) <= 20 else steps[-20:]}")
            except Exception as exc:
                choice = (None, f"cannot list {self.root}: {describe_error(exc)}")
        chosen, problem = comm.broadcast(choice, "broadcast restore step")
        if problem is not None:
            raise CheckpointNotFoundError(problem)
        if chosen is None:
            return None
        stateful = _is_stateful(state)
        target = state.state_dict() if stateful else state
        check = getattr(state, "check_load_result", None) if stateful else None
        result: LoadResult = load(target, self.path(chosen), process_group=self.process_group,
                                  strict=strict and check is None, storage_options=self.storage_options,
                                  encryption_key=self._key)
        if check is not None:
            check(result)
        if stateful:
            state.load_state_dict(target)
        return chosen

    # -- deletion (coordinator only) -------------------------------------------------------

    def gc(self) -> list[int]:
        """Remove uncommitted step directories (interrupted saves); return their steps.

        Only the coordinator deletes (other ranks return []); the directory of this
        manager's save in flight is never touched. Call it on every rank, or on rank 0 only.
        """
        if not _is_coordinator(self.process_group):
            return []
        in_flight = self._handle_step if self._handle is not None and not self._handle.done() else None
        removed = []
        for s, name in sorted(self._list_step_dirs().items()):
            if s != in_flight and not self._committed(name):
                self.storage.remove_tree(name)
                removed.append(s)
        if removed:
            log.info("gc removed uncommitted checkpoints %s under %s", removed, self.root)
        return removed

    def _remove_uncommitted(self, name: str) -> None:
        if self.storage.exists(name) and not self._committed(name):
            self.storage.remove_tree(name)

    def _apply_retention(self, just_saved: int) -> list[int]:
        if not self.policies:
            return []
        steps = self.steps()
        needs = any(getattr(p, "needs_metrics", False) for p in self.policies)
        records = []
        for s in steps:
            metrics: dict[str, float | None] = {}
            if needs:
                try:
                    metrics = self.metrics(s)
                except Exception:  # an unreadable index has no metric: never "best"
                    metrics = {}
            records.append(CheckpointRecord(s, metrics))
        doomed = plan_deletions(records, self.policies, protected={just_saved})
        for s in doomed:
            self._delete(s)
        if doomed:
            log.info("retention deleted steps %s under %s", doomed, self.root)
        return doomed

    def _delete(self, step: int) -> None:
        name = step_dir_name(step)
        # The index goes first: from here on the step is uncommitted, whatever happens next.
        self.storage.child(name).remove([INDEX_NAME])
        self.storage.remove_tree(name)
        self._metrics.pop(step, None)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None and exc[0] is None:
            self.wait()


def _is_coordinator(process_group: Any) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank(process_group) == Comm.coordinator


def _is_stateful(state: Any) -> bool:
    return callable(getattr(state, "state_dict", None)) and callable(getattr(state, "load_state_dict", None))


def _state_for_save(state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    if _is_stateful(state):
        sd = state.state_dict()
        meta_fn = getattr(state, "checkpoint_metadata", None)
        extra = dict(meta_fn()) if callable(meta_fn) else {}
        return sd, extra
    if not isinstance(state, dict):
        raise UnsupportedValueError(
            f"CheckpointManager.save needs a state dict or an object with state_dict()/load_state_dict(), "
            f"got {type(state).__name__}"
        )
    return state, {}


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, value in (metrics or {}).items():
        if not isinstance(name, str):
            raise UnsupportedValueError(f"metric names must be str, got {name!r}")
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError) as exc:
            raise UnsupportedValueError(
                f"metric {name!r} = {value!r} is not a number; pass floats (or 0-d tensors)") from exc
        out[name] = number if math.isfinite(number) else None
    return out
