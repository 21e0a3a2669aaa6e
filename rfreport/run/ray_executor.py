"""Run jobs on a Ray cluster: one task per job, position chunks for very large sweeps, bounded retries.

Every (model, input shape) job becomes a Ray task that builds its model from the spec on the worker
(only the small, picklable spec travels), sweeps, analyses and returns its :class:`JobResult`. The
task plans the job's positions first; a job with more than `chunk_positions` of them returns its
position chunks instead (:func:`rfreport.run.executors.split`). The driver then sweeps each chunk in its
own task (:func:`rfreport.run.executors.run_chunk`) and hands their refs to one more task, which merges the
sweeps in position order and analyses them (`run_job(job, main=merged)`). No task waits on another,
so tasks holding a GPU never deadlock.

A task that raises (a failed job raises :class:`JobFailed` on its worker, so Ray sees the failure),
is killed for memory or loses its worker or node is retried up to `max_retries` times; then the job
is recorded as failed with its one-line error and the other jobs complete. Results come back in job
order, so :func:`rfreport.run.pipeline.run` writes the same run folder as with the in-process executor.

A job's `seconds` add up its tasks, so they cover the stages an in-process job's do: the planning
task's model building, planning and main sweep, each chunk task's building and sweep, and the last
task's rest of the job. Every task runs within the job's time limit (rfreport.run.limits).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ray

# torch imports sympy on its first shape check (every meta pass makes one). Done lazily inside a task, that
# import has left a Ray worker with a half-initialised sympy module ("module 'sympy' has no attribute
# 'logic'"); imported with this module, it is complete before any task of the worker runs.
import torch.fx.experimental.symbolic_shapes  # noqa: F401
from ray.exceptions import RayError, RayTaskError

from rfreport.compute import models
from rfreport.errors import JobTimeout, RfReportError, SweepError, one_line
from rfreport.results import SweepResult
from rfreport.run.executors import Chunk, merge, run_chunk, split
from rfreport.run.jobs import Job, JobResult, Progress, Silent
from rfreport.run.limits import time_limit
from rfreport.run.pipeline import attempt, failed_result, run_job
from rfreport.run.plan import main_sweep, selected_positions

logger = logging.getLogger("rfreport")
CHUNK_POSITIONS = 32768   # a job sweeping more output positions than this is cut into chunks of at most this many


class ClusterError(RfReportError):
    """Ray could not start a local instance or join the cluster at the given address."""


class JobFailed(RfReportError):
    """Raised on a worker for a job that failed, so that Ray retries it; carries the failed result."""

    def __init__(self, result: JobResult):
        super().__init__(result.error)
        self.result = result

    def __reduce__(self) -> tuple[type, tuple[JobResult]]:
        """Pickle with the result (Exception pickles its args, the one-line error, by default)."""
        return JobFailed, (self.result,)


def _checked(result: JobResult) -> JobResult:
    """Return an ok result; raise a failed one as JobFailed."""
    if result.status != "ok":
        raise JobFailed(result)
    return result


@dataclass(frozen=True)
class Planned:
    """A job cut into position chunks by its planning task, with the seconds that task took (building, planning)."""

    chunks: list[Chunk]
    seconds: float


@ray.remote
def _start(job: Job, limit: int) -> JobResult | Planned:
    """Plan a job on a worker: run it whole, or return its position chunks when it has more than `limit`.

    Like every task of a job, it runs within the job's time limit and fails the job for whatever it raises.
    """
    outcome = attempt(job, lambda started: _plan(job, limit, started))
    return _checked(outcome) if isinstance(outcome, JobResult) else outcome


def _plan(job: Job, limit: int, started: float) -> JobResult | Planned:
    """Build a job's model and resolve its positions; return its chunks, or run it whole with those counted."""
    model = models.build(job.spec)
    selected = selected_positions(model, job)
    if len(selected) > limit:
        return Planned(split(job, math.ceil(len(selected) / limit)), time.perf_counter() - started)
    main = main_sweep(model, job, selected)
    return run_job(job, main=main, spent=time.perf_counter() - started)


@ray.remote
def _sweep_chunk(chunk: Chunk) -> SweepResult:
    """Sweep one position chunk on a worker; its `seconds` are the whole task's (building the model too)."""
    started = time.perf_counter()
    try:
        with time_limit(chunk.job.spec.name, chunk.job.time_limit):
            swept = run_chunk(chunk)
    except JobTimeout as exc:   # as a task error, so that Ray reports it (and retries it) like any other
        raise SweepError(str(exc)) from None
    return replace(swept, seconds=time.perf_counter() - started)


@ray.remote
def _finish(job: Job, planning_s: float, *parts: SweepResult) -> JobResult:
    """Merge a job's chunk sweeps in position order and run the rest of the job on them, counting every task."""
    merged = merge(parts)
    return _checked(run_job(job, main=merged, spent=planning_s + merged.seconds))


def connect(address: str | None) -> None:
    """Join the cluster at `address` (None: RAY_ADDRESS, else a new local instance) unless Ray is up already."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot join the Ray cluster at {address or 'RAY_ADDRESS or a local instance'}: "
                           f"{one_line(exc)}") from exc


def task_resources() -> dict[str, float]:
    """Return what each task asks for: one GPU when the cluster has GPUs, else one CPU."""
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) > 0 else {"num_cpus": 1}


def failure(job: Job, exc: RayError, seconds: float) -> JobResult:
    """Return the failed result of a job whose task gave up: the job's own result, or one naming the task error."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    return cause.result if isinstance(cause, JobFailed) else failed_result(job, cause, seconds)


@dataclass(frozen=True)
class RayExecutor:
    """Run jobs as Ray tasks, yielding their results in job order; progress counts jobs done out of the total.

    `address` is `auto`, `ray://HOST:PORT` or None (RAY_ADDRESS, else a new local instance); a job with
    more than `chunk_positions` output positions is swept in chunks; a failed task is retried up to
    `max_retries` times.
    """

    address: str | None = None
    chunk_positions: int = CHUNK_POSITIONS
    max_retries: int = 2
    progress: Progress = field(default_factory=Silent)

    def map(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        """Submit every job, then yield each result once it and all earlier ones are done."""
        connect(self.address)
        schedule = _Schedule(self, jobs, {**task_resources(), "max_retries": self.max_retries,
                                          "retry_exceptions": True})
        try:
            schedule.submit()
            for index in range(len(jobs)):
                while index not in schedule.results:
                    schedule.collect()
                yield schedule.results.pop(index)
        finally:
            schedule.cancel()


@dataclass
class _Schedule:
    """The tasks of one `RayExecutor.map` in flight (ref -> job index), and the results not yet yielded."""

    executor: RayExecutor
    jobs: Sequence[Job]
    options: dict[str, Any]
    pending: dict[ray.ObjectRef, int] = field(default_factory=dict)
    results: dict[int, JobResult] = field(default_factory=dict)
    finished: int = 0
    started: float = field(default_factory=time.perf_counter)

    def submit(self) -> None:
        """Submit one task per job (it plans the job, then runs it whole or returns its chunks)."""
        limit = self.executor.chunk_positions
        self.pending = {_start.options(**self.options).remote(job, limit): i for i, job in enumerate(self.jobs)}

    def collect(self) -> None:
        """Wait for the next task to end: record its job's result, or submit the chunks it planned."""
        (ref,), _ = ray.wait(list(self.pending), num_returns=1)
        index = self.pending.pop(ref)
        job = self.jobs[index]
        try:
            outcome = ray.get(ref)
        except RayError as exc:
            outcome = failure(job, exc, time.perf_counter() - self.started)
        if isinstance(outcome, Planned):
            self.pending[self.submit_chunks(job, outcome)] = index
        else:
            self.record(index, outcome)

    def submit_chunks(self, job: Job, planned: Planned) -> ray.ObjectRef:
        """Sweep each chunk in its own task; return the task that merges and analyses them."""
        chunks = planned.chunks
        logger.info("%s: %d positions in %d chunks", job.slug, sum(len(c.positions) for c in chunks), len(chunks))
        parts = [_sweep_chunk.options(**self.options).remote(chunk) for chunk in chunks]
        return _finish.options(**self.options).remote(job, planned.seconds, *parts)

    def record(self, index: int, result: JobResult) -> None:
        """Keep a finished job's result and advance the progress by one job (pipeline.outputs logs it)."""
        self.executor.progress.start(self.jobs[index], self.finished, len(self.jobs))
        self.executor.progress.finish(result)
        self.results[index] = result
        self.finished += 1

    def cancel(self) -> None:
        """Cancel the tasks still in flight (an interrupted or abandoned run leaves nothing queued)."""
        if ray.is_initialized():
            for ref in self.pending:
                ray.cancel(ref)
