"""Benchmark scenario: see scenario.py."""
