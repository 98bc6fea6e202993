"""Bandwidth-limited storage (issue 3, scenario d): where fewer bytes pay off.

Every engine writes through the same fsspec wrapper (benchmarks/common/throttle.py): local
files behind ONE token bucket shared by all ranks of the node, ``--throttle-mb`` MB/s
(default 200) -- a shared filesystem or object store seen from one node. shardsave takes
its generic fsspec path (as on S3), DCP its ``FsspecWriter`` with the same storage options,
torch.save ``fsspec.open``. Files are fsynced when closed. One run per dtype.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.common import throttle
from benchmarks.common.config import RunConfig
from benchmarks.common.engines import is_local, local_path
from benchmarks.common.report import ScenarioResult, check
from benchmarks.common.saveloop import run_saves
from benchmarks.sync_save.scenario import COLUMNS, _row, summarize

ENGINES = ["shardsave", "dcp", "torch.save"]


def run(cfg: RunConfig) -> ScenarioResult:
    if not is_local(cfg.storage) or cfg.storage_options:
        return ScenarioResult("throttled", [], [check("throttled save", None, ">=", 1.0,
                                                      "skipped: --storage is not a local directory")], [], COLUMNS)
    root = os.path.abspath(local_path(cfg.storage))
    os.makedirs(os.path.join(root, cfg.run_id), exist_ok=True)
    bucket = os.path.join(root, cfg.run_id, "node.bucket")
    opts = throttle.options(bucket, cfg.throttle_rate)
    tcfg = cfg.with_(storage=f"{throttle.PROTOCOL}://{root}", storage_options=opts)
    records: list[dict[str, Any]] = []
    for dtype in cfg.dtypes:
        print(f"[throttled] {dtype}, {cfg.throttle_rate / 1e6:.0f} MB/s per node", flush=True)
        records += run_saves(tcfg, tcfg.spec(dtype), ENGINES, opts, "throttled")
    rows, plot = summarize("throttled", records)
    plot["title"] = f"throttled storage ({cfg.throttle_rate / 1e6:.0f} MB/s per node): logical GB/s"
    checks = []
    for dtype in cfg.dtypes:
        bound = {"bf16": 1.35, "fp32": 1.12}.get(dtype)
        if bound:
            r = _row(rows, dtype, "shardsave")
            checks.append(check(f"throttled save {dtype}, speed x DCP", r and r["speed x DCP"], ">=", bound))
    return ScenarioResult("throttled", rows, checks, records, COLUMNS, {"plot": plot})
