"""Smoke-run the codec micro-benchmark at tiny size (benchmarks are not timed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_microbench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "codecs.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "codecs" / "microbench.py"),
            "--tiny",
            "--grouping",
            "--checksum",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    rows = {(r["data"], r["codec"]): r for r in results["codecs"]}
    assert rows[("weights bf16", "auto")]["stored_as"] == ["zstd-shuffle/1"]
    assert rows[("random bytes", "auto")]["stored_as"] == ["raw/1"]
    assert rows[("weights bf16", "zstd-shuffle")]["ratio"] > rows[("weights bf16", "zstd")]["ratio"]
    assert all(r["correct"] for r in results["grouping"])
    assert {r["checksum"] for r in results["checksum"]} >= {"zlib.crc32"}
