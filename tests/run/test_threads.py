"""The intra-op thread choice: from the usable CPUs and how many of them are idle, never over the user's choice."""

from __future__ import annotations

import pytest
import torch

from rfreport.run import threads


@pytest.mark.parametrize(("text", "cpus"), [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1),
                                            ("400000 100000", 4), ("garbage", None)])
def test_cgroup_quota_in_whole_cpus(tmp_path, text, cpus):
    """A cgroup v2 `cpu.max` reads as whole CPUs rounded up; unlimited or unreadable is None."""
    path = tmp_path / "cpu.max"
    path.write_text(text + "\n")
    assert threads.cgroup_quota(path) == cpus
    assert threads.cgroup_quota(tmp_path / "missing") is None


@pytest.mark.parametrize(("idle", "expected"), [(2.0, 2), (1.6, 2), (1.4, 1), (0.9, 1), (0.2, 1), (0.0, 1)])
def test_threads_follow_the_idle_cpus(monkeypatch, idle, expected):
    """A CPU at least half idle counts as free; at least one thread, at most the usable CPUs."""
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "idle_cpus", lambda cpus, seconds=0: idle)
    assert threads.choose_threads().threads == expected


def test_idle_cpus_are_measured_from_proc_stat():
    """The sample counts between 0 and the number of CPUs sampled."""
    cpus = {0}
    idle = threads.idle_cpus(cpus, seconds=0.02)
    assert idle is None or 0.0 <= idle <= 1.0


def test_the_users_thread_count_is_left_alone(monkeypatch):
    """OMP_NUM_THREADS set by the user: no choice is made and torch's threads do not change."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    assert threads.apply_choice() is None
    assert torch.get_num_threads() == before


def test_a_choice_sets_torch_threads(monkeypatch):
    """Without a user setting, torch runs the next job with the chosen count."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "idle_cpus", lambda cpus, seconds=0: 0.3)
    before = torch.get_num_threads()
    try:
        assert threads.apply_choice().threads == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def two_threads(monkeypatch):
    """torch on two threads, no user setting; restored after."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    threads.use(2)
    yield
    threads.use(before)


@pytest.mark.parametrize(("grain", "inside"), [(threads.SMALL_OP_FLOPS - 1, 1), (threads.SMALL_OP_FLOPS, 2),
                                               (None, 2)])
def test_small_ops_run_on_one_thread_and_the_count_comes_back(two_threads, grain, inside):
    """Below SMALL_OP_FLOPS a block runs on one thread; at or above it, or unknown, on the threads chosen."""
    with threads.sized_to(lambda: grain):
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == 2


def test_the_work_is_not_sized_where_nothing_could_change(two_threads, monkeypatch):
    """The user's OMP_NUM_THREADS, or one thread already: the grain is never asked for (no shape pass)."""
    def asked():
        raise AssertionError("the grain was asked for")

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with threads.sized_to(asked):
        assert torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads.use(1)
    with threads.sized_to(asked):
        assert torch.get_num_threads() == 1


def test_a_library_callers_thread_count_is_left_alone(two_threads):
    """torch.set_num_threads by a caller of the library API (not rfreport's choice): small work keeps it."""
    torch.set_num_threads(3)
    with threads.sized_to(lambda: 1):
        assert torch.get_num_threads() == 3


def test_a_job_of_small_ops_runs_on_one_thread(two_threads, monkeypatch):
    """The pipeline sizes a job's threads from its model's ops: the seed's small CNN runs on one."""
    from rfreport.compute import sweep as sweep_mod
    from rfreport.config import ModelSpec, RunOptions
    from rfreport.run.jobs import Job
    from rfreport.run.pipeline import inspect

    seen = []
    original = sweep_mod.Engine.__enter__

    def entered(engine):
        seen.append(torch.get_num_threads())
        return original(engine)

    monkeypatch.setattr(sweep_mod.Engine, "__enter__", entered)
    spec = ModelSpec(name="small", factory="rfreport.examples:seed_convs", input_shapes=[(1, 1, 64, 64)],
                     positions="center")
    inspect(Job(spec, (1, 1, 64, 64), RunOptions(cache=False)))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
