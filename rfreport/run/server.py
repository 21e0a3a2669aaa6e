"""The fork server that worker processes start from (rfreport.run.workers), started as early as it helps.

The server is a process that imported torch and rfreport once (:data:`PRELOAD`) and forks one
worker per request, so no worker imports torch again and none is a fork of a process that ran
torch's parallel work. Started as `run` or `check` starts, before the command imports torch
itself, the two imports run side by side on a machine with idle CPUs instead of one after the
other. This module imports neither torch nor the pipeline, so the command line can call it first.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext

from rfreport.run.threads import choose_threads

PRELOAD = ["rfreport.run.workers"]   # what the server imports once: torch, the pipeline and its stages


def context() -> ForkServerContext:
    """Return the forkserver context, with the modules the server imports when it starts."""
    found = multiprocessing.get_context("forkserver")
    found.set_forkserver_preload(PRELOAD)
    return found


def ensure_running() -> None:
    """Start the server unless it runs, deaf to Ctrl-C from its first instruction (the parent stops the workers).

    A signal ignored at `exec` stays ignored in the new Python, and in every worker forked from it.
    """
    context()
    if threading.current_thread() is not threading.main_thread():   # signal() works in the main thread only
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def start_early(requested: str | None) -> None:
    """Start the server now, unless the jobs will likely run in-process: `--workers 1`, or under two idle CPUs."""
    if requested != "1" and choose_threads().threads >= 2:
        ensure_running()
