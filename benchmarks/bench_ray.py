"""Benchmark: the same audit in-process and on a local Ray instance, wall time for both.

Runs every job of the configs (default: configs/examples.toml) through the in-process executor,
with torch's default threads and then with one thread (as each Ray worker has), then starts a
local Ray instance with `--cpus` CPUs and runs them through the Ray executor, first with freshly
started workers (they import torch on their first task), then warm. Report rendering is left out:
it happens on the driver either way. Every frame and array of every run is checked against the
first in-process run, and the table is printed with the speed-ups over it.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from rfreport import config
from rfreport.run import jobs as jobs_mod
from rfreport.run.executors import LocalExecutor
from rfreport.run.jobs import Executor, Job, JobResult
from rfreport.run.ray_executor import CHUNK_POSITIONS, RayExecutor

ROOT = Path(__file__).resolve().parent.parent


def timed(executor: Executor, jobs: Sequence[Job]) -> tuple[list[JobResult], float]:
    """Run the jobs through an executor; return their results and the wall time."""
    started = time.perf_counter()
    results = list(executor.map(jobs))
    return results, time.perf_counter() - started


def same(a: JobResult, b: JobResult) -> bool:
    """Return whether two results of one job hold equal frames, arrays, summaries and statuses."""
    if (a.status, a.error, a.summary) != (b.status, b.error, b.summary) or a.frames.keys() != b.frames.keys():
        return False
    frames = all(pd.DataFrame.equals(a.frames[k], b.frames[k]) for k in a.frames)
    return frames and a.arrays.keys() == b.arrays.keys() and all(equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


def equal(x, y) -> bool:
    """Compare two stored arrays, or dicts of arrays such as masks."""
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    return np.array_equal(x, y)


def table(rows: Sequence[tuple[str, float]], baseline: float) -> str:
    """Return the wall times as a plain-text table with the speed-up over the baseline."""
    lines = [f"{'executor':<34} {'wall s':>8} {'speed-up':>9}", "-" * 53]
    lines += [f"{name:<34} {seconds:>8.1f} {baseline / seconds:>8.2f}x" for name, seconds in rows]
    return "\n".join(lines)


def main() -> None:
    """Time the configs' audit in-process and on a local Ray instance and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=[str(ROOT / "configs" / "examples.toml")])
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance.")
    parser.add_argument("--chunk-positions", type=int, default=CHUNK_POSITIONS,
                        help="Split jobs with more output positions than this into chunks.")
    args = parser.parse_args()
    loaded = config.load(args.configs)
    # every run must sweep: the incremental-audit cache would serve the second run from disk
    jobs = jobs_mod.make_jobs(replace(loaded, options=replace(loaded.options, cache=False)))
    print(f"{len(jobs)} jobs from {', '.join(args.configs)}; {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads in-process), ray {ray.__version__}, python {platform.python_version()}")
    local, local_s = timed(LocalExecutor(), jobs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # what each Ray worker gets: separates parallelism from thread contention
    single, single_s = timed(LocalExecutor(), jobs)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    start_s = time.perf_counter() - started
    executor = RayExecutor(chunk_positions=args.chunk_positions)
    cold, cold_s = timed(executor, jobs)
    warm, warm_s = timed(executor, jobs)
    ray.shutdown()
    rows = [(f"in-process, {threads} torch threads", local_s), ("in-process, 1 torch thread", single_s),
            (f"ray, {args.cpus} CPUs, starting workers", cold_s),
            (f"ray, {args.cpus} CPUs, warm workers", warm_s),
            (f"ray, {args.cpus} CPUs, incl. ray.init ({start_s:.1f} s)", start_s + cold_s)]
    print(table(rows, local_s))
    differ = [a.slug for a, *others in zip(local, single, cold, warm, strict=True)
              if not all(same(a, other) for other in others)]
    failed = [r.slug for r in local if r.status != "ok"]
    print(f"identical results: {'yes' if not differ else 'NO: ' + ', '.join(differ)}; "
          f"failed jobs: {', '.join(failed) or 'none'}")


if __name__ == "__main__":
    main()
