"""Modern backbones built small with timm: patch embedding, window attention, global attention, layouts via the CLI.

Expected values are derived by hand and checked again by forward perturbation of the real model
(change one input pixel, see which output tokens change).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rfreport.cli import cli
from rfreport.compute import attention
from rfreport.compute import global_context as context
from rfreport.compute.sweep import sweep
from rfreport.config import ModelSpec, RunOptions
from rfreport.errors import LayoutError
from rfreport.run import jobs as jobs_mod
from rfreport.run import plan

timm = pytest.importorskip("timm")
SHAPE = (1, 3, 32, 32)
# Swin built small: 4x4 patches (an 8x8 token grid), 2x2-token windows, one stage of two blocks (the second
# shifts its windows by one token), returned channels-last.
SWIN = {"model_name": "swin_tiny_patch4_window7_224", "pretrained": False, "features_only": True, "img_size": 32,
        "window_size": 2, "embed_dim": 8, "depths": [2], "num_heads": [1], "out_indices": [0]}


def swin():
    """Build the small Swin (one stage, channels-last output)."""
    return timm.create_model(**SWIN).eval()


def vit(registers: int = 0):
    """Build a small ViT: 8x8 patches of a 32x32 input (a 4x4 token grid), a class token, optional registers."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=0,
                             reg_tokens=registers).eval()


def changed_tokens(model, read, pixel: tuple[int, int]) -> set[tuple[int, int]]:
    """Return the grid positions of `read(model(x))` that change when one input pixel changes (float64)."""
    model = model.double()
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = x.clone()
    y[0, :, pixel[0], pixel[1]] += 1.0
    with torch.no_grad():
        delta = (read(model(y)) - read(model(x))).abs().sum(dim=0)   # (H, W) grid
    return set(map(tuple, torch.nonzero(delta > 1e-12).tolist()))


def boxes_holding(result, pixel: tuple[int, int], keep) -> set[tuple[int, int]]:
    """Return the swept positions (among `keep`) whose RF box holds the pixel."""
    inside = ((result.lo <= pixel) & (result.hi >= pixel)).all(axis=1)
    return {tuple(p) for p, hit in zip(result.positions.tolist(), inside) if hit and keep(tuple(p))}


def swin_box(t: int) -> tuple[int, int]:
    """Hand-derived RF of interior token t on one axis after the two blocks (input pixels).

    Block 0 mixes t's window {2k, 2k+1}; block 1 mixes t's shifted window ({t-1, t} for even t, {t, t+1} for
    odd t), each member of which carries its own block-0 window: tokens t-2..t+1 (even) or t-1..t+2 (odd).
    """
    first = t - 2 if t % 2 == 0 else t - 1
    return 4 * first, 4 * (first + 4) - 1


def test_patch_embedding_is_exact_and_matches_perturbation():
    from timm.layers import PatchEmbed

    embed = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=8).eval()
    result = sweep(embed, SHAPE, "all", layout="tokens")
    assert result.output_spatial == (4, 4)
    expected_lo = result.positions * 8
    assert np.array_equal(result.lo, expected_lo) and np.array_equal(result.hi, expected_lo + 7)
    assert (result.support == 64).all()
    for pixel in [(0, 0), (13, 21), (31, 8)]:
        tokens = changed_tokens(embed, lambda y: y[0].T.reshape(-1, 4, 4), pixel)
        assert tokens == {(pixel[0] // 8, pixel[1] // 8)} == boxes_holding(result, pixel, lambda p: True)


def test_window_attention_rfs_are_the_hand_derived_windows():
    model = swin()
    result = sweep(model, SHAPE, "all", output=0, layout="nhwc")
    assert result.output_spatial == (8, 8)
    for pos, lo, hi in zip(result.positions.tolist(), result.lo.tolist(), result.hi.tolist()):
        for axis in range(2):
            if 1 <= pos[axis] <= 6:   # interior tokens (the wrapped window at the border is masked)
                assert (lo[axis], hi[axis]) == swin_box(pos[axis]), (pos, lo, hi)


@pytest.mark.parametrize("pixel", [(9, 9), (14, 17), (20, 11)])
def test_window_attention_rfs_match_perturbation(pixel):
    model = swin()
    result = sweep(model, SHAPE, "all", output=0, layout="nhwc")

    def interior(p):
        return all(1 <= c <= 6 for c in p)
    changed = {p for p in changed_tokens(model, lambda y: y[0][0].permute(2, 0, 1), pixel) if interior(p)}
    assert changed == boxes_holding(result, pixel, interior)


def test_window_attention_is_found_and_its_reach_measured():
    calls = attention.detect(swin(), SHAPE)
    assert [(c.block, c.tokens, c.groups) for c in calls] == [("layers_0.blocks.0", 4, 16),
                                                              ("layers_0.blocks.1", 4, 16)]
    job = jobs_mod.Job(ModelSpec("swin", "timm:create_model", (SHAPE,), kwargs=SWIN, output=0, layout="nhwc",
                                 positions="center"), SHAPE, RunOptions())
    record = plan.attention_record(swin(), job)
    assert [(b["block"], b["rf_size"], b["global"]) for b in record["blocks"]] == [
        ("layers_0.blocks.0", [8, 8], False), ("layers_0.blocks.1", [16, 16], False)]


def test_global_attention_names_the_first_global_block_and_the_local_rf_before_it():
    calls = attention.detect(vit(), SHAPE)
    assert [(c.module, c.kind, c.tokens, c.groups, c.before) for c in calls] == [
        ("blocks.0.attn", "scaled_dot_product_attention", 17, 1, "norm_pre"),
        ("blocks.1.attn", "scaled_dot_product_attention", 17, 1, "blocks.0")]


def test_hand_written_attention_and_multihead_attention_are_found():
    class Hand(torch.nn.Module):
        def forward(self, x):          # (N, C, H, W): every position attends to every other
            tokens = x.flatten(2).transpose(1, 2)
            weights = (tokens @ tokens.transpose(1, 2)).softmax(dim=-1)
            return (weights @ tokens).transpose(1, 2).reshape(x.shape)

    class Mha(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(3, 1, batch_first=True)

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)
            return self.attn(tokens, tokens, tokens)[0].transpose(1, 2).reshape(x.shape)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), Hand(), Mha()).eval()
    calls = attention.detect(model, (1, 3, 4, 6))
    assert [(c.module, c.kind, c.tokens, c.groups) for c in calls] == [
        ("1", "softmax-matmul", 24, 1), ("2.attn", "multi_head_attention", 24, 1)]
    assert attention.detect(torch.nn.Conv2d(3, 3, 3), (1, 3, 8, 8)) == ()


def test_attention_is_found_after_an_in_place_op_that_a_backward_pass_would_refuse():
    """An in-place op on a tensor autograd saved (as timm's in-place activations after attention do) makes a
    backward pass of the model as given fail; which attention the output depends on is a question of the graph."""
    class Hand(torch.nn.Module):
        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)
            weights = (tokens @ tokens.transpose(1, 2)).softmax(dim=-1)
            out = torch.sigmoid((weights @ tokens).transpose(1, 2).reshape(x.shape))
            return out.mul_(2.0)   # sigmoid saved its output for the backward

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), Hand()).eval()
    calls = attention.detect(model, (1, 3, 4, 6))
    assert [(c.module, c.kind, c.tokens, c.groups) for c in calls] == [("1", "softmax-matmul", 24, 1)]


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A factory file for the small ViT with two register tokens and the small Swin."""
    path = tmp_path_factory.mktemp("timm") / "small.py"
    path.write_text(f"from tests.test_timm import swin, vit\n\n\ndef vit_registers():\n    return vit(2)\n"
                    f"\n\ndef swin_small():\n    return swin()\n# {SWIN}\n")
    return path


def inspect_json(factory: str, layer: str, layout: str = "tokens") -> dict:
    """Run `rfreport inspect --json` on the 32x32 input and return its record."""
    done = CliRunner().invoke(cli, ["inspect", factory, "--input-shape", "1,3,32,32", "--layer", layer, "--layout",
                                    layout, "--json", "--quiet"])
    assert done.exit_code == 0, done.output
    return json.loads(done.output)


def test_cli_tokens_layout_reads_vit_blocks_and_reports_global_attention(vit_file):
    record = inspect_json(f"{vit_file}:vit_registers", "patch_embed")
    assert record["output_shape"] == [1, 16, 4, 4] and record["geometry"]["arch_rf_size"] == [8, 8]
    assert record["geometry"]["stride"] == [8, 8] and record["geometry"]["padding"] == [0, 0]
    assert record["geometry"]["global"] is False and "attention" not in record   # the blocks come after it
    record = inspect_json(f"{vit_file}:vit_registers", "blocks.0")
    geometry = record["geometry"]
    assert (geometry["global"], geometry["global_from"], geometry["global_op"]) == (
        True, "blocks.0.attn", "scaled_dot_product_attention")
    assert record["attention"]["local"] == {"layer": "norm_pre", "rf_size": [8, 8], "block": "blocks.0"}
    assert record["attention"]["stages"][0]["tokens"] == 19   # a class token, two registers, 16 patches
    assert [m["module"] for m in record["attention"]["modules"]] == ["blocks.0.attn"]   # not blocks.1 after it


def test_cli_nhwc_layout_with_levels_and_windowed_attention_finding(vit_file, tmp_path):
    path = tmp_path / "swin.toml"
    path.write_text(f'[[model]]\nname = "swin"\nfactory = "{vit_file}:swin_small"\ninput_shape = [1, 3, 32, 32]\n'
                    'layout = "nhwc"\npositions = "center"\nlayers = ["patch_embed"]\nlevels = [0]\n')
    done = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert done.exit_code == 0, done.output
    entry = json.loads((tmp_path / "run" / "summary.json").read_text())["models"][0]
    assert entry["status"] == "ok", entry["error"]
    level = entry["levels"][0]
    assert level["output_shape"] == [1, 8, 8, 8] and level["in_input_rf_size"][0] >= 16
    # windowed attention with a roll: no architecture RF is fitted on a position-dependent axis
    assert level["arch_rf_fit"] == ["nonaffine", "nonaffine"] and level["arch_rf_size"] == [None, None]
    found = [f["message"] for f in entry["findings"] if f["code"] == "attention"]
    assert found == ["Attention is windowed: tokens attend only within groups (windows or grids) per image "
                     "(layers_0.blocks.0 to layers_0.blocks.1: 16 groups of 4 tokens). A centre token's RF after "
                     "each block: layers_0.blocks.0 8 x 8, layers_0.blocks.1 16 x 16 input pixels; a token of "
                     "layers_0.blocks.0 mixes its window only, one of layers_0.blocks.1 also the neighbouring "
                     "windows its shifted (or strided) window overlaps."]


@pytest.mark.parametrize(("args", "message"), [
    (["--layout", "nchw"], "tokens"),                 # a token output read as NCHW is refused, naming the layouts
    (["--layout", "tokens:5x5"], "tokens:5x5"),       # 25 grid tokens do not fit 19
    (["--layout", "nhwc"], "nhwc"),                   # (N, L, C) is not channels-last
])
def test_cli_refuses_impossible_layouts_in_one_line(vit_file, args, message):
    done = CliRunner().invoke(cli, ["inspect", f"{vit_file}:vit_registers", "--input-shape", "1,3,32,32", "--layer",
                                    "blocks.0", *args, "--quiet"])
    assert done.exit_code in (1, 2)
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], done.output


def test_global_pooling_that_feeds_the_output_is_found_by_the_one_global_op_detector():
    from torchvision.models.segmentation.deeplabv3 import ASPP

    from rfreport.compute.engine import Target
    from rfreport.results import GlobalOp

    aspp = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), ASPP(4, [2], 4)).eval()
    assert context.global_ops(aspp, (1, 3, 12, 12)) == (GlobalOp("1.convs.2.0", "adaptive_avg_pool2d"),)
    classifier = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)).eval()
    assert context.global_ops(classifier, (1, 3, 12, 12), target=Target(layer="0")) == ()   # pooling after the target
    found = context.global_ops(classifier, (1, 3, 12, 12))
    assert attention.with_context(None, found) == {"pooling": [{"module": "1", "op": "adaptive_avg_pool2d"}]}
    assert attention.with_context({"stages": []}, ()) == {"stages": [], "pooling": []}
    assert attention.with_context(None, ()) is None


def test_the_global_finding_names_the_pooling(tmp_path):
    path = tmp_path / "se.toml"
    path.write_text('[[model]]\nname = "se"\nfactory = "rfreport.examples:se_net"\nkwargs = { in_channels = 1, '
                    'width = 4, depth = 1 }\ninput_shape = [1, 1, 16, 16]\npositions = "center"\n')
    done = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert done.exit_code == 0, done.output
    entry = json.loads((tmp_path / "run" / "summary.json").read_text())["models"][0]
    message = next(f["message"] for f in entry["findings"] if f["code"] == "global")
    assert "adaptive_avg_pool2d in layer 1.gate.0" in message and "at any input size" in message, message
    assert entry["attention"]["pooling"] and "stages" not in entry["attention"]


def test_swin_layer_growth_through_nhwc_stages_equals_direct_sweeps_of_each_layer():
    from rfreport.compute import layers

    model = swin()
    names = ["patch_embed", "layers_0.blocks.0", "layers_0.blocks.1", "layers_0"]
    frame = layers.layer_growth(model, SHAPE, layers=names, layout="nhwc").set_index("layer")
    assert list(frame.index) == names
    centre = (4, 4)
    for name in names:
        direct = sweep(model, SHAPE, [centre, (5, 4), (4, 5)], layer=name, layout="nhwc")
        row = frame.loc[name]
        size = direct.size[direct.positions.tolist().index(list(centre))]
        assert [row["h_size"], row["w_size"]] == size.tolist(), name
    # the patch embedding is affine: size, stride and padding from the centre and its next neighbours' boxes
    embed = frame.loc["patch_embed"]
    assert embed["rf_exact"] and [embed["h_rf"], embed["h_stride"], embed["h_padding"]] == [4, 4.0, 0.0]
    # window attention is not affine per token (even and odd tokens see different windows): measured directly,
    # at the hand-derived extents of the centre token (its window, then its shifted window's two windows)
    for name, (lo, hi) in [("layers_0.blocks.0", (16, 23)), ("layers_0.blocks.1", swin_box(4)),
                           ("layers_0", swin_box(4))]:
        row = frame.loc[name]
        assert not row["rf_exact"] and np.isnan(row["h_stride"]) and row["h_size"] == row["w_size"] == hi - lo + 1


def test_swin_leaf_growth_reads_no_nchw_convolution_as_nhwc():
    # under layout nhwc the patch embedding's convolution returns (1, 12, 8, 8): read as NHWC it would be a
    # 12x8 grid (RF 4x32); no single stride maps the 32x32 input to it, so the leaf is skipped
    from rfreport.compute import layers

    model = timm.create_model(**(SWIN | {"embed_dim": 12})).eval()
    frame = layers.layer_growth(model, SHAPE, layout="nhwc").set_index("layer")
    assert "patch_embed.proj" not in frame.index or frame.loc["patch_embed.proj", "w_size"] == 4


@pytest.mark.parametrize(("grid", "spatial", "uniform"), [
    ((8, 8), (32, 32), True), ((12, 8), (32, 32), False), ((15, 33), (60, 130), True), ((64, 64), (32, 32), True),
    ((1, 1), (224, 224), True), ((7, 2), (224, 224), False), ((4,), (17,), True), ((2, 4, 4), (16, 16, 16), False)])
def test_a_channels_last_grid_must_resample_the_input_by_one_stride(grid, spatial, uniform):
    from rfreport.compute.shapes import uniform_stride

    assert uniform_stride(grid, spatial) is uniform


def test_dinov2_registers_at_a_two_by_two_patch_grid_read_the_patch_grid_not_nine_tokens():
    # 1 class + 4 register tokens + a 2x2 patch grid = 9 tokens, itself a 3x3 grid of the input's aspect
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28).eval()
    result = sweep(model, (1, 3, 28, 28), "all", layer="blocks.0", layout="tokens")
    assert result.output_spatial == (2, 2)
    assert result.verified.any() and not result.violations.any()
    patches = sweep(model, (1, 3, 28, 28), "all", layer="patch_embed", layout="tokens", method="dense")
    assert patches.lo.tolist() == (patches.positions * 14).tolist()


def test_cli_json_flags_the_swin_tokens_whose_box_wraps_through_the_shifted_windows_roll(vit_file):
    done = CliRunner().invoke(cli, ["inspect", f"{vit_file}:swin_small", "--input-shape", "1,3,32,32", "--output",
                                    "0", "--layout", "nhwc", "--positions", "corners", "--pos", "3,3", "--json"])
    assert done.exit_code == 0, done.output
    rows = {tuple(p["pos"]): p for p in json.loads(done.output)["positions"]}
    # tokens 0 and 7 share the shifted window {7, 0} rolled round: pixels 24..31 and 0..7, unrolled as -8..7
    for corner in [(0, 0), (0, 7), (7, 0), (7, 7)]:
        assert (rows[corner]["lo"], rows[corner]["hi"], rows[corner]["wrap"]) == ([-8, -8], [7, 7], [True, True])
    assert (rows[3, 3]["lo"], rows[3, 3]["hi"], rows[3, 3]["wrap"]) == ([8, 8], [23, 23], [False, False])
    assert swin_box(3) == (8, 23)


def test_swin_stages_built_for_one_size_are_refused_as_nchw_naming_nhwc():
    model = timm.create_model(**{**SWIN, "embed_dim": 12}).eval()   # 12 channels on an 8x8 token grid
    with pytest.raises(LayoutError, match=r"\(1, 8, 8, 12\) at input 32x32 \(the model runs at this input size only\)"
                                          r".*--layout nhwc"):
        sweep(model, SHAPE, "center", output=0)
    assert sweep(model, SHAPE, "center", output=0, layout="nhwc").output_spatial == (8, 8)
