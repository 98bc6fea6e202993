"""Files and directories a save creates on local storage are owner-only by default
(0600/0700), configurable through the FILE_MODE / DIR_MODE knobs."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import shardsave as ss
from shardsave import knobs


@pytest.fixture
def umask_022() -> Iterator[None]:
    """A typical umask, so that what is checked is shardsave's choice, not the umask's."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[p.relative_to(root).as_posix()] = stat.S_IMODE(p.stat().st_mode)
    return out


@pytest.mark.timeout(60)
def test_a_save_creates_owner_only_files_and_directories(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "a" / "b" / "ck"  # three new directories
    ss.save({"w": torch.ones(10)}, str(path))
    ss.save({"w": torch.zeros(10)}, str(path), overwrite=True)  # the atomic index replacement too
    modes = _modes(tmp_path / "a")
    files = {k: v for k, v in modes.items() if (tmp_path / "a" / k).is_file()}
    dirs = {k: v for k, v in modes.items() if (tmp_path / "a" / k).is_dir()}
    assert files and all(m == 0o600 for m in files.values()), files
    assert len(dirs) == 4 and all(m == 0o700 for m in dirs.values()), dirs


@pytest.mark.timeout(60)
def test_an_existing_directory_keeps_its_mode(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "mine"
    path.mkdir(mode=0o755)
    ss.save({"w": torch.ones(10)}, str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "index.json").stat().st_mode) == 0o600


@pytest.mark.timeout(60)
def test_modes_are_configurable(tmp_path: Path, umask_022: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with knobs.override(FILE_MODE=0o640, DIR_MODE=0o750):
        ss.save({"w": torch.ones(10)}, str(tmp_path / "group"))
    modes = _modes(tmp_path / "group")
    assert modes["."] == 0o750 and modes["data"] == 0o750 and modes["index.json"] == 0o640
    # The environment takes octal, as chmod does.
    monkeypatch.setenv("SHARDSAVE_FILE_MODE", "644")
    monkeypatch.setenv("SHARDSAVE_DIR_MODE", "0o755")
    assert knobs.file_mode() == 0o644 and knobs.dir_mode() == 0o755
    mgr = ss.CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, {"w": torch.ones(3)})
    modes = _modes(tmp_path / "run")
    assert modes["step-000000001/index.json"] == 0o644 and modes["step-000000001"] == 0o755
    monkeypatch.setenv("SHARDSAVE_FILE_MODE", "rw-r--r--")
    with pytest.raises(ValueError, match="SHARDSAVE_FILE_MODE"):
        knobs.file_mode()
