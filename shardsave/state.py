"""Training-state helpers: everything a job needs to resume exactly, as one state dict.

:class:`TrainState` gathers, for one training job:

* model and optimizer through ``torch.distributed.checkpoint.state_dict``
  (``get_state_dict`` / ``set_state_dict``), so FSDP2 (``fully_shard``), DDP and plain
  modules all give state dicts of their natural layout -- DTensor shards for FSDP2, which
  shardsave stores sharded and reshards at load;
* the LR scheduler's state;
* progress (``step``, ``epoch``) and the data position (a sampler with
  ``state_dict``/``load_state_dict``, e.g. :class:`ResumableBatchSampler`);
* RNG states of this rank -- python ``random``, numpy's legacy global generator, torch
  CPU, every initialised CUDA device, and any named ``torch.Generator`` /
  ``numpy.random.Generator`` -- wrapped in ``ss.PerRank`` because they differ per rank;
* a reproducibility record for the index metadata (seed, versions, git commit of the
  training code, command line, world size, hostnames, user config).

It follows DCP's Stateful protocol, so ``CheckpointManager.save(step, ts)`` and
``CheckpointManager.restore(ts)`` take it as is (see manager.py)::

    ts = TrainState(model, optim, scheduler, sampler=sampler, seed=0, config=cfg)
    step = ts.restore(mgr) or 0          # (all ranks) newest committed checkpoint, if any
    ...
    ts.step = step; mgr.save(step, ts, metrics={"loss": loss})

Why the details matter:

* ``random.setstate`` wants tuples back; the checkpoint gives lists and arrays. Converted.
* numpy ``PCG64`` state holds 128-bit integers; shardsave's JSON keeps integers exact.
* Creating a DataLoader iterator, or iterating a ``RandomSampler`` without a generator,
  draws from the *global* torch RNG. Capturing the RNG before that and restoring it after
  would replay a draw; so create iterators before ``restore`` (or give the loader its own
  ``generator=``; :class:`ResumableBatchSampler` uses a private generator).
* Building an optimizer's state dict initialises its state (DCP runs one zero-lr step), so
  ``TrainState.state_dict()`` is only called by ``restore`` once a checkpoint is known to
  exist: a fresh run starts with a pristine optimizer.
* Resuming on more ranks than saved: the new ranks have no saved RNG state. They are seeded
  from (seed, rank, step) instead, with a warning: an elastic resume is exact for model,
  optimizer and data position, not for rank-local randomness (which depends on the world
  size anyway).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import random
import subprocess
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from shardsave.errors import StateDictMismatchError, UnsupportedValueError
from shardsave.load import LoadResult
from shardsave.plan.flatten import PerRank

__all__ = [
    "ResumableBatchSampler",
    "TrainState",
    "capture_rng",
    "reproducibility_record",
    "restore_rng",
    "seed_everything",
]

RNG_KEY = "rng"


# --------------------------------------------------------------------------- RNG


def capture_rng(generators: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """This process's RNG states as a shardsave-storable dict (wrap it in ``ss.PerRank``).

    CUDA states are captured only for an initialised CUDA runtime (capturing would
    otherwise create a context on every device).
    """
    version, words, gauss_next = random.getstate()
    legacy = np.random.get_state(legacy=False)
    out: dict[str, Any] = {
        "python": {"version": version, "state": np.asarray(words, dtype=np.int64), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": legacy["bit_generator"],
            "key": np.asarray(legacy["state"]["key"], dtype=np.uint32).copy(),
            "pos": int(legacy["state"]["pos"]),
            "has_gauss": int(legacy["has_gauss"]),
            "gauss": float(legacy["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
        "generators": {name: _generator_state(name, g) for name, g in (generators or {}).items()},
    }
    return out


def _generator_state(name: str, g: Any) -> Any:
    if isinstance(g, torch.Generator):
        return g.get_state()
    if isinstance(g, np.random.Generator):
        return _mutable(g.bit_generator.state)
    if isinstance(g, random.Random):
        version, words, gauss_next = g.getstate()
        return {"version": version, "state": np.asarray(words, dtype=np.int64), "gauss_next": gauss_next}
    raise UnsupportedValueError(
        f"generator {name!r} is a {type(g).__name__}; pass torch.Generator, numpy.random.Generator or random.Random"
    )


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, Any] | None = None) -> None:
    """Put back what :func:`capture_rng` captured (the tuples ``random.setstate`` needs included)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in np.asarray(py["state"]).tolist()),
                     py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((str(npy["bit_generator"]), np.asarray(npy["key"], dtype=np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["gauss"])))
    torch.set_rng_state(_as_byte_tensor(state["torch"]))
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for device in range(n):
            torch.cuda.set_rng_state(_as_byte_tensor(cuda[device]), device)
    saved = state.get("generators") or {}
    for name, g in (generators or {}).items():
        if name not in saved:
            raise StateDictMismatchError(f"the checkpoint holds no state for generator {name!r}; "
                                         f"it has {sorted(saved)}", missing=[name])
        s = saved[name]
        if isinstance(g, torch.Generator):
            g.set_state(_as_byte_tensor(s))
        elif isinstance(g, np.random.Generator):
            g.bit_generator.state = _plain_json(s)
        else:
            g.setstate((int(s["version"]), tuple(int(x) for x in np.asarray(s["state"]).tolist()), s["gauss_next"]))


def _as_byte_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.uint8).contiguous()
    return torch.from_numpy(np.asarray(value, dtype=np.uint8).copy())


def seed_everything(seed: int) -> None:
    """Seed python, numpy (legacy global) and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, rank: int, step: int) -> int:
    """A seed for rank ``rank`` at ``step`` that no other (rank, step) pair of the run shares."""
    ss = np.random.SeedSequence([seed & (2**63 - 1), rank, step])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & (2**63 - 1))


# --------------------------------------------------------------------------- data position


class ResumableBatchSampler:
    """Deterministic *global* batches with a position that survives a restart on any world size.

    Epoch ``e`` visits the samples in a permutation drawn from (seed, e) with a private
    generator -- never the global torch RNG -- and the position counts global batches
    consumed, not per-rank samples. So the batch of a step depends on nothing but the seed
    and the step, whatever the number of ranks: each rank takes its share with
    :meth:`local_slice`. Call :meth:`next_batch` once per optimizer step (not through a
    prefetching DataLoader, whose workers run ahead of the position).
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if num_samples < 1 or batch_size < 1 or batch_size > num_samples:
            raise ValueError(f"need 1 <= batch_size <= num_samples, got batch_size={batch_size}, "
                             f"num_samples={num_samples}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        """Global batches already consumed in ``epoch``."""
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size  # the ragged tail of an epoch is dropped

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(derived_seed(self.seed, 0, self.epoch))
                self._order = torch.randperm(self.num_samples, generator=g).tolist()
            else:
                self._order = list(range(self.num_samples))
        return self._order

    def next_batch(self) -> list[int]:
        """The next global batch of sample indices (the same on every rank), advancing the position."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        start = self.position * self.batch_size
        batch = self._epoch_order()[start:start + self.batch_size]
        self.position += 1
        return batch

    @staticmethod
    def local_slice(batch: list[int], rank: int, world_size: int) -> list[int]:
        """Rank ``rank``'s contiguous share of a global batch (shares differ by at most one)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        base, extra = divmod(len(batch), world_size)
        start = rank * base + min(rank, extra)
        return batch[start:start + base + (1 if rank < extra else 0)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "batch_size": self.batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in ("num_samples", "batch_size", "seed", "shuffle"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"the checkpoint's sampler has {name}={state[name]!r}, this one {getattr(self, name)!r}; "
                    "a resumed run must keep the dataset, global batch size and seed (the world size may change)"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None


# --------------------------------------------------------------------------- reproducibility


def _git(args: list[str], cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _code_dir() -> str:
    main = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-m") else ""
    return os.path.dirname(os.path.abspath(main)) if main and os.path.exists(main) else os.getcwd()


def reproducibility_record(
    *, seed: int | None = None, config: Mapping[str, Any] | None = None, process_group: Any = None
) -> dict[str, Any]:
    """What it takes to rerun this job: seed, versions, code, command, world, config.

    Collective when torch.distributed is initialised: (all ranks) gathers every rank's
    hostname over the checkpoint group. The git commit is that of the repository holding
    the training script (``sys.argv[0]``), None outside one or without git; ``git_dirty``
    says whether it had uncommitted changes. ``config`` must be JSON.
    """
    from shardsave import __version__
    from shardsave.dist.comm import Comm, hostname

    if config is not None:
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UnsupportedValueError(
                f"config must hold JSON values only (dicts, lists, str, int, finite float, bool, None): {exc}"
            ) from exc
    comm = Comm(process_group)
    hosts = comm.all_gather(hostname(), "gather hostnames")
    code = _code_dir()
    commit = _git(["rev-parse", "HEAD"], code)
    status = _git(["status", "--porcelain", "--untracked-files=no"], code) if commit else None
    cuda = torch.version.cuda
    return {
        "seed": seed,
        "versions": {
            "shardsave": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cuda": cuda,
            "cudnn": torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None,
        },
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "code_dir": code,
        "command_line": list(sys.argv),
        "executable": sys.executable,
        "world_size": comm.world_size,
        "hostnames": sorted(set(hosts)),
        "config": _mutable(dict(config)) if config is not None else None,
    }


# --------------------------------------------------------------------------- TrainState


class TrainState:
    """One training job's resumable state (module docstring), in DCP's Stateful protocol.

    ``state_dict()`` layout (keys of the saved checkpoint)::

        model.<fqn>                 model state (DTensor shards under FSDP2)
        optimizer.state.<fqn>.*     optimizer state, keyed by parameter FQN
        optimizer.param_groups.*
        scheduler.*                 LR scheduler state (if any)
        progress.step, .epoch
        sampler.*                   data position (if a sampler was given)
        rng.*                       this rank's RNG states, ss.PerRank
        extra.*                     whatever ``extra`` returns (JSON / tensors)

    Constructing it is collective when torch.distributed is initialised (the
    reproducibility record gathers hostnames): (all ranks).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        sampler: Any = None,
        seed: int | None = None,
        config: Mapping[str, Any] | None = None,
        generators: Mapping[str, Any] | None = None,
        extra: Any = None,
        options: Any = None,
        process_group: Any = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sampler = sampler
        self.seed = seed
        self.generators = dict(generators or {})
        self.extra = extra
        """An object with state_dict()/load_state_dict(), for anything else worth saving."""
        self.options = options
        """``torch.distributed.checkpoint.state_dict.StateDictOptions`` (None: sharded defaults)."""
        self.process_group = process_group
        self.step = 0
        self.epoch = 0
        self.rng_restored = False
        """Whether the last load put back this rank's saved RNG states (False: reseeded)."""
        self._rng_missing = False
        self.record = reproducibility_record(seed=seed, config=config, process_group=process_group)

    # -- Stateful -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A fresh state dict of live tensors (the model's and optimizer's own, not copies)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        out: dict[str, Any] = {}
        if self.optimizer is not None:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
            out["model"] = model_sd
            out["optimizer"] = _mutable(optim_sd)
        else:
            out["model"] = get_model_state_dict(self.model, options=self.options)
        if self.scheduler is not None:
            out["scheduler"] = _mutable(self.scheduler.state_dict())
        out["progress"] = {"step": self.step, "epoch": self.epoch}
        if self.sampler is not None:
            out["sampler"] = _mutable(self.sampler.state_dict())
        if self.extra is not None:
            out["extra"] = _mutable(self.extra.state_dict())
        out[RNG_KEY] = PerRank(capture_rng(self.generators))
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Apply a loaded state dict (the one ``state_dict()`` gave, filled by ``ss.load``)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if self.optimizer is not None:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=self.options)
        else:
            set_model_state_dict(self.model, state["model"], options=self.options)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(copy.deepcopy(dict(state["scheduler"])))
        self.step = int(state["progress"]["step"])
        self.epoch = int(state["progress"]["epoch"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        if self.extra is not None:
            self.extra.load_state_dict(state["extra"])
        rng = state[RNG_KEY]
        rng = rng.value if isinstance(rng, PerRank) else rng
        if self._rng_missing:
            self._reseed()
        else:
            restore_rng(rng, self.generators)
            self.rng_restored = True
        self._rng_missing = False

    def checkpoint_metadata(self) -> dict[str, Any]:
        """Index metadata for CheckpointManager: the reproducibility record."""
        return {"reproducibility": self.record}

    def check_load_result(self, result: LoadResult) -> None:
        """Judge a non-strict load: only this rank's RNG states may be missing (an elastic resume)."""
        rng_prefix = RNG_KEY + "."
        fatal = LoadResult(
            missing=[k for k in result.missing if not k.startswith(rng_prefix)],
            unexpected=[k for k in result.unexpected if not k.startswith(rng_prefix)],
            mismatched=[k for k in result.mismatched if not k.startswith(rng_prefix)],
        )
        if fatal.missing or fatal.unexpected or fatal.mismatched:
            raise StateDictMismatchError(
                "the checkpoint does not match this TrainState: "
                f"missing {fatal.missing[:10]}, unexpected {fatal.unexpected[:10]}, "
                f"different {fatal.mismatched[:10]} (same model, optimizer and scheduler classes are needed)",
                missing=fatal.missing, unexpected=fatal.unexpected, mismatched=fatal.mismatched,
            )
        self._rng_missing = any(k.startswith(rng_prefix) for k in [*result.missing, *result.mismatched])

    # -- conveniences ---------------------------------------------------------------------

    def restore(self, manager: Any, step: int | None = None) -> int | None:
        """(all ranks) ``manager.restore(self, step)``: the step restored, or None (fresh start)."""
        restored: int | None = manager.restore(self, step)
        return restored

    def _reseed(self) -> None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = self.seed if self.seed is not None else 0
        warnings.warn(
            f"rank {rank}: the checkpoint holds no RNG state for this rank (saved on fewer ranks); "
            f"seeding python/numpy/torch from (seed={seed}, rank={rank}, step={self.step})",
            RuntimeWarning, stacklevel=3,
        )
        s = derived_seed(seed, rank, self.step)
        seed_everything(s)
        for i, g in enumerate(self.generators.values()):
            gs = derived_seed(s, i + 1, 0)
            if isinstance(g, torch.Generator):
                g.manual_seed(gs)
            elif isinstance(g, np.random.Generator):
                g.bit_generator.state = type(g.bit_generator)(gs).state
            else:
                g.seed(gs)
        self.rng_restored = False


def _mutable(obj: Any) -> Any:
    """Tuples -> lists and fresh dicts/lists all the way down (tensors shared), so that an
    in-place load can put values back into every container."""
    if isinstance(obj, dict):
        return {k: _mutable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mutable(v) for v in obj]
    return obj


def _plain_json(obj: Any) -> Any:
    """Loaded JSON containers back to plain dicts (numpy's bit generators check types)."""
    if isinstance(obj, Mapping):
        return {k: _plain_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain_json(v) for v in obj]
    return obj
