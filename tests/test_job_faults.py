"""Models that misbehave and configs that lie: every job gets a verdict, every verdict is readable, bad input exit 2.

Factories and forwards that call sys.exit() or raise GeneratorExit, an endless loop in a forward,
error messages with terminal colour codes, NaN limits and seeds out of range, all through the CLI
with the in-process executor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rfreport import audit, runfolder, summary
from rfreport.cli import cli
from tests.support import parse_junit

NETS = '''
import sys

import torch
from torch import nn


def tiny():
    return nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3))


def exits(code=0):
    sys.exit(code)


class Exiting(nn.Module):
    def __init__(self, code):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)
        self.code = code

    def forward(self, x):
        if self.code == "generator":
            raise GeneratorExit
        sys.exit(self.code)


def exits_in_forward(code=0):
    return Exiting(code)


class Looping(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        if x.device.type == "meta":   # let the shape-only passes through: the loop is in the first pass with values
            return self.conv(x)
        while True:
            pass


def loops():
    return Looping()


def coloured():
    raise RuntimeError("\\x1b[31mCUDA error\\x1b[0m: device-side assert \\x07 triggered")
'''
SHAPE = "input_shape = [1, 1, 8, 8]\npositions = \"center\"\n"
RULE = "[model.audit]\nmin_rf = 1\n"


def model(name: str, factory: str, extra: str = "") -> str:
    """Return one [[model]] table of the test factories, with a passing audit rule."""
    return f'[[model]]\nname = "{name}"\nfactory = "nets.py:{factory}"\n{SHAPE}{extra}{RULE}'


@pytest.fixture
def ws(tmp_path) -> Path:
    """A folder holding the factory file."""
    (tmp_path / "nets.py").write_text(NETS)
    return tmp_path


def write(folder: Path, *tables: str, run: str = "") -> Path:
    """Write a config of model tables (and a [run] table) and return its path."""
    path = folder / "config.toml"
    path.write_text(run + "\n" + "\n".join(tables))
    return path


def invoke(*args):
    """Invoke the CLI with string arguments."""
    return CliRunner().invoke(cli, [str(a) for a in args])


# --------------------------------------------------------------------------------------
# sys.exit() and GeneratorExit in a model's code fail that job only


@pytest.mark.parametrize("code", [0, 3])
@pytest.mark.parametrize("where", ["exits", "exits_in_forward"])
def test_sys_exit_in_a_factory_or_forward_fails_its_job_and_the_others_run(ws, where, code):
    config = write(ws, model("before", "tiny"), model("quits", where, f"kwargs = {{ code = {code} }}\n"),
                   model("after", "tiny"))
    junit = ws / "audit.xml"
    done = invoke("check", config, "--junit", junit, "--json", "--no-cache")
    assert done.exit_code == 1, done.output
    verdicts = {m["name"]: m for m in json.loads(done.stdout)["models"]}
    assert [verdicts[n]["passed"] for n in ("before", "quits", "after")] == [True, False, True]
    assert verdicts["quits"]["status"] == "failed" and f"sys.exit({code})" in verdicts["quits"]["error"]
    suites = {suite.get("name"): suite for suite in parse_junit(junit).iter("testsuite")}
    assert suites["quits-8x8"].get("errors") == "1" and suites["after-8x8"].get("errors") == "0"


def test_sys_exit_in_a_run_leaves_a_run_folder_with_every_model(ws):
    config = write(ws, model("quits", "exits_in_forward", "kwargs = { code = 0 }\n"), model("after", "tiny"))
    done = invoke("run", config, "--out", ws / "out", "--no-cache", "-q")
    assert done.exit_code == 1 and "1 of 2 model(s) failed (quits-8x8)" in done.stderr
    assert [(m.slug, m.ok) for m in runfolder.load(ws / "out").models] == [("quits-8x8", False), ("after-8x8", True)]


def test_generator_exit_in_a_forward_fails_its_job(ws):
    config = write(ws, model("closes", "exits_in_forward", 'kwargs = { code = "generator" }\n'), model("after", "tiny"))
    done = invoke("check", config, "--json", "--no-cache")
    assert done.exit_code == 1
    closes, after = json.loads(done.stdout)["models"]
    assert closes["status"] == "failed" and "GeneratorExit" in closes["error"] and after["passed"]


def test_sys_exit_while_a_factory_file_imports_is_a_config_error(ws):
    (ws / "quitter.py").write_text("import sys\nsys.exit(0)\n")
    config = write(ws, '[[model]]\nname = "q"\nfactory = "quitter.py:build"\ninput_shape = [1, 1, 8, 8]\n')
    done = invoke("check", config)
    assert done.exit_code == 2 and "sys.exit(0)" in done.stderr and "key 'factory'" in done.stderr


def test_ctrl_c_in_a_forward_still_interrupts_the_run(ws, monkeypatch):
    from torch import nn

    def interrupted(self, x):
        raise KeyboardInterrupt

    monkeypatch.setattr(nn.Conv2d, "forward", interrupted)
    done = invoke("check", write(ws, model("tiny", "tiny")), "--no-cache")
    assert done.exit_code == 130


# --------------------------------------------------------------------------------------
# Time limits


def test_an_endless_forward_times_out_naming_the_model_and_the_stage(ws):
    config = write(ws, model("loop", "loops"), model("after", "tiny"))
    done = invoke("check", config, "--json", "--no-cache", "--job-timeout", "1")
    assert done.exit_code == 1, done.output
    loop, after = json.loads(done.stdout)["models"]
    assert loop["error"] == "model 'loop': timed out after 1 s in the attention search"
    assert after["passed"]
    assert "[1/2] loop-8x8: running" in done.stderr   # the progress says which model runs


def test_the_time_limit_comes_from_the_run_table_and_a_model_key(ws):
    config = write(ws, model("loop", "loops", "job_timeout = 1\n"), run="[run]\njob_timeout = 100\n")
    done = invoke("check", config, "--json", "--no-cache")
    assert json.loads(done.stdout)["models"][0]["error"] == "model 'loop': timed out after 1 s in the attention search"
    config = write(ws, model("loop", "loops"), run="[run]\njob_timeout = 1.5\n")
    done = invoke("check", config, "--json", "--no-cache")
    [verdict] = json.loads(done.stdout)["models"]
    assert verdict["error"] == "model 'loop': timed out after 1.5 s in the attention search"


def test_a_job_within_its_limit_is_untouched_and_the_alarm_is_disarmed(ws):
    import signal

    done = invoke("check", write(ws, model("tiny", "tiny")), "--no-cache", "--job-timeout", "60")
    assert done.exit_code == 0, done.output
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.default_int_handler, None)


# --------------------------------------------------------------------------------------
# JUnit files stay valid XML


def test_a_control_character_in_an_error_leaves_the_junit_file_valid(ws):
    junit = ws / "audit.xml"
    done = invoke("check", write(ws, model("colour", "coloured")), "--junit", junit, "--no-cache")
    assert done.exit_code == 1
    (error,) = parse_junit(junit).iter("error")
    assert error.get("message") == ("the job failed: model 'colour': factory nets.py:coloured raised RuntimeError: "
                                    "CUDA error: device-side assert \\x07 triggered").replace(
        "nets.py", str(ws / "nets.py"))


def test_xml_text_keeps_what_xml_allows_and_names_the_rest():
    assert audit.xml_text("tab\tnew\nline é ✓ \U0001F600") == "tab\tnew\nline é ✓ \U0001F600"
    assert audit.xml_text("\x1b[1;31mred\x1b[0m \x00 \x0b \ufffe") == "red \\x00 \\x0b \\xfffe"


# --------------------------------------------------------------------------------------
# Values refused at validation (exit 2, one line naming the file and the key)


@pytest.mark.parametrize(("table", "key", "problem"), [
    ("[model.audit]\nmax_edge_fraction = nan\n", "audit.max_edge_fraction", "must be a finite number, not nan"),
    ("[model.audit]\nmax_center_offset = inf\n", "audit.max_center_offset", "must be a finite number, not inf"),
    ("job_timeout = 0\n", "job_timeout", "must be a number of seconds > 0, not 0"),
    ("job_timeout = nan\n", "job_timeout", "must be a finite number, not nan"),
])
def test_a_non_finite_or_empty_limit_is_refused(ws, table, key, problem):
    config = write(ws, f'[[model]]\nname = "m"\nfactory = "nets.py:tiny"\n{SHAPE}{table}')
    done = invoke("check", config)
    assert done.exit_code == 2 and done.stderr == f"Error: {config}: model 'm': key {key!r}: {problem}\n"


@pytest.mark.parametrize(("run", "problem"), [
    ("seed = -1", "must be between 0 and 9223372036854775807 (2**63 - 1), not -1"),
    ("seed = 9223372036854775808", "must be between 0 and 9223372036854775807 (2**63 - 1), not 9223372036854775808"),
    ("device = 'gpu'", "unknown device 'gpu' (auto, cpu, cuda, cuda:N, mps, xpu or xpu:N)"),
])
def test_a_seed_or_device_out_of_range_is_refused(ws, run, problem):
    key = run.split()[0]
    config = write(ws, model("m", "tiny"), run=f"[run]\n{run}\n")
    done = invoke("check", config)
    assert done.exit_code == 2 and done.stderr == f"Error: {config}: [run]: key {key!r}: {problem}\n"


def test_a_seed_of_64_bits_is_refused_by_toml_and_by_the_flag(ws):
    config = write(ws, model("m", "tiny"))
    done = invoke("check", config, "--seed", str(2**63))
    assert done.exit_code == 2 and "--seed" in done.stderr
    done = invoke("check", config, "--seed", "-1")
    assert done.exit_code == 2 and "--seed" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_a_config_error_naming_its_file_or_flag(ws):
    config = write(ws, model("m", "tiny"), run="[run]\ndevice = 'cuda'\n")
    done = invoke("check", config)
    assert done.exit_code == 2
    assert done.stderr == (f"Error: {config}: [run]: key 'device': device 'cuda' was asked for but CUDA is not "
                           "available\n")
    done = invoke("run", write(ws, model("m", "tiny")), "--out", ws / "out", "--device", "cuda:1")
    assert done.exit_code == 2 and done.stderr.startswith("Error: --device: device 'cuda:1' was asked for")
    assert not (ws / "out").exists()
    done = invoke("inspect", f"{ws / 'nets.py'}:tiny", "--input-shape", "1,1,8,8", "--device", "cuda")
    assert done.exit_code == 2 and "--device" in done.stderr and "CUDA is not available" in done.stderr


def test_check_json_prints_standard_json_for_non_finite_values(ws):
    done = invoke("run", write(ws, model("m", "tiny")), "--out", ws / "run", "-q")
    assert done.exit_code == 0, done.output
    summary = json.loads((ws / "run" / "summary.json").read_text())
    row = summary["models"][0]["audit"][0]
    row["value"] = math.nan   # the verdict stays what the rule gives (an edited verdict is refused on load)
    (ws / "run" / "summary.json").write_text(json.dumps(summary))
    done = invoke("check", ws / "run", "--json")

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    verdicts = json.loads(done.stdout, parse_constant=refuse)
    assert done.exit_code == (0 if row["passed"] else 1) and verdicts["models"][0]["audit"][0]["value"] is None


def test_finite_replaces_nan_and_infinity_only():
    assert summary.finite({"a": [math.nan, 1.5, -math.inf], "b": (2, "x", None)}) == {"a": [None, 1.5, None],
                                                                                    "b": [2, "x", None]}
