"""Write the golden checkpoints under tests/golden/v<MAJOR>_<MINOR>/ (run once per format version).

    python scripts/make_golden.py            # refuses to overwrite an existing version
    python scripts/make_golden.py --force    # only while that version is unreleased

Each format version keeps its folder forever: tests/test_golden.py must load every one of
them bitwise, so format drift fails CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "golden"))

import golden_state as gs  # noqa: E402

import shardsave as ss  # noqa: E402
from shardsave import knobs  # noqa: E402
from shardsave.format.index import FORMAT_VERSION  # noqa: E402


def _sharded_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    state: dict = {"model": {}}
    for name, full in gs.sharded_full_tensors().items():
        dim = 1 if name == "w_col" else 0
        local = list(torch.chunk(full, world, dim=dim))[rank].contiguous()
        state["model"][name] = DTensor.from_local(local, mesh, [Shard(dim)], run_check=False,
                                                  shape=full.shape, stride=full.stride())
    state["replicated"] = gs.pattern(torch.float16, (6, 2), 42)
    state["per_rank"] = ss.PerRank(gs.per_rank_value(rank))
    state["step"] = 99
    with knobs.override(CHUNK_BYTES=32):
        ss.save(state, out, metadata={"golden": True})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    root = os.path.join(HERE, "..", "tests", "golden", f"v{FORMAT_VERSION[0]}_{FORMAT_VERSION[1]}")
    if os.path.exists(root):
        if not args.force:
            raise SystemExit(f"{root} exists; golden checkpoints of a released version never change")
        shutil.rmtree(root)
    os.makedirs(root)
    for codec in ("auto", "raw", "zstd", "zstd-shuffle"):
        with knobs.override(CHUNK_BYTES=256):
            ss.save(gs.single_process_state(), os.path.join(root, f"single-{codec}"), codec=codec)
    # Encryption (1.1 on): AES-256-GCM chunks, MACed TOCs and index, under a fixed test key.
    with knobs.override(CHUNK_BYTES=256):
        ss.save(gs.single_process_state(), os.path.join(root, "encrypted-auto"), encryption_key=gs.GOLDEN_KEY)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sharded_worker, args=(2, os.path.join(tmp, "rdzv"), os.path.join(root, "sharded-2ranks")),
                 nprocs=2)
    print(f"wrote {root}")


if __name__ == "__main__":
    main()
