"""The shardsave demo: train, checkpoint, crash, resume on a different number of ranks.

    python -m launch.demo            (from the repository root, after `pip install -e .`)

Runs ``launch/train.py`` (a tiny GPT sharded with FSDP2, gloo on CPU) through torchrun
twice, on local disk under ``--dir`` (default: a fresh temporary directory):

1. 2 ranks, async checkpoints every 10 steps, and a crash (``os._exit``) right after
   step 27 -- no cleanup, no goodbye;
2. 1 rank: resumes by itself from the newest committed checkpoint (step 20), resharded
   from 2 ranks to 1, and trains to step 40.

Then it prints what happened: which checkpoints exist, where the job resumed, how long
each save blocked training versus how long it took in the background, and how close the
resumed losses come to the ones the crashed run had computed for the same steps (the
global batch does not depend on the rank count, so they agree up to float rounding).
Exit status 0 when everything behaved as described.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TRAIN = Path(__file__).resolve().with_name("train.py")
REPO = TRAIN.parent.parent
CRASH_EXIT_CODE = 17  # launch/train.py's --stop-after exit status


def _torchrun(nproc: int, train_args: list[str], out: Path) -> tuple[int, float]:
    """Run train.py under torchrun; echo its ``[train]`` lines, keep the rest in ``out``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(TRAIN), "--", *train_args]
    start = time.perf_counter()
    with open(out, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                 text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[train]"):
                print(f"    {line.rstrip()}", flush=True)
        code = proc.wait()
    return code, time.perf_counter() - start


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _saves(events: list[dict[str, Any]]) -> list[str]:
    done = {e["step"]: e["total_s"] for e in events if e["event"] == "save_done"}
    out = []
    for i, e in enumerate(x for x in events if x["event"] == "save"):
        total = done.get(e["step"])
        total_text = f"{total * 1000:6.0f} ms until committed" if total is not None else "never finished"
        note = "  (first save of a process: buffers allocated, setup)" if i == 0 else ""
        out.append(f"step {e['step']:>3}: blocked training {e['blocked_s'] * 1000:6.1f} ms, {total_text}{note}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where checkpoints and logs go (default: a new temporary directory)")
    args = parser.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="shardsave-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ckpt, losses1, losses2 = root / "checkpoints", root / "loss-1.jsonl", root / "loss-2.jsonl"
    events1, events2 = root / "events-1.jsonl", root / "events-2.jsonl"
    common = ["--ckpt-dir", str(ckpt), "--steps", "40", "--save-every", "10", "--async", "--print-every", "5"]
    problems: list[str] = []

    print(f"shardsave demo in {root}\n")
    print("1) 2 ranks, async checkpoints every 10 steps, crash right after step 27")
    code1, t1 = _torchrun(2, [*common, "--stop-after", "27", "--log", str(losses1), "--events", str(events1)],
                          root / "torchrun-1.log")
    if code1 == 0:
        problems.append("the first run should have crashed but exited 0")
    print(f"    -> torchrun exited with status {code1} after {t1:.1f} s (the crash)\n")

    import shardsave as ss

    mgr = ss.CheckpointManager(str(ckpt), keep_last=None)
    committed = mgr.steps()
    print(f"   committed checkpoints after the crash: {committed}; the step-27 state is lost, as it should be\n")

    print("2) relaunch on 1 rank: resume from the newest committed checkpoint, train to step 40")
    code2, t2 = _torchrun(1, [*common, "--log", str(losses2), "--events", str(events2)], root / "torchrun-2.log")
    print(f"    -> torchrun exited with status {code2} after {t2:.1f} s\n")
    if code2 != 0:
        problems.append(f"the resumed run failed (status {code2}); see {root / 'torchrun-2.log'}")

    ev1, ev2 = _read_jsonl(events1), _read_jsonl(events2)
    restored = next((e for e in ev2 if e["event"] == "restore"), None)
    first = {r["step"]: r["loss"] for r in _read_jsonl(losses1)}
    second = {r["step"]: r["loss"] for r in _read_jsonl(losses2)}
    overlap = sorted(set(first) & set(second))
    rel = max((abs(first[s] - second[s]) / abs(first[s]) for s in overlap), default=float("nan"))

    print("what happened")
    print(f"  run 1: steps 1-{max(first, default=0)} on 2 ranks, then the crash (exit status {code1})")
    if restored is None:
        problems.append("the second run did not restore a checkpoint")
    else:
        print(f"  run 2: restored step {restored['step']} saved by 2 ranks onto 1 rank in {restored['seconds']:.2f} s, "
              f"then trained steps {restored['step'] + 1}-{max(second, default=0)}")
        if committed and restored["step"] != committed[-1]:
            problems.append(f"restored step {restored['step']}, expected the newest committed {committed[-1]}")
    if overlap:
        print(f"  steps {overlap[0]}-{overlap[-1]} ran twice (2 ranks, then 1 rank): losses agree to {rel:.1e} "
              "relative (same global batch, different rank count)")
        if not rel < 1e-3:
            problems.append(f"resumed losses differ by {rel:.1e} relative (expected < 1e-3)")
    print(f"  loss: {first.get(1, float('nan')):.3f} at step 1 -> {second.get(40, float('nan')):.3f} at step 40")
    print(f"  checkpoints kept (keep_last=3): {mgr.steps()}")
    print("  saves (async: training blocks only while the state is copied to host memory):")
    for line in _saves(ev1) + _saves(ev2):
        print(f"    {line}")
    print(f"\n  logs and checkpoints: {root}")
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    print("\nok: crashed, resumed on a different rank count, and continued the same optimisation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
