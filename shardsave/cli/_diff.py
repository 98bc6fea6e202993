"""``shardsave diff A B``: what differs between two checkpoints.

Keys are compared from the two indexes alone (added, removed, kind/dtype/shape changed,
JSON values changed); only keys present in both with the same dtype and shape are loaded,
a batch at a time from each side, to count differing elements (by bit pattern, so NaN
equals the same NaN) and the largest absolute difference (computed in float64 or
complex128 over the differing elements, a slice at a time to bound memory; "nan" when a
NaN faces a number).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shardsave.cli._output import Progress, json_safe, print_json, shape_str
from shardsave.convert._items import entry_raw_bytes, iter_items, select
from shardsave.convert.jsonfmt import encoding_of
from shardsave.format.index import Entry

_SLICE = 1 << 22  # elements compared at once
_BATCH_BYTES = 64 * 1024 * 1024
_UINT = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


@dataclass
class TensorDiff:
    key: str
    differing: int
    numel: int
    max_abs: float | None
    """None where the dtype is not numeric (bit patterns only)."""


@dataclass
class DiffResult:
    added: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)
    changed: list[tuple[str, str, str]] = field(default_factory=list)
    """(key, A's kind/dtype/shape or value, B's)."""
    tensors: list[TensorDiff] = field(default_factory=list)
    identical: int = 0

    @property
    def same(self) -> bool:
        return not (self.added or self.removed or self.changed or any(t.differing for t in self.tensors))


def _describe(e: Entry) -> str:
    if e.kind == "json":
        if e.is_per_rank:
            return "per-rank " + str([json_safe(v.value) if v is not None else None for v in e.per_rank])
        return f"{e.json_type} {json_safe(e.value)!r}"
    if e.is_per_rank:
        return f"{e.kind} per-rank " + ", ".join(shape_str(v.dtype, v.shape) if v else "-" for v in e.per_rank)
    return f"{e.kind} {shape_str(e.dtype, e.shape)}"


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float | None]:
    """(elements whose bits differ, max |a - b| or None for non-numeric dtypes)."""
    fa, fb = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.dtype == torch.bool:
        fa, fb = fa.view(torch.uint8), fb.view(torch.uint8)
    numeric = encoding_of(a.dtype) == "number"
    differing = 0
    worst = 0.0
    for start in range(0, fa.numel(), _SLICE):
        xa, xb = fa[start:start + _SLICE], fb[start:start + _SLICE]
        ne = xa.view(_UINT[xa.dtype.itemsize]).ne(xb.view(_UINT[xb.dtype.itemsize]))
        n = int(ne.sum())
        if not n:
            continue
        differing += n
        if not numeric:
            continue
        da, db = xa[ne], xb[ne]
        if a.dtype.is_complex:
            d = (da.to(torch.complex128) - db.to(torch.complex128)).abs()
        elif a.dtype.is_floating_point:
            d = (da.to(torch.float64) - db.to(torch.float64)).abs()
        else:
            # Exact for every width: |a - b| < 2**64 is the difference modulo 2**64 taken
            # in the right order (negative values wrap to their two's complement).
            na, nb = da.numpy(), db.numpy()
            ua, ub = na.astype(np.uint64), nb.astype(np.uint64)
            d = torch.from_numpy(np.where(na > nb, ua - ub, ub - ua).astype(np.float64))
        m = float(d.max())
        worst = math.nan if math.isnan(m) or math.isnan(worst) else max(worst, m)
    return differing, (worst if numeric else None)


def diff_checkpoints(
    a: str,
    b: str,
    *,
    keys: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> DiffResult:
    _, ea = select(a, keys, storage_options)
    _, eb = select(b, keys, storage_options)
    by_a, by_b = {e.key: e for e in ea}, {e.key: e for e in eb}
    res = DiffResult()
    res.removed = [(k, _describe(e)) for k, e in by_a.items() if k not in by_b]
    res.added = [(k, _describe(e)) for k, e in by_b.items() if k not in by_a]
    to_load: list[Entry] = []
    for k, e in by_a.items():
        f = by_b.get(k)
        if f is None:
            continue
        if e.kind == "json" or f.kind == "json" or e.kind != f.kind:
            if _describe(e) != _describe(f) or (e.kind == "json" and e.json_type == "float"
                                                and not _same_float(e.value, f.value)):
                res.changed.append((k, _describe(e), _describe(f)))
            else:
                res.identical += 1
            continue
        if _describe(e) != _describe(f):
            res.changed.append((k, _describe(e), _describe(f)))
            continue
        to_load.append(e)
    total = sum(entry_raw_bytes(e) for e in to_load)
    on_bytes = progress(2 * total, len(to_load)) if progress is not None else None
    items_b = iter_items(b, [by_b[e.key] for e in to_load], batch_bytes=_BATCH_BYTES,
                         storage_options=storage_options, on_bytes=on_bytes)
    for ia, ib in zip(iter_items(a, to_load, batch_bytes=_BATCH_BYTES, storage_options=storage_options,
                                 on_bytes=on_bytes), items_b):
        assert ia.key == ib.key
        n, m = compare_tensors(ia.value, ib.value)
        if n:
            res.tensors.append(TensorDiff(ia.key, n, ia.value.numel(), m))
        else:
            res.identical += 1
    return res


def _same_float(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return bool(x == y)


def _fmt_abs(v: float | None) -> str:
    return "bits only" if v is None else ("nan" if math.isnan(v) else f"{v:.6g}")


def cmd_diff(args: argparse.Namespace) -> int:
    with Progress("diff") as p:
        res = diff_checkpoints(args.a, args.b, keys=args.keys, storage_options=args.storage_options,
                               progress=p.start)
    if args.json:
        print_json({
            "same": res.same,
            "added": [{"key": k, "b": d} for k, d in res.added],
            "removed": [{"key": k, "a": d} for k, d in res.removed],
            "changed": [{"key": k, "a": x, "b": y} for k, x, y in res.changed],
            "tensors": [{"key": t.key, "differing": t.differing, "numel": t.numel,
                         "max_abs_diff": json_safe(t.max_abs)} for t in res.tensors],
            "identical": res.identical,
        })
        return 0 if res.same else 1
    out = sys.stdout
    for k, d in res.removed:
        out.write(f"- {k}  {d}\n")
    for k, d in res.added:
        out.write(f"+ {k}  {d}\n")
    for k, x, y in res.changed:
        out.write(f"~ {k}  {x} -> {y}\n")
    for t in res.tensors:
        out.write(f"~ {t.key}  max |a-b| {_fmt_abs(t.max_abs)}; {t.differing} of {t.numel} element(s) differ\n")
    summary = (f"{len(res.removed)} removed, {len(res.added)} added, {len(res.changed)} changed, "
               f"{len(res.tensors)} tensor(s) with different values, {res.identical} identical")
    out.write(("same: " if res.same else "differ: ") + summary + "\n")
    return 0 if res.same else 1


