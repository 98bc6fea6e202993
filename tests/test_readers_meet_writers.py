"""Readers meet writers: a load running while its checkpoint is overwritten or deleted gets
the old checkpoint whole, the new one whole, or a clear error -- never a mix.

Deterministic: a hook on the storage's ranged reads runs the competing writer at an exact
moment of the load (after the index was read, before the first data byte; or between two
read batches), instead of racing threads and hoping.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import shardsave as ss
from shardsave import knobs
from shardsave.errors import MissingFileError
from shardsave.manager import CheckpointManager
from shardsave.storage import Storage
from shardsave.storage.local import LocalStorage

pytestmark = pytest.mark.timeout(60)


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {f"w{i}": torch.randn(64, 64, generator=g) for i in range(4)}, "step": seed}


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


@pytest.fixture(params=["local", "memory", "s3"])
def path(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "ck")
    elif request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        # the tests pass no storage_options: point s3:// URLs at the test server
        original = Storage.from_url.__func__  # type: ignore[attr-defined]
        monkeypatch.setattr(Storage, "from_url", classmethod(
            lambda cls, url, storage_options=None: original(cls, url, storage_options or bucket.storage_options)))
        yield f"{bucket.url}/ck"
    else:
        url = f"memory://readers-{uuid.uuid4().hex}"
        yield url
        Storage.from_url(url).remove_tree()


@pytest.fixture
def on_data_read(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], None], int], None]:
    """``on_data_read(action, nth)``: run ``action()`` once, just before the nth (1-based)
    ranged read of data files -- the first is the tables of contents, after the index."""

    def install(action: Callable[[], None], nth: int = 1) -> None:
        calls = [0]
        depth = [0]  # LocalStorage.map_ranges may call read_ranges: count the outer call only
        for cls, method in ((Storage, "read_ranges"), (LocalStorage, "read_ranges"), (LocalStorage, "map_ranges")):
            original = cls.__dict__[method]

            def hooked(self: Storage, requests: list[tuple[str, int, int]], _orig: Any = original) -> list[Any]:
                if depth[0] == 0 and any(name.startswith("data/") for name, _, _ in requests):
                    calls[0] += 1
                    if calls[0] == nth:
                        action()
                depth[0] += 1
                try:
                    return list(_orig(self, requests))
                finally:
                    depth[0] -= 1

            monkeypatch.setattr(cls, method, hooked)

    return install


def test_overwrite_during_load_is_a_clear_error_then_retry_gets_the_new(path: str, on_data_read: Any) -> None:
    old, new = _state(1), _state(2)
    ss.save(old, path)
    on_data_read(lambda: ss.save(new, path, overwrite=True))
    with pytest.raises(MissingFileError) as info:
        ss.load_full(path)
    message = str(info.value)
    assert "data/" in message and ".bin" in message  # names the vanished file
    assert "changed while loading" in message and "retry" in message
    assert isinstance(info.value, FileNotFoundError)
    assert _equal(ss.load_full(path), new)  # the retry: the new checkpoint, whole


def test_overwrite_during_in_place_load_between_batches(path: str, on_data_read: Any) -> None:
    old, new = _state(1), _state(2)
    with knobs.override(CHUNK_BYTES=4096):
        ss.save(old, path)
    target = _state(3)
    on_data_read(lambda: ss.save(new, path, overwrite=True), nth=3)  # after some chunks landed
    with knobs.override(READ_BATCH_BYTES=8192, READ_COALESCE_GAP=0), pytest.raises(MissingFileError, match="retry"):
        ss.load(target, path)
    ss.load(target, path)
    assert _equal(target, new)


def test_old_files_still_there_gives_the_old_checkpoint_whole(
    path: str, on_data_read: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overwriting save committed its index but has not deleted the old files yet (or
    crashed before): a load that read the old index reads the old checkpoint, whole."""
    old, new = _state(1), _state(2)
    ss.save(old, path)

    def overwrite_without_cleanup() -> None:
        with monkeypatch.context() as m:
            for cls in (Storage, LocalStorage):
                m.setattr(cls, "remove", lambda self, names: None)
            ss.save(new, path, overwrite=True)

    on_data_read(overwrite_without_cleanup)
    assert _equal(ss.load_full(path), old)
    assert _equal(ss.load_full(path), new)


def test_checkpoint_deleted_during_load_is_a_clear_error(tmp_path: Path, on_data_read: Any) -> None:
    """Retention (or gc) deletes the checkpoint being restored: index first, then files."""
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=None)
    mgr.save(10, _state(1))
    on_data_read(lambda: mgr._delete(10))
    target = _state(3)
    with pytest.raises(MissingFileError, match="changed while loading"):
        ss.load(target, mgr.path(10))
    assert mgr.steps() == []
