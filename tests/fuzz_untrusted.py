"""Fuzzing of hostile checkpoints, run by tests/test_untrusted.py in a subprocess.

    python tests/fuzz_untrusted.py EXAMPLES

Every example mutates a known-good checkpoint -- its index (structurally: a field replaced
by a nasty value and the digest recomputed, so the mutation reaches past the digest; or
raw bytes), its data files (bytes flipped, truncated, extended; TOC rows rewritten with
their checksum fixed up) -- and then runs info, verify, load_full and an in-place load on
it. Each must end in success or a ShardsaveError subclass: never another exception type,
never a hang (an alarm per example), never a memory blow-up (an address-space limit on the
process, so a huge allocation fails loudly instead of swapping). When only data bytes were
changed and the index and tables of contents are intact, a successful load_full must also
return the original values bitwise.

A subprocess, because an address-space limit cannot be lifted again inside a test run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardsave as ss
from shardsave import knobs
from shardsave.errors import ShardsaveError
from shardsave.format.toc import TOC_DTYPE, TOC_HEADER

HERE = Path(__file__).resolve().parent
KEY = bytes(range(32))
ALARM_S = 20
ADDRESS_SPACE_HEADROOM = 3 << 30

NASTY: list[Any] = [
    -1, 0, 1, 7, 2**31, 2**32 + 1, 2**62, 2**63, 2**64 + 5, 10**30, 1.5, float("inf"), True, None, "", "x",
    "../../../etc/passwd", "/etc/passwd", "data/../index.json", "s3://bucket/key", "data\\evil.bin",
    "file:///etc/passwd", "data/" + "a" * 300, "data/\x00.bin", "nan", [], {}, [0], [2**62, 2**62], [1] * 70,
    {"int": 5}, {"type": "sharded", "mesh": 0, "placements": [{"type": "strided_shard", "dim": 0,
                                                              "split_factor": 2**40}]},
    {"type": "replicated", "writer": 2**40}, [[0], [2**61], 0],
]


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang(f"an operation ran past {ALARM_S} s")


def _limit_memory() -> None:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _small_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(20, 30, generator=g), "h": torch.randn(40, generator=g).half(),
            "i": torch.arange(50, dtype=torch.int32), "b": b"bytes!", "n": np.arange(6.0), "step": 3,
            "r": ss.PerRank(torch.tensor([1, 2], dtype=torch.uint8))}


def _seeds(root: Path) -> list[tuple[Path, bytes | None]]:
    """Known-good checkpoints: (path, key) -- a small plain one, an encrypted one, and the
    golden 2-rank sharded one (layouts only multi-rank saves write)."""
    with knobs.override(CHUNK_BYTES=512):
        ss.save(_small_state(), str(root / "plain"))
        ss.save(_small_state(), str(root / "enc"), encryption_key=KEY)
    shutil.copytree(HERE / "golden" / "v1_0" / "sharded-2ranks", root / "sharded")
    return [(root / "plain", None), (root / "enc", KEY), (root / "sharded", None)]


def _json_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _json_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _json_paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _seal(doc: dict[str, Any]) -> bytes:
    """Serialise and end with a correct SHA-256 digest, as a forger of a plain checkpoint can."""
    doc = {k: v for k, v in doc.items() if k not in ("index_sha256", "index_mac")}
    body = json.dumps(doc, separators=(",", ":"), allow_nan=True).encode()
    signed = body[:-1]
    return signed + b',"index_sha256":"' + hashlib.sha256(signed).hexdigest().encode() + b'"}'


def _exercise(path: Path, key: bytes | None, original: dict[str, Any] | None) -> None:
    """Every reader on a (possibly hostile) checkpoint: success or a ShardsaveError only."""
    p = str(path)
    with contextlib.suppress(ShardsaveError):
        ss.info(p)
    report = ss.verify(p, encryption_key=key)  # never raises for damage
    assert isinstance(report.ok, bool)
    try:
        got = ss.load_full(p, encryption_key=key)
    except ShardsaveError:
        got = None
    if got is not None and original is not None:
        assert _same(got, original), "load_full returned wrong values without an error"
    try:
        target = _small_state() if "sharded" not in p else {}
        ss.load(target, p, encryption_key=key, strict=False)
    except ShardsaveError:
        pass


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, ss.PerRank):
        want = [want.value]
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape and bool(
            (got.reshape(-1).view(torch.uint8) == want.reshape(-1).view(torch.uint8)).all())
    if isinstance(want, np.ndarray):
        return isinstance(got, np.ndarray) and got.tobytes() == want.tobytes()
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_same, got, want))
    return bool(got == want)


def main(examples: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="shardsave-fuzz-"))
    seeds = _seeds(workdir / "seeds")
    originals: dict[str, dict[str, Any]] = {
        str(seeds[0][0]): ss.load_full(str(seeds[0][0])),
        str(seeds[1][0]): ss.load_full(str(seeds[1][0]), encryption_key=KEY),
        str(seeds[2][0]): ss.load_full(str(seeds[2][0])),
    }
    signal.signal(signal.SIGALRM, _alarm)
    _limit_memory()
    counter = [0]

    def fresh(seed: int) -> tuple[Path, bytes | None, dict[str, Any]]:
        counter[0] += 1
        src, key = seeds[seed]
        dst = workdir / f"case{counter[0]}"
        shutil.copytree(src, dst)
        return dst, key, originals[str(src)]

    def run(path: Path, key: bytes | None, original: dict[str, Any] | None) -> None:
        signal.alarm(ALARM_S)
        try:
            _exercise(path, key, original)
        finally:
            signal.alarm(0)
            shutil.rmtree(path, ignore_errors=True)

    common = settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck), print_blob=True)

    @common
    @given(seed=st.integers(0, 2), pick=st.integers(0, 10**6), value=st.sampled_from(NASTY),
           delete=st.booleans(), reseal=st.booleans())
    def index_fields(seed: int, pick: int, value: Any, delete: bool, reseal: bool) -> None:
        path, key, _ = fresh(seed)
        index = path / "index.json"
        doc = json.loads(index.read_bytes())
        paths = _json_paths(doc)[1:]
        target = paths[pick % len(paths)]
        doc = _set(copy.deepcopy(doc), target, value, delete and target != ())
        index.write_bytes(_seal(doc) if reseal else json.dumps(doc).encode())
        run(path, key, None)

    @common
    @given(seed=st.integers(0, 2), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                  min_size=1, max_size=4), cut=st.integers(-3, 3))
    def index_bytes(seed: int, edits: list[tuple[int, int]], cut: int) -> None:
        path, key, _ = fresh(seed)
        index = path / "index.json"
        data = bytearray(index.read_bytes())
        for pos, val in edits:
            data[pos % len(data)] = val
        if cut < 0:
            data = data[:cut]
        elif cut > 0:
            data += b" " * cut
        index.write_bytes(bytes(data))
        run(path, key, None)

    @common
    @given(seed=st.integers(0, 2), which=st.integers(0, 10), edits=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
        truncate=st.one_of(st.none(), st.integers(0, 10**6)), extend=st.integers(0, 64))
    def data_bytes(seed: int, which: int, edits: list[tuple[int, int]], truncate: int | None,
                   extend: int) -> None:
        path, key, original = fresh(seed)
        files = sorted((path / "data").iterdir())
        f = files[which % len(files)]
        data = bytearray(f.read_bytes())
        for pos, val in edits:
            data[pos % len(data)] ^= val
        if truncate is not None:
            data = data[: truncate % (len(data) + 1)]
        data += b"\x00" * extend
        f.write_bytes(bytes(data))
        # The index and its digest are intact: any success must be the original values.
        run(path, key, original)

    @common
    @given(seed=st.integers(0, 2), row=st.integers(0, 10**6),
           field=st.sampled_from(["entry", "chunk", "piece", "offset", "length", "raw_length", "codec"]),
           value=st.sampled_from([0, 1, 2, 255, 2**16 - 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1]))
    def toc_rows(seed: int, row: int, field: str, value: int) -> None:
        """A forged TOC row with its checksum fixed in a resealed index (plain checkpoints
        are not authenticated: this reaches the decoders with lying sizes)."""
        path, key, _ = fresh(seed)
        index = path / "index.json"
        doc = json.loads(index.read_bytes())
        frec = doc["files"][row % len(doc["files"])]
        f = path / frec["name"]
        blob = bytearray(f.read_bytes())
        start = frec["toc_offset"] + TOC_HEADER.size
        rows = np.frombuffer(bytes(blob[start:frec["toc_offset"] + frec["toc_length"]]), dtype=TOC_DTYPE).copy()
        if len(rows):
            r = rows[row % len(rows)]
            r[field] = value % (1 << (8 * TOC_DTYPE[field].itemsize))
            blob[start:start + rows.nbytes] = rows.tobytes()
            f.write_bytes(bytes(blob))
            frec["toc_checksum"] = zlib.crc32(bytes(blob[frec["toc_offset"]:frec["toc_offset"] + frec["toc_length"]]))
        index.write_bytes(_seal(doc))
        run(path, key, None)

    for test in (index_fields, index_bytes, data_bytes, toc_rows):
        test()
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"fuzz: {counter[0]} cases, every one ended in success or a ShardsaveError")


if __name__ == "__main__":
    sys.setrecursionlimit(10_000)
    os.environ.setdefault("SHARDSAVE_MAX_LOAD_BYTES", str(512 << 20))
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
