"""Shared pytest setup. Harness only: see multirank.py for running tests on several ranks."""

from __future__ import annotations

import sys
from pathlib import Path

# Multi-rank tests import the harness as `from multirank import run_multirank`, and spawned
# ranks re-import test modules by name; both need this folder on sys.path in every import
# mode (pytest's default "prepend" mode adds it anyway; "importlib" mode would not).
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
