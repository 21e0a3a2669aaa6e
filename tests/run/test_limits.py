"""Per-job time limits: raised in Python code naming the stage, restored after, not nested, main thread only."""

from __future__ import annotations

import logging
import signal
import threading
import time

import pytest

from rfreport.errors import JobTimeout, one_line
from rfreport.run import limits


def spin(seconds: float) -> None:
    """Busy-loop in Python for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_an_endless_loop_is_interrupted_naming_the_model_and_the_stage():
    started = time.monotonic()
    with pytest.raises(JobTimeout) as raised, limits.time_limit("net", 0.3), limits.during("main sweep"):
        while True:
            pass
    assert one_line(raised.value) == "model 'net': timed out after 0.3 s in the main sweep"
    assert time.monotonic() - started < 2


def test_the_stage_is_the_innermost_running_one_and_the_first_is_model_building():
    with pytest.raises(JobTimeout, match=r"in the model building$"), limits.time_limit("net", 0.2):
        with limits.during("cache lookup"):
            pass
        spin(5)


def test_the_timer_and_handler_are_restored_after_a_block_that_ends_in_time():
    before = signal.getsignal(signal.SIGALRM)
    with limits.time_limit("net", 5):
        spin(0.01)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) is before


def test_a_limit_inside_a_running_one_adds_nothing():
    with pytest.raises(JobTimeout, match="'outer'"), limits.time_limit("outer", 0.2), limits.time_limit("inner", 100):
        spin(5)


def test_off_the_main_thread_the_limit_is_not_enforced_and_a_warning_says_so(caplog, monkeypatch):
    monkeypatch.setattr(limits, "_warned", [])
    monkeypatch.setattr(logging.getLogger("rfreport"), "propagate", True)
    done: list[bool] = []

    def job() -> None:
        with limits.time_limit("net", 0.05):
            spin(0.2)
        done.append(True)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    assert done == [True] and "running without a limit" in caplog.text
