"""Layouts: channels-last and token outputs read as (N, C, *grid), refusals for what cannot fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rfreport.cli import cli
from rfreport.compute import shapes
from rfreport.compute.layers import layer_growth
from rfreport.compute.sweep import sweep
from rfreport.errors import LayoutError, SweepError
from rfreport.layouts import Layout, LayoutKind, parse_layout, token_grid

TOKENS = Layout(LayoutKind.TOKENS)

MODELS = '''
import torch
from torch import nn

class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1)

class Patches(nn.Module):
    """A patch embedding (4x4, stride 4) with a class token in front, as ViT returns it."""
    def __init__(self, registers=0):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.extra = nn.Parameter(torch.zeros(1, 1 + registers, 8))
        self.mix = nn.Linear(8, 8)
    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.mix(torch.cat([self.extra.expand(x.shape[0], -1, -1), tokens], 1))

class TokenChain(Patches):
    """A patch embedding followed by two token-wise linears: layers read through token predecessors."""
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 8)
    def forward(self, x):
        return self.head(super().forward(x))

class Anisotropic(nn.Module):
    """A channels-first conv whose channel count equals the input width it is tested at."""
    def __init__(self, channels=5):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
    def forward(self, x):
        return self.conv(x)

class UnfoldedPatches(Patches):
    """Patch tokens cut by unfold and a linear (no grid tensor in the pass), after class and register tokens."""
    def __init__(self, registers=0):
        super().__init__(registers)
        self.embed = nn.Linear(3 * 16, 8)
    def forward(self, x):
        tokens = self.embed(nn.functional.unfold(x, 4, stride=4).transpose(1, 2))
        return self.mix(torch.cat([self.extra.expand(x.shape[0], -1, -1), tokens], 1))

class FixedSize(nn.Module):
    """Runs at one input size only (like a ViT or Swin built for its img_size); channels-last or not."""
    def __init__(self, size, last=True, channels=5):
        super().__init__()
        self.size, self.last = tuple(size), last
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
    def forward(self, x):
        if tuple(x.shape[2:]) != self.size:
            raise ValueError(f"input size {tuple(x.shape[2:])} is not {self.size}")
        y = self.conv(x)
        return y.permute(0, 2, 3, 1) if self.last else y

def channels_last():
    return ChannelsLast()

def patches(registers=0):
    return Patches(registers)
'''


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    (folder / "zoo.py").write_text(MODELS)
    namespace: dict = {}
    exec(MODELS, namespace)
    return folder / "zoo.py", namespace


def patch_box(pos: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Return the exact RF of a 4x4/stride-4 patch token: its own patch."""
    return [4 * pos[0], 4 * pos[1]], [4 * pos[0] + 3, 4 * pos[1] + 3]


def test_parse_layout_accepts_the_documented_spellings():
    assert parse_layout(None) == Layout()
    assert parse_layout("NHWC").kind is LayoutKind.NHWC
    assert parse_layout("tokens:14x14") == Layout(LayoutKind.TOKENS, (14, 14))
    assert str(parse_layout("tokens:14x14")) == "tokens:14x14"


@pytest.mark.parametrize("text", ["nhcw", "nhwc:3x3", "tokens:0x4", "tokens:ax4"])
def test_parse_layout_refuses_in_one_line(text):
    with pytest.raises(LayoutError) as info:
        parse_layout(text)
    assert "\n" not in str(info.value)


def test_token_grid_drops_class_and_register_tokens():
    assert token_grid(197, (224, 224), Layout(LayoutKind.TOKENS)) == (1, (14, 14))
    assert token_grid(201, (224, 224), Layout(LayoutKind.TOKENS)) == (5, (14, 14))
    assert token_grid(281, (224, 320), Layout(LayoutKind.TOKENS)) == (1, (14, 20))
    assert token_grid(196, (224, 224), Layout(LayoutKind.TOKENS, (14, 14))) == (0, (14, 14))


def test_nhwc_equals_the_channels_first_twin_at_every_position(zoo):
    _path, models = zoo
    model = models["channels_last"]()
    last = sweep(model, (1, 3, 12, 10), "all", layout="nhwc", method="dense")
    first = sweep(model.conv, (1, 3, 12, 10), "all", method="dense")
    assert last.output_shape == (1, 8, 12, 10)
    np.testing.assert_array_equal(last.lo, first.lo)
    np.testing.assert_array_equal(last.hi, first.hi)


@pytest.mark.parametrize("registers", [0, 4])
def test_tokens_read_patch_by_patch(zoo, registers):
    _path, models = zoo
    result = sweep(models["patches"](registers), (1, 3, 16, 24), "all", layout="tokens", method="dense")
    assert result.output_shape == (1, 8, 4, 6)
    for pos, lo, hi in zip(result.positions.tolist(), result.lo.tolist(), result.hi.tolist()):
        assert (lo, hi) == patch_box(tuple(pos))
    assert (result.support == 16).all()


def test_nchw_refuses_a_token_output_naming_the_layouts(zoo):
    _path, models = zoo
    with pytest.raises(LayoutError, match=r"layout nchw expects .*nhwc, tokens"):
        sweep(models["patches"](), (1, 3, 16, 24), "center")


def test_tokens_refuse_a_count_without_a_grid(zoo):
    _path, models = zoo
    with pytest.raises(LayoutError, match="form no grid"):
        token_grid(100, (224, 320), Layout(LayoutKind.TOKENS))
    with pytest.raises(LayoutError, match="has 3 axes"):
        sweep(models["patches"](), (1, 3, 16, 24), "center", layout="tokens:5x5x1")


def test_layer_growth_reads_captures_through_the_layout(zoo):
    _path, models = zoo
    frame = layer_growth(models["patches"](), (1, 3, 16, 24), layout="tokens")
    assert frame["layer"].tolist() == ["mix"]
    assert frame[["h_rf", "w_rf", "h_stride", "w_stride"]].iloc[0].tolist() == [4, 4, 4.0, 4.0]


def test_layer_growth_composes_through_token_layers(zoo):
    _path, models = zoo
    frame = layer_growth(models["TokenChain"](), (1, 3, 16, 24), layout="tokens")
    assert frame["layer"].tolist() == ["mix", "head"]
    assert frame[["h_rf", "w_rf", "h_stride", "w_padding"]].values.tolist() == [[4, 4, 4.0, 0.0]] * 2
    assert frame["rf_exact"].all()


def test_layer_growth_without_a_fitting_capture_says_so(zoo):
    _path, models = zoo
    with pytest.raises(SweepError, match="reads as layout tokens"):
        layer_growth(models["channels_last"](), (1, 3, 16, 24), layout="tokens")


def test_cli_inspect_tokens_and_nhwc(zoo):
    path, _models = zoo
    done = CliRunner().invoke(cli, ["inspect", f"{path}:patches", "--input-shape", "1,3,16,24", "--layout", "tokens",
                                    "--pos", "2,5", "--json"])
    assert done.exit_code == 0, done.output
    row = json.loads(done.output)["positions"][0]
    assert (row["lo"], row["hi"]) == patch_box((2, 5))
    done = CliRunner().invoke(cli, ["inspect", f"{path}:channels_last", "--input-shape", "1,3,9,9", "--layout",
                                    "nhwc", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["positions"][0]["lo"] == [3, 3]


def test_cli_refuses_an_impossible_layout(zoo):
    path, _models = zoo
    done = CliRunner().invoke(cli, ["inspect", f"{path}:patches", "--input-shape", "1,3,16,24", "--layout", "nhwc"])
    assert done.exit_code == 1
    assert "layout nhwc expects" in done.output and "Traceback" not in done.output
    done = CliRunner().invoke(cli, ["inspect", f"{path}:patches", "--input-shape", "1,3,16,24", "--layout", "tiles"])
    assert done.exit_code == 2 and "unknown layout" in done.output


@pytest.mark.parametrize("meta_kernels_loaded", [True, False])
@pytest.mark.parametrize("spatial", [(16, 20), (16, 8), (9, 9)])
def test_a_channels_last_output_read_as_nchw_is_refused_naming_nhwc(zoo, spatial, monkeypatch, meta_kernels_loaded):
    monkeypatch.setattr(shapes, "dynamo_loaded", lambda: meta_kernels_loaded)   # else the model itself runs doubled
    _path, models = zoo
    with pytest.raises(LayoutError, match=r"axis 1, which layout nchw reads as channels, grows with the input; "
                                          r"analyse it with --layout nhwc"):
        sweep(models["channels_last"](), (1, 3, *spatial), "center")


@pytest.mark.parametrize("spatial", [(16, 5), (5, 16), (8, 8)])
def test_a_channels_first_output_whose_channels_equal_a_spatial_size_stays_nchw(zoo, spatial):
    _path, models = zoo
    model = models["Anisotropic"](channels=spatial[1])
    result = sweep(model, (1, 3, *spatial), "all", method="dense")
    assert result.output_shape == (1, spatial[1], *spatial)
    assert ((result.hi - result.lo) <= 2).all() and result.verified.any() and not result.violations.any()
    with pytest.raises(LayoutError, match=r"axis 3, which layout nhwc reads as channels.*--layout nchw"):
        sweep(model, (1, 3, *spatial), "center", layout="nhwc")


@pytest.mark.parametrize(("spatial", "channels"), [((16, 20), 5), ((16, 5), 5), ((8, 8), 3), ((1, 1), 768)])
def test_a_model_of_one_input_size_is_judged_by_the_grid_each_layout_reads(zoo, spatial, channels):
    _path, models = zoo
    last = models["FixedSize"](spatial, last=True, channels=channels)
    with pytest.raises(LayoutError, match=r"runs at this input size only.*--layout nhwc"):
        sweep(last, (1, 3, *spatial), "center")
    first = models["FixedSize"](spatial, last=False, channels=channels)
    assert sweep(first, (1, 3, *spatial), "center").output_shape == (1, channels, *spatial)
    assert sweep(last, (1, 3, *spatial), "center", layout="nhwc").output_shape == (1, channels, *spatial)


def test_cli_refuses_a_channels_last_output_without_its_layout_in_one_line(zoo):
    path, _models = zoo
    done = CliRunner().invoke(cli, ["inspect", f"{path}:channels_last", "--input-shape", "1,3,16,20"])
    assert done.exit_code == 1 and "Traceback" not in done.output
    assert done.output.count("\n") == 1 and "(1, 16, 20, 8) at input 16x20" in done.output
    assert '--layout nhwc (config: layout = "nhwc")' in done.output


def test_ambiguous_token_counts_take_the_grid_the_pass_shows_or_are_refused():
    with pytest.raises(LayoutError, match=r"9 tokens fit several grids .*\(3x3 after 0 leading tokens, 2x2 after 5 "
                                          r"leading tokens, 1x1 after 8 leading tokens\).*none of them.*tokens:HxW"):
        token_grid(9, (28, 28), TOKENS)
    assert token_grid(9, (28, 28), TOKENS, seen=[(14, 14), (2, 2)]) == (5, (2, 2))
    with pytest.raises(LayoutError, match="shows several of them"):
        token_grid(9, (28, 28), TOKENS, seen=[(2, 2), (1, 1)])
    assert token_grid(197, (224, 224), TOKENS, seen=[(7, 7)]) == (1, (14, 14))   # one grid fits: no evidence needed


def test_prefix_and_patch_tokens_that_form_a_grid_themselves_read_the_patch_grid(zoo):
    _path, models = zoo
    model = models["patches"](registers=4)    # 1 class + 4 register + 2x2 patch tokens = 9 = 3x3
    result = sweep(model, (1, 3, 8, 8), "all", layout="tokens", method="dense")
    assert result.output_shape == (1, 8, 2, 2)
    for pos, lo, hi in zip(result.positions.tolist(), result.lo.tolist(), result.hi.tolist()):
        assert (lo, hi) == patch_box(tuple(pos))
    frame = layer_growth(model, (1, 3, 8, 8), layout="tokens")
    assert frame[["layer", "out_h", "out_w", "h_rf", "h_stride"]].values.tolist() == [["mix", 2, 2, 4, 4.0]]


def test_an_ambiguous_token_count_without_a_grid_in_the_pass_is_refused(zoo):
    _path, models = zoo
    model = models["UnfoldedPatches"](registers=4)
    with pytest.raises(LayoutError, match=r"model output as tokens has shape .*give the grid as tokens:HxW"):
        sweep(model, (1, 3, 8, 8), "center", layout="tokens")
    result = sweep(model, (1, 3, 8, 8), "all", layout="tokens:2x2", method="dense")
    assert [(lo, hi) for lo, hi in zip(result.lo.tolist(), result.hi.tolist())] == \
        [patch_box(tuple(p)) for p in result.positions.tolist()]


def test_config_validates_layout(tmp_path):
    from rfreport.config import load
    from rfreport.errors import ConfigError

    config = tmp_path / "c.toml"
    config.write_text('[[model]]\nname = "m"\nfactory = "rfreport.examples:dilated_net"\ninput_shape = [1, 3, 8, 8]\n'
                      'layout = "tokens:2x2"\n')
    assert load([config]).models[0].layout == "tokens:2x2"
    config.write_text(config.read_text().replace("tokens:2x2", "nwhc"))
    with pytest.raises(ConfigError, match=r"layout.*unknown layout"):
        load([config])
