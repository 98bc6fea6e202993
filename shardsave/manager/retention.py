"""Retention policies: which committed checkpoints a CheckpointManager keeps.

A policy is a small object with ``keep(records) -> steps``; the manager deletes a committed
checkpoint only when no policy keeps it, never the newest and never the one just written
(:func:`plan_deletions`, pure, so it is tested without storage). Compose your own by
passing ``CheckpointManager(..., retention=[KeepLast(2), MyPolicy()])``: a checkpoint
survives if any policy keeps it, which is the only composition that can never delete
something one policy was asked to keep.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

__all__ = ["CheckpointRecord", "KeepBest", "KeepEvery", "KeepLast", "RetentionPolicy", "plan_deletions"]


@dataclass(frozen=True)
class CheckpointRecord:
    """What a retention policy sees of one committed checkpoint."""

    step: int
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    """The metrics saved with it (empty unless some policy ``needs_metrics``)."""


@runtime_checkable
class RetentionPolicy(Protocol):
    """Says which committed checkpoints to keep; a checkpoint no policy keeps is deleted."""

    needs_metrics: ClassVar[bool]

    def keep(self, records: Sequence[CheckpointRecord]) -> set[int]:
        """Steps to keep, out of ``records`` (sorted by step)."""
        ...


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` newest checkpoints."""

    n: int
    needs_metrics: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"keep_last must be an int >= 0 (or None: keep everything), got {self.n!r}")

    def keep(self, records: Sequence[CheckpointRecord]) -> set[int]:
        return {r.step for r in records[max(0, len(records) - self.n):]} if self.n else set()


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``n`` checkpoints with the best ``metric`` (lowest for mode "min")."""

    n: int
    metric: str
    mode: str = "min"
    needs_metrics: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"keep_best must be an int >= 0, got {self.n!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"keep_best={self.n} needs best_metric, the name of a metric passed to save(); "
                             f"got {self.metric!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")

    def keep(self, records: Sequence[CheckpointRecord]) -> set[int]:
        scored = [(r.metrics[self.metric], r.step) for r in records
                  if isinstance(r.metrics.get(self.metric), (int, float))]
        sign = 1.0 if self.mode == "min" else -1.0
        # Ties: the newer checkpoint wins.
        scored.sort(key=lambda vs: (sign * float(vs[0]), -vs[1]))  # type: ignore[arg-type]
        return {s for _, s in scored[: self.n]}


@dataclass(frozen=True)
class KeepEvery:
    """Keep every checkpoint whose step is a multiple of ``every`` for good (milestones)."""

    every: int
    needs_metrics: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"keep_every must be an int >= 1 (or None), got {self.every!r}")

    def keep(self, records: Sequence[CheckpointRecord]) -> set[int]:
        return {r.step for r in records if r.step % self.every == 0}


def plan_deletions(
    records: Sequence[CheckpointRecord], policies: Sequence[RetentionPolicy], protected: Iterable[int]
) -> list[int]:
    """Committed steps to delete: kept by no policy and not protected. Pure.

    With no policies nothing is deleted. The newest record is always protected.
    """
    if not policies or not records:
        return []
    records = sorted(records, key=lambda r: r.step)
    keep = set(protected) | {records[-1].step}
    for policy in policies:
        keep |= policy.keep(records)
    return [r.step for r in records if r.step not in keep]
