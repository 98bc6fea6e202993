"""The coordinator's merge: agreement checks, replicated dedup and balance, and scale."""

from __future__ import annotations

import dataclasses
import time

import pytest

from shardsave.format.index import (
    CheckpointInfo,
    FileInfo,
    Placement,
    index_from_json,
    index_to_json,
)
from shardsave.plan.load_plan import Region, plan_reads
from shardsave.plan.save_plan import LeafMeta, ShardSpec, balance_ratio, make_rank_plan, merge_plans


def _plain(key: str, nbytes: int, crc: int = 7) -> LeafMeta:
    return LeafMeta(key, (key,), "tensor", dtype="uint8", shape=(nbytes,), checksum=crc, nbytes=nbytes)


def test_replicated_values_are_stored_once_and_spread_over_ranks() -> None:
    metas = [_plain(f"w{i}", 1000 + i) for i in range(8)]
    plan, failures = merge_plans([make_rank_plan(metas) for _ in range(4)])
    assert not failures and plan is not None
    writers = [e.layout.writer for e in plan.entries if e.layout is not None]
    assert len(writers) == 8
    loads = [0] * 4
    for e in plan.entries:
        assert e.layout is not None and e.shape is not None
        loads[e.layout.writer] += e.shape[0]
    assert balance_ratio(loads) < 1.1


def test_differing_replicated_copies_fail_naming_key_and_per_rank() -> None:
    plans = [make_rank_plan([_plain("rng", 10, crc=r)]) for r in range(2)]
    plan, failures = merge_plans(plans)
    assert plan is None
    assert "state_dict['rng']" in failures[1] and "ss.PerRank" in failures[1]


def test_shape_disagreement_fails() -> None:
    plans = [make_rank_plan([_plain("w", 10)]), make_rank_plan([_plain("w", 11)])]
    plan, failures = merge_plans(plans)
    assert plan is None and "uint8[10]" in failures[1]


def test_json_values_must_agree() -> None:
    a = LeafMeta("step", ("step",), "json", json_type="int", value=3)
    b = dataclasses.replace(a, value=4)
    _, failures = merge_plans([make_rank_plan([a]), make_rank_plan([b])])
    assert "differs between ranks" in failures[1]


def test_per_rank_values_keep_every_rank() -> None:
    plans = [make_rank_plan([LeafMeta("pos", ("pos",), "json", per_rank_root=1, json_type="int", value=r)])
             for r in range(3)]
    plan, failures = merge_plans(plans)
    assert plan is not None and not failures
    (entry,) = plan.entries
    assert [rv.value for rv in entry.per_rank if rv is not None] == [0, 1, 2]


def _fsdp_metas(n_ranks: int, n_tensors: int) -> list[LeafMeta]:
    # One spec object shared by every leaf, as dist.values interns them per mesh.
    spec = ShardSpec((n_ranks,), tuple(range(n_ranks)), (Placement("shard", dim=0),))
    return [
        LeafMeta(f"layers.{i}.w", ("layers", i, "w"), "tensor", dtype="bfloat16", shape=(65536 + i, 1024),
                 shard=spec, nbytes=2 * 1024 * (65536 + i) // n_ranks)
        for i in range(n_tensors)
    ]


@pytest.mark.timeout(300)
def test_planning_at_16384_ranks_by_1000_tensors() -> None:
    n, k = 16384, 1000
    metas = _fsdp_metas(n, k)
    start = time.perf_counter()
    rank0 = make_rank_plan(metas)
    # Every other rank's description hashes the same, so it sends no leaf list.
    plans = [rank0] + [dataclasses.replace(rank0, shared=None)] * (n - 1)
    plan, failures = merge_plans(plans)
    merge_s = time.perf_counter() - start
    assert plan is not None and not failures
    files = tuple(FileInfo(f"data/x-r{r}.bin", r, 10**9, 0, 64, 0, k) for r in range(n))
    info = CheckpointInfo("20260101T000000-00000000", n, "now", 16 << 20, ("raw/1",), plan.meshes, files,
                          plan.entries)
    blob = index_to_json(info)
    start = time.perf_counter()
    parsed = index_from_json(blob)
    # A resharding load on 8,192 ranks: rank 4321's share of every tensor.
    requests = []
    for idx, e in enumerate(parsed.entries):
        assert e.shape is not None
        rows = -(-e.shape[0] // 8192)
        lo = min(4321 * rows, e.shape[0])
        n_rows = min(rows, e.shape[0] - lo)
        requests.append((idx, 0, [Region(((lo, 0), (n_rows, e.shape[1])), (0, 0))]))
    reads = plan_reads(parsed, requests)
    load_s = time.perf_counter() - start
    assert len(reads) >= k
    assert len(blob) < 100 * 1024 * 1024
    assert merge_s < 10 and load_s < 10, (merge_s, load_s)
