"""A two-minute tour of shardsave under torchrun (the README's main job).

    torchrun --standalone --nproc-per-node 2 launch/demo.py [--dir DIR]

Builds a sharded model state (DTensor ``Shard(0)`` weights, a replicated config, per-rank
RNG states), saves it from every rank in parallel, verifies it, reloads it resharded onto
``Shard(1)``, and reads it back into one process as plain tensors -- checking every value
bitwise and printing what happened and how long each step took.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import shardsave as ss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "shardsave-demo"),
                        help="checkpoint root (default: %(default)s)")
    parser.add_argument("--mb", type=int, default=64, help="approximate state size in MiB")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    rows = max(world, int(args.mb * 2**20 / 4 / 4096 / 4))
    full = {f"layer{i}.weight": torch.randn(rows, 4096) for i in range(4)}
    full["layer0.weight"] = full["layer0.weight"].to(torch.bfloat16)
    state = {
        "model": {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()},
        "step": 100,
        "config": {"lr": 3e-4, "name": "demo"},
        "rng": ss.PerRank(torch.get_rng_state()),
    }
    path = os.path.join(args.dir, "step-100")

    t0 = time.perf_counter()
    info = ss.save(state, path, overwrite=True)
    t_save = time.perf_counter() - t0

    report = ss.verify(path) if rank == 0 else None

    target = {
        "model": {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(1)]) for k, v in full.items()},
        "step": 0,
        "config": {"lr": 0.0, "name": ""},
        "rng": ss.PerRank(torch.zeros_like(torch.get_rng_state())),
    }
    t0 = time.perf_counter()
    ss.load(target, path)
    t_load = time.perf_counter() - t0
    ok = all(torch.equal(target["model"][k].full_tensor(), v) for k, v in full.items())
    ok = ok and target["step"] == 100 and torch.equal(target["rng"].value, torch.get_rng_state())

    if rank == 0:
        t0 = time.perf_counter()
        plain = ss.load_full(path, keys=["model"])
        t_full = time.perf_counter() - t0
        ok = ok and all(torch.equal(plain["model"][k], v) for k, v in full.items())
        gb = info.raw_bytes / 1e9
        print(f"saved {len(info.entries)} keys, {gb:.3f} GB logical on {world} ranks in {t_save:.2f} s "
              f"({gb / t_save:.2f} GB/s); {info.stored_bytes / 1e9:.3f} GB on storage "
              f"({info.raw_bytes / max(1, info.stored_bytes):.2f}x smaller)")
        print(f"verify: {'ok' if report else 'FAILED'} ({report.chunks_checked if report else 0} chunks)")
        print(f"resharded load Shard(0) -> Shard(1): {t_load:.2f} s; load_full in one process: {t_full:.2f} s")
        print(f"every value bitwise equal: {ok}")
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
