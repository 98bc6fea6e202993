"""shardsave benchmarks against DCP and torch.save: one command, every scenario.

    python -m benchmarks.run                       # everything, 1 GiB state, 2 ranks, fp32 + bf16
    python -m benchmarks.run --scenario sync_save load --reps 7
    python -m benchmarks.run --tiny                # seconds; what the smoke test runs
    python -m benchmarks.run --storage /mnt/nvme/bench --size-gb 4 --world-size 4

Prints one table per scenario and the targets of issue 3, and writes results.json,
results.md and results.png to ``--out``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

SCENARIOS = ["sync_save", "async_save", "load", "throttled", "codecs", "planning", "memory"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--size-gb", type=float, default=1.0,
                   help="logical size of the whole state in GiB (weights + AdamW moments, all ranks); "
                        "default %(default)s")
    p.add_argument("--world-size", type=int, default=2, help="ranks to launch (default %(default)s)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"],
                   help="state dtype(s); sync_save and throttled run each, the others the first "
                        "(default: fp32 bf16)")
    p.add_argument("--scenario", nargs="+", default=None, choices=[*SCENARIOS, "all"],
                   help="scenarios to run (default: all)")
    p.add_argument("--storage", default=None,
                   help="root URL or directory the checkpoints go to (default: a fresh directory under "
                        "the system temp dir); every save writes a fresh sub-directory, removed after")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option for --storage (repeatable)")
    p.add_argument("--reps", type=int, default=5, help="warm repetitions per engine, after one cold "
                                                       "run (default %(default)s)")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default %(default)s)")
    p.add_argument("--tiny", action="store_true", help="tiny state and few reps: a smoke run in seconds")
    p.add_argument("--throttle-mb", type=float, default=200.0,
                   help="throttled scenario: MB/s per node, shared by all ranks (default %(default)s)")
    p.add_argument("--cache-dir", default=None, help="where the trained model state is cached "
                                                     "(default ~/.cache/shardsave-bench)")
    p.add_argument("--ab", action="append", default=[], metavar="KNOB=VALUE[,KNOB=VALUE]",
                   help="sync_save: also run shardsave under these knobs (e.g. EARLY_WRITEBACK=0), interleaved with the "
                        "rest: before/after figures from one run (repeatable)")
    p.add_argument("--train-steps", type=int, default=40, help="AdamW steps of the benchmark model")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import report
    from benchmarks.common.config import GIB, RunConfig, machine
    from benchmarks.common.data import default_cache_dir

    scenarios = SCENARIOS if not args.scenario or "all" in args.scenario else args.scenario
    own_storage = args.storage is None
    storage = args.storage or tempfile.mkdtemp(prefix="shardsave-bench-")
    opts: dict[str, Any] = {}
    for kv in args.storage_option:
        k, _, v = kv.partition("=")
        opts[k] = v
    tiny = args.tiny
    cfg = RunConfig(
        size_bytes=int((0.004 if tiny and args.size_gb == 1.0 else args.size_gb) * GIB),
        world_size=args.world_size,
        dtypes=tuple(args.dtype),
        reps=min(args.reps, 1) if tiny else args.reps,
        storage=storage,
        storage_options=opts,
        cache_dir=str(Path(args.cache_dir) if args.cache_dir else default_cache_dir()),
        tiny=tiny,
        run_id=uuid.uuid4().hex[:8],
        throttle_rate=args.throttle_mb * 1e6,
        train_steps=args.train_steps,
        ab=tuple(args.ab),
    )
    header = {
        "machine": machine(),
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {**cfg.__dict__, "storage_options": sorted(opts)},
    }
    print(f"{header['machine']}\nstate {cfg.size_bytes / GIB:.3f} GiB, {cfg.world_size} ranks, "
          f"dtypes {','.join(cfg.dtypes)}, {cfg.reps} warm reps, storage {storage}", flush=True)
    results = []
    try:
        for name in scenarios:
            mod = importlib.import_module(f"benchmarks.{name}.scenario")
            t0 = time.perf_counter()
            print(f"\n== {name} ==", flush=True)
            res = mod.run(cfg)
            print(f"-- {name}: {time.perf_counter() - t0:.0f} s\n{report.markdown_table(res.rows, res.columns)}",
                  flush=True)
            results.append(res)
    finally:
        if own_storage:
            import shutil

            shutil.rmtree(storage, ignore_errors=True)
    js, md, png = report.write(results, Path(args.out), header)
    checks = [c for r in results for c in r.checks]
    if checks:
        print("\n== targets (issue 3 item 3) ==\n" + report.checks_table(checks))
    print(f"\nwrote {js}, {md}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
