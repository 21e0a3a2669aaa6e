"""Jobs and their results: the unit of work of a run, and the seams that carry them (executors, progress).

A job is one model spec at one input shape with the run's options; its result holds only plain
values, DataFrames and numpy arrays, so both pickle across processes and machines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from rfreport.config import ModelSpec, RunConfig, RunOptions
from rfreport.options import Status
from rfreport.slugs import slugify
from rfreport.summary import Summary

Advance = Callable[[int, int], None]   # (positions done, positions total) after each sweep chunk


@dataclass(frozen=True)
class Job:
    """One unit of work: a model spec at one of its input shapes, with the run's options."""

    spec: ModelSpec
    input_shape: tuple[int, ...]
    options: RunOptions

    @property
    def slug(self) -> str:
        """Return the run-folder name of this job, e.g. `resnet50-224x224`."""
        return slugify(self.spec.name, self.input_shape)

    @property
    def time_limit(self) -> float | None:
        """Return the job's time limit in seconds: its model's `job_timeout`, else the run's (None: no limit)."""
        return self.spec.job_timeout if self.spec.job_timeout is not None else self.options.job_timeout


@dataclass(frozen=True)
class JobResult:
    """What a job produced: picklable and torch-free (plain values, DataFrames, numpy arrays)."""

    name: str
    slug: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...] | None
    status: Status
    error: str | None                                               # one line when failed
    mode: str
    target: str
    seconds: float
    summary: Summary | None = None                                  # None when the job failed
    findings: tuple[dict, ...] = ()                                 # {code, severity, message}
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)   # saved under their schema names
    arrays: dict[str, Any] = field(default_factory=dict)            # coverage; masks, erf_maps by position
    cached: bool = False                                            # taken from the incremental-audit cache


def make_jobs(config: RunConfig) -> list[Job]:
    """Return one job per model and input shape, in config order."""
    return [Job(spec, shape, config.options) for spec in config.models for shape in spec.input_shapes]


class Executor(Protocol):
    """Runs jobs somewhere and yields their results in the order of the jobs."""

    def map(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        """Run every job and yield its result, in job order."""


class Progress(Protocol):
    """Receives progress from an executor: jobs as they start and end (overlapping when they run in worker
    processes; a result names its job by its slug), and position chunks within a job run in-process."""

    def start(self, job: Job, index: int, count: int) -> None:
        """Announce job `index` (0-based) of `count`."""

    def advance(self, done: int, total: int) -> None:
        """Report the positions swept so far of the current job."""

    def finish(self, result: JobResult | None = None) -> None:
        """Report the end of a job: the current one, or the one whose result it is."""


class Silent:
    """A Progress that shows nothing."""

    def start(self, job: Job, index: int, count: int) -> None:
        """Ignore the start of a job."""

    def advance(self, done: int, total: int) -> None:
        """Ignore progress within a job."""

    def finish(self, result: JobResult | None = None) -> None:
        """Ignore the end of a job."""
