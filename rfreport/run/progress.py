"""Progress lines: stages slow enough to be worth a line on stderr, torch-free so `report` can use it.

A record logged with :func:`stage` carries `progress=True`; the CLI's console shows such records
at the default verbosity (and hides them with `-q`), so a piped run still says what it is doing
while the rest of the info-level log stays behind `-v`. Every stage is logged at debug level too, so
log.txt holds the timing of each. A job's outcome is logged with `job_status=True`: the console leaves
it to the progress display's status line of that job, and shows it itself only with `-q`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("rfreport")
SLOW_S = 3.0     # a stage that took at least this long gets a progress line
PROGRESS = {"progress": True}
JOB_STATUS = {"job_status": True}   # a job's outcome, which a progress display also prints as its status line


def is_progress(record: logging.LogRecord) -> bool:
    """Tell whether a log record is a progress line."""
    return bool(getattr(record, "progress", False))


def is_job_status(record: logging.LogRecord) -> bool:
    """Tell whether a log record reports a job's outcome (shown once: by the progress display when there is one)."""
    return bool(getattr(record, "job_status", False))


def announce(message: str, *args) -> None:
    """Log a progress line now (e.g. before a long stage whose end is also reported)."""
    logger.info(message, *args, extra=PROGRESS)


@contextmanager
def stage(label: str, slow_s: float | None = None) -> Iterator[None]:
    """Time a stage: a debug record always, and a progress line when it took at least `slow_s` (SLOW_S) seconds."""
    started = time.perf_counter()
    yield
    seconds = time.perf_counter() - started
    if seconds >= (SLOW_S if slow_s is None else slow_s):
        logger.info("%s took %.1f s", label, seconds, extra=PROGRESS)
    else:
        logger.debug("%s took %.1f s", label, seconds)
