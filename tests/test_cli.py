"""The ``shardsave`` command end to end: each subcommand through ``main([...])``, and the
installed console script through a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_convert import pattern, same

import shardsave as ss
from shardsave.cli import main
from shardsave.cli._diff import compare_tensors
from shardsave.cli._inspect import checkpoint_stats
from shardsave.cli._output import Progress
from shardsave.manager import step_dir_name

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def make_root(root: Path) -> None:
    """Two committed steps with metrics, and one interrupted save."""
    mgr = ss.CheckpointManager(str(root), keep_last=None)
    for step in (100, 200):
        mgr.save(step, {"model": {"w": pattern(torch.bfloat16, (32, 16), step)}, "step": step},
                 metrics={"loss": 10.0 / step})
    partial = root / step_dir_name(300) / "data"
    partial.mkdir(parents=True)
    (partial / "20260101T000000-0badf00d-r0.bin").write_bytes(b"x" * 100)


# --------------------------------------------------------------------------- help and errors


@pytest.mark.timeout(60)
def test_help_is_there_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("ls", "info", "verify", "convert", "import", "diff", "gc", "examples:", "exit status"):
        assert cmd in out
    for cmd in ("ls", "info", "verify", "convert", "import", "diff", "gc"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert f"usage: shardsave {cmd}" in capsys.readouterr().out
    assert main([]) == 2  # no command: the help, on stderr, and a usage error


@pytest.mark.timeout(60)
def test_errors_are_one_line_with_exit_status_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "info", str(tmp_path / "nope"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("shardsave info: error: no committed checkpoint")
    code, _, err = run(capsys, "ls", str(tmp_path / "nope"))
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


# --------------------------------------------------------------------------- ls


@pytest.mark.timeout(120)
def test_ls_lists_steps_committed_and_partial(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    make_root(tmp_path / "run")
    code, out, _ = run(capsys, "ls", str(tmp_path / "run"))
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["CHECKPOINT", "STEP", "STATUS", "SIZE", "AGE", "METRICS"]
    assert lines[1].split()[:3] == ["step-000000100", "100", "committed"] and "loss=0.1" in lines[1]
    assert lines[2].split()[:3] == ["step-000000200", "200", "committed"] and "loss=0.05" in lines[2]
    assert lines[3].split()[:5] == ["step-000000300", "300", "partial", "100", "B"]
    code, out, _ = run(capsys, "ls", str(tmp_path / "run"), "--json")
    recs = json.loads(out)
    assert [(r["step"], r["status"]) for r in recs] == [(100, "committed"), (200, "committed"), (300, "partial")]
    assert recs[0]["metrics"] == {"loss": 0.1} and recs[0]["size"] > 0 and recs[0]["age_s"] >= 0
    assert recs[2]["size"] == 100
    # A single checkpoint lists itself.
    code, out, _ = run(capsys, "ls", str(tmp_path / "run" / step_dir_name(200)), "--json")
    assert [r["step"] for r in json.loads(out)] == [200]


# --------------------------------------------------------------------------- info


@pytest.mark.timeout(120)
def test_info_reports_keys_sizes_codecs_and_ratio(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ck")
    w = torch.randn(256, 64).to(torch.bfloat16)  # compresses with byte grouping
    ss.save({"model": {"w": w, "noise": pattern(torch.uint8, (4096,), 1)}, "step": 3, "cfg": {"lr": 0.1}}, ckpt,
            metadata={"run": "r1"})
    code, out, _ = run(capsys, "info", ckpt, "--json")
    st = json.loads(out)
    assert code == 0 and st["world_size"] == 1 and st["metadata"] == {"run": "r1"}
    assert st["environment"]["torch"] == torch.__version__
    by_key = {e["key"]: e for e in st["entries"]}
    mw = by_key["model.w"]
    assert mw["dtype"] == "bfloat16" and mw["shape"] == [256, 64] and mw["raw_bytes"] == 256 * 64 * 2
    assert mw["codecs"] == ["zstd-shuffle/1"] and mw["ratio"] > 1.1 and mw["stored_bytes"] < mw["raw_bytes"]
    assert by_key["model.noise"]["codecs"] == ["raw/1"] and by_key["model.noise"]["ratio"] == 1.0
    assert by_key["step"] == {"key": "step", "kind": "json", "type": "int", "value": 3}
    assert st["raw_bytes"] == mw["raw_bytes"] + 4096
    assert st["stored_bytes"] == mw["stored_bytes"] + 4096
    code, out, _ = run(capsys, "info", ckpt)
    assert code == 0 and "zstd-shuffle/1" in out and "bfloat16[256,64]" in out and '"run": "r1"' in out
    assert "torch " + torch.__version__ in out


# --------------------------------------------------------------------------- verify


@pytest.mark.timeout(120)
def test_verify_exit_status_follows_damage(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    info = ss.save({"w": torch.arange(1000.0), "v": torch.ones(10)}, str(ckpt))
    code, out, _ = run(capsys, "verify", str(ckpt))
    assert code == 0 and out.startswith("OK")
    extra = ckpt / "data" / "20260101T000000-0badf00d-r0.bin"
    extra.write_bytes(b"junk")
    code, out, _ = run(capsys, "verify", str(ckpt))
    assert code == 1 and "EXTRA" in out and "shardsave gc" in out
    assert run(capsys, "verify", str(ckpt), "--allow-extra")[0] == 0
    extra.unlink()
    data = ckpt / info.files[0].name
    blob = bytearray(data.read_bytes())
    blob[10] ^= 0xFF  # inside the first chunk
    data.write_bytes(bytes(blob))
    code, out, _ = run(capsys, "verify", str(ckpt), "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and any("checksum" in p for p in report["problems"])
    data.unlink()
    code, out, _ = run(capsys, "verify", str(ckpt))
    assert code == 1 and "missing" in out


# --------------------------------------------------------------------------- convert and import


@pytest.mark.timeout(180)
def test_convert_and_import_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ck")
    state = {"model": {"w": pattern(torch.bfloat16, (8, 8), 1), "b": torch.zeros(8)}, "opt": {"m": torch.ones(3)},
             "step": 12}
    ss.save(state, ckpt)
    out = str(tmp_path / "model.safetensors")
    code, stdout, err = run(capsys, "convert", ckpt, out, "--keys", "model")
    assert code == 0 and "wrote" in stdout and err == ""  # no progress bar without a terminal
    code, stdout, _ = run(capsys, "import", out, str(tmp_path / "back"))
    assert code == 0 and "(safetensors)" in stdout
    same(ss.load_full(str(tmp_path / "back")), {"model": state["model"]})
    code, _, err = run(capsys, "convert", ckpt, out)
    assert code == 2 and "--overwrite" in err
    code, _, err = run(capsys, "import", out, str(tmp_path / "back"))
    assert code == 2 and "already holds a committed checkpoint" in err and err.count("\n") == 1
    assert run(capsys, "import", out, str(tmp_path / "back"), "--overwrite", "--codec", "raw")[0] == 0
    assert list(checkpoint_stats(str(tmp_path / "back"))["codecs"]) == ["raw/1"]
    h5 = str(tmp_path / "all.h5")
    assert run(capsys, "convert", ckpt, h5, "--to", "hdf5")[0] == 0
    assert run(capsys, "import", h5, str(tmp_path / "back2"), "--format", "hdf5")[0] == 0
    same(ss.load_full(str(tmp_path / "back2")), ss.load_full(ckpt))
    code, _, err = run(capsys, "convert", ckpt, str(tmp_path / "x.json"), "--max-json-bytes", "100")
    assert code == 2 and "over the JSON export limit of 100 B (100 bytes)" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- diff


@pytest.mark.timeout(180)
def test_diff_reports_keys_shapes_and_values(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = {"w": torch.arange(12.0).reshape(3, 4), "same": torch.ones(5, dtype=torch.int64), "gone": torch.zeros(1),
            "cast": torch.zeros(2), "step": 1, "nan": torch.tensor([float("nan"), 1.0])}
    ss.save(base, str(tmp_path / "a"))
    code, out, _ = run(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "a"))
    assert code == 0 and out.startswith("same:")
    other = dict(base)
    other["w"] = base["w"].clone()
    other["w"][1, 2] += 0.5
    other["w"][2, 3] -= 2.0
    del other["gone"]
    other["new"] = torch.ones(2)
    other["cast"] = torch.zeros(2, dtype=torch.float16)
    other["step"] = 2
    ss.save(other, str(tmp_path / "b"))
    code, out, _ = run(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json")
    d = json.loads(out)
    assert code == 1 and not d["same"]
    assert [r["key"] for r in d["removed"]] == ["gone"] and [r["key"] for r in d["added"]] == ["new"]
    changed = {r["key"]: (r["a"], r["b"]) for r in d["changed"]}
    assert changed["cast"] == ("tensor float32[2]", "tensor float16[2]")
    assert changed["step"] == ("int 1", "int 2")
    assert d["tensors"] == [{"key": "w", "differing": 2, "numel": 12, "max_abs_diff": 2.0}]
    assert d["identical"] == 2  # "same", and "nan" (the same NaN bits)
    code, out, _ = run(capsys, "diff", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 1 and "- gone" in out and "+ new" in out and "~ w  max |a-b| 2" in out


@pytest.mark.timeout(60)
def test_compare_tensors_per_dtype() -> None:
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert compare_tensors(a, a.clone()) == (0, 0.0)
    n, m = compare_tensors(a, torch.tensor([1.0, 2.0, 3.0]))
    assert n == 1 and m != m  # NaN facing a number
    assert compare_tensors(torch.tensor([0, 2**64 - 1], dtype=torch.uint64),
                           torch.tensor([0, 2**64 - 3], dtype=torch.uint64)) == (1, 2.0)
    assert compare_tensors(torch.tensor([True, False]), torch.tensor([False, False])) == (1, 1.0)
    assert compare_tensors(torch.tensor([1 + 1j]), torch.tensor([1 - 2j])) == (1, 3.0)
    bits = pattern(torch.bits16, (4,), 1)
    assert compare_tensors(bits, pattern(torch.bits16, (4,), 2))[1] is None


# --------------------------------------------------------------------------- progress


@pytest.mark.timeout(60)
def test_progress_only_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress("x", enabled=False) as p:
        p.start(100)(50)
    assert capsys.readouterr().err == ""
    with Progress("x", enabled=True) as p:
        update = p.start(100)
        update(100)
    assert "x" in capsys.readouterr().err  # tqdm drew on stderr


# --------------------------------------------------------------------------- the console script


def _script() -> list[str]:
    exe = shutil.which("shardsave")
    if exe is None:
        pytest.skip("the shardsave console script is not installed (pip install -e .)")
    return [exe]


@pytest.mark.timeout(300)
def test_console_script_verifies(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    ss.save({"w": torch.ones(4)}, str(ckpt))
    proc = subprocess.run([*_script(), "verify", str(ckpt)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=280)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK") and proc.stderr == ""


@pytest.mark.timeout(300)
def test_console_script_refuses_a_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # Written by hand (protocol 2): GLOBAL posix.system, called with one argument.
    payload = b"\x80\x02cposix\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little") + \
        f"touch {marker}".encode() + b"q\x01\x85q\x02Rq\x03."
    src = tmp_path / "model.pt"
    src.write_bytes(payload)
    proc = subprocess.run([*_script(), "import", str(src), str(tmp_path / "ck")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=280)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "refusing to import" in proc.stderr and "posix.system" in proc.stderr
    assert not marker.exists() and not (tmp_path / "ck").exists()

