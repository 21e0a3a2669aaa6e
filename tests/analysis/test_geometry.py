"""The analysis against closed forms: affine recurrences, known graphs, edges, coverage, wrap, global context."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

from rfreport.analysis.analyze import analyze, border_layers_from, global_from, no_border_resolution
from rfreport.analysis.edges import coverage_stats
from rfreport.analysis.geometry import AxisFit, fit_axis, unwrap_shift
from rfreport.compute.sweep import sweep
from rfreport.options import POOLED_LAYER
from rfreport.positions import resolve
from rfreport.run.plan import geometry_positions
from rfreport.summary import ValidRegion
from tests.oracle import Layer, lengths
from tests.support import hole_free_stacks, recurrence

SUMMARY_KEYS = {
    "arch_rf_size", "arch_rf_fit", "stride", "padding", "center_offset", "affine", "nonaffine", "in_input_rf_size",
    "positions",
    "edge_positions", "edge_fraction", "valid_region", "asymmetric_axes", "unseen_pixels", "unseen_fraction",
    "coverage_nonuniform", "holes", "min_fill", "wrapped", "padding_modes", "global", "global_from", "global_op",
    "covers_input", "covering_positions", "covering_fraction", "no_coverage_resolution",
    "local_rf_size", "border_layers_from", "no_border_resolution", "verified", "violations", "verify_trials",
    "size_dependent",
    "attention", "resolution_stride", "position_rf_min", "position_rf_max", "local_rf_clipped", "global_before",
}


def analysed(model: nn.Module, spatial: tuple[int, ...], positions="all", **kwargs):
    """Sweep a model (plus the geometry positions) and analyse it."""
    torch.manual_seed(0)
    shape = (1, 1, *spatial)
    result = sweep(model, shape, positions, batch_size=64)
    geometry = sweep(model, shape, geometry_positions(result.output_spatial), batch_size=64)
    return analyze(result, geometry=geometry, **kwargs)


def unclipped_positions(layers: list[Layer], axis: int, n: int) -> int:
    """Count output positions whose unclipped RF lies strictly inside the input on one axis."""
    r, s, p = recurrence(layers, axis)
    starts = np.arange(lengths(layers, axis, n)[-1]) * s - p
    return int(((starts > 0) & (starts + r - 1 < n - 1)).sum())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(hole_free_stacks())
def test_affine_fit_matches_the_recurrences(case):
    layers, shape = case
    model = nn.Sequential(*(layer.module(1) for layer in layers))
    analysis = analysed(model, shape)
    for axis, row in analysis.geometry.iterrows():
        r, s, p = recurrence(layers, axis)
        if unclipped_positions(layers, axis, shape[axis]) >= 2:
            assert row["fit"] == "affine", row["problem"]
            assert (row["arch_rf_size"], row["stride"], row["padding"]) == (r, s, p)
            assert row["center_offset"] == (r - s) / 2 - p
        else:  # one clear box may be cut by intermediate padding: only the lower bound is certain
            assert row["arch_rf_size"] <= r


class AlignedBranches(nn.Module):
    """1x1 stride 4 | ZeroPad2d((1,0,1,0)) + 3x3 stride 2 + 1x1 stride 2, added: RF 3, stride 4, padding 1."""

    def __init__(self):
        super().__init__()
        self.short = nn.Conv2d(1, 1, 1, stride=4)
        self.long = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(1, 1, 3, stride=2),
                                  nn.Conv2d(1, 1, 1, stride=2))

    def forward(self, x):
        return self.short(x) + self.long(x)


class SimpleDiamond(nn.Module):
    """3x3 stride 2 padding 1 | 1x1 stride 2, added: RF 3, stride 2, padding 1."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Conv2d(1, 1, 1, stride=2)

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("model, spatial, expected", [
    (AlignedBranches(), (16, 16), ((3, 3), (4, 4), (1, 1))),
    (nn.Sequential(nn.Conv2d(1, 1, (3, 5), stride=2), nn.Conv2d(1, 1, (3, 1), stride=2)), (21, 21),
     ((7, 5), (4, 4), (0, 0))),
    (nn.Sequential(AlignedBranches(), SimpleDiamond()), (32, 32), ((11, 11), (8, 8), (5, 5))),
], ids=["aligned-branches", "non-square", "stacked-diamonds"])
def test_known_graphs(model, spatial, expected):
    summary = analysed(model, spatial).summary.to_json()
    assert (summary["arch_rf_size"], summary["stride"], summary["padding"]) == tuple(list(v) for v in expected)
    assert summary["affine"] and summary["nonaffine"] is None


def test_stride_two_on_an_even_size_treats_borders_asymmetrically():
    model = nn.Conv2d(1, 1, 3, stride=2, padding=1)
    even = analysed(model, (8, 9))
    h, w = even.geometry.iloc[0], even.geometry.iloc[1]
    assert (h["border_lo"], h["border_hi"], h["edge_lo"], h["edge_hi"]) == (1, 0, 1, 0)
    assert (w["border_lo"], w["border_hi"], w["edge_lo"], w["edge_hi"]) == (1, 1, 1, 1)
    assert even.summary.asymmetric_axes == ("h",)
    assert (even.summary.valid_region, even.summary.positions) == (ValidRegion(lo=(1, 1), hi=(3, 3)), 20)
    assert even.summary.edge_positions == 20 - 3 * 3
    frame = even.positions.set_index(["pos_h", "pos_w"])
    assert frame.loc[(3, 0), "h_clip_hi"] == False and frame.loc[(3, 0), "w_clip_lo"] == True  # noqa: E712
    assert frame.loc[(0, 4), ["h_out_lo", "w_out_hi"]].tolist() == [1.0, 1.0]
    assert frame["edge"].sum() == even.summary.edge_positions
    assert any(f.code == "asymmetric" and "Axis h" in f.message for f in even.findings)


def test_circular_padding_wraps_and_fits_unrolled():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1, padding_mode="circular"),
                          nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"))
    analysis = analysed(model, (12, 12))
    s = analysis.summary.to_json()
    assert (s["arch_rf_size"], s["stride"], s["padding"]) == ([7, 7], [2.0, 2.0], [3.0, 3.0])
    assert s["wrapped"] and s["padding_modes"] == ["circular"] and s["affine"]
    assert {"wrap", "edge"} <= {f.code for f in analysis.findings}


def test_stride_two_one_by_one_leaves_three_quarters_unseen():
    analysis = analysed(nn.Conv2d(1, 1, 1, stride=2), (8, 8))
    assert (analysis.summary.to_json()["unseen_pixels"], analysis.summary.to_json()["unseen_fraction"]) == (48, 0.75)
    assert not analysis.summary.to_json()["coverage_nonuniform"]
    assert "unseen" in {f.code for f in analysis.findings}


def test_sampled_sweeps_do_not_judge_coverage():
    analysis = analysed(nn.Conv2d(1, 1, 1, stride=2), (8, 8), positions="center")
    assert analysis.summary.to_json()["unseen_pixels"] is None
    assert "sampled" in {f.code for f in analysis.findings}
    assert analysis.summary.to_json()["arch_rf_size"] == [1, 1] and analysis.summary.to_json()["stride"] == [2.0, 2.0]


def test_strided_three_by_three_coverage_is_a_checkerboard():
    analysis = analysed(nn.Conv1d(1, 1, 3, stride=2, padding=1), (16,))
    assert analysis.summary.to_json()["coverage_nonuniform"]
    assert analysis.coverage.tolist() == [1, 2] * 7 + [1, 1]


def test_dilation_leaves_holes_with_their_fill_ratio():
    analysis = analysed(nn.Conv2d(1, 1, 3, padding=2, dilation=2), (10, 10))
    assert analysis.summary.to_json()["holes"] and analysis.summary.to_json()["min_fill"] == pytest.approx(9 / 25)
    assert analysis.summary.to_json()["arch_rf_size"] == [5, 5] and analysis.summary.to_json()["affine"]


def test_reflect_padding_is_reported():
    analysis = analysed(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), (8, 8))
    assert analysis.summary.to_json()["padding_modes"] == ["reflect"]
    assert "mirror" in {f.code for f in analysis.findings}


def test_transposed_convolution_is_not_affine():
    analysis = analysed(nn.ConvTranspose1d(1, 1, 3, stride=2), (12,))
    assert not analysis.summary.to_json()["affine"]
    assert "varies" in analysis.summary.to_json()["nonaffine"]


def test_a_nonaffine_axis_prints_no_fitted_digits_but_its_resolution_stride_and_rf_range():
    analysis = analysed(nn.ConvTranspose1d(1, 1, 3, stride=2), (12,))   # 25 outputs, each sees 1 or 2 pixels
    s = analysis.summary.to_json()
    assert (s["stride"], s["padding"], s["center_offset"]) == ([None], [None], [None])
    assert s["resolution_stride"] == [12 / 25] and (s["position_rf_min"], s["position_rf_max"]) == ([1], [2])
    row = analysis.geometry.iloc[0]
    assert math.isnan(row["stride"]) and math.isnan(row["padding"]) and math.isnan(row["center_offset"])
    assert (row["size_min"], row["size_max"]) == (1, 2)
    affine = analysed(nn.Conv2d(1, 1, 3, stride=2), (9, 9)).summary.to_json()
    assert affine["stride"] == [2, 2] and affine["resolution_stride"] == [9 / 4, 9 / 4]
    assert affine["position_rf_min"] is None and affine["position_rf_max"] is None


class SqueezeExcite(nn.Module):
    """conv 3x3 -> x * sigmoid(conv1x1(avgpool(x))) -> conv 3x3: global, local RF 5."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 1, 3, padding=1)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2, 2, 1), nn.Sigmoid())

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(x * self.se(x))


def test_squeeze_excitation_is_global_with_a_local_rf():
    from rfreport.compute.global_context import global_ops
    from rfreport.compute.layers import layer_growth

    model = SqueezeExcite()
    local = sweep(model, (1, 1, 12, 12), "all", local=True)
    layers = layer_growth(model, (1, 1, 12, 12))
    analysis = analysed(model, (12, 12), local=local, layers=layers, global_ops=global_ops(model, (1, 1, 12, 12)))
    s = analysis.summary.to_json()
    assert s["global"] and s["global_from"] == "se.0" and s["global_op"] == "adaptive_avg_pool2d"
    assert s["covers_input"] and s["no_coverage_resolution"] is None
    assert s["local_rf_size"] == [5, 5]
    assert analysis.geometry["local_stride"].tolist() == [1.0, 1.0]
    assert any(f.code == "global" and "se.0" in f.message and "5 x 5" in f.message for f in analysis.findings)


def test_summary_has_every_documented_key_and_is_json():
    summary = analysed(nn.Conv2d(1, 1, 3), (6, 6)).summary.to_json()
    assert set(summary) == SUMMARY_KEYS
    json.dumps(summary, allow_nan=False)


def test_geometry_positions_cross_the_centre():
    rows = {tuple(p) for p in resolve(geometry_positions((9, 2)), (9, 2)).tolist()}
    assert {(p, 0) for p in range(1, 8)} <= rows and {(4, 0), (4, 1), (0, 0), (8, 0)} <= rows


def test_fit_ignores_clipped_positions():
    pos = np.arange(8)
    start = pos * 2 - 3
    lo, hi = np.clip(start, 0, 15), np.clip(start + 6, 0, 15)
    fit = fit_axis(pos, lo, hi, np.zeros(8, bool), 16)
    assert (fit.size, fit.stride, fit.padding, fit.fit) == (7, 2.0, 3.0, "affine")
    assert fit.center_offset == (7 - 2) / 2 - 3


def test_fit_flags_alternating_sizes_as_not_affine():
    pos = np.arange(10)
    lo, hi = pos // 2 + 1, (pos + 1) // 2 + 1
    fit = fit_axis(pos, lo, hi, np.zeros(10, bool), 12, "w")
    assert fit.fit == "nonaffine" and "axis w" in fit.problem


def test_fit_estimates_when_every_rf_touches_a_border():
    pos = np.arange(4)
    start = pos * 2 - 4
    lo, hi = np.clip(start, 0, 9), np.clip(start + 8, 0, 9)
    fit = fit_axis(pos, lo, hi, np.zeros(4, bool), 10)
    assert (fit.fit, fit.stride, fit.padding, fit.size) == ("estimated", 2.0, 4.0, 9)


def test_ends_pinned_by_an_inner_border_give_no_stride():
    """A valid stride-2 convolution (8 -> 3 cells) before padded ones: every box ends at pixel 6, one short of the
    border, because the inner map stops there; ends that do not move from one position to the next are no stride."""
    pos = np.arange(3)
    fit = fit_axis(pos, np.zeros(3, np.int64), np.full(3, 6), np.zeros(3, bool), 8)
    assert fit.fit == "estimated" and fit.size == 7 and math.isnan(fit.stride) and math.isnan(fit.padding)


def test_boxes_that_do_not_move_have_no_stride():
    """Four clear positions with one box (an upsampling by 4 on this stretch of the grid) are no stride of 0."""
    pos = np.arange(4)
    fit = fit_axis(pos, np.full(4, 2), np.full(4, 5), np.zeros(4, bool), 10)
    assert fit.fit == "nonaffine" and "does not move from one output position to the next" in fit.problem


def test_fit_without_any_support_is_none():
    empty = np.empty(0, dtype=np.int64)
    fit = fit_axis(empty, empty, empty, np.empty(0, bool), 5)
    assert fit.fit == "none" and math.isnan(fit.stride)


def test_wrapped_boxes_shift_next_to_their_neighbours():
    shift = unwrap_shift(np.array([0, 5]), np.array([-1, -5]), np.array([5, 1]), np.array([True, True]), 12, 6)
    assert shift.tolist() == [0, 12]


def test_coverage_stats_on_a_hand_made_map():
    coverage = np.full((8, 8), 4)
    coverage[0, :] = coverage[-1, :] = coverage[:, 0] = coverage[:, -1] = 1
    coverage[3, 3] = 0
    stats = coverage_stats(coverage)
    assert stats["unseen"] == 1 and stats["unseen_fraction"] == 1 / 64
    assert stats["ratio"] == 1.0 and stats["border"] == pytest.approx(16 / 60)  # rim mean 1, centre 4x4 mean 60/16


def layers_frame(border: list[bool], is_global: list[bool], rf: list[int], exact: list[bool],
                 pooled: list[bool] | None = None) -> pd.DataFrame:
    """Build a minimal hand-made layers frame for the pure helpers (inexact global rows read through global
    pooling unless `pooled` says otherwise)."""
    pooled = pooled if pooled is not None else [g and not e for g, e in zip(is_global, exact)]
    estimated = [POOLED_LAYER if p else "" if e else "a lower bound" for p, e in zip(pooled, exact)]
    return pd.DataFrame({"layer": [f"l{i}" for i in range(len(border))], "border": border, "global": is_global,
                         "h_rf": rf, "w_rf": rf, "rf_exact": exact, "estimated": estimated})


def test_layer_helpers_on_hand_made_frames():
    frame = layers_frame([False, True, False, True, True], [False, False, False, False, True],
                         [3, 9, 5, 17, 40], [True, True, True, True, False])
    assert border_layers_from(frame) == "l3"
    assert global_from(frame) == "l4"
    assert no_border_resolution(frame, 2) == [18, 18]
    inexact = layers_frame([False, False], [False, False], [3, 5], [True, False])
    assert no_border_resolution(inexact, 2) is None and border_layers_from(inexact) is None
    saturated = layers_frame([False, True], [False, True], [3, 5], [True, False], pooled=[False, False])
    assert no_border_resolution(saturated, 2) is None   # covers this input, but not through global pooling
    assert global_from(None) is None and border_layers_from(None) is None


def test_axis_fit_predicts_position_zero_without_a_stride():
    fit = AxisFit(5, math.nan, 2.0, "estimated")
    assert fit.start(np.array([0])).tolist() == [-2.0]


def test_in_input_share_of_each_rf_follows_the_exact_geometry():
    """Two 3x3 convolutions, stride 2 then 1, padding 1 (RF 7, stride 2, padding 3) on 16 x 16: the share of each
    unclipped box inside the input is the closed form product of (in-input part of [2p - 3, 2p + 3]) / 7."""
    model = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Conv2d(1, 1, 3, padding=1)).eval()
    frame = analyze(sweep(model, (1, 1, 16, 16), "all")).positions
    inside = {p: (min(2 * p + 3, 15) - max(2 * p - 3, 0) + 1) / 7 for p in range(8)}
    expected = [inside[h] * inside[w] for h, w in zip(frame["pos_h"], frame["pos_w"])]
    assert frame["in_input_share"].tolist() == pytest.approx(expected)
    assert frame["in_input_share"].min() == pytest.approx((4 / 7) ** 2)   # the corner (0, 0)
    assert (frame["h_out_lo"] == [max(0, 3 - 2 * h) for h in frame["pos_h"]]).all()


def test_borders_reached_unequally_by_the_same_positions_are_not_asymmetric():
    """A strided 'same' conv on an even input: its first RF reaches 2 pixels before the input, its last 1 past its end,
    but one position sees padding at each border; the difference is the centre offset (-0.5) and the input size,
    not a border treated differently, so no `asymmetric` warning (it fired on every ImageNet backbone)."""
    stem = analysed(nn.Conv2d(1, 1, 5, stride=2, padding=2), (12, 12))
    h = stem.geometry.iloc[0]
    assert (h["border_lo"], h["border_hi"], h["edge_lo"], h["edge_hi"], h["center_offset"]) == (2, 1, 1, 1, -0.5)
    assert stem.summary.asymmetric_axes == () and "asymmetric" not in [f.code for f in stem.findings]


def test_axes_made_exact_beyond_this_input_share_one_finding_named_by_how():
    """Geometry composed from per-layer windows is reported once, as `composed` (it was `enlarged`, once per axis)."""
    model = nn.Sequential(nn.Conv2d(1, 1, 5, padding=2), nn.Conv2d(1, 1, 5, padding=2))
    torch.manual_seed(0)
    main = sweep(model, (1, 1, 6, 6), "center")
    found = analyze(main, composed=[(9, 1.0, 4.0), (9, 1.0, 4.0)], global_ops=())
    assert found.summary.arch_rf_size == (9, 9) and found.summary.arch_rf_fit == ("composed", "composed")
    assert found.summary.in_input_rf_size == (6, 6)
    (composed,) = [f for f in found.findings if f.code in ("composed", "enlarged")]
    assert composed.code == "composed" and composed.message.startswith("Axes h, w: every RF is clipped")
