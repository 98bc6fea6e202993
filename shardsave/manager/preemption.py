"""Preemption: SIGTERM becomes a final checkpoint that every rank takes after the same step."""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from typing import Any

from shardsave.dist.comm import describe_error
from shardsave.errors import CheckpointError

__all__ = ["PreemptionGuard"]


class PreemptionGuard:
    """Turns SIGTERM (what Slurm and Kubernetes send before killing) into a final checkpoint.

    The signal handler only sets a flag: a save cannot run inside a handler, and ranks
    receive the signal at different moments. ``agreed()`` turns the flag into a decision
    all ranks share at a step boundary (one tiny all-reduce over the *training* group --
    never the checkpoint group, which a background save may be using), so every rank
    stops after the same step and takes the final checkpoint together.

    ``deadline_s`` is the time from the signal by which the final checkpoint must be
    committed (keep it under the launcher's grace period: torchrun SIGKILLs workers 30 s
    after forwarding SIGTERM; Slurm's KillWait and Kubernetes' terminationGracePeriodSeconds
    play the same role). ``remaining_s()`` lets the loop skip a save that cannot finish.

    Use::

        guard = PreemptionGuard(deadline_s=20).install()      # main thread
        for step in ...:
            train_step()
            if guard.agreed():                                 # (all ranks)
                if guard.remaining_s() > 0:
                    mgr.save(step, state, force=True); mgr.wait()
                break
    """

    def __init__(
        self,
        deadline_s: float = 25.0,
        signals: Sequence[int] = (signal.SIGTERM,),
        process_group: Any = None,
    ) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0 seconds, got {deadline_s!r}")
        self.deadline_s = float(deadline_s)
        self.signals = tuple(signals)
        self.process_group = process_group
        self.signal_time: float | None = None
        """time.monotonic() at the first signal (None: none received)."""
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionGuard:
        """Install the handlers (main thread only; the previous ones come back on uninstall)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_time is None:
            self.signal_time = time.monotonic()
            self.signum = signum

    @property
    def requested(self) -> bool:
        """Whether this rank received a signal (a local view; use ``agreed()`` to act on it)."""
        return self.signal_time is not None

    def remaining_s(self) -> float:
        """Seconds left before the deadline (``deadline_s`` if no signal yet)."""
        if self.signal_time is None:
            return self.deadline_s
        return self.deadline_s - (time.monotonic() - self.signal_time)

    def agreed(self) -> bool:
        """(all ranks of the training group) Whether any rank received a signal."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        device = "cpu"
        if dist.get_backend(self.process_group) == "nccl":
            device = f"cuda:{torch.cuda.current_device()}"
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        except Exception as exc:
            raise CheckpointError(f"preemption check failed on rank {dist.get_rank()}: {describe_error(exc)}") from exc
        return bool(flag.item() > 0)
