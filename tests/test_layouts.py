"""Layouts: channels-last and token outputs read as (N, C, *grid), refusals for what cannot fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rfreport.cli import cli
from rfreport.compute.layers import layer_growth
from rfreport.compute.sweep import sweep
from rfreport.errors import LayoutError, SweepError
from rfreport.layouts import Layout, LayoutKind, parse_layout, token_grid

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
