"""What encryption at rest costs: AES-256-GCM alone, and save / load_full with and without a key.

    python scripts/bench_encryption.py [--mib 512] [--dir /dev/shm] [--repeat 3]

Writes to ``--dir`` (tmpfs by default, so the disk does not hide the CPU cost) and prints
one table: GB/s of raw logical bytes, best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import tempfile
import time

import numpy as np
import torch

import shardsave as ss
from shardsave.crypto import SaveCipher


def _gcm(nbytes: int, threads: int, repeat: int) -> float:
    cipher = SaveCipher(os.urandom(32), "20260101T000000-00000000", bytes(16))
    chunk = np.frombuffer(os.urandom(16 << 20), dtype=np.uint8)
    n = max(1, nbytes // chunk.nbytes)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: cipher.encrypt_chunk(chunk, entry=0, chunk=i, piece=0, raw_length=chunk.nbytes,
                                                         codec=0), range(n)))
        best = min(best, time.perf_counter() - t)
    return n * chunk.nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    nbytes = args.mib << 20
    g = torch.Generator().manual_seed(0)
    # Trained-weight-like bf16 (compressible exponents) and random fp32 (incompressible).
    states = {
        "bf16 weights": {f"w{i}": (torch.randn(nbytes // 16 // 2, generator=g) * 0.02).bfloat16() for i in range(8)},
        "fp32 random": {f"w{i}": torch.rand(nbytes // 16 // 4, generator=g) for i in range(4)},
    }
    print("| what | plain GB/s | encrypted GB/s | overhead |\n| --- | --- | --- | --- |")
    for threads in (1, 2):
        print(f"| AES-256-GCM encrypt, {threads} thread(s) | - | {_gcm(nbytes, threads, args.repeat):.2f} | - |")
    key = os.urandom(32)
    root = tempfile.mkdtemp(dir=args.dir, prefix="shardsave-bench-enc-")
    try:
        for name, state in states.items():
            raw = sum(t.numel() * t.element_size() for t in state.values())
            for codec in ("raw", "auto"):
                rates: dict[str, list[float]] = {}
                for label, k in (("plain", None), ("enc", key)):
                    save_best = load_best = float("inf")
                    for r in range(args.repeat):
                        path = os.path.join(root, f"{label}-{codec}-{r}")
                        t = time.perf_counter()
                        ss.save(state, path, codec=codec, encryption_key=k)
                        save_best = min(save_best, time.perf_counter() - t)
                        t = time.perf_counter()
                        ss.load_full(path, encryption_key=k)
                        load_best = min(load_best, time.perf_counter() - t)
                        shutil.rmtree(path)
                    rates[label] = [raw / save_best / 1e9, raw / load_best / 1e9]
                for i, op in enumerate(("save", "load_full")):
                    p, e = rates["plain"][i], rates["enc"][i]
                    print(f"| {op}, {name}, codec={codec} | {p:.2f} | {e:.2f} | {100 * (p / e - 1):+.0f}% time |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
