"""Suite-wide fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run torch on one thread: the suite's small backward passes are much slower oversubscribed on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def jobs_in_process(monkeypatch):
    """Let `workers = "auto"` find one idle CPU: runs stay in-process whatever the machine's load (no early fork
    server), and workers asked for by number (tests/run/test_workers.py) get one thread each."""
    from rfreport.run import server, threads, workers

    for module in (workers, server):
        monkeypatch.setattr(module, "choose_threads", lambda: threads.ThreadChoice(1, 1, 1.0))


@pytest.fixture(autouse=True, scope="module")
def module_cache_dir(tmp_path_factory):
    """Give each test module's module-scoped fixtures their own empty result cache, never ~/.cache/rfreport."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RFREPORT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    """Give every test its own empty result cache, never the developer's ~/.cache/rfreport."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("RFREPORT_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(autouse=True)
def strict_junit(request):
    """Parse strictly every JUnit file a test wrote under its tmp_path, whatever the test itself checks."""
    folder = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if folder is not None:   # pytest keeps the folder after its fixture ends
        from tests.support import junit_files, parse_junit

        for path in junit_files(folder):
            parse_junit(path)


def _hypothesis_profiles() -> None:
    """Explore new examples on developer machines; replay a fixed set in CI so a red build is reproducible."""
    import os

    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")


_hypothesis_profiles()
