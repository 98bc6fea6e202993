"""Statistics, tables, target checks, JSON and the PNG plot.

Conventions, the same in every scenario:

* rep 0 of each engine is the *cold* run (first call in the process: thread pools, imports,
  first-touch page faults, DCP's planner caches) and is reported on its own; reps 1..N are
  *warm*; we report their median and spread (min-max);
* engines run interleaved (the order rotates every rep) and each rep writes a fresh
  directory, so slow and fast phases of a noisy disk hit every engine alike;
* "x DCP" is DCP's warm median time over ours (> 1: we are faster) for times, and our
  bytes over DCP's for sizes (< 1: we store less).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Stat:
    cold: float | None
    median: float | None
    lo: float | None
    hi: float | None
    n: int
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, reps: dict[int, float]) -> Stat:
        cold = reps.get(0)
        warm = [v for r, v in sorted(reps.items()) if r > 0]
        if not warm and cold is not None:
            warm = [cold]
        if not warm:
            return cls(cold, None, None, None, 0, [])
        return cls(cold, statistics.median(warm), min(warm), max(warm), len(warm), warm)


def collect(records: list[dict[str, Any]], metric: str) -> dict[tuple[str, str], Stat]:
    """(case, engine) -> Stat of ``metric`` over reps."""
    by: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in records:
        if metric in r:
            by[(r["case"], r["engine"])][r["rep"]] = float(r[metric])
    return {k: Stat.of(v) for k, v in by.items()}


def paired_ratio(records: list[dict[str, Any]], metric: str, case: str, num: str, den: str) -> float | None:
    """Median over reps of num/den for the same rep (robust to drift of the disk over time)."""
    a = {r["rep"]: r[metric] for r in records if r["case"] == case and r["engine"] == num and metric in r}
    b = {r["rep"]: r[metric] for r in records if r["case"] == case and r["engine"] == den and metric in r}
    ratios = [a[k] / b[k] for k in a if k in b and k > 0 and b[k]]
    return statistics.median(ratios) if ratios else None


@dataclass
class Check:
    target: str
    measured: float | None
    required: str
    met: bool | None
    note: str = ""


@dataclass
class ScenarioResult:
    name: str
    rows: list[dict[str, Any]]
    checks: list[Check]
    records: list[dict[str, Any]]
    columns: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "checks": [asdict(c) for c in self.checks], "records": self.records,
                "extra": self.extra}


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.{digits}g}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def checks_table(checks: list[Check]) -> str:
    rows = [{"target": c.target, "measured": c.measured, "required": c.required,
             "met": {True: "yes", False: "**no**", None: "n/a"}[c.met], "note": c.note} for c in checks]
    return markdown_table(rows, ["target", "measured", "required", "met", "note"])


def check(target: str, measured: float | None, op: str, bound: float, note: str = "") -> Check:
    if measured is None:
        return Check(target, None, f"{op} {bound:g}", None, note or "not measured")
    met = measured >= bound if op == ">=" else measured <= bound if op == "<=" else measured < bound
    return Check(target, round(measured, 3), f"{op} {bound:g}", met, note)


def write(results: list[ScenarioResult], out: Path, header: dict[str, Any]) -> tuple[Path, Path, Path | None]:
    """results.json, results.md and results.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    js = out / "results.json"
    js.write_text(json.dumps({"machine": header, "scenarios": {r.name: r.to_json() for r in results}}, indent=1,
                             default=str))
    md = out / "results.md"
    parts = [f"Machine: {header.get('machine', '?')}; command: `{header.get('command', '')}`; "
             f"{header.get('when', '')}", ""]
    all_checks: list[Check] = []
    for r in results:
        parts += [f"### {r.name}", "", markdown_table(r.rows, r.columns), ""]
        all_checks += r.checks
    if all_checks:
        parts += ["### targets (issue 3 item 3)", "", checks_table(all_checks), ""]
    md.write_text("\n".join(parts))
    png = out / "results.png"
    try:
        plot(results, png)
    except ImportError:
        return js, md, None
    return js, md, png


def plot(results: list[ScenarioResult], path: Path) -> None:
    """One panel per scenario: each engine's warm median with its min-max spread, cold as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in results if r.extra.get("plot")]
    if not panels:
        return
    cols = 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.6 * rows), squeeze=False)
    # Most specific prefix first: shardsave's raw codec and --ab variants get their own shades.
    colors = {"shardsave[raw]": "tab:cyan", "shardsave@": "tab:brown", "shardsave": "tab:blue",
              "dcp": "tab:orange", "torch.save": "tab:gray", "torch.load": "tab:gray", "zipnn": "tab:green",
              "blosc2": "tab:purple", "zstd": "tab:olive"}
    for ax, r in zip(axes.flat, panels):
        p = r.extra["plot"]
        labels, med, lo, hi, cold, col = [], [], [], [], [], []
        for item in p["bars"]:
            labels.append(item["label"])
            med.append(item["median"] or 0)
            lo.append((item["median"] or 0) - (item.get("lo") if item.get("lo") is not None else item["median"] or 0))
            hi.append((item.get("hi") if item.get("hi") is not None else item["median"] or 0) - (item["median"] or 0))
            cold.append(item.get("cold"))
            col.append(next((c for k, c in colors.items() if item["engine"].startswith(k)), "tab:red"))
        y = range(len(labels))
        ax.barh(list(y), med, xerr=[lo, hi], color=col, alpha=0.85, capsize=3)
        for i, c in enumerate(cold):
            if c is not None:
                ax.plot(c, i, "k.", ms=6)
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(p["xlabel"], fontsize=8)
        ax.set_title(p["title"], fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("shardsave vs DCP vs torch.save (bars: warm median, whiskers: min-max, dots: cold)", fontsize=10)
    fig.tight_layout()
    fig.subplots_adjust(left=0.19, wspace=0.55)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars(stats: dict[tuple[str, str], Stat], transform: Any = None) -> list[dict[str, Any]]:
    """Plot bars from stats. ``transform(case, value)`` maps a value (e.g. seconds to GB/s);
    a decreasing transform swaps the ends of the spread."""
    out = []
    for (case, engine), s in stats.items():
        def tr(v: float | None, case: str = case) -> float | None:
            if v is None:
                return None
            return transform(case, v) if transform else v
        lo, hi = tr(s.lo), tr(s.hi)
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        out.append({"label": f"{case} | {engine}", "engine": engine, "median": tr(s.median), "lo": lo, "hi": hi,
                    "cold": tr(s.cold)})
    return out
