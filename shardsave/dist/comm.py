"""Process-group glue: the few collectives a save or load needs, and error aggregation.

Checkpoint collectives run on their own gloo group, created once per parent group on
first use, collectively, on the calling (main) thread. Three reasons: object collectives
need a CPU backend even when training uses NCCL; an async save's background collectives
must never interleave with training collectives; and a dead peer must be reported after
``knobs.collective_timeout_s()`` -- minutes -- not torch's default 30.

Every collective here is reached by *all* ranks of the group: a rank that failed locally
still takes part (carrying its error), so no other rank hangs waiting for it.
"""

from __future__ import annotations

import datetime
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from shardsave import knobs
from shardsave.errors import CheckpointError

T = TypeVar("T")

_GROUPS: dict[Any, Any] = {}
_GROUPS_LOCK = threading.Lock()


def _checkpoint_group(process_group: Any) -> Any:
    """The dedicated gloo group for ``process_group`` (None: the default group)."""
    key = process_group if process_group is not None else "default"
    with _GROUPS_LOCK:
        group = _GROUPS.get(key)
        if group is None:
            timeout = datetime.timedelta(seconds=knobs.collective_timeout_s())
            if process_group is None:
                # (all ranks of the default group) new_group is itself a collective.
                group = dist.new_group(backend="gloo", timeout=timeout)
            else:
                # A caller's sub-group: new_group would need every rank of the world, which
                # only the sub-group's members reach here. Use the group as given.
                group = process_group
            _GROUPS[key] = group
        return group


_BEFORE_USE: list[Callable[[], None]] = []


def add_before_use_hook(hook: Callable[[], None]) -> None:
    """Run ``hook()`` at the start of every ``Comm(...)``.

    The async-save module registers "wait for the background save in flight" here: a
    checkpoint collective started on the main thread while the background thread runs
    collectives on the same group would pair up the wrong messages across ranks.
    """
    if hook not in _BEFORE_USE:
        _BEFORE_USE.append(hook)


def reset_groups() -> None:
    """Forget cached groups (after destroy_process_group, e.g. between tests)."""
    with _GROUPS_LOCK:
        _GROUPS.clear()


class Comm:
    """The checkpoint's view of its process group. Without one, a world of size 1."""

    coordinator = 0
    """Group rank that plans, commits the index and reports the outcome."""

    def __init__(self, process_group: Any = None) -> None:
        for hook in _BEFORE_USE:
            hook()
        self.distributed = dist.is_available() and dist.is_initialized()
        if not self.distributed:
            if process_group is not None:
                raise ValueError("process_group was given but torch.distributed is not initialised")
            self.group = None
            self.rank = 0
            self.world_size = 1
            return
        self.parent = process_group
        self.group = _checkpoint_group(process_group)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._coordinator_global = dist.get_global_rank(self.group, self.coordinator)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == self.coordinator

    def to_group_rank(self, global_rank: int) -> int:
        """Group rank of a global rank (DTensor meshes name global ranks)."""
        if not self.distributed or self.parent is None:
            return global_rank
        assert self.group is not None
        r = dist.get_group_rank(self.group, global_rank)
        if r < 0:
            raise CheckpointError(f"global rank {global_rank} is not in the checkpoint's process group")
        return r

    def _lost(self, what: str, exc: BaseException) -> CheckpointError:
        return CheckpointError(
            f"checkpoint collective '{what}' failed on rank {self.rank}: a peer rank was lost or timed out "
            f"(timeout {knobs.collective_timeout_s():.0f}s, SHARDSAVE_COLLECTIVE_TIMEOUT_S)",
            {self.rank: f"{type(exc).__name__}: {exc}"},
        )

    def gather(self, obj: T, what: str) -> list[T] | None:
        """(all ranks) Every rank's ``obj`` on the coordinator (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_coordinator else None
        try:
            dist.gather_object(obj, out, dst=self._coordinator_global, group=self.group)
        except Exception as exc:
            raise self._lost(what, exc) from exc
        return out

    def broadcast(self, obj: T | None, what: str) -> T:
        """(all ranks) The coordinator's ``obj`` on every rank."""
        if not self.distributed:
            assert obj is not None
            return obj
        box = [obj if self.is_coordinator else None]
        try:
            dist.broadcast_object_list(box, src=self._coordinator_global, group=self.group)
        except Exception as exc:
            raise self._lost(what, exc) from exc
        return box[0]  # type: ignore[return-value]

    def all_gather(self, obj: T, what: str) -> list[T]:
        """(all ranks) Every rank's ``obj`` on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as exc:
            raise self._lost(what, exc) from exc
        return out


def hostname() -> str:
    return socket.gethostname()


def describe_error(exc: BaseException) -> str:
    """One line for an aggregated failure report."""
    from shardsave.errors import ShardsaveError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, ShardsaveError) and text else f"{type(exc).__name__}: {text}"
