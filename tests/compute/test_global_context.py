"""Global context against RFs that merely cover the input; the audit rules against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rfreport import audit, examples
from rfreport.compute.engine import Target
from rfreport.compute.global_context import global_ops
from rfreport.config import AUDIT_RULES, ModelSpec, RunOptions
from rfreport.options import EXACT_FITS
from rfreport.positions import center
from rfreport.report import render
from rfreport.results import GlobalOp
from rfreport.run import jobs as jobs_mod
from rfreport.run import plan


class Gated(nn.Module):
    """conv -> x * f(x) -> conv, where f is a given global (or local) operation on the feature map."""

    def __init__(self, gate):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 1, 3, padding=1)
        self.gate = gate

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(x * self.gate(x))


class SpatialMean(nn.Module):
    """The timm squeeze: a mean over both spatial axes."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


class ChannelsLastNorm(nn.Module):
    """ConvNeXt's LayerNorm2d: a layer norm over channels only, in channels-last order."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("gate, expected", [
    (nn.AdaptiveAvgPool2d(1), [GlobalOp("gate", "adaptive_avg_pool2d")]),
    (nn.AdaptiveMaxPool2d(1), [GlobalOp("gate", "adaptive_max_pool2d")]),
    (SpatialMean(), [GlobalOp("gate", "mean")]),
    (nn.GroupNorm(1, 2), [GlobalOp("gate", "group_norm")]),
    (nn.InstanceNorm2d(2), [GlobalOp("gate", "instance_norm")]),
    (nn.LayerNorm([8, 8]), [GlobalOp("gate", "layer_norm")]),
    (ChannelsLastNorm(2), []),
    (nn.AvgPool2d(3, stride=1, padding=1), []),
    (nn.Conv2d(2, 2, 3, padding=1), []),
], ids=["avgpool", "maxpool", "mean", "groupnorm", "instancenorm", "spatial-layernorm", "channel-layernorm",
        "local-pool", "conv"])
def test_global_ops_are_recognised_by_what_they_pool_over(gate, expected):
    assert list(global_ops(Gated(gate), (1, 1, 8, 8))) == expected


class Decided(nn.Module):
    """A per-pixel argmax over channels of a squeeze-and-excitation block: an integer output with global context."""

    def __init__(self):
        super().__init__()
        self.gated = Gated(SpatialMean())
        self.head = nn.Conv2d(1, 3, 1)

    def forward(self, x):
        return self.head(self.gated(x)).argmax(1, keepdim=True)


def test_global_context_is_found_through_an_integer_output():
    assert global_ops(Decided(), (1, 1, 12, 12)) == (GlobalOp("gated.gate", "mean"),)


def test_a_global_op_after_the_analysed_layer_does_not_count():
    model = examples.resnet_small(width=4, blocks=1)
    assert global_ops(model, (1, 3, 16, 16), target=Target("stages")) == ()
    assert global_ops(model, (1, 3, 16, 16), target=Target("head.0")) == (GlobalOp("head.0", "adaptive_avg_pool2d"),)


def run(model_factory: str, shape, layer: str | None = None, **kwargs):
    """Run one job through the pipeline's compute stages (no layer growth); return its analysis."""
    spec = ModelSpec(name="m", factory=model_factory, input_shapes=(shape,), kwargs=kwargs, layer=layer)
    job = jobs_mod.Job(spec, shape, RunOptions(device="cpu"))
    from rfreport.compute import models

    return plan.measure(models.build(spec), job, growth=False).analyse()


def codes(analysis) -> list[str]:
    """Return the finding codes of an analysis."""
    return [f.code for f in analysis.findings]


def test_saturation_is_not_called_global_context():
    analysis = run("rfreport.examples:resnet_small", (1, 3, 24, 24), layer="stages", width=4, blocks=1)
    s = analysis.summary.to_json()
    assert s["global"] is False and s["global_from"] is None and s["covering_positions"] > 0
    assert "global" not in codes(analysis) and "covers" in codes(analysis)
    (covers,) = [f for f in analysis.findings if f.code == "covers"]
    size = s["arch_rf_size"]
    assert s["no_coverage_resolution"] == [n + 1 for n in size]
    assert f"from an input of {size[0] + 1} x {size[1] + 1} on, no RF can cover it" in covers.message
    assert "no global operation" in covers.message


class FactorisedAttention(nn.Module):
    """CoaT's factorised attention over a 4 x 4 patch grid: softmax(k) over the tokens, then q (softmax(k)^T v).

    Every token mixes every token at any input size, through matrix products no pattern rfreport knows: the
    search finds no global operation, so it must not call the whole-input RFs saturation.
    """

    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(1, 6, 4, stride=4)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)           # (N, 16, 6)
        q, k, v = tokens.split(2, dim=-1)
        mixed = q @ (k.softmax(dim=1).transpose(1, 2) @ v)            # (N, 16, 2)
        return mixed.transpose(1, 2).reshape(x.shape[0], 2, x.shape[2] // 4, x.shape[3] // 4)


def test_whole_input_rfs_from_an_unrecognised_mixing_op_are_not_called_saturation():
    model = FactorisedAttention()
    spec = ModelSpec(name="m", factory="x:y", input_shapes=((1, 1, 16, 16),), audit={"no_global": True})
    job = jobs_mod.Job(spec, (1, 1, 16, 16), RunOptions(device="cpu"))
    analysis = plan.measure(model, job, growth=False).analyse()
    s = analysis.summary.to_json()
    assert s["covers_input"] and s["global"] is None and s["arch_rf_fit"] == ["estimated", "estimated"]
    (covers,) = [f for f in analysis.findings if f.code == "covers"]
    assert "global context is not ruled out" in covers.message and "saturates" not in covers.message
    (row,) = audit.evaluate({"no_global": True}, {"status": "ok", **s})
    assert not row["passed"] and row["note"].startswith("global context not ruled out")
    assert render.global_source(analysis.summary) == render.NOT_RULED_OUT   # the overview reads "unknown"


def test_global_context_names_its_layer_op_and_local_rf():
    analysis = run("rfreport.examples:se_net", (1, 3, 16, 16), width=4, depth=2)
    s = analysis.summary.to_json()
    assert (s["global"], s["global_from"], s["global_op"]) == (True, "2.gate.0", "adaptive_avg_pool2d")
    assert s["covers_input"] and s["no_coverage_resolution"] is None and s["local_rf_size"] == [5, 5]
    (found,) = [f for f in analysis.findings if f.code == "global"]
    assert "adaptive_avg_pool2d in layer 2.gate.0" in found.message and "local RF is 5 x 5" in found.message
    assert "covers" not in codes(analysis)


def test_global_context_is_found_even_when_no_rf_covers_the_input():
    model = nn.Sequential(nn.Conv2d(1, 2, 1, stride=2), examples.SqueezeExcite(2, reduction=1))
    spec = ModelSpec(name="m", factory="x:y", input_shapes=((1, 1, 16, 16),))
    job = jobs_mod.Job(spec, (1, 1, 16, 16), RunOptions(device="cpu"))
    s = plan.measure(model, job, growth=False).analyse().summary.to_json()
    assert (s["global"], s["global_from"], s["covering_positions"]) == (True, "1.gate.0", 0)  # pixel 15 is unseen
    assert s["local_rf_size"] == [1, 1]


def test_a_local_net_has_neither_finding():
    analysis = run("torch.nn:Conv2d", (1, 1, 12, 12), in_channels=1, out_channels=1, kernel_size=3)
    s = analysis.summary.to_json()
    assert (s["global"], s["covering_positions"], s["covering_fraction"], s["covers_input"]) == (False, 0, 0.0, False)
    assert not {"global", "covers"} & set(codes(analysis))


# --- every audit rule against a direct computation on the frames --------------------------------------------

@st.composite
def nets(draw):
    """Draw a small conv stack, maybe gated by a global average (squeeze-and-excitation), and an input size.

    Strides without padding may leave border pixels unseen: the global op must be found even when no
    RF covers the whole input.
    """
    layers, channels = [], 1
    for _ in range(draw(st.integers(1, 3))):
        k, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        layers.append(nn.Conv2d(channels, 2, k, stride=s, padding=draw(st.integers(0, k // 2)), dilation=d))
        channels = 2
    gated = draw(st.booleans())
    if gated:
        layers.append(examples.SqueezeExcite(2, reduction=1))
    size = draw(st.tuples(st.integers(6, 14), st.integers(6, 14)))
    return nn.Sequential(*layers), gated, size


LIMITS = {"min_rf": st.integers(1, 15), "max_rf": st.integers(1, 15), "min_rf_in_input": st.integers(1, 15),
          "max_rf_in_input": st.integers(1, 15), "min_stride": st.integers(1, 4), "max_stride": st.integers(1, 4),
          "max_edge_fraction": st.floats(0, 1),
          "no_unseen": st.just(True), "no_global": st.just(True), "no_full_coverage": st.just(True),
          "max_covering_fraction": st.floats(0, 1), "max_center_offset": st.floats(0, 3),
          "min_fill": st.floats(0, 1)}


def closed_form(model: nn.Module) -> tuple[int, int]:
    """Return the architecture RF and the stride of a conv stack (the same on both axes), by the recurrence."""
    rf, jump = 1, 1
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):   # a gate's 1x1 convs add nothing
        rf += conv.dilation[0] * (conv.kernel_size[0] - 1) * jump
        jump *= conv.stride[0]
    return rf, jump


def architecture(rule: str, limit, model: nn.Module, exact: bool, gated: bool) -> bool:
    """Judge an architecture-RF or stride rule: unbounded under global context, never on an inexact fit."""
    if gated and rule in ("min_rf", "max_rf"):
        return rule == "min_rf"
    rf, stride = closed_form(model)
    value = rf if rule.endswith("_rf") else stride
    return exact and (value >= limit if rule.startswith("min") else value <= limit)


def direct(rule: str, limit, frame, coverage: np.ndarray, gated: bool, shape) -> bool:
    """Judge a rule from the positions frame, the coverage map and how the net was built."""
    n = np.array(shape[2:])
    lo, hi = frame[["h_lo", "w_lo"]].to_numpy(), frame[["h_hi", "w_hi"]].to_numpy()
    seen = frame["support"].to_numpy() > 0
    covers = seen & ((lo <= 0) & (hi >= n - 1)).all(axis=1)
    out = (int(frame["pos_h"].max()) + 1, int(frame["pos_w"].max()) + 1)
    mid = frame[(frame["pos_h"] == center(out)[0]) & (frame["pos_w"] == center(out)[1])]
    size = (mid[["h_hi", "w_hi"]].to_numpy() - mid[["h_lo", "w_lo"]].to_numpy() + 1)[0]
    fill = frame["support"].to_numpy()[seen] / np.prod(hi[seen] - lo[seen] + 1, axis=1)
    return {
        "min_rf_in_input": lambda: bool((size >= limit).all()),
        "max_rf_in_input": lambda: bool((size <= limit).all()),
        "max_edge_fraction": lambda: bool(frame["edge"].mean() <= limit),
        "no_unseen": lambda: bool((coverage == 0).sum() == 0),
        "no_global": lambda: not gated,
        "no_full_coverage": lambda: not covers.any(),
        "max_covering_fraction": lambda: bool(covers.mean() <= limit),
        "min_fill": lambda: bool(fill.min() >= limit) if len(fill) else True,
    }[rule]()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=nets(), data=st.data())
def test_every_rule_agrees_with_a_direct_computation(drawn, data):
    model, gated, size = drawn
    shape = (1, 1, *size)
    spec = ModelSpec(name="m", factory="x:y", input_shapes=(shape,))
    job = jobs_mod.Job(spec, shape, RunOptions(device="cpu"))
    torch.manual_seed(0)
    try:
        measured = plan.measure(model, job, growth=False)
    except Exception:   # an input too small for the stack: nothing to judge
        return
    analysis = measured.analyse()
    # max_center_offset has its closed form below; the anchor rules need pyramid levels (tests/analysis/test_levels.py);
    # global_not_before names a layer (test_global_not_before_judges_where_global_context_starts)
    judged = [r for r in AUDIT_RULES
              if r not in ("max_center_offset", "anchors_fit", "min_anchor_share", "global_not_before")]
    rule = data.draw(st.sampled_from(judged))
    limit = data.draw(LIMITS[rule])
    entry = {"status": "ok", **analysis.summary.to_json()}
    (row,) = audit.evaluate({rule: limit}, entry)
    frame = analysis.positions
    pooled = gated and len(frame) > 1   # a global pool over a one-cell map pools nothing
    if rule in ("min_rf", "max_rf", "min_stride", "max_stride"):
        exact = bool(analysis.geometry["fit"].isin(EXACT_FITS).all())
        assert row["passed"] == architecture(rule, limit, model, exact, pooled), row
        if exact and not pooled:
            assert analysis.summary.arch_rf_size == (closed_form(model)[0],) * 2
    else:
        assert row["passed"] == direct(rule, limit, frame, analysis.coverage, pooled, shape)


def test_max_center_offset_agrees_with_the_closed_form():
    for k, s, p in [(3, 1, 1), (2, 1, 0), (4, 2, 1), (5, 2, 0)]:
        analysis = run("torch.nn:Conv2d", (1, 1, 16, 16), in_channels=1, out_channels=1, kernel_size=k, stride=s,
                       padding=p)
        offset = (k - s) / 2 - p
        for limit in (abs(offset), abs(offset) - 0.25):
            (row,) = audit.evaluate({"max_center_offset": limit}, {"status": "ok", **analysis.summary.to_json()})
            assert row["passed"] == (limit >= abs(offset)) and row["value"] == [offset, offset]


# --- global context by attention and token mixing ---------------------------------------------------------------

class Tokens(nn.Module):
    """A 2x2-pixel patch embedding, a token mixer over the (N, L, C) tokens, read back as a grid."""

    def __init__(self, mixer: nn.Module, channels: int = 4):
        super().__init__()
        self.embed, self.mixer = nn.Conv2d(1, channels, 2, stride=2), mixer

    def forward(self, x):
        t = self.embed(x)
        tokens = self.mixer(t.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(t.shape)


class Sdpa(nn.Module):
    """F.scaled_dot_product_attention over every token, or within windows of `window` consecutive tokens."""

    def __init__(self, window: int = 0, causal: bool = False):
        super().__init__()
        self.window, self.causal = window, causal

    def forward(self, t):
        n, length, c = t.shape
        grouped = t.reshape(n * length // self.window, self.window, c) if self.window else t
        out = nn.functional.scaled_dot_product_attention(grouped, grouped, grouped, is_causal=self.causal)
        return out.reshape(n, length, c)


class SoftmaxAttention(nn.Module):
    """Hand-written attention: softmax(t t^T) t."""

    def forward(self, t):
        return (t @ t.transpose(1, 2)).softmax(dim=-1) @ t


class Mha(nn.Module):
    """nn.MultiheadAttention over the tokens."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, 1, batch_first=True)

    def forward(self, t):
        return self.attn(t, t, t, need_weights=False)[0]


class TokenMixing(nn.Module):
    """The MLP-Mixer token mix: a linear map over the token axis (or over channels, `over_tokens=False`)."""

    def __init__(self, length: int, over_tokens: bool = True):
        super().__init__()
        self.over_tokens, self.mix = over_tokens, nn.Linear(length, length)

    def forward(self, t):
        return self.mix(t.transpose(1, 2)).transpose(1, 2) if self.over_tokens else self.mix(t)


@pytest.mark.parametrize("mixer, expected", [
    (Sdpa(), GlobalOp("mixer", "scaled_dot_product_attention")),
    (SoftmaxAttention(), GlobalOp("mixer", "softmax-attention")),
    (Mha(), GlobalOp("mixer.attn", "multi_head_attention")),
    (TokenMixing(16), GlobalOp("mixer.mix", "token-mixing linear")),
], ids=["sdpa", "softmax", "multihead", "token-linear"])
def test_attention_and_token_mixing_over_every_token_are_global_context(mixer, expected):
    found = global_ops(Tokens(mixer, channels=16 if isinstance(mixer, TokenMixing) else 4), (1, 1, 8, 8))
    assert found == (expected,) and found[0].kind == ("token mixing" if "linear" in expected.op else "attention")


@pytest.mark.parametrize("mixer", [Sdpa(window=4), Sdpa(causal=True), TokenMixing(16, over_tokens=False)],
                         ids=["windows", "causal", "channel-linear"])
def test_windowed_causal_or_channel_mixing_is_not_global(mixer):
    assert global_ops(Tokens(mixer, channels=16), (1, 1, 8, 8)) == ()   # 16 channels like the 16 tokens


class Stages(nn.Module):
    """Windowed attention over 4x4 tokens, a 2x downsample, the same attention class over the 2x2 map (one window
    that spans it at this size only)."""

    def __init__(self):
        super().__init__()
        self.embed, self.down = nn.Conv2d(1, 4, 2, stride=2), nn.Conv2d(4, 4, 2, stride=2)
        self.first, self.second = Sdpa(window=4), Sdpa(window=4)

    def forward(self, x):
        t = self.embed(x)
        t = self.first(t.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(t.shape)
        t = self.down(t)
        return self.second(t.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(t.shape)


def test_a_window_spanning_the_map_at_this_size_stays_windowed():
    assert global_ops(Stages(), (1, 1, 8, 8)) == ()
    model = Stages()
    model.second = SoftmaxAttention()   # another class attending over the whole 2x2 map: global attention
    assert global_ops(model, (1, 1, 8, 8)) == (GlobalOp("second", "softmax-attention"),)


def test_global_attention_in_the_summary_and_findings():
    spec = ModelSpec(name="m", factory="x:y", input_shapes=((1, 1, 8, 8),))
    job = jobs_mod.Job(spec, (1, 1, 8, 8), RunOptions(device="cpu"))
    measured = plan.measure(Tokens(Sdpa()), job, growth=False)
    assert measured.enlarged is None and measured.composed is None   # global at every size: no larger input helps
    analysis = measured.analyse()
    s = analysis.summary.to_json()
    assert (s["global"], s["global_from"], s["global_op"]) == (True, "mixer", "scaled_dot_product_attention")
    assert s["local_rf_size"] is None   # the local sweep holds pooling constant, not attention
    (found,) = [f.message for f in analysis.findings if f.code == "global"]
    assert "scaled_dot_product_attention in layer mixer lets every token attend to every token" in found


def test_layers_after_global_context_stay_border_layers_at_every_size():
    shape = (1, 1, 16, 16)
    spec = ModelSpec(name="m", factory="rfreport.examples:se_net", input_shapes=(shape,),
                     kwargs={"in_channels": 1, "width": 4, "depth": 2})
    from rfreport.compute import models

    analysis = plan.measure(models.build(spec), jobs_mod.Job(spec, shape, RunOptions(device="cpu"))).analyse()
    s = analysis.summary.to_json()
    assert s["border_layers_from"] == "2.gate.0" and s["no_border_resolution"] is None
    (border,) = [f.message for f in analysis.findings if f.code == "border"]
    assert "would be a border layer" not in border
    assert "global context (adaptive_avg_pool2d in layer 2.gate.0) makes every layer after it cover" in border


def test_a_clipped_local_rf_is_labelled_a_lower_bound():
    analysis = run("rfreport.examples:se_net", (1, 1, 4, 4), in_channels=1, width=4, depth=2)   # local RF 5 > 4
    s = analysis.summary.to_json()
    assert s["local_rf_size"] == [4, 4] and s["local_rf_clipped"] is True
    (found,) = [f.message for f in analysis.findings if f.code == "global"]
    assert "the local RF is at least 4 x 4 (every local RF is clipped by the input border here" in found
    assert run("rfreport.examples:se_net", (1, 1, 16, 16), in_channels=1, width=4, depth=2).summary.to_json()[
        "local_rf_clipped"] is False


@pytest.mark.parametrize("layer, first", [
    ("0.embed", None),          # the patch embedding runs before any attention
    ("0.mixer", None),          # global context starts in the named layer itself
    ("1", "0.mixer"),           # a later layer reads the attention's output
], ids=["before-attention", "in-the-layer", "after-attention"])
def test_global_not_before_judges_where_global_context_starts(layer, first):
    model = nn.Sequential(Tokens(Sdpa()), nn.Conv2d(4, 4, 1))
    shape = (1, 1, 8, 8)
    spec = ModelSpec(name="m", factory="x:y", input_shapes=(shape,), audit={"global_not_before": layer})
    s = plan.measure(model, jobs_mod.Job(spec, shape, RunOptions(device="cpu")), growth=False).analyse().summary
    assert s.global_before == {"layer": layer, "module": first, "op": first and "scaled_dot_product_attention"}
    (row,) = audit.evaluate(spec.audit, {"status": "ok", **s.to_json()})
    assert row["passed"] is (first is None)
