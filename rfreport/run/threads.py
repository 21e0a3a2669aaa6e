"""Intra-op threads chosen from the CPUs this process can really get, job by job.

torch starts one intra-op thread per core it sees, and OpenMP threads spin while they wait for work.
On a machine shared with other processes (CI runners, review machines) those threads fight the
neighbours for cores: a small model's sweep that takes 6 s alone took 17 s beside one busy torch
process with the default threads, 9 s with one thread. So before each job rfreport counts the CPUs
it may use (affinity and the cgroup's CPU quota), samples how many of them are idle right now
(`/proc/stat`, 50 ms), and runs the job with that many threads (at least one). OpenMP waits
passively (`OMP_WAIT_POLICY=PASSIVE`, set before torch loads) so idle threads yield their core.

The size of the work decides too: once the model is built, a shape-only pass counts the flops of its
ops, and a job whose ops are small (flop-weighted mean below SMALL_OP_FLOPS) runs on one thread,
since waking a second thread for each op costs more than it shares. Measured as whole `inspect`
processes alone on 2 cores (docs/benchmarks.md): mobilenet_v2 and efficientnet_b0 (about 20 MFLOP
an op) and the small example ResNet (4 MFLOP) run 6-15% faster on one thread; resnet18/50, alexnet
and convnext_tiny (180-310 MFLOP) take the same time either way; vgg16 (3 GFLOP) and the
all-positions FCN (290 MFLOP) 20-25% less on two.

An explicit `OMP_NUM_THREADS` (or `torch.set_num_threads` by a caller of the library API) is the
user's choice and is left alone: the choice is made only by the command line and the executors.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.05
BUSY_SHARE = 0.5    # a CPU counts as free when at least half of it was idle during the sample
SMALL_OP_FLOPS = 64 * 10**6   # ops this small (flop-weighted mean) run faster on one thread than on several
_chosen: int | None = None     # the thread count rfreport itself set last (None: it set none in this process)


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads a job gets, and what the choice was made from."""

    threads: int
    usable: int          # CPUs this process may run on (affinity, cgroup quota)
    idle: float          # of those, how many were idle during the sample


def prefer_passive_waits() -> None:
    """Make OpenMP threads sleep rather than spin while they wait (only before torch is imported)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def user_chose_threads() -> bool:
    """Tell whether the environment already fixes the thread count."""
    return bool(os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"))


def usable_cpus() -> int:
    """Count the CPUs this process may use: its affinity, bounded by a cgroup v2 CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, cgroup_quota() or cpus))


def cgroup_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Read a cgroup v2 CPU quota as whole CPUs (rounded up); None when unlimited or unreadable."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))


def cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """Read (idle, total) jiffies of each listed CPU from /proc/stat; empty where it cannot be read."""
    times = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]
            times[int(name[3:])] = (values[3] + values[4], sum(values))   # idle + iowait, all
    return times


def idle_cpus(cpus: set[int], seconds: float = SAMPLE_SECONDS) -> float | None:
    """Count how many of `cpus` were idle during a short sample (None without /proc/stat)."""
    before = cpu_times(cpus)
    time.sleep(seconds)
    after = cpu_times(cpus)
    shares = [(after[c][0] - before[c][0]) / (after[c][1] - before[c][1])
              for c in before if c in after and after[c][1] > before[c][1]]
    return sum(shares) if shares else None


def choose_threads() -> ThreadChoice:
    """Choose a job's intra-op threads: the usable CPUs that are idle now, at least one."""
    usable = usable_cpus()
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(usable))
    idle = idle_cpus(cpus)
    if idle is None:
        return ThreadChoice(usable, usable, float(usable))
    free = math.floor(idle + 1 - BUSY_SHARE)   # a CPU at least BUSY_SHARE idle counts as free
    return ThreadChoice(max(1, min(usable, free)), usable, idle)


def apply_choice() -> ThreadChoice | None:
    """Set torch's intra-op threads for the next job, unless the user fixed them; return the choice made."""
    if user_chose_threads():
        return None

    choice = choose_threads()
    use(choice.threads)
    logger.debug("threads: %d (usable CPUs %d, idle %.1f)", choice.threads, choice.usable, choice.idle)
    return choice


def use(threads: int) -> None:
    """Set torch's intra-op threads as rfreport's own choice (which `sized_to` may lower for small work)."""
    import torch

    global _chosen
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _chosen = threads


@contextmanager
def sized_to(grain: Callable[[], int | None]) -> Iterator[None]:
    """Run a block on one intra-op thread when its ops are small, then restore the count.

    `grain` returns the flop-weighted mean flops of the block's ops (None: unknown); it is asked only
    when more than one thread is set and rfreport chose the count (the command line, an executor): a
    count the user fixed (OMP_NUM_THREADS, or torch.set_num_threads by a library caller) is left alone.
    """
    import torch

    before = torch.get_num_threads()
    size = grain() if before > 1 and before == _chosen and not user_chose_threads() else None
    lower = size is not None and size < SMALL_OP_FLOPS
    if lower:
        logger.debug("threads: 1 for ops of %.1f MFLOP (flop-weighted mean)", size / 1e6)
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if lower:
            torch.set_num_threads(before)
