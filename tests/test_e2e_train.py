"""End to end through torchrun: launch/train.py (tiny GPT, FSDP2, gloo) crashes, resumes, reshards.

Each torchrun launch costs seconds (python + torch start in every rank), so the checks share
launches, and independent launches run at the same time:

phase 1 (concurrently)
  A  1 node x 2 ranks, 12 steps, --async saves every 3 steps          (uninterrupted reference)
  B  2 "nodes" x 1 rank on localhost (c10d rendezvous, node rank by arrival), sync saves,
     crash (os._exit) right after step 7                               -> checkpoints 3, 6
phase 2 (concurrently, each on its own copy of B's checkpoints)
  B2 2 ranks relaunched: resumes from 6, trains to 12
  E3 3 ranks: resumes from 6 (saved on 2), dumps the restored state, trains step 7
  E1 1 rank:  the same

Checks: (a) B2's losses after the restored step equal A's bitwise; (b) E3/E1 restored model
and optimizer state equal B's step-6 checkpoint bitwise (full tensors) and their step-7 loss
is within 1e-3 relative of A's; (c) B saved on two nodes, E3/E1 restored on other rank
counts; B's losses equal A's bitwise too; (d) A's async checkpoints equal B's synchronous ones
bitwise, and A logged how long each save blocked. A second test sends SIGTERM (e).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from multirank import free_port

import shardsave as ss

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
LAUNCH_TIMEOUT = 300


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this host
    return env


def _torchrun(nproc: int, args: list[str], *, nodes: tuple[int, str] | None = None) -> list[str]:
    if nodes is None:
        launcher = ["--standalone"]  # port 0: torchrun picks a free one
    else:
        port, rdzv_id = nodes
        launcher = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                    f"--rdzv-id={rdzv_id}", "--local-addr=127.0.0.1"]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc-per-node={nproc}",
            "--monitor-interval=0.2", str(TRAIN), "--", *args]


class _Launch:
    """One torchrun process; its output goes to a file that a failure message quotes."""

    def __init__(self, name: str, cmd: list[str], out_dir: Path, *, pipe: bool = False) -> None:
        self.name = name
        self.out = out_dir / f"{name}.out"
        self._file = open(self.out, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if pipe else self._file, stderr=subprocess.STDOUT,
                                     env=_env(), text=True)

    def wait(self, timeout: float = LAUNCH_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name}: torchrun ran past {timeout} s\n{self.tail()}") from None
        finally:
            self._file.close()

    def tail(self, n: int = 60) -> str:
        lines = self.out.read_text(errors="replace").splitlines() if self.out.exists() else []
        return f"--- last lines of {self.out} ---\n" + "\n".join(lines[-n:])


def _run_all(launches: list[_Launch]) -> list[int]:
    try:
        return [launch.wait() for launch in launches]
    finally:
        for launch in launches:
            if launch.proc.poll() is None:
                launch.proc.kill()
                launch.proc.wait()


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _jsonl(path)}


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and obj and any(isinstance(v, (dict, list, torch.Tensor, np.ndarray)) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_leaves(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): obj}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return bool(a == b)


def _differences(a: dict[str, Any], b: dict[str, Any], prefixes: tuple[str, ...] | None = None) -> list[str]:
    la, lb = _leaves(a), _leaves(b)
    if prefixes is not None:
        la = {k: v for k, v in la.items() if k.startswith(prefixes)}
        lb = {k: v for k, v in lb.items() if k.startswith(prefixes)}
    diff = sorted(set(la) ^ set(lb))
    diff += [k for k in sorted(set(la) & set(lb)) if not _same(la[k], lb[k])]
    return diff


COMMON = ["--save-every", "3", "--keep-last", "10", "--print-every", "0"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_exact_and_elastic_resume_two_nodes_and_async(tmp_path: Path) -> None:
    a_ckpt, b_ckpt = tmp_path / "A", tmp_path / "B"
    # ---- phase 1: A (single node, async) and B (two nodes, sync, crash after step 7) at once
    port, rdzv = free_port(), f"e2e-{uuid.uuid4().hex[:8]}"
    a = _Launch("A", _torchrun(2, ["--ckpt-dir", str(a_ckpt), "--steps", "12", "--async", *COMMON,
                                   "--log", str(tmp_path / "A.log"), "--events", str(tmp_path / "A.ev")]), tmp_path)
    b_args = ["--ckpt-dir", str(b_ckpt), "--steps", "12", "--stop-after", "7", *COMMON,
              "--log", str(tmp_path / "B.log"), "--events", str(tmp_path / "B.ev")]
    nodes = [_Launch(f"B-node{i}", _torchrun(1, b_args, nodes=(port, rdzv)), tmp_path) for i in range(2)]
    codes = _run_all([a, *nodes])
    assert codes[0] == 0, a.tail()
    for node, code in zip(nodes, codes[1:]):
        assert code != 0, f"{node.name} should have crashed after step 7\n{node.tail()}"
    losses_a, losses_b = _losses(tmp_path / "A.log"), _losses(tmp_path / "B.log")
    assert sorted(losses_a) == list(range(1, 13)) and sorted(losses_b) == list(range(1, 8))
    # (c) two nodes compute what one node computes, bit for bit (2 ranks either way).
    assert all(losses_b[s] == losses_a[s] for s in losses_b), (losses_a, losses_b)
    mgr_b = ss.CheckpointManager(str(b_ckpt), keep_last=None)
    assert mgr_b.steps() == [3, 6], "the crash must leave exactly the committed checkpoints 3 and 6"
    assert mgr_b.info(6).metadata["reproducibility"]["world_size"] == 2
    assert len(mgr_b.info(6).metadata["reproducibility"]["hostnames"]) >= 1

    # (d) async checkpoints hold exactly what synchronous ones hold; blocked time was logged.
    mgr_a = ss.CheckpointManager(str(a_ckpt), keep_last=None)
    assert mgr_a.steps() == [3, 6, 9, 12]
    for step in (3, 6):
        diff = _differences(ss.load_full(mgr_a.path(step)), ss.load_full(mgr_b.path(step)))
        assert not diff, f"async vs sync checkpoint of step {step} differ in {diff[:10]}"
    ev_a = _jsonl(tmp_path / "A.ev")
    saves = {e["step"]: e for e in ev_a if e["event"] == "save"}
    done = {e["step"]: e for e in ev_a if e["event"] == "save_done"}
    assert sorted(saves) == sorted(done) == [3, 6, 9, 12]
    assert all(saves[s]["mode"] == "async" and 0 < saves[s]["blocked_s"] <= done[s]["total_s"] for s in saves)
    # Training went on while the saves were written: completion was seen at a later step.
    assert any(done[s]["at_step"] > s for s in (3, 6, 9)), ev_a

    # ---- phase 2: relaunch B on 2 ranks; resume copies of it on 3 and on 1 rank -- at once
    e3_ckpt, e1_ckpt = tmp_path / "E3", tmp_path / "E1"
    shutil.copytree(b_ckpt, e3_ckpt)
    shutil.copytree(b_ckpt, e1_ckpt)
    b2 = _Launch("B2", _torchrun(2, ["--ckpt-dir", str(b_ckpt), "--steps", "12", *COMMON,
                                     "--log", str(tmp_path / "B2.log"), "--events", str(tmp_path / "B2.ev")]),
                 tmp_path)
    elastic = {
        n: _Launch(f"E{n}", _torchrun(n, ["--ckpt-dir", str(ckpt), "--steps", "7", *COMMON,
                                          "--dump-restored", str(tmp_path / f"E{n}.dump"),
                                          "--log", str(tmp_path / f"E{n}.log"), "--events", str(tmp_path / f"E{n}.ev")]),
                   tmp_path)
        for n, ckpt in ((3, e3_ckpt), (1, e1_ckpt))
    }
    codes = _run_all([b2, *elastic.values()])
    for launch, code in zip([b2, *elastic.values()], codes):
        assert code == 0, launch.tail()

    # (a) exact resume: every loss after the restored step is bitwise the uninterrupted one.
    restore = next(e for e in _jsonl(tmp_path / "B2.ev") if e["event"] == "restore")
    assert restore["step"] == 6 and restore["world_size"] == 2 and restore["rng_restored"]
    losses_b2 = _losses(tmp_path / "B2.log")
    assert sorted(losses_b2) == list(range(7, 13))
    mismatched = {s: (losses_b2[s], losses_a[s]) for s in losses_b2 if losses_b2[s] != losses_a[s]}
    assert not mismatched, f"resumed losses differ from the uninterrupted run: {mismatched}"

    # (b) elastic resume: restored state equals the checkpoint bitwise; the optimisation goes on.
    saved = ss.load_full(mgr_b.path(6))
    for n in (3, 1):
        restore = next(e for e in _jsonl(tmp_path / f"E{n}.ev") if e["event"] == "restore")
        assert restore["step"] == 6 and restore["world_size"] == n
        dumped = ss.load_full(str(tmp_path / f"E{n}.dump"))
        diff = _differences(saved, dumped, ("model.", "optimizer.", "scheduler.", "progress.", "sampler."))
        assert not diff, f"state restored on {n} ranks differs from the checkpoint in {diff[:10]}"
        assert len([k for k in _leaves(saved) if k.startswith("model.")]) > 10
        first = _losses(tmp_path / f"E{n}.log")
        assert sorted(first) == [7]
        rel = abs(first[7] - losses_a[7]) / abs(losses_a[7])
        assert rel < 1e-3 and math.isfinite(first[7]), f"{n} ranks: step-7 loss {first[7]} vs {losses_a[7]}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_takes_a_final_checkpoint_and_a_relaunch_resumes(tmp_path: Path) -> None:
    ckpt = tmp_path / "P"
    args = ["--ckpt-dir", str(ckpt), "--save-every", "1000", "--print-every", "2", "--term-deadline", "20"]
    run = _Launch("P1", _torchrun(2, [*args, "--steps", "100000", "--events", str(tmp_path / "P1.ev")]),
                  tmp_path, pipe=True)
    seen: list[str] = []
    try:
        assert run.proc.stdout is not None
        for line in run.proc.stdout:  # blocks until rank 0 reports progress: no sleeping
            seen.append(line)
            if line.startswith("[train] step 4 "):
                break
        else:
            raise AssertionError("training never reached step 4:\n" + "".join(seen[-40:]))
        run.proc.send_signal(signal.SIGTERM)  # what Kubernetes does; torchrun forwards it to the workers
        rest, _ = run.proc.communicate(timeout=120)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        run._file.close()
    output = "".join(seen) + (rest or "")
    events = _jsonl(tmp_path / "P1.ev")
    final = next((e for e in events if e["event"] == "final_checkpoint"), None)
    assert final is not None, output[-4000:]
    step = final["step"]
    assert step >= 4 and final["committed"] and final["within_deadline"], final
    assert events[-1]["event"] == "exit" and events[-1]["reason"] == "preempted" and events[-1]["code"] == 0
    assert "exitcode" not in output, "a worker did not exit cleanly:\n" + output[-4000:]
    assert ss.CheckpointManager(str(ckpt)).steps() == [step]

    relaunch = _Launch("P2", _torchrun(2, [*args, "--steps", str(step + 2), "--log", str(tmp_path / "P2.log"),
                                           "--events", str(tmp_path / "P2.ev")]), tmp_path)
    assert _run_all([relaunch]) == [0], relaunch.tail()
    restore = next(e for e in _jsonl(tmp_path / "P2.ev") if e["event"] == "restore")
    assert restore["step"] == step
    assert sorted(_losses(tmp_path / "P2.log")) == [step + 1, step + 2]
