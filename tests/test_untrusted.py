"""Opening someone else's checkpoint is safe: nothing is unpickled or evaluated, file names
cannot leave the checkpoint, declared sizes cannot make a reader allocate or loop without
bound, and the fuzzer (tests/fuzz_untrusted.py) finds no exception outside ShardsaveError."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import shardsave as ss
from shardsave import knobs
from shardsave.errors import (
    CorruptionError,
    FormatError,
    LimitExceededError,
    ShardsaveError,
    StorageError,
)
from shardsave.format.index import index_from_json

ROOT = Path(__file__).resolve().parent.parent


def _seal(doc: dict[str, Any]) -> bytes:
    """An index with a valid SHA-256 digest, as anyone can forge for a plain checkpoint."""
    doc = {k: v for k, v in doc.items() if k != "index_sha256"}
    signed = json.dumps(doc, separators=(",", ":")).encode()[:-1]
    return signed + b',"index_sha256":"' + hashlib.sha256(signed).hexdigest().encode() + b'"}'


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ck"
    with knobs.override(CHUNK_BYTES=256):
        ss.save({"w": torch.arange(300.0).reshape(30, 10), "b": b"abc", "step": 1}, str(path))
    return path


def _forge(path: Path, edit: Any) -> None:
    index = path / "index.json"
    doc = json.loads(index.read_bytes())
    edit(doc)
    index.write_bytes(_seal(doc))


@pytest.mark.timeout(30)
def test_no_pickle_or_eval_in_the_package() -> None:
    """Loading runs no code from a checkpoint. The only unpicklers are torch's weights_only
    one, in the import of foreign formats (convert/foreign.py) and in the DCP writer's
    recovery of this process's own objects (dcp.py); nothing else may even import pickle.
    Checked on the syntax tree, so docstrings that mention these names do not count."""
    allowed_torch_load = {"convert/foreign.py", "dcp.py"}
    unpicklers = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "yaml", "jsonpickle"}
    bad: list[str] = []
    for src in sorted((ROOT / "shardsave").rglob("*.py")):
        rel = src.relative_to(ROOT / "shardsave").as_posix()
        for node in ast.walk(ast.parse(src.read_text())):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] in unpicklers for n in names) and rel != "convert/foreign.py":
                    bad.append(f"{where}: imports {names}")
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                bad.append(f"{where}: calls {f.id}")
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                if f.value.id in unpicklers and f.attr in ("load", "loads", "Unpickler", "unsafe_load"):
                    bad.append(f"{where}: calls {f.value.id}.{f.attr}")
                if f.value.id == "torch" and f.attr == "load":
                    weights_only = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                                       and k.value.value is True for k in node.keywords)
                    if rel not in allowed_torch_load or not weights_only:
                        bad.append(f"{where}: torch.load outside the allow-list or without weights_only=True")
    assert not bad, "\n".join(bad)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["../evil.bin", "data/../../evil.bin", "/etc/passwd", "data//x.bin",
                                  "s3://bucket/x.bin", "file:///etc/passwd", "data\\..\\evil.bin", "data/./x.bin",
                                  "data/x\x00.bin", "index.json", "data/.hidden", "data/é.bin", ""])
def test_file_names_that_leave_the_checkpoint_are_refused(ckpt: Path, name: str) -> None:
    _forge(ckpt, lambda d: d["files"][0].__setitem__("name", name))
    with pytest.raises(FormatError, match="name"):
        ss.load_full(str(ckpt))
    assert not ss.verify(str(ckpt)).ok


@pytest.mark.timeout(30)
def test_a_huge_declared_shape_allocates_nothing(ckpt: Path) -> None:
    _forge(ckpt, lambda d: d["entries"][0].__setitem__("shape", [2**40, 2**20]))
    start = time.perf_counter()
    with pytest.raises(ShardsaveError):
        ss.load_full(str(ckpt))
    with pytest.raises(ShardsaveError):
        ss.load({"w": None}, str(ckpt), strict=False)  # a placeholder target would be allocated fresh
    assert not ss.verify(str(ckpt)).ok
    assert time.perf_counter() - start < 20


@pytest.mark.timeout(30)
def test_a_forged_tiny_chunk_size_cannot_make_planning_run_forever(ckpt: Path) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["chunk_bytes"] = 1
        d["entries"][0]["shape"] = [2**20, 2**20]

    _forge(ckpt, edit)
    start = time.perf_counter()
    with pytest.raises((FormatError, CorruptionError, LimitExceededError)):
        ss.load_full(str(ckpt))
    assert not ss.verify(str(ckpt)).ok
    assert time.perf_counter() - start < 20


@pytest.mark.timeout(30)
def test_layouts_that_do_not_cover_the_tensor_are_refused(tmp_path: Path) -> None:
    """A forged per-rank shape smaller than its stored chunks, or a shape larger than them:
    load_full must never hand back uninitialised memory."""
    path = tmp_path / "ck"
    with knobs.override(CHUNK_BYTES=64):
        ss.save({"w": torch.arange(64.0)}, str(path))
    _forge(path, lambda d: d["entries"][0].__setitem__("shape", [80]))
    with pytest.raises((FormatError, CorruptionError)):
        ss.load_full(str(path))


@pytest.mark.timeout(30)
def test_limits_on_what_a_load_may_allocate_and_read(ckpt: Path, tmp_path: Path) -> None:
    with knobs.override(MAX_LOAD_BYTES=1000), pytest.raises(LimitExceededError, match="SHARDSAVE_MAX_LOAD_BYTES"):
        ss.load_full(str(ckpt))  # genuine, but 1200 bytes of w
    assert ss.load_full(str(ckpt), keys=["b"])["b"] == b"abc"
    with knobs.override(MAX_TOC_BYTES=64), pytest.raises(LimitExceededError, match="SHARDSAVE_MAX_TOC_BYTES"):
        ss.load_full(str(ckpt))
    with knobs.override(MAX_INDEX_BYTES=100), pytest.raises(StorageError, match="SHARDSAVE_MAX_INDEX_BYTES"):
        ss.load_full(str(ckpt))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text", [
    b'{"format":"shardsave","format_version":"1.0","world_size":' + b"9" * 5000 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"format":"shardsave","format_version":"1.0","world_size":1e999}',
    b"\xff\xfe{}",
    b'{"format":"shardsave","format_version":"1.1","world_size":1,"save_id":"x","created_at":"","chunk_bytes":1,'
    b'"codecs":[],"files":[],"entries":[]}',  # 1.1 without its digest
])
def test_malformed_index_text_is_a_format_error(text: bytes) -> None:
    with pytest.raises(FormatError):
        index_from_json(text)


@pytest.mark.timeout(30)
def test_entry_paths_must_form_one_tree(ckpt: Path) -> None:
    # "b" moved below "w": rebuilding would index into a tensor.
    _forge(ckpt, lambda d: d["entries"][1].__setitem__("path", ["w", "b"]))
    with pytest.raises(FormatError, match="path"):
        ss.load_full(str(ckpt))
    _forge(ckpt, lambda d: d["entries"][1].__setitem__("path", ["w"]))
    with pytest.raises(FormatError, match="path"):
        ss.load_full(str(ckpt))


@pytest.mark.timeout(30)
def test_every_index_byte_flip_of_a_plain_checkpoint_is_detected(ckpt: Path) -> None:
    """Format 1.1 ends the index with a SHA-256 digest: bit rot in a JSON value (a step
    counter, a shape) is an error, not a silently different checkpoint."""
    index = ckpt / "index.json"
    good = index.read_bytes()
    for pos in range(len(good)):
        bad = bytearray(good)
        bad[pos] ^= 0x01
        index.write_bytes(bytes(bad))
        with pytest.raises(ShardsaveError):
            index_from_json(bytes(bad))
    index.write_bytes(good)


@pytest.mark.timeout(240)
def test_fuzzing_hostile_checkpoints_ends_only_in_shardsave_errors() -> None:
    """tests/fuzz_untrusted.py under an address-space limit and a per-case alarm (see there)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_untrusted.py"), "50"], cwd=ROOT,
                          capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "every one ended in success or a ShardsaveError" in proc.stdout
