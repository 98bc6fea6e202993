"""Save planning: what each rank reports, and the coordinator's merge into one plan.

(all ranks)   describe their leaves as :class:`LeafMeta` (no tensor data)
(coordinator) :func:`merge_plans` checks that ranks agree, deduplicates replicated
              values (identical checksums, or the save fails naming the key and
              pointing to ss.PerRank), and spreads their writes over ranks by bytes
(all ranks)   receive the entries and write what the plan assigns them

Pure functions on plain data: simulated at thousands of ranks in one process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shardsave.format.index import Entry, Layout, Mesh, Placement, RankValue
from shardsave.plan.flatten import path_repr


@dataclass(frozen=True)
class ShardSpec:
    """A DTensor's distribution: mesh (as ranks of the checkpoint group) and placements."""

    mesh_shape: tuple[int, ...]
    mesh_ranks: tuple[int, ...]
    placements: tuple[Placement, ...]


@dataclass(frozen=True)
class LeafMeta:
    """What one rank knows about one of its leaves, without its data."""

    key: str
    path: tuple[Any, ...]
    kind: str
    per_rank_root: int | None = None
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    shard: ShardSpec | None = None
    checksum: int | None = None
    """Checksum of the bytes of a replicated (plain) value, to prove the copies identical."""
    nbytes: int = 0
    json_type: str | None = None
    value: Any = None


@dataclass(frozen=True)
class RankPlan:
    """One rank's report to the coordinator.

    At 16,384 ranks x 1,000 tensors, sending every rank's full leaf list would move and
    merge 16 M descriptions. But the descriptions of sharded and replicated leaves are
    the same on every rank that holds them, so ranks hash them (``signature``) and only a
    rank whose signature differs from the coordinator's sends them in full; what truly
    differs per rank (checksums of replicated data, per-rank values) travels separately.
    """

    signature: str
    shared: tuple[LeafMeta, ...] | None
    """Leaves described identically on every holder (checksum left None); None: same as the coordinator's."""
    checksums: tuple[int | None, ...]
    """Per shared leaf: checksum of a replicated value's bytes (None for others)."""
    per_rank: tuple[LeafMeta, ...] = ()
    sharded_bytes: int = 0
    """Bytes of sharded pieces this rank will write (the baseline for balancing)."""


def make_rank_plan(metas: Sequence[LeafMeta]) -> RankPlan:
    """Split a rank's leaves into the shared description, its checksums and its per-rank values."""
    shared: list[LeafMeta] = []
    checksums: list[int | None] = []
    per_rank: list[LeafMeta] = []
    sharded_bytes = 0
    for m in metas:
        if m.per_rank_root is not None:
            per_rank.append(m)
            continue
        checksums.append(m.checksum)
        shared.append(replace(m, checksum=None, nbytes=m.nbytes if m.shard is None else 0))
        if m.shard is not None:
            replicas = math.prod(s for s, p in zip(m.shard.mesh_shape, m.shard.placements) if p.kind == "replicate")
            sharded_bytes += m.nbytes // max(1, replicas)
    return RankPlan(_signature(shared), tuple(shared), tuple(checksums), tuple(per_rank), sharded_bytes)


def _signature(shared: Sequence[LeafMeta]) -> str:
    """A digest of the shared descriptions; each distinct mesh is hashed once, not per leaf."""
    specs: dict[int, int] = {}
    spec_list: list[ShardSpec] = []
    items = []
    for m in shared:
        sid = -1
        if m.shard is not None:
            sid = specs.get(id(m.shard), -1)
            if sid < 0:
                sid = next((i for i, s in enumerate(spec_list) if s == m.shard), len(spec_list))
                if sid == len(spec_list):
                    spec_list.append(m.shard)
                specs[id(m.shard)] = sid
        items.append((m.key, m.path, m.kind, m.dtype, m.shape, sid, m.json_type, repr(m.value), m.nbytes))
    return hashlib.sha256(repr((items, spec_list)).encode()).hexdigest()


@dataclass(frozen=True)
class GlobalPlan:
    """The coordinator's answer: the index entries (without files) and meshes."""

    entries: tuple[Entry, ...]
    meshes: tuple[Mesh, ...]


@dataclass
class _Merged:
    first: LeafMeta
    first_rank: int
    holders: list[int] = field(default_factory=list)
    checksum: int | None = None
    per_rank: dict[int, LeafMeta] = field(default_factory=dict)


def merge_plans(plans: Sequence[RankPlan]) -> tuple[GlobalPlan | None, dict[int, str]]:
    """(coordinator) Merge every rank's plan, indexed by rank: (plan, {}) or (None, failures).

    Cost: O(distinct signatures x leaves + ranks x replicated leaves), so a uniform
    16,384-rank FSDP job merges in the time of one rank's leaf list.
    """
    failures: dict[int, str] = {}
    merged: dict[str, _Merged] = {}
    groups: dict[str, list[int]] = {}
    shared_of: dict[str, tuple[LeafMeta, ...]] = {}
    for rank, plan in enumerate(plans):
        groups.setdefault(plan.signature, []).append(rank)
        if plan.shared is not None:
            shared_of.setdefault(plan.signature, plan.shared)
    load = [p.sharded_bytes for p in plans]

    for sig, ranks in groups.items():
        rank_set = set(ranks)
        if sig not in shared_of:
            failures[ranks[0]] = "internal: no rank sent the leaf descriptions of its signature"
            continue
        for i, leaf in enumerate(shared_of[sig]):
            m = merged.get(leaf.key)
            if m is None:
                m = merged[leaf.key] = _Merged(leaf, ranks[0])
            elif m.first_rank not in rank_set:
                problem = _disagreement(m.first, leaf)
                if problem:
                    failures.setdefault(ranks[0], f"{path_repr(leaf.path)}: {problem} (vs rank {m.first_rank})")
                    continue
            if leaf.shard is None and leaf.kind != "json":
                for r in ranks:
                    crc = plans[r].checksums[i]
                    if m.checksum is None:
                        m.checksum = crc
                    elif crc != m.checksum:
                        failures.setdefault(r, f"{path_repr(leaf.path)}: holds different data than rank "
                                               f"{m.holders[0]} although it is not sharded; wrap values that "
                                               "legitimately differ per rank in ss.PerRank(value)")
                    m.holders.append(r)
    for rank, plan in enumerate(plans):
        for leaf in plan.per_rank:
            m = merged.get(leaf.key)
            if m is None:
                m = merged[leaf.key] = _Merged(leaf, rank)
            elif m.first.per_rank_root is None or m.first.kind != leaf.kind:
                failures.setdefault(rank, f"{path_repr(leaf.path)}: "
                                          + (_disagreement(m.first, leaf) or "differs between ranks"))
                continue
            m.per_rank[rank] = leaf
    if failures:
        return None, failures

    meshes: list[Mesh] = []
    mesh_ids: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    entries: list[Entry | None] = []
    replicated: list[tuple[int, int, _Merged]] = []  # (nbytes, entry index, merged)
    for m in merged.values():
        f = m.first
        if f.per_rank_root is not None:
            entries.append(_per_rank_entry(m, len(plans)))
        elif f.kind == "json":
            entries.append(Entry(f.key, f.path, "json", json_type=f.json_type, value=f.value))
        elif f.shard is not None:
            mk = (f.shard.mesh_shape, f.shard.mesh_ranks)
            if mk not in mesh_ids:
                mesh_ids[mk] = len(meshes)
                meshes.append(Mesh(*mk))
            layout = Layout("sharded", mesh=mesh_ids[mk], placements=f.shard.placements)
            entries.append(Entry(f.key, f.path, f.kind, dtype=f.dtype, shape=f.shape, layout=layout))  # type: ignore[arg-type]
        else:
            replicated.append((f.nbytes, len(entries), m))
            entries.append(None)

    # Largest first onto the least loaded holder: the classic greedy bound (<= 4/3 of optimal).
    for nbytes, idx, m in sorted(replicated, key=lambda t: (-t[0], t[1])):
        writer = min(m.holders, key=lambda r: (load[r], r))
        load[writer] += nbytes
        f = m.first
        entries[idx] = Entry(f.key, f.path, f.kind, dtype=f.dtype, shape=f.shape,  # type: ignore[arg-type]
                             layout=Layout("replicated", writer=writer))
    return GlobalPlan(tuple(e for e in entries if e is not None), tuple(meshes)), {}


def _disagreement(a: LeafMeta, b: LeafMeta) -> str | None:
    if (a.per_rank_root is None) != (b.per_rank_root is None):
        return "is wrapped in ss.PerRank on some ranks but not on others; wrap it on every rank"
    if a.per_rank_root is not None:
        return None if a.kind == b.kind else f"is a {a.kind} on one rank and a {b.kind} on another"
    if a.kind != b.kind:
        return f"is a {a.kind} on one rank and a {b.kind} on another"
    if a.kind == "json":
        if a.json_type != b.json_type or not _json_equal(a.value, b.value):
            return (f"differs between ranks ({a.value!r} vs {b.value!r}); "
                    "wrap values that legitimately differ per rank in ss.PerRank(value)")
        return None
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"has dtype/shape {a.dtype}{list(a.shape or ())} on one rank and {b.dtype}{list(b.shape or ())} on another"
    if (a.shard is None) != (b.shard is None) or a.shard != b.shard:
        return "is a DTensor on some ranks and a plain tensor (or another layout) on others"
    return None


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b) and type(a) is type(b)


def _per_rank_entry(m: _Merged, world_size: int) -> Entry:
    f = m.first
    values: list[RankValue | None] = []
    for r in range(world_size):
        leaf = m.per_rank.get(r)
        if leaf is None:
            values.append(None)
        elif f.kind == "json":
            values.append(RankValue(json_type=leaf.json_type, value=leaf.value))
        else:
            values.append(RankValue(dtype=leaf.dtype, shape=leaf.shape))
    return Entry(f.key, f.path, f.kind, per_rank_root=f.per_rank_root, per_rank=tuple(values),  # type: ignore[arg-type]
                 layout=Layout("per_rank"))


def balance_ratio(loads: Sequence[int]) -> float:
    """max/mean of per-rank bytes (1.0 = perfectly even); used by tests and benchmarks."""
    if not loads or max(loads) == 0:
        return 1.0
    return max(loads) / (sum(loads) / len(loads))


