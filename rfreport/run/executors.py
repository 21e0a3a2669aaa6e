"""The executor seam: where jobs run. In-process by default, in worker processes on request; a distributed
executor plugs in here.

An executor only has to map jobs to results in job order (:class:`Executor`). Jobs and
results are picklable, so an executor may ship them to other processes or machines. One
large job can also be cut into position chunks (:func:`split`) whose sweeps run anywhere
(:func:`run_chunk`) and are merged back in position order (:func:`merge`); the merged sweep,
handed to :func:`rfreport.run.pipeline.run_job` as `main`, gives the same frames as an unchunked run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from rfreport.compute import models
from rfreport.results import SweepResult, join
from rfreport.run import workers
from rfreport.run.jobs import Advance, Job, JobResult, Progress, Silent
from rfreport.run.pipeline import run_job
from rfreport.run.plan import main_sweep, selected_positions
from rfreport.run.threads import apply_choice


@dataclass(frozen=True)
class LocalExecutor:
    """Run jobs on this machine: one after another in this process, or side by side in worker processes.

    `workers` is a number of worker processes or "auto" (:func:`rfreport.run.workers.share`); with one
    (the default of the library API) every job runs in this process, reporting its sweep's progress.
    A script that asks for more needs the `if __name__ == "__main__":` guard: each worker imports
    the main module (multiprocessing's forkserver).
    """

    progress: Progress = field(default_factory=Silent)
    workers: int | str = 1

    def map(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        """Run every job, reporting progress, and yield the results in job order."""
        chosen = workers.share(self.workers, len(jobs)) if self.workers != 1 else None
        if chosen is not None and chosen.workers > 1:
            yield from workers.Pool(jobs, chosen, self.progress).map()
            return
        for index, job in enumerate(jobs):
            self.progress.start(job, index, len(jobs))
            apply_choice()
            result = run_job(job, self.progress.advance)
            self.progress.finish(result)
            yield result


@dataclass(frozen=True)
class Chunk:
    """A slice of one job's main sweep: explicit output positions, in position order."""

    job: Job
    positions: np.ndarray    # (P, d) int64


def split(job: Job, count: int) -> list[Chunk]:
    """Cut a job's positions into at most `count` non-empty chunks of consecutive positions."""
    selected = selected_positions(models.build(job.spec), job)
    return [Chunk(job, part) for part in np.array_split(selected, max(1, count)) if len(part)]


def run_chunk(chunk: Chunk, advance: Advance | None = None) -> SweepResult:
    """Sweep one chunk's positions (with the job's masks kept where they fall in the chunk)."""
    return main_sweep(models.build(chunk.job.spec), chunk.job, chunk.positions, advance)


def merge(parts: Sequence[SweepResult]) -> SweepResult:
    """Merge chunk sweeps of one job into one sweep: rows in position order, coverage summed, masks joined."""
    first = parts[0]
    columns = {name: np.concatenate([getattr(p, name) for p in parts])
               for name in ("positions", "lo", "hi", "support", "wrapped", "path", "verified", "violations")}
    order = np.lexsort(columns["positions"].T[::-1])
    return replace(first, **{name: values[order] for name, values in columns.items()},
                   coverage=np.sum([p.coverage for p in parts], axis=0),
                   masks={pos: mask for p in parts for pos, mask in p.masks.items()},
                   seconds=sum(p.seconds for p in parts), verification=join([p.verification for p in parts]))
