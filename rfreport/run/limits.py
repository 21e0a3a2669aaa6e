"""Per-job time limits: a job running past its limit fails naming its model and the stage it was in.

The limit is a POSIX interval timer (`signal.setitimer`) whose SIGALRM handler raises
:class:`~rfreport.errors.JobTimeout` in the main thread, in the middle of whatever Python code runs
there (an endless loop in a `forward` included). Why a signal and not a worker process per job:
the job keeps running in this process, with its progress bars, its log records and the models
and imports it shares with the other jobs, and a job that finishes in time costs nothing. The
trade-offs, documented in docs/config.md:

* Python runs a signal handler between bytecodes only: one long call into C++ (a huge
  convolution, a blocking CUDA op) is interrupted when it returns, so the job fails late;
* a model that swallows every exception (`except BaseException:` in a loop) can hold on past its
  limit; the handler re-raises every :data:`REPEAT_S` seconds until the job lets go;
* signals exist on POSIX only and reach the main thread only: elsewhere (Windows, a job run in a
  thread) the limit is not enforced, and a warning says so once.

Limits do not nest: a job's limit covers everything run inside it, and a limit asked for inside
a running one (a Ray task that plans a job and then runs it) adds nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rfreport.errors import JobTimeout

logger = logging.getLogger("rfreport")
REPEAT_S = 1.0          # after the limit, the timeout is raised again this often until the job gives way
FIRST_STAGE = "model building"


@dataclass
class _Clock:
    """The running job's limit: whom it names, how long it is, and the stage running now."""

    model: str
    seconds: float
    stage: str = FIRST_STAGE

    def expired(self) -> JobTimeout:
        """Return the timeout of this job in its current stage."""
        return JobTimeout(f"model {self.model!r}: timed out after {self.seconds:g} s in the {self.stage}")


_running: list[_Clock] = []     # at most one: the job whose limit is armed
_warned: list[bool] = []


def supported() -> bool:
    """Tell whether a limit can be enforced here: a POSIX interval timer, in the main thread."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def time_limit(model: str, seconds: float | None) -> Iterator[None]:
    """Raise JobTimeout in this block once it has run `seconds` (no limit when None, or inside a running limit)."""
    if seconds is None or _running or not supported():
        if seconds is not None and not _running and not _warned:
            _warned.append(True)
            logger.warning("job time limits need POSIX signals in the main thread; running without a limit")
        yield
        return
    clock = _Clock(model, seconds)

    def expire(_signum: int, _frame: Any) -> None:
        signal.setitimer(signal.ITIMER_REAL, REPEAT_S)   # again, should the model's code swallow this one
        raise clock.expired()

    previous = signal.signal(signal.SIGALRM, expire)
    _running.append(clock)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _running.clear()


@contextmanager
def during(stage: str) -> Iterator[None]:
    """Name the stage a timeout in this block reports (the enclosing stage again after it)."""
    if not _running:
        yield
        return
    clock = _running[0]
    outer, clock.stage = clock.stage, stage
    try:
        yield
    finally:
        clock.stage = outer
