"""Formatting for the command-line tool: sizes, ages, tables, JSON, progress bars.

Progress bars go to stderr and only when stderr is a terminal and tqdm is installed
(``pip install 'shardsave[progress]'``): a pipe, a log file or a CI job gets no control
characters, and stdout stays clean for ``--json``.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TextIO


def human_bytes(n: int | float) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(size) < 1024 or unit == "PiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def human_age(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}" if seconds >= 10 * size else f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def parse_time(text: str) -> float | None:
    """Seconds since the epoch of an ISO 8601 time (``created_at``), or None."""
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$")


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"10m"``, ``"2h"``, ``"1d"`` -> seconds (argparse type)."""
    m = _DURATION.match(text)
    if m is None:
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 90s, 10m, 2h or 1d")
    scale = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * scale


def shape_str(dtype: str | None, shape: Sequence[int] | None) -> str:
    if dtype is None:
        return "-"
    return f"{dtype}[{','.join(str(d) for d in shape)}]" if shape is not None else dtype


def table(rows: Sequence[Sequence[str]], header: Sequence[str], out: TextIO | None = None) -> None:
    """Left-aligned columns, two spaces apart; numbers are pre-formatted strings."""
    out = out or sys.stdout
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for r in (header, *rows):
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False, allow_nan=False, default=str)
    sys.stdout.write("\n")


def json_safe(v: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats become strings (as in index.json)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


class Progress:
    """A tqdm byte counter on stderr when it is a terminal; otherwise nothing at all.

    ``with Progress("convert") as p: fn(progress=p.start)``: the callee calls
    ``p.start(total_bytes, n_items)`` once and gets the function to report bytes done.
    """

    def __init__(self, desc: str, *, enabled: bool | None = None) -> None:
        self.desc = desc
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None

    def start(self, total: int, items: int = 0) -> Callable[[int], None]:
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                self.enabled = False
            else:
                self._bar = tqdm(total=total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024,
                                 file=sys.stderr, leave=False, dynamic_ncols=True)
                return self._update
        return _ignore

    def _update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _ignore(n: int) -> None:
    return None
