"""``shardsave gc`` and the scan behind ``ls``: what is garbage, what is kept, and the
re-checks that keep a concurrent save safe."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

import shardsave as ss
from shardsave.cli import main
from shardsave.gc import execute_gc, plan_gc, scan
from shardsave.manager import step_dir_name

OLD_ID = "20260101T000000-0badf00d"


def committed(path: Path | str, value: float = 1.0) -> ss.CheckpointInfo:
    return ss.save({"w": torch.full((16,), value)}, str(path))


def dead_save(ckpt: Path, rank: int = 0) -> Path:
    """A data file of a save that never committed."""
    f = ckpt / "data" / f"{OLD_ID}-r{rank}.bin"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"z" * 64)
    return f


def make_garbage(root: Path) -> dict[str, Path]:
    committed(root / step_dir_name(1))
    keep = committed(root / step_dir_name(2))
    orphan = dead_save(root / step_dir_name(2))
    tmp = root / step_dir_name(2) / "index.json.tmp-0123abcd"
    tmp.write_bytes(b"{")
    claim = root / step_dir_name(2) / f".commit-claim-{keep.save_id}"  # a crash mid-commit
    claim.write_text('{"save_id": "x", "host": "h", "created": 0}')
    partial = root / step_dir_name(3)
    dead_save(partial)
    other = root / "not-a-step"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    return {"orphan": orphan, "tmp": tmp, "claim": claim, "partial": partial, "other": other,
            "live": root / step_dir_name(2) / keep.files[0].name}


@pytest.mark.timeout(120)
def test_plan_finds_uncommitted_steps_orphans_and_temporaries(tmp_path: Path) -> None:
    g = make_garbage(tmp_path)
    actions = plan_gc(str(tmp_path), min_age_s=0)
    got = {(a.checkpoint, a.what, a.names) for a in actions}
    assert got == {
        (step_dir_name(2), "files", (f"data/{OLD_ID}-r0.bin",)),
        (step_dir_name(2), "files", ("index.json.tmp-0123abcd",)),
        (step_dir_name(2), "files", (g["claim"].name,)),
        (step_dir_name(3), "directory", (f"data/{OLD_ID}-r0.bin",)),
    }
    assert all(a.skipped is None for a in actions)
    done, problems = execute_gc(str(tmp_path), actions)
    assert len(done) == 4 and problems == []
    assert not g["orphan"].exists() and not g["tmp"].exists() and not g["partial"].exists()
    assert not g["claim"].exists()
    assert g["live"].exists() and (g["other"] / "notes.txt").exists()
    assert ss.verify(str(tmp_path / step_dir_name(2))).ok and ss.verify(str(tmp_path / step_dir_name(1))).ok


@pytest.mark.timeout(120)
def test_recent_files_are_kept(tmp_path: Path) -> None:
    make_garbage(tmp_path)
    actions = plan_gc(str(tmp_path))  # default minimum age: one hour
    assert actions and all(a.skipped and "minimum age" in a.skipped for a in actions)
    assert execute_gc(str(tmp_path), actions) == ([], [])
    later = plan_gc(str(tmp_path), now=time.time() + 7200)
    assert all(a.skipped is None for a in later)


@pytest.mark.timeout(120)
def test_a_single_checkpoint_and_an_uncommitted_one(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    committed(ck)
    dead_save(ck, rank=1)
    [a] = plan_gc(str(ck), min_age_s=0)
    assert a.checkpoint == "" and a.names == (f"data/{OLD_ID}-r1.bin",)
    # A directory that is not a step directory and has no index: only shardsave's files go.
    loose = tmp_path / "loose"
    dead_save(loose)
    (loose / "README").write_text("keep me")
    [b] = plan_gc(str(loose), min_age_s=0)
    assert b.what == "files" and b.names == (f"data/{OLD_ID}-r0.bin",)
    execute_gc(str(loose), [b])
    assert (loose / "README").exists() and not (loose / "data" / f"{OLD_ID}-r0.bin").exists()


@pytest.mark.timeout(120)
def test_execution_rechecks_what_changed_since_the_plan(tmp_path: Path) -> None:
    partial = tmp_path / step_dir_name(5)
    dead_save(partial)
    ck = tmp_path / step_dir_name(6)
    committed(ck)
    dead_save(ck)
    actions = plan_gc(str(tmp_path), min_age_s=0)
    assert len(actions) == 2
    # Meanwhile: step 5's save commits, and step 6 is overwritten by a new save.
    committed(partial)
    ss.save({"w": torch.zeros(16)}, str(ck), overwrite=True)
    done, problems = execute_gc(str(tmp_path), actions)
    assert done == [] and len(problems) == 2
    assert any("committed since" in p for p in problems) and any("overwritten since" in p for p in problems)
    assert ss.verify(str(partial)).ok and ss.verify(str(ck), ).ok


@pytest.mark.timeout(120)
def test_scan_and_gc_on_an_fsspec_filesystem() -> None:
    root = f"memory://gc-{uuid.uuid4().hex}"
    try:
        committed(f"{root}/{step_dir_name(1)}")
        fs = fsspec.filesystem("memory")
        fs.pipe(f"{root}/{step_dir_name(2)}/data/{OLD_ID}-r0.bin".removeprefix("memory://"), b"x" * 10)
        found = scan(root)
        assert [(c.step, c.committed, c.info is not None) for c in found] == [(1, True, True), (2, False, False)]
        assert found[1].size == 10 and found[1].newest_mtime is not None
        [a] = plan_gc(root, min_age_s=0)
        assert a.checkpoint == step_dir_name(2) and a.what == "directory"
        execute_gc(root, [a])
        assert [c.step for c in scan(root)] == [1]
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


@pytest.mark.timeout(120)
def test_gc_command_is_a_dry_run_unless_yes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    g = make_garbage(tmp_path)
    assert main(["gc", str(tmp_path), "--min-age", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("would remove") == 4 and "dry run: 4 item(s)" in out and "--yes" in out
    assert g["orphan"].exists() and g["partial"].exists()
    assert main(["gc", str(tmp_path)]) == 0  # default minimum age keeps everything just written
    out = capsys.readouterr().out
    assert out.count("keeping") == 4 and "dry run: 0 item(s)" in out
    assert main(["gc", str(tmp_path), "--min-age", "0s", "--yes", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["dry_run"] and len(report["remove"]) == 4 and report["problems"] == []
    assert not g["orphan"].exists() and not g["partial"].exists() and g["live"].exists()
    assert main(["gc", str(tmp_path), "--min-age", "0", "--yes"]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert main(["ls", str(tmp_path), "--json"]) == 0
    assert [r["step"] for r in json.loads(capsys.readouterr().out)] == [1, 2]
    with pytest.raises(SystemExit):
        main(["gc", str(tmp_path), "--min-age", "soon"])
    assert "not a duration" in capsys.readouterr().err
