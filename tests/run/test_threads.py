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
