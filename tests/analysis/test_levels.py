"""Feature-pyramid levels: config, per-level sweeps against hand-derived geometry, anchors, audit, report, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from rfreport import config, runfolder
from rfreport.analysis import levels
from rfreport.cli import cli
from rfreport.errors import ConfigError

# Three 3x3 stride-2 padding-1 convolutions; torchvision's IntermediateLayerGetter returns the last two
# as a dict, as an FPN backbone does. By hand (Araujo et al.): after k layers r = 2^(k+1) - 1, s = 2^k,
# P = 2^k - 1, so p2 (k=2) has r 7, s 4, P 3 and p3 (k=3) r 15, s 8, P 7; the centre offset (r - s)/2 - P
# is -1.5 and -3.5. On a 32x32 input, p2's RF [-3 + 4p, 3 + 4p] leaves the input only at p = 0 (8x8 grid:
# 64 - 7*7 = 15 edge positions); p3's [-7 + 8p, 7 + 8p] only at p = 0 (4x4 grid: 16 - 3*3 = 7).
NETS = '''
from collections import OrderedDict

from torch import nn
from torchvision.models._utils import IntermediateLayerGetter


def pyramid():
    body = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(1, 2, 3, stride=2, padding=1), block1=nn.Conv2d(2, 2, 3, stride=2, padding=1),
        block2=nn.Conv2d(2, 2, 3, stride=2, padding=1)))
    return IntermediateLayerGetter(body, {"block1": "p2", "block2": "p3"})
'''
EXPECTED = {"p2": ([8, 8], [4, 4], [7, 7], [3, 3], [-1.5, -1.5], 15 / 64),
            "p3": ([4, 4], [8, 8], [15, 15], [7, 7], [-3.5, -3.5], 7 / 16)}
CONFIG = '''
[[model]]
name = "pyramid"
factory = "nets.py:pyramid"
input_shape = [1, 1, 32, 32]
positions = "center"
layers = ["block1", "block2"]

[model.audit]
anchors_fit = true

[[model.levels]]
name = "p2"
output = "p2"
anchors = [8]
audit = { max_rf = 5 }

[[model.levels]]
output = "p3"
anchors = [4, [8, 12]]
audit = { min_rf = 15, max_edge_fraction = 0.5 }
'''


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A folder with the pyramid factory and its config."""
    folder = tmp_path_factory.mktemp("levels")
    (folder / "nets.py").write_text(NETS)
    (folder / "pyramid.toml").write_text(CONFIG)
    return folder


@pytest.fixture(scope="module")
def pyramid_run(ws) -> runfolder.Run:
    """Run the pyramid config once through the CLI."""
    done = CliRunner().invoke(cli, ["run", str(ws / "pyramid.toml"), "--out", str(ws / "run"), "--quiet"])
    assert done.exit_code == 0, done.output
    return runfolder.load(ws / "run")


def load_levels(tmp_path: Path, levels_toml: str, extra: str = "") -> config.ModelSpec:
    """Load a one-model config with the given `levels` value."""
    (tmp_path / "nets.py").write_text(NETS)
    path = tmp_path / "c.toml"
    path.write_text(f'[[model]]\nname = "m"\nfactory = "nets.py:pyramid"\ninput_shape = [1, 1, 32, 32]\n{extra}'
                    f'levels = {levels_toml}\n')
    return config.load([path]).models[0]


def test_levels_short_and_table_forms(tmp_path):
    spec = load_levels(tmp_path, '["p2", { layer = "block2", name = "deep", anchors = [4, [8, 6]] }]')
    assert [(lv.name, lv.layer, lv.output, lv.anchors) for lv in spec.levels] == [
        ("p2", None, "p2", ()), ("deep", "block2", None, ((4,), (8, 6)))]
    assert (spec.layer, spec.output) == ("block2", None)   # the model's own target defaults to its last level


def test_a_level_output_reads_the_models_layer(tmp_path):
    spec = load_levels(tmp_path, "[0, 1]", extra='layer = "body"\n')
    assert [(lv.layer, lv.output) for lv in spec.levels] == [("body", 0), ("body", 1)]
    assert (spec.layer, spec.output) == ("body", None)


@pytest.mark.parametrize(("levels_toml", "message"), [
    ("[]", "key 'levels': must not be empty"),
    ('[{ name = "x" }]', "key 'levels[0]': a level needs a layer, an output or both"),
    ('[{ output = 0, anchor = [3] }]', "key 'levels[0].anchor': unknown level key (did you mean 'levels[0].anchors'?)"),
    ('[{ output = 0, anchors = [0] }]', "key 'levels[0].anchors': anchor 0 must be a positive integer"),
    ('[{ output = 0, anchors = [[3, 4, 5]] }]', "key 'levels[0].anchors': [3, 4, 5] must have 2 entries"),
    ('[{ output = 0, audit = { no_unseen = true } }]', "key 'levels[0].audit.no_unseen': is a rule of the whole "
                                                      "model, not of a level: put it in the model's [model.audit]"),
    ('[{ output = 0, audit = { min_rff = 3 } }]', "key 'levels[0].audit.min_rff': unknown audit rule"),
    ('[{ output = 0, layout = "tiles" }]', "key 'levels[0].layout'"),
    ('[0, { output = 1, name = "0" }]', "key 'levels': level name '0' is used twice"),
])
def test_bad_levels_are_one_line_config_errors(tmp_path, levels_toml, message):
    with pytest.raises(ConfigError, match=None) as caught:
        load_levels(tmp_path, levels_toml)
    assert message in str(caught.value) and "model 'm'" in str(caught.value) and "\n" not in str(caught.value)


def test_each_level_matches_the_hand_derived_geometry(pyramid_run):
    entry = pyramid_run.models[0].entry
    assert entry["status"] == "ok" and entry["target"] == "output['p3']"
    for record in entry["levels"]:
        out, stride, rf, padding, offset, edge = EXPECTED[record["level"]]
        assert record["output_shape"][2:] == out and record["fit"] == "affine"
        assert (record["stride"], record["arch_rf_size"], record["padding"]) == (stride, rf, padding)
        assert record["center_offset"] == offset and record["edge_fraction"] == pytest.approx(edge)
        assert record["global"] is False


def test_the_levels_frame_has_its_schema(pyramid_run):
    frame = pyramid_run.models[0].frames["levels"]
    assert list(frame.columns) == levels.LEVELS.names(2)
    assert frame.dtypes.astype(str).to_dict() == levels.LEVELS.dtypes(2)
    shown = ["level", "target", "channels", "h_stride", "w_arch_rf", "h_center_offset", "anchors"]
    assert frame[shown].values.tolist() == [
        ["p2", "output['p2']", 2, 4.0, 7, -1.5, "8"], ["p3", "output['p3']", 2, 8.0, 15, -3.5, "4, 8x12"]]
    assert frame["anchors_fit"].tolist() == [False, True]
    assert frame["anchor_min_share"].tolist() == pytest.approx([8 / 7, 4 / 15])


def test_an_anchor_larger_than_its_rf_is_a_finding_and_fails_the_audits(pyramid_run):
    entry = pyramid_run.models[0].entry
    anchor = [f for f in entry["findings"] if f["code"] == "anchor"]
    assert [f["message"] for f in anchor] == ["Level p2: anchor(s) 8 exceed the level's RF of 7 x 7 input pixels: no "
                                              "position of this level sees an object of that size whole."]
    results = {row["rule"]: (row["value"], row["passed"]) for row in entry["audit"]}
    assert results == {"anchors_fit": (False, False), "max_rf (level p2)": ([7, 7], False),
                       "min_rf (level p3)": ([15, 15], True), "max_edge_fraction (level p3)": (7 / 16, True)}


def test_check_reports_the_level_rules(pyramid_run, ws):
    done = CliRunner().invoke(cli, ["check", str(ws / "run")])
    assert done.exit_code == 1
    assert "max_rf (level p2)" in done.output and "min_rf (level p3)" in done.output


def test_the_report_shows_the_levels_table(pyramid_run):
    html = (pyramid_run.path / "index.html").read_text()
    assert "Feature-pyramid levels" in html and "8x12" in html


def test_inspect_json_lists_the_levels(ws):
    done = CliRunner().invoke(cli, ["inspect", f"{ws / 'nets.py'}:pyramid", "--input-shape", "1,1,32,32", "--level",
                                    "p2", "--level", "p3", "--json", "--quiet"])
    assert done.exit_code == 0, done.output
    record = json.loads(done.output)
    assert record["output_shape"] == [1, 2, 4, 4]   # the last level is the main target
    assert [(lv["level"], lv["stride"], lv["arch_rf_size"]) for lv in record["levels"]] == [
        ("p2", [4, 4], [7, 7]), ("p3", [8, 8], [15, 15])]
    assert "attention" not in record


def test_levels_frame_of_a_global_level_compares_anchors_with_the_local_rf():
    summary = {"arch_rf_size": [32, 32], "global": True, "local_rf_size": [9, 9]}
    check = levels.anchor_check([(12,), (4, 9)], summary, 2)
    assert check == {"anchors": [[12, 12], [4, 9]], "anchor_basis": "local", "anchor_rf": [9, 9],
                     "anchors_fit": False, "anchor_min_share": pytest.approx(4 / 9)}
    assert levels.aggregate([{"anchors": [], "anchors_fit": None}]) == {"anchors_fit": None, "anchor_min_share": None}
    assert isinstance(levels.frame([], 2), pd.DataFrame)


def test_a_level_that_cannot_be_read_fails_the_job_in_one_line_naming_it(ws, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(f'[[model]]\nname = "bad"\nfactory = "{ws / "nets.py"}:pyramid"\ninput_shape = [1, 1, 32, 32]\n'
                    'positions = "center"\nlayers = ["block2"]\nlevels = ["p4", "p3"]\n')
    done = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert done.exit_code == 1
    entry = json.loads((tmp_path / "run" / "summary.json").read_text())["models"][0]
    assert entry["status"] == "failed" and entry["error"].startswith("level 'p4': model output has no key 'p4'")


def test_clipped_levels_take_their_exact_geometry_from_the_layer_growth_rows(ws, tmp_path):
    """On an 8x8 input every RF of p2 (2x2 grid) and p3 (1x1) is clipped: the levels are the very outputs of
    block1 and block2, whose exact layer-growth rows give the hand-derived geometry with no enlarged sweep."""
    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "small.toml").write_text(CONFIG.replace("[1, 1, 32, 32]", "[1, 1, 8, 8]").split("[model.audit]")[0]
                                         + 'levels = ["p2", "p3"]\n')
    done = CliRunner().invoke(cli, ["run", str(tmp_path / "small.toml"), "--out", str(tmp_path / "run"), "--quiet"])
    assert done.exit_code == 0, done.output
    entry = runfolder.load(tmp_path / "run").models[0].entry
    found = {r["level"]: (r["fit"], r["stride"], r["arch_rf_size"], r["padding"]) for r in entry["levels"]}
    assert found == {"p2": ("composed", [4, 4], [7, 7], [3, 3]), "p3": ("composed", [8, 8], [15, 15], [7, 7])}
    p2 = entry["levels"][0]
    assert (p2["verified"], p2["violations"]) == (1, 0)   # the level's own sweep checks its centre on the model


def test_output_layers_name_the_modules_whose_output_a_level_is():
    import torch

    from rfreport.compute.engine import Target
    from rfreport.compute.layers import output_layers

    namespace: dict = {}
    exec(NETS, namespace)
    model = namespace["pyramid"]()
    assert output_layers(model, (1, 1, 32, 32), Target(output="p3")) == ("block2",)
    assert output_layers(model, (1, 1, 32, 32), Target(output="nope")) == ()

    class Doubled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3))

        def forward(self, x):
            return self.conv(x) * 2   # no module returns this tensor

    assert output_layers(Doubled(), (1, 1, 8, 8), Target()) == ()
    assert output_layers(Doubled(), (1, 1, 8, 8), Target(layer="conv")) == ("conv", "conv.0")


def test_a_level_whose_global_context_is_not_ruled_out_reads_null_in_the_frame():
    row = {"target": "output[0]", "output_shape": [1, 8, 4, 4], "fit": "estimated", "edge_fraction": 1.0,
           "anchors": [], "anchor_basis": None, "anchors_fit": None, "anchor_min_share": None, "local_rf_size": None,
           "stride": [None, None], "arch_rf_size": [64, 64], "padding": [None, None], "center_offset": [None, None]}
    frame = levels.frame([{**row, "level": "a", "global": None}, {**row, "level": "b", "global": False},
                          {**row, "level": "c", "global": True}], 2)
    assert frame["global"].isna().tolist() == [True, False, False]
    assert frame["global"].iloc[1:].tolist() == [False, True]   # unknown is not read as "no"
