"""Fixtures of the storage conformance suite.

``storage`` runs a test once per backend. Each backend is a factory in ``BACKENDS`` that
builds a fresh, empty checkpoint directory for one test; adding a backend (s3 against a moto
server, say) is one more entry whose factory may ask pytest for the fixtures it needs
(``request.getfixturevalue("s3_server")``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from storage_fakes import FlakyFS

from shardsave.storage import Storage


def _memory_root() -> str:
    return f"/shardsave-tests/{uuid.uuid4().hex}"


def _local(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return Storage.from_url(str(tmp_path / "ckpt"))


def _file_url(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return Storage.from_url((tmp_path / "ckpt").as_uri())


def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return Storage.from_url("memory://" + _memory_root())


def _fsspec_local(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return Storage.from_filesystem(FlakyFS(LocalFileSystem()), str(tmp_path / "ckpt"))


def _s3(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """A prefix of a fresh bucket on the in-process moto server (tests/s3_server.py)."""
    bucket = request.getfixturevalue("s3_bucket")
    return Storage.from_url(f"{bucket.url}/ckpt", bucket.storage_options)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Storage]] = {
    "local": _local,
    "file-url": _file_url,
    "memory": _memory,
    # the generic fsspec path (as used for object stores) on a real local disk
    "fsspec-local": _fsspec_local,
    # s3fs against moto's server mode on loopback: ranged GETs, multipart uploads, PUTs
    "s3": _s3,
}


@pytest.fixture(params=list(BACKENDS))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    store = BACKENDS[request.param](request, tmp_path)
    yield store
    store.remove_tree()


@pytest.fixture
def flaky_memory() -> Iterator[Callable[..., tuple[Storage, FlakyFS]]]:
    """Factory: ``make(fail=N, error=..., methods=...)`` -> (Storage over FlakyFS, the fs)."""
    made: list[Storage] = []

    def make(**kwargs: Any) -> tuple[Storage, FlakyFS]:
        fs = FlakyFS(MemoryFileSystem(), **kwargs)
        store = Storage.from_filesystem(fs, _memory_root())
        made.append(store)
        return store, fs

    yield make
    memory = MemoryFileSystem()
    for store in made:
        with contextlib.suppress(FileNotFoundError):
            memory.rm(store.root, recursive=True)
