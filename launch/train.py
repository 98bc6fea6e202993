"""A small but real training job: a tiny GPT on a synthetic token stream, sharded with FSDP2.

    torchrun --standalone --nproc-per-node 2 launch/train.py -- --ckpt-dir /tmp/run --steps 40 --log /tmp/run.log

(The ``--`` keeps torchrun's own parser away from the job's options: it would read ``--log``
as an ambiguous abbreviation of its ``--log-dir``.)

It checkpoints through ``ss.CheckpointManager`` and resumes by itself from the newest
committed checkpoint in ``--ckpt-dir`` -- on any number of ranks. What makes a resume exact:

* The data: sequences of a fixed synthetic "language" (a noisy affine Markov chain over the
  vocabulary, learnable), visited by a ``ResumableBatchSampler`` whose position is saved.
* The global batch does not depend on the world size: each rank takes its contiguous share
  of the same global batch and scales its loss by ``world_size / global_tokens``, so that
  FSDP's averaging reduce-scatter yields the gradient of the global mean loss on any rank
  count (equal up to float rounding; bitwise on the same rank count).
* Model, optimizer (AdamW), LR schedule, progress, data position and RNG states are saved
  by ``ss.state.TrainState``.

Crash and preemption: ``--stop-after N`` leaves with ``os._exit`` right after step N (after
that step's save was started, before anything else: no cleanup, like a crash); SIGTERM
makes every rank stop after the same step, take a final checkpoint within
``--term-deadline`` seconds and exit with status 0.

Outputs: ``--log FILE`` gets one JSON line per step, ``{"step": s, "loss": x}`` (steps from
1); ``--events FILE`` gets rank 0's JSON lines about restores, saves (time blocked, total
time), preemption and exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import shardsave as ss
from shardsave.manager import PreemptionGuard
from shardsave.state import ResumableBatchSampler, TrainState, derived_seed, seed_everything

CRASH_EXIT_CODE = 17
"""Exit status of ``--stop-after`` (non-zero, like a crash)."""


# --------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + F.dropout(self.mlp(self.ln2(x)), self.dropout, self.training)


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, seq: int, dim: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def synthetic_corpus(n: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    """``n`` sequences of ``seq + 1`` tokens: x[t+1] = (a * x[t] + b + noise) mod vocab."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, seq + 1, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    noise = torch.randint(0, 3, (n, seq), generator=g)
    for t in range(seq):
        out[:, t + 1] = (5 * out[:, t] + 3 + noise[:, t]) % vocab
    return out


# --------------------------------------------------------------------------- job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", required=True, help="checkpoint root (any fsspec URL); resumes from it")
    p.add_argument("--steps", type=int, default=40, help="total optimizer steps (default %(default)s)")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (default %(default)s)")
    p.add_argument("--keep-last", type=int, default=3, help="checkpoints kept by recency (default %(default)s)")
    p.add_argument("--async", dest="async_save", action="store_true", help="save in the background")
    p.add_argument("--log", help="JSON lines, one per step: {\"step\": s, \"loss\": x}")
    p.add_argument("--events", help="JSON lines about restores, saves, preemption and exit (rank 0)")
    p.add_argument("--stop-after", type=int, help=f"os._exit({CRASH_EXIT_CODE}) right after step N (a crash)")
    p.add_argument("--term-deadline", type=float, default=20.0,
                   help="seconds from SIGTERM by which the final checkpoint must be committed (default %(default)s; "
                        "torchrun kills workers 30 s after forwarding SIGTERM)")
    p.add_argument("--print-every", type=int, default=10, help="rank 0 prints the loss every N steps (0: never)")
    p.add_argument("--dump-restored", help="after restoring, also save the restored state here (for tests)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--global-batch", type=int, default=12, help="sequences per step, over all ranks")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--samples", type=int, default=240, help="sequences in the synthetic dataset")
    # torchrun's own parser reads "--log" as an ambiguous abbreviation of its --log-dir, so
    # launch scripts put "--" between the script and its options; it may reach us.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--"]
    return p.parse_args(argv)


class Events:
    """Rank 0's JSON-lines event log (and a one-line echo on stdout)."""

    def __init__(self, path: str | None, rank: int) -> None:
        self.path = path if rank == 0 else None
        self.rank = rank

    def __call__(self, event: str, **fields: Any) -> None:
        if self.rank != 0:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        print(f"[train] {event}: " + ", ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


def setup() -> tuple[int, int, torch.device]:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
        # Same thread count on every run: CPU kernels are deterministic for a given count.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, device = setup()
    events = Events(args.events, rank)
    if world > args.global_batch:
        raise SystemExit(f"--global-batch {args.global_batch} must be >= the world size {world}")

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    seed_everything(args.seed)  # identical full init on every rank; fully_shard keeps each rank's shard
    model = TinyGPT(args.vocab, args.seq, args.dim, args.heads, args.layers, args.dropout).to(device)
    seed_everything(derived_seed(args.seed, rank, 0))  # rank-local randomness (dropout) from here on
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = 5
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warmup))
    corpus = synthetic_corpus(args.samples, args.seq, args.vocab, args.seed).to(device)
    sampler = ResumableBatchSampler(args.samples, args.global_batch, seed=args.seed)
    config = {k: v for k, v in vars(args).items() if k not in ("log", "events", "dump_restored")}
    ts = TrainState(model, optim, sched, sampler=sampler, seed=args.seed, config=config)
    mgr = ss.CheckpointManager(args.ckpt_dir, keep_last=args.keep_last, save_every=args.save_every,
                               async_save=args.async_save)

    t0 = time.perf_counter()
    start = ts.restore(mgr) or 0
    if start:
        events("restore", step=start, world_size=world, seconds=round(time.perf_counter() - t0, 3),
               rng_restored=ts.rng_restored)
    else:
        events("start", world_size=world)
    removed = mgr.gc()  # (coordinator) directories of saves a crash interrupted
    if removed:
        events("gc", removed_steps=removed)
    if args.dump_restored:
        ss.save(ts.state_dict(), args.dump_restored, overwrite=True)

    guard = PreemptionGuard(deadline_s=args.term_deadline).install()
    log = open(args.log, "a") if args.log and rank == 0 else None  # noqa: SIM115 - closed at exit
    saved_step = start if start else None
    pending: list[tuple[int, float, Any]] = []  # (step, seconds blocked, handle) of async saves
    global_tokens = args.global_batch * args.seq

    def report_finished(block: bool, at_step: int) -> None:
        for item in list(pending):
            step_, blocked, handle = item
            if block or handle.done():
                handle.wait()
                # From the save() call (TrainState.state_dict() included) to the commit.
                total = blocked + (handle.total_s - handle.stall_s)
                events("save_done", step=step_, total_s=round(total, 4), at_step=at_step)
                pending.remove(item)

    def checkpoint(step: int, loss: float, force: bool = False) -> None:
        nonlocal saved_step
        ts.step = step
        t = time.perf_counter()
        out = mgr.save(step, ts, metrics={"loss": loss}, force=force)
        if out is None:
            return
        blocked = time.perf_counter() - t
        saved_step = step
        if isinstance(out, ss.AsyncSaveHandle):
            events("save", step=step, mode="async", blocked_s=round(blocked, 4),
                   staging_s=round(out.staging.seconds, 4))
            pending.append((step, blocked, out))
        else:
            events("save", step=step, mode="sync", blocked_s=round(blocked, 4), total_s=round(blocked, 4))

    loss_value = math.nan
    for step in range(start + 1, args.steps + 1):
        batch = sampler.next_batch()
        mine = ResumableBatchSampler.local_slice(batch, rank, world)
        data = corpus[mine]
        logits = model(data[:, :-1])
        loss_sum = F.cross_entropy(logits.reshape(-1, args.vocab), data[:, 1:].reshape(-1), reduction="sum")
        # FSDP averages gradients over ranks: scale so the result is d(global mean)/dparam.
        (loss_sum * (world / global_tokens)).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        sched.step()
        total = loss_sum.detach().reshape(1).clone()
        dist.all_reduce(total)  # (all ranks, training group) the logged loss is the global mean
        loss_value = total.item() / global_tokens
        if log is not None:
            log.write(json.dumps({"step": step, "loss": loss_value}) + "\n")
            log.flush()
        if rank == 0 and args.print_every and step % args.print_every == 0:
            print(f"[train] step {step} loss {loss_value:.4f}", flush=True)
        checkpoint(step, loss_value)
        report_finished(block=False, at_step=step)
        if args.stop_after is not None and step == args.stop_after:
            if log is not None:
                log.flush()
            os._exit(CRASH_EXIT_CODE)  # a crash: no cleanup, no waiting for saves in flight
        if guard.agreed():  # (all ranks) stop together after the same step
            events("preempted", step=step, signal=guard.signum if guard.requested else None)
            if saved_step != step and guard.remaining_s() > 0:
                checkpoint(step, loss_value, force=True)
            report_finished(block=True, at_step=step)
            mgr.wait()
            since = (time.monotonic() - guard.signal_time) if guard.signal_time is not None else None
            events("final_checkpoint", step=step, committed=step in mgr.steps(),
                   since_signal_s=round(since, 3) if since is not None else None,
                   deadline_s=args.term_deadline,
                   within_deadline=since is not None and since <= args.term_deadline)
            return finish(log, events, "preempted", step)
    if saved_step != args.steps and args.steps > start:
        checkpoint(args.steps, loss_value, force=True)
    report_finished(block=True, at_step=args.steps)
    mgr.wait()
    return finish(log, events, "completed", args.steps)


def finish(log: Any, events: Events, reason: str, step: int) -> int:
    if log is not None:
        log.close()
    events("exit", reason=reason, step=step, code=0)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Every save has been waited for and the process group destroyed: skip the interpreter
    # teardown, which with torch loaded costs seconds per rank and does nothing we need.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
