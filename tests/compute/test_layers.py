"""Per-layer growth against the analytic recurrences, a small ResNet's border layers, and model hygiene."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from rfreport.analysis.analyze import border_layers_from, global_from, no_border_resolution
from rfreport.compute.layers import layer_growth, leaf_names, target_geometry
from rfreport.compute.sweep import sweep
from rfreport.errors import SweepError
from tests.oracle import axis_support, lengths
from tests.support import ReusedReLU, conv_stack, hole_free_stacks, recurrence, tf_same_chain, tf_same_geometry


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(hole_free_stacks())
def test_every_layer_matches_the_recurrences(case):
    layers, shape = case
    torch.manual_seed(0)
    frame = layer_growth(nn.Sequential(*(layer.module(1) for layer in layers)), (1, 1, *shape))
    assert frame["layer"].tolist() == [str(i) for i in range(len(layers))]
    for i, row in frame.iterrows():
        covers, truly_covers = [], []
        for axis, a in enumerate("hw"):
            r, s, p = recurrence(layers[:i + 1], axis)
            n, out = shape[axis], lengths(layers[:i + 1], axis, shape[axis])[-1]
            assert row[f"out_{a}"] == out
            start = (out - 1) // 2 * s - p
            seen = axis_support(layers[:i + 1], axis, n, (out - 1) // 2)
            assume(seen)  # a centre that reads only padding has no RF to compare
            covers.append(start <= 0 and start + r - 1 >= n - 1)
            truly_covers.append(min(seen) == 0 and max(seen) == n - 1)
            # composition is exact up to border pixels an intermediate layer drops or pads
            assert max(seen) - min(seen) + 1 <= row[f"{a}_size"] <= min(start + r - 1, n - 1) - max(start, 0) + 1
            if row["rf_exact"]:
                assert (row[f"{a}_rf"], row[f"{a}_padding"]) == (r, p)
                assert math.isnan(row[f"{a}_stride"]) or row[f"{a}_stride"] == s
            else:
                assert row[f"{a}_rf"] <= r
        assert all(covers) >= row["border"] >= all(truly_covers)


class TinyResNet(nn.Module):
    """stem, a residual block, a stride-2 conv, a residual block, global pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.b1c1, self.b1c2, self.relu1 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()
        self.down = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.b2c1, self.b2c2, self.relu2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu1(x + self.b1c2(self.b1c1(x)))
        x = self.down(x)
        x = self.relu2(x + self.b2c2(self.b2c1(x)))
        return self.head(self.pool(x).flatten(1))


def test_small_resnet_border_layers():
    frame = layer_growth(TinyResNet(), (1, 1, 12, 12))
    names = ["stem", "b1c1", "b1c2", "relu1", "down", "b2c1", "b2c2", "relu2", "pool"]
    assert frame["layer"].tolist() == names  # the linear head is not spatial
    exact = frame.iloc[:-1]
    assert exact["h_rf"].tolist() == [3, 5, 7, 7, 9, 13, 17, 17]
    assert exact["w_stride"].tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert exact["h_padding"].tolist() == [1, 2, 3, 3, 4, 6, 8, 8]
    assert exact["rf_exact"].all() and not frame["rf_exact"].iloc[-1]
    assert frame["h_size"].tolist() == [3, 5, 7, 7, 9, 11, 12, 12, 12]
    assert frame["border"].tolist() == [False] * 6 + [True] * 3
    assert frame["global"].tolist() == [False] * 8 + [True]
    assert border_layers_from(frame) == "b2c2"
    assert no_border_resolution(frame, 2) == [18, 18]
    assert global_from(frame) == "pool"
    at_18 = layer_growth(TinyResNet(), (1, 1, 18, 18), layers=["b2c2"])
    assert not at_18["border"].any() and at_18["h_rf"].tolist() == [17]


def test_tiny_grids_take_unclipped_values_from_a_larger_input():
    frame = layer_growth(TinyResNet(), (1, 1, 3, 3))
    row = frame.set_index("layer").loc["b2c2"]
    assert (row["h_rf"], row["h_stride"], row["h_padding"], row["rf_exact"]) == (17, 2.0, 8.0, True)
    assert row["h_size"] == 3 and row["border"]


def test_chosen_layers_come_back_in_forward_order_and_unknown_names_fail():
    frame = layer_growth(TinyResNet(), (1, 1, 12, 12), layers=["down", "stem"])
    assert frame["layer"].tolist() == ["stem", "down"]
    with pytest.raises(SweepError, match="no submodule 'nope'"):
        layer_growth(TinyResNet(), (1, 1, 12, 12), layers=["nope"])


def test_model_is_left_as_found_in_gradient_mode():
    model = TinyResNet().train()
    frame = layer_growth(model, (1, 1, 12, 12), mode="gradient")
    assert len(frame) == 9 and model.training
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


class Boom(nn.Module):
    """A layer whose forward pass fails."""

    def forward(self, x):
        raise RuntimeError("boom")


def test_hooks_on_the_users_model_are_removed_after_a_failed_pass():
    model = nn.Sequential(nn.Conv2d(1, 1, 3), Boom())   # gradient mode hooks the model itself, not a copy
    with pytest.raises(SweepError, match="boom"):
        layer_growth(model, (1, 1, 8, 8), mode="gradient")
    assert all(not m._forward_hooks for m in model.modules())


def test_one_dimensional_models():
    frame = layer_growth(nn.Sequential(nn.Conv1d(1, 1, 5, stride=2, padding=2), nn.Conv1d(1, 1, 3)), (1, 1, 20))
    assert frame[["l_rf", "l_stride", "l_padding"]].to_numpy().tolist() == [[5, 2, 2], [9, 2, 2]]
    assert np.array_equal(frame["out_l"], [10, 8])


class LateShortcut(nn.Module):
    """A block whose identity shortcut module runs after the body that reads the same tensor."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(1, 2, 3, padding=1)
        self.body = nn.Conv2d(2, 2, 3, padding=1)
        self.shortcut = nn.Identity()

    def forward(self, x):
        x = torch.relu(self.first(x))
        return self.body(x) + self.shortcut(x)


def test_a_shortcut_that_fires_after_its_readers_is_measured_first():
    frame = layer_growth(LateShortcut(), (1, 1, 16, 16)).set_index("layer")
    assert frame.loc["shortcut", "h_rf"] == 3 and frame.loc["body", "h_rf"] == 5
    assert list(frame.index) == ["first", "body", "shortcut"]


class Add(nn.Module):
    """A skip connection that adds two tensors (a leaf, so it is a layer)."""

    def forward(self, a, b):
        return a + b


class Cat(nn.Module):
    """A skip connection that concatenates two tensors along channels."""

    def forward(self, a, b):
        return torch.cat([a, b], dim=1)


class Graph(nn.Module):
    """Nodes applied in order, each to earlier nodes' outputs (node 0 is the input); returns the last."""

    def __init__(self, nodes: list[tuple[nn.Module, tuple[int, ...]]]):
        super().__init__()
        self.mods = nn.ModuleList(module for module, _ in nodes)
        self.inputs = [inputs for _, inputs in nodes]

    def forward(self, x):
        outs = [x]
        for module, inputs in zip(self.mods, self.inputs):
            outs.append(module(*(outs[i] for i in inputs)))
        return outs[-1]


@st.composite
def graphs(draw):
    """Draw a graph of convs (some strided), nearest/bilinear upsampling by 2 and add/cat skips, on a square input."""
    n = draw(st.sampled_from([8, 16]))
    sizes, channels, nodes = [n], [1], []
    for _ in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(["conv", "conv", "stride", "nearest", "bilinear", "add", "cat"]))
        source = draw(st.integers(max(0, len(sizes) - 3), len(sizes) - 1))
        partners = [i for i in range(len(sizes)) if sizes[i] == sizes[-1] and i != len(sizes) - 1 and i > 0]
        if kind in ("add", "cat") and partners:
            other = draw(st.sampled_from(partners))
            module = Add() if kind == "add" and channels[other] == channels[-1] else Cat()
            c = channels[-1] + channels[other] if isinstance(module, Cat) else channels[-1]
            nodes.append((module, (len(sizes) - 1, other)))
            sizes.append(sizes[-1])
            channels.append(c)
            continue
        if kind in ("nearest", "bilinear") and sizes[source] <= 32:
            nodes.append((nn.Upsample(scale_factor=2, mode=kind), (source,)))
            sizes.append(sizes[source] * 2)
            channels.append(channels[source])
            continue
        k = draw(st.sampled_from([1, 3, 5])) if kind != "stride" else draw(st.sampled_from([2, 3]))
        stride = 2 if kind == "stride" and sizes[source] >= 2 else 1
        nodes.append((nn.Conv2d(channels[source], 2, k, stride=stride, padding=k // 2 if k % 2 else 0), (source,)))
        sizes.append(sizes[source] // stride if k == 2 else (sizes[source] - 1) // stride + 1)
        channels.append(2)
    return Graph(nodes), n


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_exact_rows_equal_a_direct_sweep_at_their_centre(case):
    model, n = case
    frame = layer_growth(model, (1, 1, n, n))
    for row in frame.itertuples(index=False):
        direct = sweep(model, (1, 1, n, n), "center", layer=row.layer)
        lo, hi = direct.lo[0], direct.hi[0]
        for axis, a in enumerate("hw"):
            assert getattr(row, f"{a}_size") == hi[axis] - lo[axis] + 1, (row.layer, a)
            if not row.rf_exact:
                continue
            c = (getattr(row, f"out_{a}") - 1) // 2
            start = (c * getattr(row, f"{a}_stride") if c else 0.0) - getattr(row, f"{a}_padding")
            end = start + getattr(row, f"{a}_rf") - 1
            assert (max(start, 0), min(end, n - 1)) == (lo[axis], hi[axis]), (row.layer, a)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(hole_free_stacks())
def test_target_geometry_matches_the_recurrences_or_declines(case):
    layers, shape = case
    model = nn.Sequential(nn.Sequential(*(layer.module(1) for layer in layers)))
    found = target_geometry(model, (1, 1, *shape), "0")
    if found.exact:
        assert [(found.rf[a], found.stride[a], found.padding[a]) for a in range(2)] == [
            recurrence(layers, a) for a in range(2)]


def test_target_geometry_of_a_clipped_residual_network():
    found = target_geometry(TinyResNet(), (1, 1, 16, 16), "relu2")
    assert found.exact and not found.pooled
    assert found.rf.tolist() == [17, 17] and found.stride.tolist() == [2, 2] and found.padding.tolist() == [8, 8]
    assert target_geometry(TinyResNet(), (1, 1, 16, 16), "pool").pooled


class Resized(nn.Module):
    """A conv, a resize to a fixed size (size-dependent) and a conv after it."""

    def __init__(self):
        super().__init__()
        self.first, self.last = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        return self.last(torch.nn.functional.interpolate(self.first(x), size=(21, 21), mode="bilinear"))


def test_layers_after_a_size_dependent_resize_are_measured_directly():
    frame = layer_growth(Resized(), (1, 1, 16, 16)).set_index("layer")
    assert frame.loc["first", "rf_exact"] and not frame.loc["last", "rf_exact"]
    direct = sweep(Resized(), (1, 1, 16, 16), "center", layer="last")
    assert frame.loc["last", "h_size"] == direct.hi[0, 0] - direct.lo[0, 0] + 1


def test_global_context_spares_larger_inputs_and_changes_nothing(monkeypatch):
    from rfreport.compute import layers as layers_mod
    from rfreport.examples import se_net

    calls = []
    capture = layers_mod._capture
    monkeypatch.setattr(layers_mod, "_capture", lambda *a, **k: calls.append(a[1]) or capture(*a, **k))
    plain = layer_growth(se_net(in_channels=1, width=4, depth=2), (1, 1, 16, 16), layers=["0", "2", "3"])
    rerun = len(calls)
    calls.clear()
    spared = layer_growth(se_net(in_channels=1, width=4, depth=2), (1, 1, 16, 16), layers=["0", "2", "3"],
                          global_context=True)
    assert len(calls) < rerun
    pd.testing.assert_frame_equal(plain, spared)


def test_stages_after_global_context_are_settled_without_enlarged_reruns():
    """Stage-level growth through a squeeze-and-excitation block (coarse layers, as in a timm config): the stages
    after it read only from a global border layer, so no larger input can make them exact; the growth spends no
    rerun on them (one capture, one direct pass) and reports them global and inexact."""
    from unittest import mock

    from rfreport.compute import layers
    from rfreport.examples import se_net

    model = nn.Sequential(se_net(in_channels=1, width=4, depth=2), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1)).eval()
    spy = mock.Mock(wraps=layers._capture)
    with mock.patch.object(layers, "_capture", spy):
        frame = layers.layer_growth(model, (1, 1, 32, 32), layers=["0.1", "0.3", "1", "2"], global_context=True)
    assert spy.call_count == 2
    first = frame.iloc[0]
    assert (first["layer"], first["h_rf"], first["h_stride"], first["h_padding"], first["rf_exact"]) == (
        "0.1", 5, 2.0, 2.0, True)   # 3x3 stride 1, then 3x3 stride 2 (padding 1 each)
    rest = frame.iloc[1:]
    assert list(rest["layer"]) == ["0.3", "1", "2"] and rest["global"].all() and not rest["rf_exact"].any()
    assert (rest["h_size"] == 32).all()


class FixedSizeChain(nn.Module):
    """A stem and residual 3x3 convolutions summed with a plain `+` (no module owns the sums, as in ConvNeXt,
    Swin or ViT blocks); it refuses every input size but 16 x 16."""

    def __init__(self, blocks: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 3, padding=1) for _ in range(blocks))

    def forward(self, x):
        if x.shape[-2:] != (16, 16):
            raise ValueError("this model takes 16 x 16 inputs only")
        x = self.stem(x)
        for conv in self.convs:
            x = x + conv(x)
        return x


def test_windows_across_plain_residual_sums_stay_local():
    """A block reads every earlier block through the identity path; its window on each counts only the paths
    that meet no other captured layer (3 wide, not 2k+1), so no window meets the 16-cell border and every row
    is exact at the one size the model accepts."""
    model = FixedSizeChain()
    frame = layer_growth(model, (1, 1, 16, 16))
    assert frame["rf_exact"].all()
    assert frame["h_rf"].tolist() == list(range(3, 20, 2)) and (frame["w_padding"] == (frame["w_rf"] - 1) // 2).all()
    found = target_geometry(model, (1, 1, 16, 16), "convs.7")
    assert found.exact and found.rf.tolist() == [19, 19] and found.padding.tolist() == [9, 9]


class SplitHalves(nn.Module):
    """One split node: an identity module returns its first half (a captured layer); the second half reaches
    the sum through a 5x5 convolution that no module owns, so only the split's other output leads there."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.Identity()
        self.wide = nn.Conv2d(2, 2, 5, padding=2)
        self.out = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        return self.out(self.norm(a) + nn.functional.conv2d(b, self.wide.weight, padding=2))


def test_a_cut_behind_one_output_of_a_split_leaves_its_other_outputs_open():
    frame = layer_growth(SplitHalves(), (1, 1, 16, 16)).set_index("layer")
    assert frame["h_rf"].to_dict() == {"stem": 3, "norm": 3, "out": 7} and frame["rf_exact"].all()
    direct = sweep(SplitHalves(), (1, 1, 16, 16), "center", layer="out")
    assert (direct.lo[0].tolist(), direct.hi[0].tolist()) == ([4, 4], [10, 10])
    assert target_geometry(SplitHalves(), (1, 1, 16, 16), "out").rf.tolist() == [7, 7]


def test_layer_growth_keeps_no_graph_alive(monkeypatch):
    """The cuts are hooks on graph nodes: they must not hold the engine, or every pass would leak its graph."""
    import gc
    import weakref

    from rfreport.compute.engine import LayerEngine

    kept = []
    original = LayerEngine.local_support

    def spy(self, name, *args, **kwargs):
        kept.append(weakref.ref(self.layers[name].value))
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(LayerEngine, "local_support", spy)
    layer_growth(FixedSizeChain(blocks=2), (1, 1, 16, 16))
    gc.collect()
    assert kept and all(ref() is None for ref in kept)


def test_an_upsampling_whose_windows_a_small_grid_clips_is_never_exact():
    """Bilinear upsampling of a 2 x 2 grid: every window meets the border at the given size, and on the stretched
    input the next neighbour's window does not move (the previous one does): not affine, never a stride of 0."""
    model = Graph([(nn.Conv2d(1, 2, 2, stride=2), (0,)), (nn.Conv2d(2, 2, 2, stride=2), (1,)),
                   (nn.Upsample(scale_factor=2, mode="bilinear"), (2,))])
    row = layer_growth(model, (1, 1, 8, 8)).set_index("layer").loc["mods.2"]
    assert not row["rf_exact"] and np.isnan(row["h_stride"])
    direct = sweep(model, (1, 1, 8, 8), "center", layer="mods.2")
    assert row["h_size"] == direct.hi[0, 0] - direct.lo[0, 0] + 1


@pytest.mark.parametrize("shape", [(1, 1, 6, 8, 8), (1, 1, 6, 8)], ids=["3-D", "2-D"])
def test_a_dilated_convolution_on_a_tiny_grid_is_exact(shape):
    """Stride-2 conv (RF 3, padding 1), then a dilation-2 conv on its 3 x 4 (x 4) grid: RF 3 + 2 * 2 * 2 = 11,
    stride 2, padding 1 + 2 * 2 = 5. The border cuts the taps of the centre and both neighbours to windows of one
    size moving by unequal steps: clipped (a larger input settles it), not 'not affine'."""
    model = conv_stack(len(shape) - 2)
    row = layer_growth(model, shape).set_index("layer").loc["2"]
    direct = sweep(model, shape, "center", layer="2")
    assert row["rf_exact"] and row["estimated"] == ""
    for axis, a in enumerate("dhw"[-(len(shape) - 2):]):
        assert (row[f"{a}_rf"], row[f"{a}_stride"], row[f"{a}_padding"]) == (11, 2.0, 5.0)
        assert row[f"{a}_size"] == direct.hi[0, axis] - direct.lo[0, axis] + 1


@pytest.mark.parametrize(("kernel", "dilation", "n"), [(3, 2, 4), (3, 3, 4), (3, 5, 6), (5, 5, 8)])
def test_a_dilated_kernel_whose_taps_a_border_cuts_is_never_read_as_unclipped(kernel, dilation, n):
    """Taps beyond the border leave the centre's window clear of it (one cell at n = 4, dilation 3): a wider window
    elsewhere, or a cell past the border within the widest gap between taps, shows the cut."""
    reach = dilation * (kernel - 1)
    model = nn.Sequential(nn.Conv1d(1, 1, kernel, padding=reach // 2, dilation=dilation))
    row = layer_growth(model, (1, 1, n)).iloc[0]
    assert row["rf_exact"]
    assert (row["l_rf"], row["l_stride"], row["l_padding"]) == (reach + 1, 1.0, reach // 2)


def test_a_dilation_past_the_whole_grid_is_measured_on_a_larger_input():
    # every window on a 4-cell grid is one cell (the other taps lie past the border at every position), as a 1 x 1
    # kernel's are: the op itself says so, and the stretched reruns give the kernel's extent
    model = nn.Sequential(nn.Conv1d(1, 1, 3, padding=4, dilation=4))
    row = layer_growth(model, (1, 1, 4)).iloc[0]
    assert (row["l_rf"], row["rf_exact"], row["l_size"]) == (9, True, 1)


@pytest.mark.parametrize("dilation, size", [(6, 4), (12, 8), (3, 2)])
def test_an_aspp_branch_past_a_small_grid_keeps_its_dilated_extent(dilation, size):
    # an ASPP-like branch: its outer taps lie in padding at every position of a small grid, on both axes
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=dilation, dilation=dilation))
    row = layer_growth(model, (1, 1, size, size)).iloc[-1]
    assert (row["h_rf"], row["w_rf"], bool(row["rf_exact"])) == (3 + 2 * dilation, 3 + 2 * dilation, True)
    assert (row["h_padding"], row["w_padding"]) == (1 + dilation, 1 + dilation)


def test_a_pool_wider_than_its_grid_keeps_its_extent():
    model = nn.Sequential(nn.AvgPool1d(7, stride=1, padding=3))
    row = layer_growth(model, (1, 1, 3)).iloc[0]
    assert (row["l_rf"], bool(row["rf_exact"])) == (7, True)


@pytest.mark.parametrize("mode", ["structural", "gradient"])
def test_a_module_returning_the_input_itself_is_a_layer_of_rf_one(mode):
    model = nn.Sequential(nn.Identity(), nn.Conv2d(1, 2, 3, padding=1), nn.Identity(), nn.Conv2d(2, 2, 3))
    frame = layer_growth(model, (1, 1, 16, 16), mode=mode)
    assert frame["h_rf"].tolist() == [1, 3, 3, 5] and frame["rf_exact"].all()
    assert frame["h_padding"].tolist() == [0.0, 1.0, 1.0, 1.0]


class ChannelsLastBlocks(nn.Module):
    """A ConvNeXt-like stage: depthwise 7x7, then a norm and a linear layer on channels-last tensors between two
    permutes, added back with a plain `+`; 16 channels, so at 64x64 a channels-last stage-1 tensor (1, 16, 16, 16)
    has the shape of a grid."""

    def __init__(self, channels: int = 16, blocks: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 4, stride=4)
        self.dw = nn.ModuleList(nn.Conv2d(channels, channels, 7, padding=3, groups=channels) for _ in range(blocks))
        self.norm = nn.ModuleList(nn.LayerNorm(channels) for _ in range(blocks))
        self.pw = nn.ModuleList(nn.Linear(channels, channels) for _ in range(blocks))
        self.valid = nn.Conv2d(channels, channels, (1, 5))   # anisotropic and valid: a grid all the same

    def forward(self, x):
        x = self.stem(x)
        for dw, norm, pw in zip(self.dw, self.norm, self.pw):
            x = x + pw(norm(dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.valid(x)


def test_channels_last_tensors_inside_a_channels_first_model_are_not_layers():
    from rfreport.compute.layers import channels_last_outputs

    model = ChannelsLastBlocks()
    assert channels_last_outputs(model, (1, 1, 64, 64)) == {"norm.0", "norm.1", "pw.0", "pw.1"}
    frame = layer_growth(model, (1, 1, 64, 64)).set_index("layer")
    assert list(frame.index) == ["stem", "dw.0", "dw.1", "valid"] and frame["rf_exact"].all()
    assert frame["h_rf"].tolist() == [4, 28, 52, 52] and frame["w_rf"].tolist() == [4, 28, 52, 68]
    for name, row in frame.iterrows():
        direct = sweep(model, (1, 1, 64, 64), "center", layer=name)
        assert row["h_size"] == direct.hi[0, 0] - direct.lo[0, 0] + 1
        assert row["w_size"] == direct.hi[0, 1] - direct.lo[0, 1] + 1
    found = target_geometry(model, (1, 1, 64, 64), "valid")
    assert found.exact and found.rf.tolist() == [52, 68] and found.stride.tolist() == [4, 4]


class CachesItsMask(nn.Module):
    """Keeps a tensor built in forward for the next call at the same size (as attention masks are cached)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.mask = None

    def forward(self, x):
        if self.mask is None or self.mask.shape != x.shape[-2:]:
            self.mask = torch.ones(x.shape[-2:], device=x.device)
        return self.conv(x) * self.mask


def test_the_shape_passes_leave_the_model_as_it_was():
    """Finding channels-last outputs runs the model on the meta device at two sizes: on a copy, so state a
    forward pass keeps (a cached mask) is the user's own afterwards."""
    model = CachesItsMask()
    model(torch.rand(1, 1, 16, 16))
    mask = model.mask
    assert layer_growth(model, (1, 1, 16, 16))["rf_exact"].all()
    assert model.mask is mask and model.training
    assert model(torch.rand(1, 1, 16, 16)).device.type == "cpu"


def test_a_reused_modules_later_call_is_named_as_the_growth_captures_it():
    """The block's output is `relu#2`, never the row of the ReLU's first call (RF 3 where the block's is 7)."""
    from rfreport.compute.engine import Target
    from rfreport.compute.layers import exact_geometry, output_layers

    model = nn.Sequential(ReusedReLU())
    assert output_layers(model, (1, 1, 8, 8), Target(layer="0")) == ("0", "0.relu#2")
    assert all(not m._forward_hooks for m in model.modules())
    frame = layer_growth(model, (1, 1, 8, 8), target=Target(layer="0"))
    assert frame["layer"].tolist() == ["0.conv1", "0.relu", "0.conv2", "0"]   # the block is captured as a row
    assert frame["target"].tolist() == [False, False, False, True]
    assert exact_geometry(frame, output_layers(model, (1, 1, 8, 8), Target(layer="0"))) == [(7, 4.0, 3.0)] * 2


def test_a_row_says_why_it_is_estimated():
    frame = layer_growth(TinyResNet(), (1, 1, 12, 12)).set_index("layer")
    assert frame.loc["pool", "estimated"] == "reads through global pooling: its RF is global at every input size"
    assert (frame.drop(index="pool")["estimated"] == "").all()
    assert layer_growth(Resized(), (1, 1, 16, 16)).set_index("layer").loc["last", "estimated"].startswith(
        "not affine at its centre")
    upsampled = Graph([(nn.Conv2d(1, 2, 2, stride=2), (0,)), (nn.Conv2d(2, 2, 2, stride=2), (1,)),
                       (nn.Upsample(scale_factor=2, mode="bilinear"), (2,))])
    row = layer_growth(upsampled, (1, 1, 8, 8)).set_index("layer").loc["mods.2"]
    assert row["estimated"] == ("a grid border cuts a local window on axes h, w (here or upstream) and no larger "
                                "input tried gave exact values: the RF is a lower bound")


def test_layer_windows_are_the_same_one_row_per_backward_pass(monkeypatch):
    """Layer probes run in chunks of the engine's batch size: one row per pass gives the same frame."""
    from rfreport.compute import engine

    whole = layer_growth(TinyResNet(), (1, 1, 12, 12))
    monkeypatch.setattr(engine, "CPU_TENSOR_BYTES", 1)
    pd.testing.assert_frame_equal(layer_growth(TinyResNet(), (1, 1, 12, 12)), whole)


def _measuring_everything(capture):
    """Wrap `_capture` so that a pass takes nothing from earlier passes: no layer's geometry given, no windows
    reused, probes stacked only after a single-probe pass finds ops that cancel."""
    def plain(*args, **kwargs):
        return capture(*args, **{**kwargs, "given": None, "reuse": (), "stacked": False})
    return plain


def _shortcuts_change_nothing(model: nn.Module, shape: tuple[int, ...], **kwargs) -> list[dict]:
    """Assert that the layers frame is the same with every pass measuring everything; return the keyword
    arguments of the passes that took shortcuts."""
    from unittest import mock

    from rfreport.compute import layers

    calls: list[dict] = []
    capture = layers._capture
    with mock.patch.object(layers, "_capture", lambda *a, **k: calls.append(k) or capture(*a, **k)):
        fast = layers.layer_growth(model, shape, **kwargs)
    with mock.patch.object(layers, "_capture", _measuring_everything(capture)):
        pd.testing.assert_frame_equal(layers.layer_growth(model, shape, **kwargs), fast)
    return calls


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_passes_taking_what_earlier_passes_measured_give_the_same_frame(case):
    """Reruns on stretched inputs take the layers already exact on their axis as given (only the others' windows
    are measured): on random graphs whose RFs the small input clips, the frame is the one every pass measures."""
    model, n = case
    _shortcuts_change_nothing(model, (1, 1, n, n))


@pytest.mark.parametrize("shortcut", ["given", "reuse", "stacked"])
def test_each_shortcut_is_taken_and_changes_nothing(shortcut):
    """A clipped residual network's reruns take its exact layers as given; the pass measuring layers of unknown
    geometry (after a squeeze-and-excitation block) directly reuses the first pass's windows; a model with a
    norm (ops that cancel) reruns with its probes stacked from the start."""
    from rfreport.examples import se_net

    model, shape, kwargs = {
        "given": (TinyResNet(), (1, 1, 6, 6), {}),
        "reuse": (nn.Sequential(se_net(in_channels=1, width=4, depth=2), nn.Conv2d(4, 4, 3, padding=1)).eval(),
                  (1, 1, 32, 32), {"layers": ["0.1", "0.3", "1"], "global_context": True}),
        "stacked": (ChannelsLastBlocks(blocks=1), (1, 1, 32, 32), {}),
    }[shortcut]
    calls = _shortcuts_change_nothing(model, shape, **kwargs)
    assert any(call.get(shortcut) for call in calls)


def test_a_layers_cotangent_scale_is_not_kept():
    """Each layer's cotangent scale is drawn for its own backward passes and dropped (kept for every layer, the
    scales add up to a copy of every output); drawn again it is the same, so are the windows."""
    from rfreport.compute.dense import one_hot_weights
    from rfreport.compute.engine import LayerEngine

    with LayerEngine(TinyResNet(), (1, 1, 12, 12)) as engine:
        name = "b2c2"   # a 6 x 6 grid, read from `down` and `b2c1`
        weights = one_hot_weights(np.array([[1, 1], [2, 3]]), tuple(engine.layers[name].value.shape[2:]))
        first = engine.local_support(name, weights)
        assert not engine._scales
        again = engine.local_support(name, weights)
    assert first.keys() == again.keys() and all(torch.equal(first[s], again[s]) for s in first)


def test_the_c_heap_is_trimmed_as_local_gradients_add_up(monkeypatch):
    """On a CPU the C heap hands its free pages back after every TRIM_BYTES of local gradients; the frame is the
    same however often it does."""
    from rfreport.compute import engine

    whole = layer_growth(TinyResNet(), (1, 1, 12, 12))
    real, trims = engine._trim_heap, []
    monkeypatch.setattr(engine, "TRIM_BYTES", 1)
    monkeypatch.setattr(engine, "_trim_heap", lambda: trims.append(1))
    pd.testing.assert_frame_equal(layer_growth(TinyResNet(), (1, 1, 12, 12)), whole)
    assert trims
    real()   # runs wherever the C library has malloc_trim, and is a no-op elsewhere


class MaskedResidual(nn.Module):
    """A residual block whose sum is multiplied by a constant spatial mask (zeros in a band through the centre) and
    rectified: layers reading position by position, one of them through real zeros."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.body = nn.Conv2d(2, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.scale = nn.BatchNorm2d(2)
        mask = torch.ones(1, 1, 9, 9)
        mask[..., 3:6, :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        x = self.conv(x)
        return self.act(self.scale((x + self.body(x)) * self.mask))


def _growth_without_pointwise_passes(model: nn.Module, shape: tuple[int, ...]) -> pd.DataFrame:
    """The layers frame with one backward pass per probe row everywhere."""
    from unittest import mock

    from rfreport.compute.engine import LayerEngine

    with mock.patch.object(LayerEngine, "pointwise_sources", lambda self, name: None):
        return layer_growth(model, shape)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_layers_read_position_by_position_take_one_pass_and_give_the_same_frame(case):
    model, n = case
    shape = (1, 1, n, n)
    pd.testing.assert_frame_equal(layer_growth(model, shape), _growth_without_pointwise_passes(model, shape))


@pytest.mark.parametrize("model, shape, pointwise", [(TinyResNet(), (1, 1, 12, 12), {"relu1", "relu2"}),
                                                      (MaskedResidual(), (1, 1, 9, 9), {"act", "scale"})])
def test_pointwise_layers_are_found_and_a_constant_zero_still_cuts_them(model, shape, pointwise):
    from rfreport.compute.engine import LayerEngine

    with LayerEngine(model, shape, layers=leaf_names(model)) as engine:
        found = {name for name in engine.layers if engine.pointwise_sources(name) is not None}
    assert found == pointwise
    pd.testing.assert_frame_equal(layer_growth(model, shape), _growth_without_pointwise_passes(model, shape))


@pytest.mark.parametrize("n, settled", [(9, False), (13, False), (16, True), (37, True)])
def test_a_geometry_is_taken_from_a_larger_input_only_where_it_pads_alike(n, settled):
    """TensorFlow's "same" padding depends on the input size: at 13 the map before the last layer has 4 cells and
    pads 1 before it, at 26 it has 7 and pads 2. Where a larger input pads otherwise, its windows do not stand in
    (the row stays a lower bound); where every size pads alike, they do (16, 37)."""
    frame = layer_growth(tf_same_chain(), (1, 1, n, n))
    truth = tf_same_geometry(n)
    exact = [(row.h_rf, row.h_stride, row.h_padding) for row in frame.itertuples() if row.rf_exact]
    assert exact == truth[:len(exact)] and (len(exact) == len(truth)) == settled
    found = target_geometry(tf_same_chain(), (1, 1, n, n), "2")
    assert found.exact == settled and (not settled or (found.rf[0], found.stride[0], found.padding[0]) == truth[-1])


def test_a_tiny_input_that_every_rf_covers_gives_no_border_resolution():
    """At 1x1 every layer's RF covers the input (saturation, not global pooling): from which input size no layer
    is a border layer is unknown there, not taken from the few rows that happen to be exact."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(2, 2, 3, padding=1))
    assert no_border_resolution(layer_growth(model, (1, 1, 1, 1)), 2) is None
    assert no_border_resolution(layer_growth(model, (1, 1, 32, 32)), 2) == [9, 9]
