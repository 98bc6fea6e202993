"""Shared pytest setup: the multi-rank harness on sys.path (see multirank.py) and hypothesis profiles."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Multi-rank tests import the harness as `from multirank import run_multirank`, and spawned
# ranks re-import test modules by name; both need this folder on sys.path in every import
# mode (pytest's default "prepend" mode adds it anyway; "importlib" mode would not).
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# Hypothesis: CI runs a deterministic profile (same examples every run, no deadline on a
# loaded 2-core machine); locally the default profile explores new examples each time.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# The S3 test server (moto's server mode, in-process): fixtures s3_server and s3_bucket.
from s3_server import s3_bucket, s3_server  # noqa: E402,F401
