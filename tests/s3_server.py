"""A real S3-protocol server for the tests: moto's server mode on loopback, inside pytest.

Why server mode and not ``moto.mock_aws``: the mock patches botocore inside one process,
so spawned ranks (``tests/multirank.py``) would not see it, and nothing would go over
HTTP -- ranged GETs, multipart uploads and single-PUT commits would not be exercised the
way s3fs sends them. ``ThreadedMotoServer`` is a real HTTP server on 127.0.0.1 on a free
port; it runs in a thread of the pytest process (one per xdist worker), so CI needs no
extra service: ``.ci/run`` stays the README's test command.

Fixtures (imported into ``tests/conftest.py``):

* ``s3_server`` (session): the endpoint URL; started once per worker (~4 s: moto's
  imports), stopped at the end of the session.
* ``s3_bucket``: a fresh bucket per test, as :class:`S3Bucket` -- ``url`` (``s3://name``),
  ``storage_options`` (what ``ss.save``/``ss.load`` and each spawned rank pass to s3fs)
  and ``fs`` (an s3fs filesystem for the test's own checks). Emptied and removed after.

Without s3fs or moto installed (``pip install -e '.[test]'`` installs both), the tests
that need them are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

# Buckets are created with a LocationConstraint (s3fs sends the configured region);
# us-east-1 is the one region S3 refuses as a constraint, so the tests use another.
REGION = "us-west-2"


def s3_options(endpoint: str) -> dict[str, Any]:
    """storage_options for s3fs against the test server (picklable: spawned ranks get them)."""
    return {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": REGION},
    }


@dataclass
class S3Bucket:
    """A fresh bucket on the test server."""

    name: str
    endpoint: str
    storage_options: dict[str, Any]
    fs: Any = field(repr=False)

    @property
    def url(self) -> str:
        return f"s3://{self.name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    pytest.importorskip("s3fs", reason="the S3 tests need s3fs (pip install -e '.[test]')")
    server_mod = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (pip install -e '.[test]')")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[S3Bucket]:
    import s3fs

    options = s3_options(s3_server)
    # The same (cached) instance that ss.save / Storage.from_url build from these options:
    # a fresh client per test would cost ~1 s of botocore start-up each.
    fs = s3fs.S3FileSystem(**options)
    name = f"ss-{uuid.uuid4().hex[:16]}"
    fs.mkdir(name)
    try:
        yield S3Bucket(name, s3_server, options, fs)
    finally:
        with contextlib.suppress(Exception):
            fs.rm(name, recursive=True)
        with contextlib.suppress(Exception):
            fs.rmdir(name)
