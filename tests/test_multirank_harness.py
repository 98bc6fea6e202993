"""Tests of the multi-rank harness itself: results, remote errors, deaths, timeouts, DTensor."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from multirank import free_port, run_multirank, tmp_rendezvous_file

pytestmark = pytest.mark.multirank


# --- functions run on the ranks: module level, so spawned children can import them ---------


def _all_reduce_rank() -> tuple[int, int, float]:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)  # (all ranks)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _report_env() -> tuple[str | None, str | None, str | None, int]:
    return (os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS"),
            os.environ.get("SHARDSAVE_TEST_MARK"), torch.get_num_threads())


def _raise_on_rank_1() -> int:
    if dist.get_rank() == 1:
        raise ValueError("boom from rank one")
    return dist.get_rank()


def _exit_on_rank_1(code: int) -> int:
    # (all ranks) Gloo builds its full mesh lazily; a peer that dies while another rank is
    # still connecting fails that rank's init. Die only once everyone is connected.
    dist.barrier()
    if dist.get_rank() == 1:
        os._exit(code)
    return dist.get_rank() * 10


def _hang_on_rank_0(pid_dir: str) -> None:
    with open(os.path.join(pid_dir, f"rank{dist.get_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if dist.get_rank() == 0:
        time.sleep(3600)  # the hang under test, not synchronisation


def _dtensor_round_trip() -> tuple[list[int], bool]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)  # same on every rank
    dt = distribute_tensor(full, mesh, [Shard(0)])  # (all ranks)
    local = dt.to_local()
    return list(local.shape), torch.equal(dt.full_tensor(), full)  # full_tensor: all ranks


def _subgroup_mesh() -> float | None:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    pg = dist.new_group([0, 1])  # (all ranks, members or not)
    if dist.get_rank() not in (0, 1):
        return None
    mesh = DeviceMesh.from_group(pg, "cpu")  # (ranks 0 and 1)
    dt = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
    return dt.full_tensor().sum().item()  # (ranks 0 and 1)


def _unpicklable_result() -> object:
    return lambda: None


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size", [2, 3])
def test_all_reduce(world_size: int) -> None:
    expected = float(sum(range(1, world_size + 1)))
    results = run_multirank(_all_reduce_rank, world_size)
    assert results == [(r, world_size, expected) for r in range(world_size)]


@pytest.mark.timeout(60)
def test_exception_on_rank_1_reports_its_traceback() -> None:
    with pytest.raises(AssertionError) as info:
        run_multirank(_raise_on_rank_1, 2)
    text = str(info.value)
    assert "rank 1" in text
    assert "ValueError: boom from rank one" in text
    assert "_raise_on_rank_1" in text  # the remote traceback, not just the message
    assert "--- rank 0 ---" not in text
    assert not multiprocessing.active_children()


@pytest.mark.timeout(60)
def test_rank_exit_reported_as_death() -> None:
    with pytest.raises(AssertionError, match="rank 1 died with exit code 3"):
        run_multirank(_exit_on_rank_1, 2, 3)
    assert not multiprocessing.active_children()


@pytest.mark.timeout(60)
def test_allowed_death_returns_none_and_other_results() -> None:
    assert run_multirank(_exit_on_rank_1, 3, 3, allow_death={1}) == [0, None, 20]


@pytest.mark.timeout(90)
def test_hang_is_killed_at_timeout(tmp_path: Path) -> None:
    # The timeout counts from spawn, and two ranks importing torch on a busy 2-core machine
    # can take ~10 s: 20 s leaves rank 0 time to reach its sleep without making the test slow.
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_multirank(_hang_on_rank_0, 2, str(tmp_path), timeout=20)
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "timeout after 20 s" in text
    assert "rank 0 still running" in text
    assert 20 <= elapsed < 50, elapsed
    assert not multiprocessing.active_children()
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert pids, "no rank reached fn before the timeout; the machine is overloaded"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.timeout(90)
def test_keyboard_interrupt_kills_children(tmp_path: Path) -> None:
    main = threading.main_thread().ident
    assert main == threading.get_ident()

    def interrupt_once_rank_0_hangs() -> None:
        # Poll for the condition (rank 0 is in fn), then interrupt the waiting main thread.
        give_up = time.monotonic() + 60
        while not (tmp_path / "rank0.pid").exists() and time.monotonic() < give_up:
            time.sleep(0.05)
        assert main is not None
        signal.pthread_kill(main, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter = threading.Thread(target=interrupt_once_rank_0_hangs, daemon=True)
    try:
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            run_multirank(_hang_on_rank_0, 2, str(tmp_path), timeout=80)
    finally:
        interrupter.join()
        signal.signal(signal.SIGINT, previous)
    assert not multiprocessing.active_children()
    for pid_file in tmp_path.glob("rank*.pid"):
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


@pytest.mark.timeout(60)
def test_child_env() -> None:
    results = run_multirank(_report_env, 2, env={"SHARDSAVE_TEST_MARK": "x"})
    assert results == [("1", "1", "x", 1)] * 2


@pytest.mark.timeout(60)
def test_dtensor_shard0_round_trip() -> None:
    assert run_multirank(_dtensor_round_trip, 2) == [([3, 4], True)] * 2


@pytest.mark.timeout(60)
def test_subgroup_mesh_inside_larger_world() -> None:
    assert run_multirank(_subgroup_mesh, 3) == [8.0, 8.0, None]


@pytest.mark.timeout(60)
def test_unpicklable_result_is_reported() -> None:
    with pytest.raises(AssertionError, match="could not be pickled"):
        run_multirank(_unpicklable_result, 2)


@pytest.mark.timeout(10)
def test_local_function_rejected_before_spawning() -> None:
    def local() -> None:
        pass

    with pytest.raises(TypeError, match="module level"):
        run_multirank(local, 2)


@pytest.mark.timeout(10)
def test_free_port_and_rendezvous_file() -> None:
    assert 0 < free_port() < 65536
    with tmp_rendezvous_file() as path:
        assert not os.path.exists(path)
        assert os.path.isdir(os.path.dirname(path))
    assert not os.path.exists(os.path.dirname(path))
