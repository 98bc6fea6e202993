"""Codec micro-benchmark: ratio and single-core speed of each codec on realistic tensors.

Random normal numbers compress differently from trained weights (their exponents spread
differently), so the data comes from a real, if small, training run: an MLP trained with
Adam for a few hundred steps on a synthetic teacher-student task. We measure its weights
(fp32 and cast to bf16) and Adam's ``exp_avg`` / ``exp_avg_sq``, plus int64 indices and random
bytes (which ``auto`` must store raw).

    python benchmarks/codecs/microbench.py            # ~15-30 s on 2 cores
    python benchmarks/codecs/microbench.py --tiny     # a few seconds (what the tests run)
    python benchmarks/codecs/microbench.py --grouping --checksum   # the design measurements
    python benchmarks/codecs/microbench.py --json results.json

Speeds are GB/s of raw (uncompressed) bytes on one thread, best of ``--repeat`` runs; decode
writes into a reused buffer. By default time is this thread's CPU time, so that work of other
processes on a shared machine does not show up as codec slowness (``--wall`` for wall time);
candidates are run round-robin. Compare codecs within one run.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shardsave import knobs
from shardsave.codec import EncodedChunk, decode_chunk, encode_chunk
from shardsave.codec import _bytegroup as bytegroup


@functools.lru_cache(maxsize=2)
def train_mlp(*, tiny: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train a small MLP with Adam; return its flattened weights and Adam moments."""
    torch.manual_seed(seed)
    width, depth, steps, batch = (256, 2, 60, 64) if tiny else (1024, 3, 200, 64)
    d_in, d_out = 64, 16
    layers: list[torch.nn.Module] = []
    dims = [d_in] + [width] * depth
    for a, b in itertools.pairwise(dims):
        layers += [torch.nn.Linear(a, b), torch.nn.LayerNorm(b), torch.nn.GELU()]
    layers.append(torch.nn.Linear(width, d_out))
    model = torch.nn.Sequential(*layers)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(d_in, 128), torch.nn.Tanh(), torch.nn.Linear(128, d_out)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randn(batch, d_in)
        with torch.no_grad():
            y = teacher(x).argmax(dim=1)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = list(model.parameters())
    state = opt.state

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    return {
        "weights": cat(params),
        "exp_avg": cat([state[p]["exp_avg"] for p in params]),
        "exp_avg_sq": cat([state[p]["exp_avg_sq"] for p in params]),
    }


def datasets(tiny: bool) -> list[tuple[str, np.ndarray, int, bool]]:
    """(label, bytes, itemsize, is_float) for each measured tensor."""
    t0 = time.perf_counter()
    trained = train_mlp(tiny=tiny)
    print(
        f"trained MLP ({trained['weights'].numel():,} params) in {time.perf_counter() - t0:.1f} s"
    )

    def raw(t: torch.Tensor) -> np.ndarray:
        return t.contiguous().view(torch.uint8).numpy().copy()

    w, ea, es = trained["weights"], trained["exp_avg"], trained["exp_avg_sq"]
    n = w.numel()
    rng = np.random.default_rng(0)
    return [
        ("weights fp32", raw(w), 4, True),
        ("weights bf16", raw(w.to(torch.bfloat16)), 2, True),
        ("weights fp16", raw(w.to(torch.float16)), 2, True),
        ("exp_avg fp32", raw(ea), 4, True),
        ("exp_avg_sq fp32", raw(es), 4, True),
        ("exp_avg bf16", raw(ea.to(torch.bfloat16)), 2, True),
        ("int64 indices", raw(torch.from_numpy(rng.integers(0, 50_000, n // 2))), 8, False),
        ("random bytes", rng.integers(0, 256, 2 * n, dtype=np.uint8), 1, False),
    ]


_clock: Callable[[], float] = time.thread_time


def _best_of(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best time of each function, running them round-robin so that a burst of load from
    other processes hits all candidates alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t = _clock()
            fn()
            best[name] = min(best[name], _clock() - t)
    return best


def bench_codecs(tiny: bool, repeat: int, codecs: list[str]) -> list[dict[str, Any]]:
    rows = []
    for label, data, itemsize, is_float in datasets(tiny):
        for codec in codecs:
            row = _bench_codec(data, itemsize, is_float, codec, repeat)
            rows.append({"data": label, **row})
            print(
                f"{label:16s} {codec:13s} {','.join(row['stored_as']):22s} {row['ratio']:6.3f}x "
                f"{row['compress_gbps']:7.2f} {row['decompress_gbps']:7.2f}",
                flush=True,
            )
    return rows


def _bench_codec(
    data: np.ndarray, itemsize: int, is_float: bool, codec: str, repeat: int
) -> dict[str, Any]:
    """Encode and decode ``data`` in chunks of ``knobs.chunk_bytes()``, one thread."""
    step = max(itemsize, knobs.chunk_bytes() // itemsize * itemsize)
    pieces = [data[i : i + step] for i in range(0, data.size, step)]

    def encode_all() -> list[EncodedChunk]:
        return [encode_chunk(p, itemsize=itemsize, is_float=is_float, codec=codec) for p in pieces]

    encoded = encode_all()
    outs = [np.empty(p.size, np.uint8) for p in pieces]

    def decode_all() -> None:
        for e, o in zip(encoded, outs, strict=True):
            decode_chunk(e.descriptor, e.payload, raw_length=e.raw_length, itemsize=itemsize, out=o)

    times = _best_of({"enc": encode_all, "dec": decode_all}, repeat)
    t_enc, t_dec = times["enc"], times["dec"]
    assert all(np.array_equal(o, p) for o, p in zip(outs, pieces, strict=True)), codec
    stored = sum(e.stored_length for e in encoded)
    return {
        "codec": codec,
        "stored_as": sorted({e.descriptor for e in encoded}),
        "raw_bytes": int(data.size),
        "ratio": data.size / max(1, stored),
        "compress_gbps": data.size / t_enc / 1e9,
        "decompress_gbps": data.size / t_dec / 1e9,
    }


def bench_grouping(tiny: bool, repeat: int) -> list[dict[str, Any]]:
    """Re-measure the byte grouping variants (see shardsave/codec/_bytegroup.py)."""
    w = train_mlp(tiny=tiny)["weights"]
    rows = []
    for label, t, k in (("bf16", w.to(torch.bfloat16), 2), ("fp32", w, 4), ("fp64", w.double(), 8)):
        src = t.contiguous().view(torch.uint8).numpy().copy()
        for name, gbps, ok in _grouping_variants(src, k, repeat):
            rows.append({"dtype": label, "variant": name, "gbps": gbps, "correct": ok})
            print(f"{label} {name:38s} {gbps:6.2f} GB/s{'' if ok else '  WRONG'}", flush=True)
    return rows


def _grouping_variants(src: np.ndarray, k: int, repeat: int) -> list[tuple[str, float, bool]]:
    n = src.size // k
    dst = np.ones(src.size, np.uint8)
    out = np.ones(src.size, np.uint8)
    streams = [dst[j * n : (j + 1) * n] for j in range(k)]
    tsrc, tdst, tout = (torch.from_numpy(a) for a in (src, dst, out))

    def torch_group() -> None:
        view = tsrc.view(n, k)
        for j in range(k):
            tdst[j * n : (j + 1) * n].copy_(view[:, j])

    def torch_ungroup() -> None:
        view = tout.view(n, k)
        for j in range(k):
            view[:, j].copy_(tdst[j * n : (j + 1) * n])

    def fresh_transpose() -> None:
        fresh = np.empty(src.size, np.uint8)
        np.copyto(fresh.reshape(k, n), src.reshape(n, k).T)

    variants: dict[str, Callable[[], None]] = {}
    for name, group in bytegroup.GROUP_VARIANTS.items():
        variants[f"group {name}"] = functools.partial(group, src, dst, k, n)
    variants["group torch copy_"] = torch_group
    variants["group transpose into fresh alloc"] = fresh_transpose
    variants["group CHOSEN"] = functools.partial(bytegroup.group_into, src, dst, k)
    for name, ungroup in bytegroup.UNGROUP_VARIANTS.items():
        variants[f"ungroup {name}"] = functools.partial(ungroup, streams, out, k, n)
    variants["ungroup torch copy_"] = torch_ungroup
    variants["ungroup CHOSEN"] = functools.partial(bytegroup.ungroup_into, streams, out, k)
    expect = src.reshape(n, k).T.reshape(-1)
    checks = {}
    for name, fn in variants.items():
        if name.startswith("group"):
            dst[:] = 0
            fn()
            ok = "fresh" in name or bool(np.array_equal(dst, expect))
        else:
            np.copyto(dst, expect)
            out[:] = 0
            fn()
            ok = bool(np.array_equal(out, src))
        checks[name] = ok
    times = _best_of(dict(variants), repeat)
    return [(name, src.size / times[name] / 1e9, checks[name]) for name in variants]


def bench_checksums(tiny: bool, repeat: int) -> list[dict[str, Any]]:
    data = np.random.default_rng(0).integers(0, 256, (1 if tiny else 16) << 20, dtype=np.uint8)
    words = data.view(np.uint64)
    candidates: dict[str, Callable[[], object]] = {
        "zlib.crc32": lambda: zlib.crc32(data),
        "zlib.adler32": lambda: zlib.adler32(data),
        "hashlib.sha1": lambda: hashlib.sha1(data).digest(),
        "hashlib.sha256": lambda: hashlib.sha256(data).digest(),
        "hashlib.blake2b-8": lambda: hashlib.blake2b(data, digest_size=8).digest(),
        "numpy uint64 sum (unsound)": lambda: int(words.sum()),
    }
    rows = []
    for name, t in _best_of(candidates, repeat).items():
        gbps = data.size / t / 1e9
        rows.append({"checksum": name, "gbps": gbps})
        print(f"{name:28s} {gbps:6.2f} GB/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small model, few repeats")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--codecs", default="zstd-shuffle,zstd,auto,raw")
    parser.add_argument("--grouping", action="store_true", help="also time grouping variants")
    parser.add_argument("--checksum", action="store_true", help="also time checksum candidates")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument(
        "--wall",
        action="store_true",
        help="time with the wall clock instead of this thread's CPU time (the default, which "
        "keeps figures comparable on a machine shared with other work)",
    )
    args = parser.parse_args(argv)
    global _clock
    _clock = time.perf_counter if args.wall else time.thread_time
    torch.set_num_threads(1)  # single-core figures; codecs run one chunk per pool thread
    repeat = args.repeat or (1 if args.tiny else 9)
    print(
        f"zstd level {knobs.zstd_level()}, min gain {knobs.min_compression_gain()}, "
        f"chunk {knobs.chunk_bytes() >> 20} MiB, load avg {os.getloadavg()[0]:.1f}, "
        f"clock {'wall' if args.wall else 'thread CPU time'}"
    )
    print(
        f"{'data':16s} {'codec':13s} {'stored as':22s} {'ratio':>7s} {'c GB/s':>7s} {'d GB/s':>7s}"
    )
    results: dict[str, Any] = {
        "codecs": bench_codecs(args.tiny, repeat, args.codecs.split(",")),
    }
    if args.grouping:
        results["grouping"] = bench_grouping(args.tiny, repeat)
    if args.checksum:
        results["checksum"] = bench_checksums(args.tiny, repeat)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
