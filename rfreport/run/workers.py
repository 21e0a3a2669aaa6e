"""Jobs side by side in worker processes, results in job order: the local executor's `workers`.

torch spreads the small and medium ops of one job poorly over several threads (a whole run of the
example configs kept about 1.2 of 2 CPUs busy), so independent jobs run at once in worker
processes instead, each with its share of the CPUs:

* **How many.** `workers = "auto"` (the default of `run` and `check`) takes one worker per usable CPU
  (affinity, cgroup quota) that is idle now (:mod:`rfreport.run.threads`), at most one per job, and
  divides those CPUs among the workers as intra-op threads (at least one each); an explicit
  `OMP_NUM_THREADS` is every worker's thread count. One worker is the in-process loop
  (:class:`rfreport.run.executors.LocalExecutor`).
* **Started from a fork server** that imported torch and rfreport once (:mod:`rfreport.run.server`):
  a worker starts without importing torch again, and no worker is a fork of a process that ran
  parallel torch work (OpenMP hangs after such a fork).
  A worker takes the parent's environment and folder, runs one job at a time as the parent hands
  them out, and lives until the run ends.
* **Largest input first.** Jobs are handed out largest input first (:func:`largest_first`); results
  still come back in job order.
* **One pipe per worker** carries, in order, the job's start, its log records (stage timings,
  warnings, tracebacks for log.txt) and its result, so a job's lines come before its verdict and
  a dying worker garbles no other worker's messages.
* **Faults.** A job that raises fails alone, as in-process (:func:`rfreport.run.pipeline.run_job`). A
  worker that dies (the out-of-memory killer's SIGKILL, a segfault in a model's C code,
  `os._exit`) fails the job it was running with one line naming the model and the signal; a new
  worker takes its place and the other jobs run on. A job's time limit (:mod:`rfreport.run.limits`)
  runs in its worker's main thread; a worker still busy :data:`GRACE_S` after it (stuck in one call
  into C++, which a signal cannot interrupt) is killed, and the job fails as timed out. Workers
  ignore Ctrl-C; the parent stops them (SIGTERM, then SIGKILL) and raises it. Only the parent
  writes the run folder; the result cache writes each entry atomically (:mod:`rfreport.run.cache`),
  so workers storing at once are safe.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from logging.handlers import QueueHandler
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from rfreport.errors import RfReportError
from rfreport.run import threads
from rfreport.run.allocator import freeze_loaded, manage_collector, reuse_freed_memory
from rfreport.run.jobs import Job, JobResult, Progress
from rfreport.run.pipeline import failed_result, run_job
from rfreport.run.server import context, ensure_running
from rfreport.run.threads import choose_threads, user_chose_threads

logger = logging.getLogger("rfreport")
STOP_S = 5.0                         # how long a worker told to stop may take before it is killed
GRACE_S = 5.0                        # how long past its time limit a job's worker may take before it is killed


class WorkerDied(RfReportError):
    """The worker process running a job ended without returning its result (killed, crashed, exited)."""


@dataclass(frozen=True)
class Share:
    """How a run's jobs share the CPUs: worker processes, and intra-op threads each (None: the user's choice)."""

    workers: int
    threads: int | None


def share(requested: int | str, jobs: int) -> Share:
    """Choose a run's workers: `requested`, or for "auto" the usable CPUs idle now; at most one per job."""
    free = choose_threads().threads
    count = max(1, min(free if requested == "auto" else int(requested), jobs))
    return Share(count, None if user_chose_threads() else max(1, free // count))


# --- the worker's side -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What a worker starts with: the parent's environment (the fork server's is older), its threads, the log level."""

    environ: dict[str, str]
    threads: int | None
    level: int


@dataclass(frozen=True)
class Started:
    """A worker began job `index`."""

    index: int


@dataclass(frozen=True)
class Finished:
    """A worker's result of job `index`."""

    index: int
    result: JobResult


class Forward(QueueHandler):
    """Send a worker's log records through its pipe, formatted (tracebacks included) so that they pickle."""

    def enqueue(self, record: logging.LogRecord) -> None:
        """Send one prepared record to the parent."""
        self.queue.send(record)


def serve(conn: Connection, setup: Setup) -> None:
    """Run the jobs the parent sends, one at a time, until it sends None or goes away: a worker's life."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle: it stops the workers
    os.environ.clear()
    os.environ.update(setup.environ)
    reuse_freed_memory()   # the fork server is a fresh interpreter: the command's allocator choice is not inherited
    manage_collector()
    freeze_loaded()        # what the fork server imported (torch, the stages) stays out of the collector's walks
    if setup.threads is not None:
        threads.use(setup.threads)
    log = logging.getLogger("rfreport")
    log.handlers, log.propagate = [Forward(conn)], False
    log.setLevel(setup.level)
    while (message := receive(conn)) is not None:
        index, job = message
        conn.send(Started(index))
        conn.send(Finished(index, run_job(job)))


def receive(conn: Connection) -> tuple[int, Job] | None:
    """Return the next (index, job) from the parent; None when it says stop or has gone."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


# --- the parent's side -----------------------------------------------------------------------------------------------


@dataclass
class Worker:
    """A worker process, the parent's end of its pipe, and the job it runs (index, when it was sent) if any."""

    process: BaseProcess
    conn: Connection
    job: int | None = None
    since: float = 0.0


def start_worker(setup: Setup) -> Worker:
    """Start one worker from the fork server (which starts on first use unless it was started early)."""
    forks = context()
    ensure_running()
    parent, child = forks.Pipe()
    process = forks.Process(target=serve, args=(child, setup), name="rfreport-worker", daemon=True)
    process.start()
    child.close()   # the worker holds the only other end: its death closes the pipe
    return Worker(process, parent)


def death(code: int | None) -> str:
    """Say how a worker process ended, from its exit code."""
    if code is None:
        return "stopped answering"
    if code < 0:
        name = signal.Signals(-code).name
        return f"was killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exited with status {code}"


def largest_first(jobs: Sequence[Job]) -> list[int]:
    """Return the order jobs are handed out in: the largest input first, config order among equals.

    A job's passes grow with its input, so this is the longest-processing-time rule on the one cost
    known before a model is built: the large jobs start first and the small ones fill the gaps at the
    end, where in config order a large job listed last would run alone while the other workers idle.
    """
    return sorted(range(len(jobs)), key=lambda index: -math.prod(jobs[index].input_shape))


@dataclass
class Pool:
    """Worker processes running a run's jobs: results kept by job index until they can be yielded in order."""

    jobs: Sequence[Job]
    share: Share
    progress: Progress
    waiting: deque[int] = field(init=False)
    workers: list[Worker] = field(default_factory=list)
    results: dict[int, JobResult] = field(default_factory=dict)
    announced: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.waiting = deque(largest_first(self.jobs))

    def map(self) -> Iterator[JobResult]:
        """Run every job in the workers and yield the results in job order; stop the workers however it ends."""
        setup = Setup(dict(os.environ), self.share.threads, logger.getEffectiveLevel())
        logger.info("%d jobs in %d worker processes, torch threads each: %s", len(self.jobs), self.share.workers,
                    self.share.threads or "OMP_NUM_THREADS")
        finished = False
        try:
            self.workers = [start_worker(setup) for _ in range(self.share.workers)]
            for index in range(len(self.jobs)):
                while index not in self.results:
                    self.dispatch(setup)
                    self.collect()
                yield self.results.pop(index)
            finished = True
        finally:
            self.stop(gently=finished)

    def dispatch(self, setup: Setup) -> None:
        """Hand a waiting job to every idle worker, replacing the workers that died."""
        while len(self.workers) < self.share.workers and self.waiting:
            self.workers.append(start_worker(setup))
        for worker in self.workers:
            if worker.job is None and self.waiting:
                worker.job, worker.since = self.waiting.popleft(), time.perf_counter()
                with suppress(OSError):   # a worker that died idle: collect() finds its closed pipe
                    worker.conn.send((worker.job, self.jobs[worker.job]))

    def collect(self) -> None:
        """Wait until a worker sends something or ends, or a job overruns its limit, and handle it."""
        deadlines = {id(w): self.deadline(w) for w in self.workers}
        due = [d for d in deadlines.values() if d is not None]
        timeout = max(0.0, min(due) - time.perf_counter()) if due else None
        ready = set(wait([w.conn for w in self.workers] + [w.process.sentinel for w in self.workers], timeout))
        for worker in list(self.workers):
            if worker.conn in ready or worker.process.sentinel in ready:
                self.drain(worker)
            elif (deadline := deadlines[id(worker)]) is not None and time.perf_counter() >= deadline:
                worker.process.kill()
                limit = self.jobs[worker.job].time_limit
                self.bury(worker, f"timed out after {limit:g} s; its worker process did not stop, and was killed")

    def deadline(self, worker: Worker) -> float | None:
        """Return when a busy worker is killed: GRACE_S after its job's time limit (None: no job, no limit)."""
        limit = self.jobs[worker.job].time_limit if worker.job is not None else None
        return None if limit is None else worker.since + limit + GRACE_S

    def drain(self, worker: Worker) -> None:
        """Handle every message a worker has sent; a closed pipe means it died."""
        try:
            while worker.conn.poll():
                self.handle(worker, worker.conn.recv())
        except (EOFError, OSError):
            self.bury(worker)

    def handle(self, worker: Worker, message: object) -> None:
        """Act on one message of a worker: a job's start, a log record, a job's result."""
        if isinstance(message, Started):
            worker.since = time.perf_counter()
            self.announce(message.index)
        elif isinstance(message, logging.LogRecord):
            if logger.isEnabledFor(message.levelno):
                logging.getLogger(message.name).handle(message)
        elif isinstance(message, Finished):
            worker.job = None
            self.finish(message.index, message.result)

    def bury(self, worker: Worker, reason: str | None = None) -> None:
        """Remove a dead worker; fail the job it was running with `reason`, else with how the worker died."""
        worker.process.join(STOP_S)
        if worker.process.is_alive():
            worker.process.kill()
        worker.conn.close()
        self.workers.remove(worker)
        if worker.job is not None:
            job = self.jobs[worker.job]
            reason = reason or f"its worker process {death(worker.process.exitcode)}"
            error = WorkerDied(f"model {job.spec.name!r}: {reason}")
            self.announce(worker.job)
            self.finish(worker.job, failed_result(job, error, time.perf_counter() - worker.since))

    def announce(self, index: int) -> None:
        """Report a job's start, once."""
        if index not in self.announced:
            self.announced.add(index)
            self.progress.start(self.jobs[index], index, len(self.jobs))

    def finish(self, index: int, result: JobResult) -> None:
        """Keep a job's result and report its end."""
        self.results[index] = result
        self.progress.finish(result)

    def stop(self, gently: bool) -> None:
        """End every worker: asked to stop after the last job, else (an interrupt, an error) at once."""
        for worker in self.workers:
            if not gently:
                worker.process.terminate()
            with suppress(OSError):
                worker.conn.send(None)
        for worker in self.workers:
            worker.process.join(STOP_S if gently else 1.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.workers = []
