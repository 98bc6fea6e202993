"""Fault injection in one process: failures at every named fault point, ENOSPC and write
errors from a failing fsspec filesystem and from local disk, storage failing transiently,
truncated and bit-flipped files, and two jobs saving to one path at once.

What must hold every time: a save that fails commits nothing and leaves the previous
checkpoint loading bitwise; corruption anywhere is an error, never different tensors.
(SIGKILL of a rank of a multi-rank save: tests/test_crash_multirank.py.)
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import faulty_fs
import pytest
import torch

import shardsave as ss
from shardsave import faults, knobs
from shardsave.errors import FaultInjectedError, ShardsaveError
from shardsave.format.names import CLAIM_PREFIX
from shardsave.storage import Storage
from shardsave.storage.local import LocalStorage

save_module = importlib.import_module("shardsave.save")
ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))


def state(version: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(version)
    return {"w": torch.randn(30, 20, generator=g), "h": torch.randn(50, generator=g).half(),
            "ids": torch.arange(40) * version, "blob": bytes([version]) * 5, "step": version}


def same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape and bool(
            (got.reshape(-1).view(torch.uint8) == want.reshape(-1).view(torch.uint8)).all())
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(same(got[k], want[k]) for k in want)
    return bool(got == want)


def data_files(path: str | Path) -> set[str]:
    return {p.name for p in Path(path, "data").iterdir()} if Path(path, "data").exists() else set()


# --------------------------------------------------------------------------- fault points


@pytest.mark.timeout(30)
def test_fault_specs_and_hits() -> None:
    assert faults.parse("mid-data-write:kill@1#3, after-plan") == [
        faults.Fault("mid-data-write", "kill", 1, 3), faults.Fault("after-plan", "kill", None, 1)]
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.parse("nowhere:kill")
    with pytest.raises(ValueError, match="unknown fault action"):
        faults.Fault("after-plan", "explode")
    assert faults.choose(7) == faults.choose(7)  # seeded: the same fault every run
    with faults.arm(faults.Fault("after-data", "raise", hit=2)):
        faults.fault_point("after-data")
        with pytest.raises(FaultInjectedError):
            faults.fault_point("after-data")
        faults.fault_point("after-data")  # fires once
    faults.fault_point("after-data")  # disarmed


# (point, whether the new checkpoint is committed although the point raised)
RAISING = [("after-plan", False), ("mid-data-write", False), ("after-data", False), ("mid-index-write", False),
           ("after-rename", True), ("mid-cleanup", True)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("point", "committed"), RAISING, ids=[p for p, _ in RAISING])
def test_a_failure_at_each_point_of_an_overwrite(tmp_path: Path, point: str, committed: bool) -> None:
    path = str(tmp_path / "ck")
    with knobs.override(CHUNK_BYTES=512):
        ss.save(state(1), path)
        old_files = data_files(path)
        hit = 2 if point == "mid-data-write" else 1
        with faults.arm(faults.Fault(point, "raise", hit=hit)):
            if committed:
                ss.save(state(2), path, overwrite=True)  # the index is in place: the save stands
            else:
                with pytest.raises(ss.CheckpointError, match="injected"):
                    ss.save(state(2), path, overwrite=True)
    assert same(ss.load_full(path), state(2 if committed else 1))
    report = ss.verify(path)
    assert report.ok, report.problems
    if not committed:  # the failed save removed what it wrote, temporary index included
        assert data_files(path) == old_files and sorted(os.listdir(path)) == ["data", "index.json"]


@pytest.mark.timeout(120)
def test_sigkill_armed_through_the_environment_and_a_stale_claim(tmp_path: Path) -> None:
    """SHARDSAVE_FAULTS arms a subprocess (as CI would); killed while writing the index it
    holds the commit claim, which then blocks saves on the same base -- clearly -- until
    it is stale."""
    path = str(tmp_path / "ck")
    ss.save(state(1), path)
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_faults import state
        import shardsave as ss
        ss.save(state(2), {path!r}, overwrite=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "SHARDSAVE_FAULTS": "mid-index-write:kill"},
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert same(ss.load_full(path), state(1))
    assert any(n.startswith(CLAIM_PREFIX) for n in os.listdir(path))
    with pytest.raises(ss.CheckpointError, match=f"another save .* is committing.*remove .*{CLAIM_PREFIX}"):
        ss.save(state(3), path, overwrite=True)
    assert same(ss.load_full(path), state(1))
    with knobs.override(CLAIM_STALE_S=0.0):
        ss.save(state(3), path, overwrite=True)
    assert same(ss.load_full(path), state(3))


# --------------------------------------------------------------------------- failing storage


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["data", "index"])
def test_enospc_from_a_failing_fsspec_filesystem(where: str) -> None:
    url = f"{faulty_fs.PROTOCOL}://enospc-{where}-{os.getpid()}/ck"
    ss.save(state(1), url)
    before = ss.info(url)
    stored = before.stored_bytes
    # "data": space for part of a data file; "index": for the data file, not the index.
    budget = stored // 3 if where == "data" else stored + 200
    with faulty_fs.failing(budget=budget) as f, pytest.raises(ss.CheckpointError, match="No space left"):
        ss.save(state(2), url, overwrite=True)
    assert f.enospc >= 1
    assert same(ss.load_full(url), state(1))
    assert ss.info(url).save_id == before.save_id
    assert ss.verify(url).ok


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("point", "action", "message"), [
    ("mid-data-write", "enospc", "No space left"), ("mid-index-write", "enospc", "No space left"),
    ("mid-data-write", "eio", "Input/output error")])
def test_write_errors_on_local_disk(tmp_path: Path, point: str, action: str, message: str) -> None:
    path = str(tmp_path / "ck")
    ss.save(state(1), path)
    with faults.arm(faults.Fault(point, action)), pytest.raises(ss.CheckpointError, match=message):
        ss.save(state(2), path, overwrite=True)
    assert same(ss.load_full(path), state(1))
    assert sorted(os.listdir(path)) == ["data", "index.json"] and len(data_files(path)) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2])
def test_storage_failing_transiently_10_percent_of_the_time(seed: int, tmp_path: Path) -> None:
    """Every storage call fails with a connection reset 10% of the time: retries make the
    save and the load succeed, and the data files are byte-identical to a clean save's."""
    url = f"{faulty_fs.PROTOCOL}://flaky-{seed}-{os.getpid()}/ck"
    clean = str(tmp_path / "clean")
    with knobs.override(CHUNK_BYTES=256, STORAGE_RETRY_BASE_S=0.001, STORAGE_RETRIES=10):
        ss.save(state(seed), clean)
        with faulty_fs.failing(rate=0.1, seed=seed) as f:
            ss.save(state(seed), url)
            got = ss.load_full(url)
            assert ss.verify(url).ok
        assert f.transient >= 3
    assert same(got, state(seed))
    a, b = ss.info(clean).files[0], ss.info(url).files[0]
    assert Path(clean, a.name).read_bytes() == Storage.from_url(url).read_bytes(b.name)


# --------------------------------------------------------------------------- damaged files


@pytest.fixture(params=["plain", "encrypted"])
def small(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, bytes | None]:
    key = KEY if request.param == "encrypted" else None
    path = str(tmp_path / "small")
    with knobs.override(CHUNK_BYTES=128):
        ss.save({"w": torch.arange(64.0), "b": b"xy", "step": 1}, path, encryption_key=key)
    return path, key


@pytest.mark.timeout(120)
def test_every_flipped_byte_is_detected(small: tuple[str, bytes | None]) -> None:
    path, key = small
    files = [Path(path, "index.json"), *Path(path, "data").iterdir()]
    for f in files:
        good = f.read_bytes()
        for pos in range(len(good)):
            bad = bytearray(good)
            bad[pos] ^= 1 << (pos % 8)
            f.write_bytes(bytes(bad))
            with pytest.raises(ShardsaveError):
                ss.load_full(path, encryption_key=key)
            if f.name != "index.json" and pos % 7 == 0:
                assert not ss.verify(path, encryption_key=key).ok
        f.write_bytes(good)
    assert same(ss.load_full(path, encryption_key=key), {"w": torch.arange(64.0), "b": b"xy", "step": 1})


@pytest.mark.timeout(60)
def test_truncated_data_files_are_detected(small: tuple[str, bytes | None]) -> None:
    path, key = small
    info = ss.info(path)
    f = info.files[0]
    target = Path(path, f.name)
    good = target.read_bytes()
    for cut in sorted({0, 1, f.toc_offset // 2, f.toc_offset, f.toc_offset + 20, f.size - 1}):
        target.write_bytes(good[:cut])
        with pytest.raises(ShardsaveError):
            ss.load_full(path, encryption_key=key)
        assert not ss.verify(path, encryption_key=key).ok
    target.write_bytes(good + b"\x00")  # extended: the index records the size
    assert not ss.verify(path, encryption_key=key).ok


# --------------------------------------------------------------------------- racing saves


@pytest.mark.timeout(60)
def test_when_another_save_commits_first_this_one_fails_clearly(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Job A plans an overwrite; job B plans and commits while A writes; A must not replace
    B's checkpoint: it fails, naming the other save, and removes only its own files."""
    path = str(tmp_path / "ck")
    ss.save(state(1), path)
    original = save_module.write_rank_file
    nested: dict[str, Any] = {}

    def write_then_let_b_in(*args: Any, **kwargs: Any) -> Any:
        if not nested:
            nested["b"] = "running"
            nested["b"] = ss.save(state(3), path, overwrite=True)  # job B, start to commit
        return original(*args, **kwargs)

    monkeypatch.setattr(save_module, "write_rank_file", write_then_let_b_in)
    with pytest.raises(ss.CheckpointError, match=r"another save .* committed to .* while this save ran"):
        ss.save(state(2), path, overwrite=True)  # job A
    assert same(ss.load_full(path), state(3))
    assert ss.info(path).save_id == nested["b"].save_id
    report = ss.verify(path)
    assert report.ok and not report.extra_files, report


@pytest.mark.timeout(60)
def test_a_save_committing_while_another_holds_the_claim_fails(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "ck")
    ss.save(state(1), path)
    original = LocalStorage.write_atomic
    outcome: dict[str, str] = {}

    def commit_with_b_racing(self: LocalStorage, name: str, data: bytes) -> None:
        if not outcome:  # job A holds the claim now; job B tries to commit on the same base
            outcome["b"] = "running"
            try:
                ss.save(state(3), path, overwrite=True)
                outcome["b"] = "committed"
            except ss.CheckpointError as exc:
                outcome["b"] = str(exc)
        original(self, name, data)

    monkeypatch.setattr(LocalStorage, "write_atomic", commit_with_b_racing)
    ss.save(state(2), path, overwrite=True)  # job A
    assert "another save" in outcome["b"] and "is committing" in outcome["b"], outcome
    assert same(ss.load_full(path), state(2))
    assert ss.verify(path).ok and not any(n.startswith(CLAIM_PREFIX) for n in os.listdir(path))


_RACER = textwrap.dedent("""
    import json, sys, torch
    import shardsave as ss
    root, me = sys.argv[1], int(sys.argv[2])
    out = []
    for r in range(6):
        try:
            ss.save({"who": torch.full((2000,), float(me)), "me": me}, f"{root}/r{r}")
            out.append("committed")
        except ss.ShardsaveError as exc:
            out.append(type(exc).__name__ + ": " + str(exc).replace(chr(10), " "))
    print(json.dumps(out))
""")


@pytest.mark.timeout(120)
def test_two_jobs_saving_to_the_same_paths_at_once(tmp_path: Path) -> None:
    """Two processes save different values to the same six paths, racing freely: each path
    ends with exactly one committed checkpoint, whole and bitwise the winner's; the loser
    gets a clear error (the checkpoint exists, or another save committed first)."""
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(me)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for me in (1, 2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=100)
        assert p.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    for r in range(6):
        results = [outs[0][r], outs[1][r]]
        assert results.count("committed") == 1, results
        loser = next(x for x in results if x != "committed")
        assert loser.startswith("CheckpointExistsError") or "another save" in loser, loser
        winner = 1 + results.index("committed")
        full = ss.load_full(str(tmp_path / f"r{r}"))
        assert full["me"] == winner and torch.equal(full["who"], torch.full((2000,), float(winner)))
        assert ss.verify(str(tmp_path / f"r{r}")).ok
    shutil.rmtree(tmp_path, ignore_errors=True)
