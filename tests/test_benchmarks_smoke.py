"""Smoke runs of every benchmark scenario at tiny size: they run end to end and report.

No timing is asserted (benchmarks are not timed tests): each scenario must produce rows,
target checks, a JSON/Markdown report and (where it plots) a PNG. The trained model is a
width-64 GPT trained for 5 steps into a per-session cache; each scenario spawns its ranks
once (two, four for the load cases).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")
# The benchmarks package lives at the repository root, next to tests/.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.common import report  # noqa: E402
from benchmarks.common.config import RunConfig  # noqa: E402
from benchmarks.common.launch import reuse_ranks  # noqa: E402


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunConfig]:
    root = tmp_path_factory.mktemp("bench")
    c = RunConfig(size_bytes=1 << 20, world_size=2, dtypes=("fp32",), reps=0, storage=str(root / "storage"),
                  cache_dir=str(root / "cache"), tiny=True, run_id="smoke", throttle_rate=50e6)
    c.spec().full()  # train the tiny model once for every scenario of this module
    # Start each world size once for the whole module: spawning ranks and importing torch
    # costs more than a tiny scenario.
    with reuse_ranks():
        yield c


def _run(name: str, cfg: RunConfig, out: Path) -> Any:
    mod = importlib.import_module(f"benchmarks.{name}.scenario")
    res = mod.run(cfg)
    assert res.rows, f"{name} produced no rows"
    assert res.checks, f"{name} checks no target"
    js, md, png = report.write([res], out, {"machine": "test", "command": "pytest"})
    data = json.loads(js.read_text())
    assert name in data["scenarios"]
    assert md.read_text().count("|") > 10
    if res.extra.get("plot"):
        assert png is not None and png.stat().st_size > 1000
    return res


@pytest.mark.timeout(60)
def test_sync_save(cfg: RunConfig, tmp_path: Path) -> None:
    res = _run("sync_save", cfg, tmp_path)
    engines = {r["engine"] for r in res.rows}
    assert {"shardsave", "shardsave[raw]", "dcp", "torch.save"} <= engines
    assert all(r["MiB stored"] for r in res.rows)


@pytest.mark.timeout(60)
def test_async_save(cfg: RunConfig, tmp_path: Path) -> None:
    res = _run("async_save", cfg, tmp_path)
    assert {"shardsave", "dcp"} <= {r["engine"] for r in res.rows}


@pytest.mark.timeout(90)
def test_load_same_layout_and_resharded(cfg: RunConfig, tmp_path: Path) -> None:
    res = _run("load", cfg, tmp_path)
    assert len({r["case"] for r in res.rows}) == 4
    assert all(r["bitwise ok"] == "yes" for r in res.rows), res.rows


@pytest.mark.timeout(60)
def test_throttled(cfg: RunConfig, tmp_path: Path) -> None:
    res = _run("throttled", cfg, tmp_path)
    assert {"shardsave", "dcp", "torch.save"} <= {r["engine"] for r in res.rows}


@pytest.mark.timeout(60)
def test_codecs(cfg: RunConfig, tmp_path: Path) -> None:
    res = _run("codecs", cfg, tmp_path)
    ours = [r for r in res.rows if r["codec"] == "shardsave (auto)"]
    assert len(ours) == 6 and all(r["round trip"] == "ok" for r in ours)


@pytest.mark.timeout(60)
def test_planning(cfg: RunConfig, tmp_path: Path) -> None:
    res = _run("planning", cfg, tmp_path)
    assert all(c.met for c in res.checks), res.checks


@pytest.mark.timeout(60)
def test_memory(cfg: RunConfig, tmp_path: Path) -> None:
    res = _run("memory", cfg, tmp_path)
    assert {("sync", "shardsave"), ("async", "dcp")} <= {(r["mode"], r["engine"]) for r in res.rows}


def test_cli_parses_every_documented_option() -> None:
    from benchmarks.run import parse

    a = parse(["--size-gb", "2", "--world-size", "4", "--dtype", "bf16", "--scenario", "sync_save", "load",
               "--storage", "/tmp/x", "--reps", "7", "--out", "o", "--tiny", "--ab", "EARLY_WRITEBACK=0"])
    assert (a.size_gb, a.world_size, a.dtype, a.scenario, a.reps, a.tiny) == (2.0, 4, ["bf16"],
                                                                            ["sync_save", "load"], 7, True)
