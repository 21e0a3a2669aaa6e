"""The allocator thresholds of a command-line process: set through mallopt, left alone when the user set them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rfreport.run import allocator

PROBE = "from rfreport.run.allocator import reuse_freed_memory; print(reuse_freed_memory())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_fresh_process_takes_the_thresholds():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env={"PATH": ""})
    assert done.stdout.strip() == "True"


@pytest.mark.parametrize("env", [{"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
                                 {"MALLOC_TRIM_THRESHOLD_": "0"}])
def test_thresholds_the_environment_sets_are_left_alone(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert allocator.user_chose_allocator() and not allocator.reuse_freed_memory()


def test_importing_the_library_leaves_the_allocator_alone():
    code = "import rfreport.cli, rfreport.compute.sweep, sys; print('rfreport.run.allocator' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
