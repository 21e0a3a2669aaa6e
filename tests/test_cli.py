"""The click CLI through CliRunner: run, report, check, diff and inspect, their exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rfreport import cli as cli_mod
from rfreport import runfolder
from rfreport.cli import cli
from rfreport.run.executors import Silent
from tests.oracle import support_mask
from tests.support import NETS, TINY, assert_gold, parse_junit, tf_same_before

MODEL = 'name = "{name}"\nfactory = "nets.py:{factory}"\ninput_shape = [1, 1, 17, 17]\npositions = "all"\n'
CONFIGS = {
    "good.toml": f"[[model]]\n{MODEL.format(name='tiny', factory='tiny')}[model.audit]\nmin_rf = 5\nno_unseen = true\n",
    "strict.toml": f"[[model]]\n{MODEL.format(name='tiny', factory='tiny')}[model.audit]\nmin_rf = [100, 5]\n",
    "wide.toml": f"[[model]]\n{MODEL.format(name='tiny', factory='tiny')}kwargs = {{ k = 5 }}\n"
                 "[model.audit]\nmin_rf = 5\nno_unseen = true\n",
    "mixed.toml": f"[[model]]\n{MODEL.format(name='tiny', factory='tiny')}[[model]]\n"
                  f"{MODEL.format(name='broken', factory='broken')}",
    "bad.toml": f"[[model]]\n{MODEL.format(name='tiny', factory='tiny')}bogus = 1\n",
    "ci.toml": f"[[model]]\n{MODEL.format(name='tiny', factory='tiny')}[model.audit]\nmin_rf = 100\nno_unseen = true\n"
               f"[[model]]\n{MODEL.format(name='broken', factory='broken')}[model.audit]\nmin_rf = 1\n",
    "norules.toml": f"[[model]]\n{MODEL.format(name='tiny', factory='tiny')}[model.audit]\nno_global = false\n",
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A folder with the factory file and the configs."""
    root = tmp_path_factory.mktemp("cli")
    (root / "nets.py").write_text(NETS)
    for name, text in CONFIGS.items():
        (root / name).write_text(text)
    return root


def invoke(*args: str):
    """Invoke the CLI with string arguments."""
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def good(ws):
    """Run good.toml once; return the click result."""
    return invoke("run", ws / "good.toml", "--out", ws / "good")


@pytest.fixture(scope="module")
def good_run(ws, good) -> Path:
    """The run folder of good.toml."""
    assert good.exit_code == 0, good.output
    return ws / "good"


def test_run_writes_the_folder_and_prints_only_the_report_path(good, good_run):
    assert good.stdout == f"{good_run / 'index.html'}\n"
    run = runfolder.load(good_run)
    assert [(m.slug, m.status) for m in run.models] == [("tiny-17x17", "ok")]
    files = {p.relative_to(good_run).as_posix() for p in good_run.rglob("*") if p.is_file()}
    assert {"summary.json", "log.txt", "index.html", "models/tiny-17x17/positions.parquet",
            "models/tiny-17x17/positions.csv", "models/tiny-17x17/edges.csv", "models/tiny-17x17/coverage.npy"} <= files
    assert "tiny-17x17: ok" in (good_run / "log.txt").read_text()


def test_a_failing_model_is_recorded_and_the_exit_code_is_1(ws):
    done = invoke("run", ws / "mixed.toml", "--out", ws / "mixed")
    assert done.exit_code == 1
    assert done.stdout == f"{ws / 'mixed' / 'index.html'}\n"
    assert "Error: 1 of 2 model(s) failed (broken-17x17)" in done.stderr and "Traceback" not in done.output
    statuses = {m.slug: (m.status, m.entry["error"]) for m in runfolder.load(ws / "mixed").models}
    assert statuses["tiny-17x17"] == ("ok", None)
    assert statuses["broken-17x17"][0] == "failed" and "no model today" in statuses["broken-17x17"][1]


REPORT_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from rfreport.cli import main
sys.argv = ["rfreport", "report", {path!r}]
main()
"""


def test_report_rerenders_without_importing_torch(good_run):
    (good_run / "index.html").unlink()
    code = REPORT_WITHOUT_TORCH.format(path=str(good_run))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(good_run / "index.html") and (good_run / "index.html").is_file()


def test_report_on_a_missing_folder_is_a_usage_error(ws):
    done = invoke("report", ws / "nowhere")
    assert done.exit_code == 2 and done.stderr == f"Error: {ws / 'nowhere'}: no run folder there\n"


def test_check_a_run_folder_that_passes(good_run):
    done = invoke("check", good_run)
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["model", "rule", "limit", "value", "result", "note"]
    assert [line.split() for line in lines[2:]] == [["tiny-17x17", "min_rf", "5", "13", "x", "13", "pass"],
                                                    ["tiny-17x17", "no_unseen", "True", "0", "pass"]]


def test_check_a_config_whose_audit_fails(ws):
    done = invoke("check", ws / "strict.toml")
    assert done.exit_code == 1
    assert "min_rf  100 x 5  13 x 13  FAIL" in done.stdout
    assert done.stderr.endswith("Error: audit failed for tiny-17x17\n")


def test_config_errors_exit_2_with_one_line_naming_file_model_and_key(ws):
    for command in ("check", "run"):
        extra = ["--out", ws / "never"] if command == "run" else []
        done = invoke(command, ws / "bad.toml", *extra)
        assert done.exit_code == 2
        assert done.stderr.startswith(f"Error: {ws / 'bad.toml'}: model 'tiny': key 'bogus': unknown key")
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.output
    assert not (ws / "never").exists()


def test_check_of_a_config_with_only_level_rules_judges_them(tmp_path):
    config = tmp_path / "levels.toml"
    config.write_text('[[model]]\nname = "lvl"\nfactory = "rfreport.examples:dilated_net"\n'
                      'input_shape = [1, 3, 32, 32]\n'
                      'levels = [{layer = "1", name = "mid", audit = {max_stride = 0.5}}]\n')
    done = invoke("check", config, "--workers", "1", "--no-cache", "--junit", tmp_path / "j.xml")
    assert done.exit_code == 1 and 'name="max_stride (level mid)"' in (tmp_path / "j.xml").read_text()


def test_check_rejects_a_run_folder_mixed_with_configs(ws, good_run):
    done = invoke("check", good_run, ws / "good.toml")
    assert done.exit_code == 2 and "either one RUN_DIR or" in done.output


def test_diff_of_a_run_with_itself_has_no_changes(good_run):
    done = invoke("diff", good_run, good_run, "--fail-on-change")
    assert done.exit_code == 0 and done.stdout == "no changes\n"


def test_diff_lists_changes_and_fails_on_request(ws, good_run):
    assert invoke("run", ws / "wide.toml", "--out", ws / "wide").exit_code == 0
    done = invoke("diff", good_run, ws / "wide")
    assert done.exit_code == 0
    rows = {line.split("  ")[1].strip(): line for line in done.stdout.splitlines()[2:]}
    assert "13 × 13" in rows["architecture RF"] and "15 × 15" in rows["architecture RF"]
    assert "padding" in rows and "width=" not in done.stdout and "k=5" in rows["config: keyword arguments"]
    failing = invoke("diff", good_run, ws / "wide", "--fail-on-change")
    assert failing.exit_code == 1 and "1 model(s) changed between" in failing.stderr


def inspect_json(ws: Path, *args: str) -> dict:
    """Run inspect --json on the tiny model and return its one JSON object."""
    done = invoke("inspect", f"{ws / 'nets.py'}:tiny", "--input-shape", "1,1,17,17", "--json", *args)
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def test_inspect_json_has_exactly_the_documented_schema(ws):
    record = inspect_json(ws, "--pos", "3,3", "--positions", "corners")
    assert list(record) == ["model", "input_shape", "output_shape", "mode", "positions", "geometry", "verified",
                            "violations", "exact", "cached"]
    assert record["verified"] == 5 and record["violations"] == 0 and record["exact"] is True
    assert record["input_shape"] == [1, 1, 17, 17] and record["output_shape"] == [1, 1, 8, 8]
    assert record["mode"] == "structural"
    assert [p["pos"] for p in record["positions"]] == [[0, 0], [0, 7], [3, 3], [7, 0], [7, 7]]
    assert record["geometry"] == {"arch_rf_size": [13, 13], "in_input_rf_size": [13, 13], "stride": [2, 2],
                                  "padding": [5, 5], "center_offset": [0.5, 0.5],
                                  "affine": True, "global": False,
                                  "global_from": None, "global_op": None, "arch_rf_fit": ["affine", "affine"],
                                  "size_dependent": None, "estimated": None}
    for entry in record["positions"]:
        assert list(entry) == ["pos", "lo", "hi", "wrap", "size", "support", "fill", "edge", "verified",
                               "violations"]
        assert entry["wrap"] == [False, False]
        assert entry["verified"] is True and entry["violations"] == 0
        mask = support_mask(TINY, (17, 17), tuple(entry["pos"]))
        hs, ws_ = np.nonzero(mask)
        assert entry["lo"] == [hs.min(), ws_.min()] and entry["hi"] == [hs.max(), ws_.max()]
        assert entry["size"] == [hs.max() - hs.min() + 1, ws_.max() - ws_.min() + 1]
        assert entry["support"] == mask.sum() and entry["fill"] == 1.0
    assert [p["edge"] for p in record["positions"]] == [True, True, False, True, True]


def test_inspect_json_flags_per_axis_a_box_unrolled_round_the_border():
    done = invoke("inspect", "rfreport.examples:circular_net", "--input-shape", "1,3,32,24", "--json",
                  "--positions", "corners", "--pos", "4,3")
    assert done.exit_code == 0, done.output
    for entry in json.loads(done.output)["positions"]:
        lo, hi, wrap = np.array(entry["lo"]), np.array(entry["hi"]), entry["wrap"]
        assert wrap == ((lo < 0) | (hi >= [32, 24])).tolist()
        assert any(wrap) == (entry["pos"] != [4, 3])


def test_inspect_geometry_is_filled_for_a_single_position(ws):
    record = inspect_json(ws)
    assert [p["pos"] for p in record["positions"]] == [[3, 3]]
    assert record["geometry"]["stride"] == [2, 2] and record["geometry"]["arch_rf_size"] == [13, 13]


def test_inspect_geometry_is_exact_when_every_rf_is_clipped(ws):
    done = invoke("inspect", f"{ws / 'nets.py'}:tiny", "--input-shape", "1,1,5,5", "--json")
    assert done.exit_code == 0, done.output
    geometry = json.loads(done.stdout)["geometry"]
    assert geometry == {"arch_rf_size": [13, 13], "in_input_rf_size": [4, 4], "stride": [2, 2], "padding": [5, 5],
                        "center_offset": [0.5, 0.5], "affine": True, "global": False, "global_from": None,
                        "global_op": None, "arch_rf_fit": ["enlarged", "enlarged"], "size_dependent": None,
                        "estimated": None}


def test_inspect_json_says_why_a_size_dependent_geometry_is_estimated(tmp_path):
    (tmp_path / "sizenets.py").write_text(
        "from torch import nn\n\n\ndef pooled():\n    return nn.Sequential(nn.Conv2d(1, 1, 5, padding=2), "
        "nn.Conv2d(1, 1, 5, padding=2), nn.AdaptiveAvgPool2d(2))\n")
    # a 2x2 adaptive pool over an 8x8 map: every RF is clipped, and no larger input may stand in for this one
    done = invoke("inspect", f"{tmp_path / 'sizenets.py'}:pooled", "--input-shape", "1,1,8,8", "--json")
    assert done.exit_code == 0, done.output
    geometry = json.loads(done.stdout)["geometry"]
    assert geometry["arch_rf_fit"] == ["estimated", "estimated"] and geometry["affine"] is False
    assert geometry["size_dependent"] == ["adaptive_avg_pool2d"]
    reasons = geometry["estimated"].split("; w: ")
    assert reasons[0].startswith("h: ") and len(reasons) == 2
    assert all("the geometry depends on the input size (adaptive_avg_pool2d)" in r for r in reasons)
    shown = invoke("inspect", f"{tmp_path / 'sizenets.py'}:pooled", "--input-shape", "1,1,8,8")
    assert "arch_rf_fit: estimated x estimated" in shown.output
    assert "size_dependent: adaptive_avg_pool2d" in shown.output


@pytest.mark.parametrize("n, fit, shifted", [(7, "estimated", True), (16, "affine", False), (33, "affine", True)])
def test_inspect_takes_no_geometry_from_an_input_that_pads_otherwise(n, fit, shifted):
    """TensorFlow's "same" pads 2 before a 7-cell axis and 1 before a 14-cell one: at 7 every RF is clipped, and
    the doubled input may not lend its padding (nor its fit) to this size. At 33 the geometry is measured here
    (exact) but pads 2 where 66 pads 1: it holds at this size only, and says so."""
    record = json.loads(invoke("inspect", "tests.support:tf_same_conv", "--input-shape", f"1,1,{n},{n}",
                               "--positions", "all", "--json").stdout)
    geometry = record["geometry"]
    assert geometry["arch_rf_fit"] == [fit, fit] and geometry["padding"] == [tf_same_before(n, 5, 2)] * 2
    assert geometry["size_dependent"] == (["pad"] if shifted else None)
    assert all("the geometry depends on the input size (pad)" in reason
               for reason in (geometry["estimated"] or "").split("; w: ") if fit == "estimated")


@pytest.mark.parametrize("factory, n", [("pixel_shuffled", 8), ("upsampled", 5)])
def test_inspect_passes_no_rf_that_moves_by_turns_off_as_a_stride(factory, n):
    """Every RF is clipped here; a larger input shows boxes moving 0, 2, 0, 2 pixels a step: no affine geometry
    may come from it (the centre and one neighbour alone showed a stride of 2)."""
    record = json.loads(invoke("inspect", f"tests.support:{factory}", "--input-shape", f"1,1,{n},{n}",
                               "--positions", "all", "--json").stdout)
    geometry = record["geometry"]
    assert geometry["affine"] is False and geometry["arch_rf_fit"] == ["estimated", "estimated"]
    assert geometry["stride"] == [None, None] and geometry["padding"] == [None, None]


def test_inspect_joins_lists_of_names_with_commas_and_per_axis_values_with_x():
    """`size_dependent: flatten x reshape` read like one value per axis: names are listed with commas."""
    assert cli_mod.geometry_text("size_dependent", ["flatten", "reshape"]) == "flatten, reshape"
    assert cli_mod.geometry_text("arch_rf_fit", ["affine", "estimated"]) == "affine x estimated"
    assert cli_mod.geometry_text("arch_rf_size", [435, 435]) == "435 x 435"
    assert cli_mod.geometry_text("arch_rf_size", None) == "unbounded (global context)"
    assert cli_mod.geometry_text("arch_rf_size", [32, 435], ["estimated", "affine"]) == ">=32 x 435"
    assert cli_mod.geometry_text("stride", [2, 2], ["estimated", "affine"]) == "2 x 2"


def test_inspect_erf_flags_add_the_erf_rows(ws):
    record = inspect_json(ws, "--erf-samples", "2", "--erf-positions", "3,3")
    assert [row["pos_h"] for row in record["erf"]] == [3] and record["erf"][0]["rf_support"] == 169


def test_inspect_claims_no_exact_rf_in_gradient_mode(ws):
    """Gradient mode reports the model's own support on one probe input (max-pooling routes it to one argmax):
    it is never called exact, in the JSON (null) or the table."""
    assert inspect_json(ws, "--mode", "gradient")["exact"] is None
    shown = invoke("inspect", f"{ws / 'nets.py'}:tiny", "--input-shape", "1,1,17,17", "--mode", "gradient")
    assert "exact: not claimed (gradient mode" in shown.stdout and "exact: yes" not in shown.stdout


def test_inspect_prints_the_erf_it_measured(ws):
    shown = invoke("inspect", f"{ws / 'nets.py'}:tiny", "--input-shape", "1,1,17,17", "--erf-samples", "2")
    record = inspect_json(ws, "--erf-samples", "2")["erf"][0]
    table = shown.stdout.split("effective RF (mean |gradient| over random inputs")[1].splitlines()
    assert table[1].split()[:3] == ["pos", "peak", "side"]
    assert table[3].split()[:8] == ["3", "x", "3", str(record["peak_h"]), "x", str(record["peak_w"]),
                                    str(record["side50"]), str(record["side90"])]


def test_inspect_reads_a_key_of_a_layers_output():
    """A detector returns scores; its backbone's levels are a dict that only --layer and --output together reach."""
    done = invoke("inspect", "tests.support:detector", "--layer", "body", "--output", "coarse", "--input-shape",
                  "1,1,16,16", "--json")
    assert done.exit_code == 0, done.output
    record = json.loads(done.stdout)
    assert record["output_shape"] == [1, 1, 8, 8]
    assert (record["geometry"]["arch_rf_size"], record["geometry"]["stride"], record["geometry"]["padding"]) == (
        [5, 5], [2, 2], [2, 2])


def test_inspect_errors_name_the_model(ws):
    done = invoke("inspect", f"{ws / 'nets.py'}:tiny", "--input-shape", "1,1,17,17", "--layer", "nope")
    assert done.exit_code == 1 and done.output.count("\n") == 1
    assert done.output.startswith(f"Error: model '{ws / 'nets.py'}:tiny': ") and "'nope'" in done.output


def test_inspect_prints_a_readable_table(ws):
    done = invoke("inspect", f"{ws / 'nets.py'}:tiny", "--input-shape", "1,1,17,17", "--pos", "0,0")
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[2].split() == ["pos", "lo", "hi", "size", "support", "fill", "edge"]
    assert lines[4].split() == ["0", "x", "0", "0", "x", "0", "7", "x", "7", "8", "x", "8", "64", "1.000", "yes"]
    assert "stride: 2 x 2" in lines


@pytest.mark.parametrize("args, message", [
    (["--kwargs", "{nope"], "--kwargs"),
    (["--batch-size", "zero"], "must be a positive integer or auto"),
    (["--input-shape", "1,1,0,17"], "all positive"),
    (["--input-shape", "1,17"], "1 to 3 spatial sizes"),
])
def test_inspect_usage_errors_exit_2(ws, args, message):
    done = invoke("inspect", f"{ws / 'nets.py'}:tiny", "--input-shape", "1,1,17,17", *args)
    assert done.exit_code == 2 and message in done.output


def test_executor_ray_without_ray_says_how_to_install(ws, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "rfreport.run.ray_executor", raising=False)
    done = invoke("run", ws / "good.toml", "--out", ws / "ray", "--executor", "ray")
    assert done.exit_code == 2 and "pip install 'rfreport[ray]'" in done.stderr
    assert done.stderr.count("\n") == 1


def test_flags_override_the_config(ws):
    loaded = cli_mod.load_config([ws / "good.toml"], device="cpu", batch_size="8", seed=3, erf_samples=4,
                                 erf_positions=["corners", "2,3"])
    assert (loaded.options.device, loaded.options.batch_size, loaded.options.seed) == ("cpu", 8, 3)
    assert loaded.models[0].erf == {"samples": 4, "positions": ["corners", (2, 3)]}
    assert not cli_mod.make_progress(quiet=False).bars  # stdout is not a terminal under pytest: lines only
    assert isinstance(cli_mod.make_progress(quiet=True), Silent)
    plain = cli_mod.load_config([ws / "good.toml"], device=None, batch_size=None, seed=None, erf_samples=None,
                                erf_positions=())
    assert plain.models[0].erf is None and plain.options.seed == 0


def test_an_unknown_device_is_a_usage_error_before_any_job(ws):
    done = invoke("run", ws / "good.toml", "--out", ws / "nodevice", "--device", "warp:7")
    assert done.exit_code == 2 and done.stderr == "Error: --device: unknown device 'warp:7'\n"
    assert not (ws / "nodevice").exists()


def test_run_refuses_a_folder_that_is_not_a_run_folder_and_keeps_it(ws):
    (ws / "mine").mkdir()
    (ws / "mine" / "notes.txt").write_text("precious")
    done = invoke("run", ws / "good.toml", "--out", ws / "mine")
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert done.stderr.startswith(f"Error: {ws / 'mine'}: not an rfreport run folder") and done.stderr.count("\n") == 1
    assert [p.name for p in (ws / "mine").iterdir()] == ["notes.txt"]
    assert (ws / "mine" / "notes.txt").read_text() == "precious"


def test_run_refuses_the_current_folder_and_a_file(ws, monkeypatch):
    (ws / "here").mkdir()
    monkeypatch.chdir(ws / "here")
    done = invoke("run", ws / "good.toml", "--out", ".")
    assert done.exit_code == 2 and "current folder" in done.stderr and "Traceback" not in done.output
    assert list((ws / "here").iterdir()) == []
    (ws / "afile").write_text("x")
    done = invoke("run", ws / "good.toml", "--out", ws / "afile")
    assert done.exit_code == 2 and str(ws / "afile") in done.stderr and (ws / "afile").read_text() == "x"


def test_rerun_replaces_a_run_folder_and_cleans_leftovers_of_killed_runs(ws, good_run):
    leftover = ws / ".good.tmp-killed"
    (leftover / "good").mkdir(parents=True)
    (leftover / "owner").write_text(f"{__import__('socket').gethostname()} 999999999")
    done = invoke("run", ws / "good.toml", "--out", good_run, "-q")
    assert done.exit_code == 0, done.output
    assert not leftover.exists() and runfolder.load(good_run).models[0].ok


def test_ctrl_c_exits_130_and_leaves_the_old_run_and_no_staging(ws, good_run, monkeypatch):
    from rfreport.run import pipeline

    before = (good_run / "summary.json").read_text()

    def interrupted(jobs, executor):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "outputs", interrupted)
    done = invoke("run", ws / "good.toml", "--out", good_run)
    assert done.exit_code == 130 and done.stderr.endswith("Error: interrupted; nothing was written\n")
    assert (good_run / "summary.json").read_text() == before
    assert not [p for p in ws.iterdir() if p.name.startswith(".good.tmp-")]
    done = invoke("check", ws / "ci.toml", "--junit", ws / "never.xml")
    assert done.exit_code == 130 and not list(ws.glob("*never.xml*"))


def test_check_with_nothing_to_check_exits_2(ws, tmp_path):
    done = invoke("check", ws / "norules.toml")
    assert done.exit_code == 2 and "nothing to check: no model has audit rules" in done.stderr
    runfolder.write(tmp_path / "empty-run", {}, [])
    done = invoke("check", tmp_path / "empty-run")
    assert done.exit_code == 2 and done.stderr == f"Error: {tmp_path / 'empty-run'}: nothing to check: the run " \
                                                  "folder has no models\n"


@pytest.fixture(scope="module")
def ci_run(ws) -> Path:
    """Run ci.toml (a failing rule, a passing rule, a failing job) into a run folder."""
    done = invoke("run", ws / "ci.toml", "--out", ws / "ci", "-q")
    assert done.exit_code == 1, done.output
    return ws / "ci"


def test_check_writes_junit_with_failures_for_rules_and_errors_for_jobs(ci_run, tmp_path):
    path = tmp_path / "reports" / "audit.xml"   # the folder is created
    done = invoke("check", ci_run, "--junit", path)
    assert done.exit_code == 1 and "audit failed for tiny-17x17, broken-17x17" in done.stderr
    root = parse_junit(path)
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("3", "1", "1")
    suites = {suite.get("name"): suite for suite in root.iter("testsuite")}
    assert list(suites) == ["tiny-17x17", "broken-17x17"]
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert list(cases) == [("tiny-17x17", "min_rf"), ("tiny-17x17", "no_unseen"), ("broken-17x17", "job")]
    (failure,) = cases["tiny-17x17", "min_rf"]
    assert failure.tag == "failure" and failure.get("message") == "min_rf: value 13 x 13, limit 100"
    assert list(cases["tiny-17x17", "no_unseen"]) == []
    (error,) = cases["broken-17x17", "job"]
    assert error.tag == "error" and "no model today" in error.get("message")
    for suite in suites.values():
        counted = {k: sum(1 for c in suite for e in c if e.tag == k[:-1]) for k in ("failures", "errors")}
        assert int(suite.get("tests")) == len(suite) and all(int(suite.get(k)) == v for k, v in counted.items())
    assert list(tmp_path.rglob(".*partial")) == []


def test_check_json_prints_the_verdicts(ci_run):
    done = invoke("check", ci_run, "--json")
    assert done.exit_code == 1
    verdicts = json.loads(done.stdout)
    assert verdicts["passed"] is False
    tiny, broken = verdicts["models"]
    assert (tiny["slug"], tiny["status"], tiny["passed"]) == ("tiny-17x17", "ok", False)
    assert [(r["rule"], r["value"], r["passed"]) for r in tiny["audit"]] == [("min_rf", [13, 13], False),
                                                                            ("no_unseen", 0, True)]
    assert (broken["status"], broken["passed"]) == ("failed", False) and "no model today" in broken["error"]
    passing = invoke("check", ci_run.parent / "good.toml", "--json")
    assert passing.exit_code == 0 and json.loads(passing.stdout)["passed"] is True


def test_piped_progress_names_each_job_and_the_rendering_and_q_silences_it(ws):
    done = invoke("run", ws / "good.toml", "--out", ws / "progress")
    assert done.exit_code == 0
    lines = done.stderr.splitlines()
    assert lines[0] == "[1/1] tiny-17x17: running" and lines[1].startswith("[1/1] tiny-17x17: ok (")
    assert lines[2] == "rendering the report of 1 job(s)"
    assert lines[3].startswith("rendering the report took ") and lines[4].startswith("model ") and len(lines) == 7
    quiet = invoke("run", ws / "good.toml", "--out", ws / "progress", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_a_slow_stage_gets_a_progress_line(ws, monkeypatch):
    from rfreport.run import progress

    monkeypatch.setattr(progress, "SLOW_S", 0.0)
    done = invoke("check", ws / "good.toml")
    assert done.exit_code == 0
    assert "tiny-17x17: main sweep took" in done.stderr and "tiny-17x17: layer growth took" in done.stderr


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_frame_file_is_one_line_naming_it(ws, good_run, tmp_path, damage):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(good_run, copy)
    frame = copy / "models" / "tiny-17x17" / "edges.parquet"
    if damage == "corrupt":
        frame.write_bytes(b"PAR1 this is not parquet")
    else:
        frame.unlink()
    done = invoke("report", copy)
    assert done.exit_code == 2 and "Traceback" not in done.output and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"Error: {copy if damage == 'missing' else frame}")
    assert "edges.parquet" in done.stderr


UNBATCHED = """[[model]]
name = "flat"
factory = "torch.nn:Conv2d"
kwargs = { in_channels = 16, out_channels = 1, kernel_size = 3 }
input_shape = [3, 16, 16]
[model.audit]
min_rf = 1
[[model]]
name = "line"
factory = "torch.nn:Conv1d"
kwargs = { in_channels = 3, out_channels = 1, kernel_size = 3 }
input_shape = [1, 3, 16]
[model.audit]
min_rf = 1
"""


def test_an_input_shape_the_model_reads_unbatched_fails_its_job_naming_the_key(tmp_path):
    (tmp_path / "unbatched.toml").write_text(UNBATCHED)
    done = invoke("check", tmp_path / "unbatched.toml", "--json", "-q")
    assert done.exit_code == 1 and "Traceback" not in done.output
    flat, line = json.loads(done.stdout)["models"]
    assert flat["status"] == "failed" and flat["error"] == (
        "model 'flat': key 'input_shape': [3, 16, 16] gives 1 spatial axis, but the model's first spatial layer "
        "(the model itself) (Conv2d) reads 2, so torch would take it as one unbatched sample (its N as channels): "
        "give [N, C, *spatial] with 2 spatial axes")
    assert line["status"] == "ok" and line["passed"]


def test_the_rank_guard_checks_only_the_first_spatial_layer_and_leaves_no_hook():
    import torch
    from torch import nn

    from rfreport.compute.models import rank_guard
    from rfreport.errors import SweepError

    class Tokens(nn.Module):
        """A 2-D stem, then a Conv1d over the flattened grid: only the stem is checked."""

        def __init__(self):
            super().__init__()
            self.stem, self.mix = nn.Conv2d(1, 2, 3), nn.Conv1d(2, 2, 3)

        def forward(self, x):
            return self.mix(self.stem(x).flatten(2))

    model = Tokens()
    with rank_guard(model, (1, 1, 8, 8)):
        model(torch.zeros(1, 1, 8, 8))
    model3d = nn.Sequential(nn.Conv3d(1, 1, 3))
    unbatched = r"layer 0 \(Conv3d\) reads 3, so torch would take it as one unbatched"
    with pytest.raises(SweepError, match=unbatched), rank_guard(model3d, (1, 1, 8, 8)):
        model3d(torch.zeros(1, 1, 8, 8))
    assert all(not m._forward_pre_hooks for m in [*model.modules(), *model3d.modules()])


SMALL_RESNET = ("inspect", "rfreport.examples:resnet_small", "--input-shape", "1,3,16,16", "--kwargs",
                '{"width": 4, "blocks": 1}', "--layer", "stages", "--layers")
# hand-derived architecture geometry of resnet_small(blocks=1): (stride, RF, padding, centre offset (r - s)/2 - P)
HAND_DERIVED = {
    "stem.0": (1, 3, 1, 0.0),                 # 3x3, padding 1
    "stages.0.body.1": (1, 7, 3, 0.0),        # two more 3x3 convs at stride 1
    "stages.1.body.0.0": (2, 9, 4, -0.5),     # 3x3 at stride 2, padding 1: RF 7 + 2, P 3 + 1
    "stages.1.shortcut.0": (2, 7, 3, -0.5),   # 1x1 at stride 2 on the stage-0 output
    "stages.2.body.1": (4, 25, 12, -1.5),     # 3x3 (stride 2) then 3x3 on a stride-4 grid: RF 13 + 2*2 + 2*4
    "stages": (4, 25, 12, -1.5),              # the last block: the union of its body (25) and shortcut (13)
}


def test_inspect_layers_prints_the_per_layer_table():
    """The text table of `inspect --layers` is the golden file; its rows hold the hand-derived geometry."""
    done = invoke(*SMALL_RESNET)
    assert done.exit_code == 0, done.output
    assert_gold("inspect_layers.txt", done.stdout)
    lines = done.stdout.splitlines()
    table = lines[lines.index("per-layer table (> the analysed layer):") + 1:]
    assert table[0].split() == ["layer", "type", "output", "stride", "arch", "rf", "padding", "offset", "exact",
                                "covers"]
    rows = {line[3:].split()[0]: line[3:].split() for line in table[2:] if not line.startswith("(")}
    assert table[2 + list(rows).index("stages")].startswith(">  stages ")
    for name, (stride, rf, padding, offset) in HAND_DERIVED.items():
        values = [f"{v:g}" for v in (stride, stride, rf, rf, padding, padding, offset, offset)]
        assert rows[name][7:19:3] + rows[name][9:20:3] == values[::2] + values[1::2], name
        assert rows[name][19] == "yes"
    assert rows["stages"][20:] == ["border"] and rows["stem.0"][20:] == []
    assert table[-1] == "(1) reads through global pooling: its RF is global at every input size"


def test_inspect_layers_json_lists_the_rows_with_the_hand_derived_geometry():
    done = invoke(*SMALL_RESNET, "--json")
    assert done.exit_code == 0, done.output
    layers = {row["layer"]: row for row in json.loads(done.stdout)["layers"]}
    for name, (stride, rf, padding, offset) in HAND_DERIVED.items():
        row = layers[name]
        assert (row["stride"], row["arch_rf_size"], row["padding"], row["center_offset"]) == (
            [stride] * 2, [rf] * 2, [padding] * 2, [offset] * 2), name
        assert row["exact"] is True and row["estimated"] is None
    assert [name for name, row in layers.items() if row["target"]] == ["stages"]
    assert layers["stages"]["output_shape"] == [16, 4, 4] and layers["stages"]["border"] is True
    pooled = layers["head.0"]
    assert pooled["global"] is True and pooled["exact"] is False and "global pooling" in pooled["estimated"]
    assert list(pooled) == ["layer", "type", "output_shape", "stride", "arch_rf_size", "padding", "center_offset",
                            "exact", "estimated", "border", "global", "target"]


def test_inspect_without_layers_lists_no_layer_rows(ws):
    assert "layers" not in inspect_json(ws)


def test_run_and_check_end_with_a_summary_table_on_stderr_and_q_silences_it(ws, ci_run):
    done = invoke("run", ws / "good.toml", "--out", ws / "summarised")
    assert done.exit_code == 0 and done.stdout == f"{ws / 'summarised' / 'index.html'}\n"
    assert [line.split() for line in done.stderr.splitlines()[-3:]] == [
        ["model", "input", "verdict", "architecture", "RF", "stride", "global"],
        ["-" * 10, "-" * 7, "-" * 7, "-" * 15, "-" * 6, "-" * 6],
        ["tiny-17x17", "17", "x", "17", "pass", "13", "x", "13", "2", "x", "2", "no"]]
    checked = invoke("check", ci_run)
    assert checked.stdout.splitlines()[0].split() == ["model", "rule", "limit", "value", "result", "note"]
    summary = checked.stderr.splitlines()
    assert summary[0].split()[:3] == ["model", "input", "verdict"]
    assert summary[2].split() == ["tiny-17x17", "17", "x", "17", "FAIL:", "min_rf", "13", "x", "13", "2", "x", "2",
                                  "no"]
    assert summary[3].split() == ["broken-17x17", "17", "x", "17", "job", "failed", "-", "-", "-"]
    assert summary[4] == "Error: audit failed for tiny-17x17, broken-17x17" and len(summary) == 5
    assert invoke("check", ci_run, "-q").stderr == "Error: audit failed for tiny-17x17, broken-17x17\n"


@pytest.mark.parametrize("quiet", [False, True])
def test_a_failed_job_is_reported_once_on_stderr(ws, quiet):
    done = invoke("run", ws / "mixed.toml", "--out", ws / "mixed-once", *(["-q"] if quiet else []))
    assert done.exit_code == 1 and done.stderr.count("no model today") == 1
    assert ("[2/2] broken-17x17: FAILED: " in done.stderr) is not quiet
    assert "broken-17x17: failed: " in (ws / "mixed-once" / "log.txt").read_text()


def test_cache_hits_are_named_in_the_progress_lines(ws):
    first = invoke("run", ws / "good.toml", "--out", ws / "cached")
    again = invoke("run", ws / "good.toml", "--out", ws / "cached")
    assert first.stderr.splitlines()[1].startswith("[1/1] tiny-17x17: ok (") and "from the cache" not in first.stderr
    assert again.stderr.splitlines()[1].endswith(" s, from the cache)")


def test_inspect_help_mentions_no_config():
    shown = invoke("inspect", "--help")
    assert "(default: auto)" in shown.stdout and "config" not in shown.stdout
    assert "(default: the config's, else auto)" in " ".join(invoke("run", "--help").stdout.split())
def test_inspect_says_position_dependent_where_the_geometry_is_not_affine():
    args = ["inspect", "torch.nn:ConvTranspose1d", "--input-shape", "1,1,12", "--kwargs",
            '{"in_channels": 1, "out_channels": 1, "kernel_size": 3, "stride": 2}', "--positions", "all", "--quiet"]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    lines = dict(line.split(": ", 1) for line in done.output.splitlines() if ": " in line)
    assert lines["stride"] == lines["padding"] == lines["center_offset"] == "position-dependent"
    assert lines["resolution_stride"] == "0.48" and lines["rf_size_range"] == "1-2"
    record = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)["geometry"]
    assert record["stride"] == [None] and record["rf_size_range"] == [[1, 2]]
