"""The fork server starts early only where workers are likely: not with `--workers 1`, not without two idle CPUs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rfreport.run import server, threads


@pytest.mark.parametrize(("requested", "idle", "starts"), [
    (None, 2, True), ("auto", 4, True), ("3", 2, True), ("1", 4, False), (None, 1, False), ("2", 1, False)])
def test_the_server_starts_early_only_where_workers_are_likely(requested, idle, starts, monkeypatch):
    started = []
    monkeypatch.setattr(server, "choose_threads", lambda: threads.ThreadChoice(idle, 4, float(idle)))
    monkeypatch.setattr(server, "ensure_running", lambda: started.append(True))
    server.start_early(requested)
    assert started == ([True] if starts else [])


def test_starting_the_server_early_imports_no_torch_here():
    code = ("import sys; from rfreport.run import server; server.context(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
