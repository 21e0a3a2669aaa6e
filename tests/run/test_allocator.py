"""The memory settings of a command-line process: the allocator thresholds set through mallopt, left alone when the
user set them; what is loaded kept out of the garbage collector's walks in the command's process only."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
from click.testing import CliRunner

from rfreport.cli import cli
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


def test_the_command_freezes_what_it_loaded_and_a_caller_running_it_in_process_does_not():
    code = ("import gc, sys\n"
            "from rfreport import cli\n"
            "sys.argv = ['rfreport', 'inspect', 'rfreport.examples:dilated_net', '--input-shape', '1,3,16,16',"
            " '--no-cache', '-q']\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(gc.get_freeze_count())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) > 10_000       # torch's and the pipeline's modules, at least
    before = gc.get_freeze_count()
    result = CliRunner().invoke(cli, ["inspect", "rfreport.examples:dilated_net", "--input-shape", "1,3,16,16",
                                      "--no-cache", "-q"])
    assert result.exit_code == 0 and gc.get_freeze_count() == before
