"""Run-time verification by forward perturbation: no false alarm on real conv stacks, every planted lie caught."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from rfreport import audit, config
from rfreport.analysis.analyze import analyze
from rfreport.analysis.frames import positions_frame
from rfreport.cli import cli
from rfreport.compute import shapes
from rfreport.compute.engine import Engine, Target
from rfreport.compute.surrogate import surrogates_reused
from rfreport.compute.sweep import sweep
from rfreport.compute.verify import (
    FREE_FLOPS,
    RTOL,
    SAMPLES,
    Plan,
    afford,
    choose,
    default_count,
    float64_copy,
    reads,
    verify,
)
from rfreport.errors import ConfigError, SweepError
from rfreport.layouts import parse_layout
from rfreport.run import jobs as jobs_mod
from rfreport.run import pipeline
from tests.oracle import Layer, lengths, support_mask
from tests.support import build, conv_stack, layer_stacks

TINY = Path(__file__).parents[1] / "data" / "tiny_model.py"


class Residual(nn.Module):
    """A strided stem and a residual block with batch norm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 5, stride=2, padding=2), nn.BatchNorm2d(4), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Conv2d(4, 4, 3, padding=2, dilation=2))

    def forward(self, x):
        h = self.stem(x)
        return torch.relu(h + self.body(h))


class BatchCoupled(nn.Module):
    """Adds the batch mean of its features: batch elements are coupled even in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        h = self.conv(x)
        return h + h.mean(dim=0, keepdim=True)


class BatchOfOne(nn.Module):
    """Refuses any batch but one, through a hard-coded view."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return self.conv(x).view(1, 2, 10, 10)


class PositiveOnly(nn.Module):
    """Runs on the sweep's positive probe but raises on a signed input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        if (x < 0).any():
            raise ValueError("inputs must be non-negative")
        return self.conv(x)


class TileRounding(nn.Module):
    """A 3x3 convolution computed like a fast algorithm: exact in theory, with rounding from its whole 8x8 tile.

    `(y + t) - t` equals `y` in exact arithmetic, but in floating point it rounds `y` at the scale of
    `t`, a large value built from every pixel of the tile, so pixels outside the RF move the output
    by a few ulps, as a Winograd or FFT convolution does.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        t = 1e3 * F.interpolate(F.avg_pool2d(x.abs().sum(1, keepdim=True), 8), scale_factor=8)
        return (y + t) - t


def large_kernels() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 7, padding=3), nn.ReLU(), nn.Conv2d(4, 2, 5, padding=2))


def pooled() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, dilation=3, padding=3), nn.MaxPool2d(3, stride=2, ceil_mode=True),
                         nn.Conv2d(3, 2, 3, stride=2), nn.BatchNorm2d(2))


def residual_in_train_mode() -> nn.Module:
    torch.manual_seed(0)
    model = Residual().train()
    for norm in (model.stem[1], model.body[1]):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    return model


def state_of(model: nn.Module) -> list:
    """Snapshot everything a check must leave alone: flags, hooks, parameters and buffers."""
    return [[m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
            [t.detach().clone() for t in [*model.parameters(), *model.buffers()]],
            [(t.dtype, t.device) for t in model.parameters()]]


def assert_same_state(before: list, after: list) -> None:
    assert before[:3] == after[:3] and before[4] == after[4]
    assert all(torch.equal(a, b) for a, b in zip(before[3], after[3], strict=True))


@pytest.mark.parametrize(("build", "shape", "chosen"), [
    (large_kernels, (1, 2, 64, 64), "grid:21"),
    (pooled, (2, 1, 40, 36), "all"),
    (residual_in_train_mode, (1, 3, 32, 32), "grid:5"),
])
def test_real_conv_stacks_raise_no_false_alarm(build, shape, chosen):
    model = build()
    before = state_of(model)
    result = sweep(model, shape, chosen)
    assert_same_state(before, state_of(model))
    expected = min(default_count(2), len(result.positions))
    assert result.verified.sum() == expected == result.verification.checked
    assert not result.violations.any() and result.verification.max_deviation <= RTOL
    assert result.verification.note == "" and result.verification.seconds > 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(layer_stacks(rank=2))
def test_random_stacks_pass_against_the_set_propagation_oracle(case):
    layers, shape = case
    model = build(layers)
    out = tuple(lengths(layers, axis, n)[-1] for axis, n in enumerate(shape))
    grid = np.array(list(np.ndindex(*out)))
    chosen = choose(grid, out, default_count(2), seed=1)
    masks = np.stack([support_mask(layers, shape, tuple(p)) for p in chosen.tolist()])
    done = verify(model, (1, 2, *shape), Target(), chosen, masks, samples=2)
    assert done.checked == len(chosen) and not done.violations.any()


def test_outputs_that_are_nan_on_every_pass_are_unchanged():
    """Regression: a max-pool window wholly in padding gives -inf, and a conv after it NaN, on every pass."""
    layers = [Layer("conv", (1, 4), (1, 1), (0, 2), (1, 3)), Layer("max", (1, 2), (1, 1), (0, 1), (1, 2)),
              Layer("conv", (1, 2), (1, 1), (0, 1), (1, 1))]
    result = sweep(build(layers), (1, 2, 4, 6), "all", verify="all")
    assert result.verified.all() and not result.violations.any()


def test_checked_positions_are_the_centre_the_corners_and_random_ones():
    grid = np.array([(i, j) for i in range(9) for j in range(7)])
    picked = choose(grid, (9, 7), 7, seed=3)
    assert {(4, 3), (0, 0), (0, 6), (8, 0), (8, 6)} <= set(map(tuple, picked.tolist()))
    assert len(picked) == 7 and len(np.unique(picked, axis=0)) == 7
    np.testing.assert_array_equal(picked, choose(grid, (9, 7), 7, seed=3))
    assert len(choose(grid, (9, 7), 0)) == 0 and len(choose(grid[:3], (9, 7), 10)) == 3


def test_a_support_one_pixel_too_small_is_caught_in_every_trial():
    model = large_kernels()
    result = sweep(model, (1, 2, 24, 24), [(12, 12), (0, 0), (23, 5)], keep_masks="all", verify=False)
    masks = np.stack([result.masks[tuple(p)] for p in result.positions.tolist()])
    honest = verify(model, (1, 2, 24, 24), Target(), result.positions, masks)
    assert honest.checked == 3 and not honest.violations.any()
    assert result.positions.tolist() == [[0, 0], [12, 12], [23, 5]]
    masks[0, 0, 0] = False                        # drop one pixel the corner position really reads
    caught = verify(model, (1, 2, 24, 24), Target(), result.positions, masks, samples=4)
    assert caught.violations.tolist() == [4, 0, 0] and caught.failed == 1
    assert caught.deviation[0] > 1e-6 > RTOL >= caught.deviation[1:].max()


def test_rounding_noise_from_outside_the_rf_is_not_a_dependency():
    model = TileRounding()
    true_rf = sweep(model.conv, (1, 2, 16, 16), "all", keep_masks="all", verify=False)
    masks = np.stack([true_rf.masks[tuple(p)] for p in true_rf.positions.tolist()])
    done = verify(model, (1, 2, 16, 16), Target(), true_rf.positions, masks)
    assert 0 < done.max_deviation < RTOL and not done.violations.any()
    masks[:, 8:, :] = False      # but one row of a real dependency dropped is caught
    caught = verify(model, (1, 2, 16, 16), Target(), true_rf.positions, masks)
    reads_row_8 = true_rf.positions[:, 0] >= 7
    assert (caught.violations[reads_row_8] == 3).all() and not caught.violations[~reads_row_8].any()


class LyingShift(torch.autograd.Function):
    """Shifts right by 3 columns, but its backward claims the identity: an op no engine rule knows."""

    @staticmethod
    def forward(ctx, x):
        return F.pad(x, (3, 0))[..., :x.shape[-1]]

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_an_op_whose_gradient_lies_is_caught_on_the_real_model():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1)
    model = nn.Sequential(conv, LambdaModule(LyingShift.apply))
    result = sweep(model, (1, 1, 12, 12), "all")
    checked = result.positions[result.verified]
    reads_shifted = checked[:, 1] >= 3      # columns 0-2 hold the shift's zero padding: constant outputs
    assert reads_shifted.sum() >= 4
    np.testing.assert_array_equal(result.violations[result.verified], np.where(reads_shifted, 3, 0))


class LambdaModule(nn.Module):
    """Wraps a function as a module."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


def erase_first_column(monkeypatch) -> None:
    """Make the structural engine under-report: the first column of every support is dropped."""
    real = Engine.input_grads

    def bogus(self, weights):
        grads = real(self, weights).clone()
        first = (grads > 0).any(dim=-2).to(torch.int8).argmax(dim=-1)
        grads[torch.arange(len(grads)), :, first] = 0
        return grads

    monkeypatch.setattr(Engine, "input_grads", bogus)


def test_an_engine_that_under_reports_is_caught_and_the_run_is_marked_not_exact(monkeypatch):
    erase_first_column(monkeypatch)
    result = sweep(large_kernels(), (1, 2, 20, 20), "grid:4", method="dense")
    assert result.verified.sum() == default_count(2)
    assert (result.violations[result.verified] == 3).all() and not result.violations[~result.verified].any()
    frame = positions_frame(result)
    assert frame["verified"].tolist() == result.verified.tolist()
    assert frame["violations"].tolist() == result.violations.tolist()
    done = analyze(result)
    assert done.summary.to_json()["verified"] == default_count(2) == done.summary.to_json()["violations"]
    warning = next(f for f in done.findings if f.code == "not_exact")
    assert warning.severity == "warning" and warning.message.startswith(f"Not exact: {default_count(2)} of ")
    rows = audit.evaluate({}, {"status": "ok", **done.summary.to_json()})
    assert rows == [{"rule": "exact", "limit": 0, "value": default_count(2), "passed": False, "note": None}]


def test_honest_summary_has_no_finding_and_no_audit_row():
    done = analyze(sweep(large_kernels(), (1, 2, 20, 20), "grid:4"))
    assert done.summary.to_json()["verified"] == default_count(2) and done.summary.to_json()["violations"] == 0
    assert not [f for f in done.findings if f.code in ("not_exact", "unverified")]
    assert audit.evaluate({}, {"status": "ok", **done.summary.to_json()}) == []


def test_check_and_inspect_fail_on_a_violation(monkeypatch, tmp_path):
    erase_first_column(monkeypatch)
    config = tmp_path / "tiny.toml"
    config.write_text(f'[[model]]\nname = "tiny"\nfactory = "{TINY}:build"\ninput_shape = [1, 1, 12, 12]\n'
                      'positions = "all"\n[model.audit]\nmin_rf = 1\n')
    checked = CliRunner().invoke(cli, ["check", str(config)])
    assert checked.exit_code == 1
    rows = [line.split() for line in checked.stdout.splitlines()[2:]]
    assert rows == [["tiny-12x12", "min_rf", "1", "5", "x", "4", "pass"], ["tiny-12x12", "exact", "0", "8", "FAIL"]]
    assert checked.stderr.endswith("Error: audit failed for tiny-12x12\n")
    shown = CliRunner().invoke(cli, ["inspect", f"{TINY}:build", "--input-shape", "1,1,12,12", "--json",
                                     "--positions", "corners"])
    record = json.loads(shown.stdout)
    table = CliRunner().invoke(cli, ["inspect", f"{TINY}:build", "--input-shape", "1,1,12,12"])
    assert table.stdout.splitlines()[-1] == ("exact: NO (1 of 1 verified position(s) changed when input outside "
                                             "the reported RF was perturbed)")
    assert record["exact"] is False and record["verified"] == 4 == record["violations"]
    assert [(p["verified"], p["violations"]) for p in record["positions"]] == [(True, 3)] * 4


def test_the_report_shows_the_violation_as_a_warning(monkeypatch, tmp_path):
    erase_first_column(monkeypatch)
    config = tmp_path / "tiny.toml"
    config.write_text(f'[[model]]\nname = "tiny"\nfactory = "{TINY}:build"\ninput_shape = [1, 1, 12, 12]\n'
                      'positions = "corners"\n')
    done = CliRunner().invoke(cli, ["run", str(config), "--out", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    entry = json.loads((tmp_path / "run" / "summary.json").read_text())["models"][0]
    assert entry["verified"] == 4 == entry["violations"]
    assert {"rule": "exact", "limit": 0, "value": 4, "passed": False, "note": None} in entry["audit"]
    assert "Not exact: 4 of 4 verified positions changed" in (tmp_path / "run" / "index.html").read_text()


def test_inspect_reports_exact_when_nothing_changes():
    shown = CliRunner().invoke(cli, ["inspect", f"{TINY}:build", "--input-shape", "1,1,12,12", "--json"])
    record = json.loads(shown.stdout)
    assert record["exact"] is True and record["verified"] == 1 and record["violations"] == 0
    assert record["positions"][0]["verified"] is True and record["positions"][0]["violations"] == 0
    table = CliRunner().invoke(cli, ["inspect", f"{TINY}:build", "--input-shape", "1,1,12,12"])
    assert table.stdout.splitlines()[-1] == "exact: yes (1 position(s) verified on the model)"


@pytest.mark.parametrize("model", [BatchCoupled(), BatchOfOne()])
def test_stacking_never_invents_a_violation(model):
    result = sweep(model, (1, 2, 12, 12), "all", verify=6)
    assert result.verified.sum() == 6 and not result.violations.any()


def test_a_model_that_cannot_run_the_check_is_reported_unverified():
    result = sweep(PositiveOnly(), (1, 1, 9, 9), "all")
    assert not result.verified.any() and result.verification.checked == 0
    assert result.verification.note == ("the float64 copy of the model did not run: the model raised ValueError on "
                                        "input shape (1, 1, 9, 9): inputs must be non-negative")
    finding = next(f for f in analyze(result).findings if f.code == "unverified")
    assert finding.severity == "info" and "not verified on the model" in finding.message


def test_verification_is_off_where_supports_are_smaller_on_purpose_or_when_asked():
    model = large_kernels()
    for options in ({"mode": "gradient"}, {"local": True}, {"verify": False}, {"verify": 0}):
        result = sweep(model, (1, 2, 10, 10), "corners", **options)
        assert result.verification is None and not result.verified.any() and not result.violations.any()
    assert sweep(model, (1, 2, 10, 10), "all", verify="all").verified.all()
    chosen = sweep(model, (1, 2, 10, 10), "corners", verify=[(0, 9), (5, 5)])    # checked where swept
    assert chosen.positions[chosen.verified].tolist() == [[0, 9]]
    with pytest.raises(SweepError, match="verify must be auto, all, true, false or a number"):
        sweep(model, (1, 2, 10, 10), "corners", verify="some")


def test_a_support_of_the_whole_input_is_verified_without_a_forward_pass(monkeypatch):
    def refuse(*_args):
        raise AssertionError("no copy, no pass: nothing lies outside the support")

    monkeypatch.setattr("rfreport.compute.verify.float64_copy", refuse)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Upsample(scale_factor=2))
    result = sweep(model, (1, 1, 8, 8), "all")
    assert len(result.positions) == 4 and result.verified.all() and result.verification.note == ""
    assert not result.violations.any()


def test_a_channels_last_output_is_checked_through_its_layout():
    model = nn.Sequential(large_kernels(), LambdaModule(lambda y: y.permute(0, 2, 3, 1)))
    result = sweep(model, (1, 2, 16, 16), "all", layout="nhwc")
    assert result.verified.sum() == default_count(2) and not result.violations.any()
    masks = np.stack([np.ones((16, 16), bool)] * 2)
    masks[0, :, :3] = False                          # position (8, 8) reads columns 3-13 only: still honest
    masks[1, :, 13:] = False                         # but it reads column 13: caught, through the layout
    target = Target(layout=parse_layout("nhwc"))
    done = verify(model, (1, 2, 16, 16), target, np.array([[8, 8], [8, 8]]), masks)
    assert done.violations.tolist() == [0, 3]


class ConvolutionInputs(TorchFunctionMode):
    """Record the layout of every float64 convolution input it sees."""

    def __init__(self):
        super().__init__()
        self.contiguous: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.conv2d and args[0].dtype == torch.float64:
            self.contiguous.append(args[0].is_contiguous())
        return func(*args, **(kwargs or {}))


def test_a_depthwise_convolution_of_a_permuted_tensor_is_checked_channels_first_and_still_catches_a_lie():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), LambdaModule(lambda y: y.permute(0, 2, 3, 1)),
                          nn.Linear(4, 4), LambdaModule(lambda y: y.permute(0, 3, 1, 2)),
                          nn.Conv2d(4, 4, 5, padding=2, groups=4), nn.Conv2d(4, 2, 1))
    result = sweep(block, (1, 2, 20, 20), [(10, 10)], keep_masks="all", verify=False)
    masks = result.masks[(10, 10)][None].copy()
    with ConvolutionInputs() as seen:
        honest = verify(block, (1, 2, 20, 20), Target(), np.array([[10, 10]]), masks)
    assert seen.contiguous and all(seen.contiguous)      # the permuted input reached its kernel channels-first
    assert honest.violations.tolist() == [0]
    masks[0, 10, 13] = False                              # a pixel the position reads: it reads columns 7-13
    assert verify(block, (1, 2, 20, 20), Target(), np.array([[10, 10]]), masks).violations.tolist() == [SAMPLES]


def test_a_layer_target_is_checked_on_that_layer():
    model = pooled()
    result = sweep(model, (1, 1, 30, 30), "all", layer="1")
    assert result.verified.sum() == default_count(2) and not result.violations.any()


@pytest.mark.parametrize(("text", "expected"), [("", "auto"), ('verify = "all"', "all"), ("verify = false", False),
                                                ("verify = 4", 4), ("verify = true", True)])
def test_the_verify_config_key(tmp_path, text, expected):
    path = tmp_path / "run.toml"
    path.write_text(f'[[model]]\nname = "a"\nfactory = "{TINY}:build"\ninput_shape = [1, 1, 12, 12]\n{text}\n')
    assert config.load([path]).models[0].verify == expected


@pytest.mark.parametrize(("text", "problem"), [
    ('"some"', "must be one of auto, all, not 'some'"),
    ("-1", "must be a number of positions >= 0, not -1"),
    ("1.5", "must be auto, all, true, false or a number of positions, not float 1.5"),
])
def test_a_bad_verify_value_names_file_model_and_key(tmp_path, text, problem):
    path = tmp_path / "run.toml"
    path.write_text(f'[[model]]\nname = "a"\nfactory = "{TINY}:build"\ninput_shape = [1, 1, 12, 12]\nverify = {text}\n')
    with pytest.raises(ConfigError) as caught:
        config.load([path])
    assert str(caught.value) == f"{path}: model 'a': key 'verify': {problem}"


def test_a_job_checks_as_many_positions_as_its_config_says(tmp_path):
    spec = config.ModelSpec(name="tiny", factory=f"{TINY}:build", input_shapes=((1, 1, 12, 12),), verify=2)
    result = pipeline.run_job(jobs_mod.Job(spec, (1, 1, 12, 12), config.RunOptions()))
    assert result.frames["positions"]["verified"].sum() == 2 == result.summary.to_json()["verified"]
    assert result.summary.to_json()["violations"] == 0


class TiedHead(nn.Module):
    """A body, a large head after it, and a layer that reads another module's weight without calling it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 1000)

    def forward(self, x):
        y = F.conv2d(self.body(x), self.shared.weight, padding=1)
        return self.head(y.flatten(1))


def test_the_float64_copy_leaves_out_what_the_pass_to_the_target_never_reads():
    model = TiedHead().eval()
    copied = dict(float64_copy(model, torch.device("cpu"), reads(model, (1, 1, 8, 8), Target())).named_parameters())
    assert copied["head.weight"].numel() == 4 * 8 * 8 * 1000   # the model output reads the head
    body_only = float64_copy(model, torch.device("cpu"), reads(model, (1, 1, 8, 8), Target(layer="body")))
    kept = {name: p.numel() for name, p in body_only.named_parameters()}
    assert kept["head.weight"] == kept["shared.weight"] == 0 and kept["body.weight"] == 36
    assert all(p.dtype == torch.float64 for p in body_only.parameters())


def test_a_layer_reading_another_modules_weight_is_still_verified():
    class Target4(TiedHead):
        def forward(self, x):
            return F.conv2d(self.body(x), self.shared.weight, padding=1)

    result = sweep(Target4().eval(), (1, 1, 8, 8), "all", verify=4)
    assert result.verification.note == "" and result.verification.checked == 4 and result.violations.sum() == 0


class Threshold(nn.Module):
    """A 3x3 convolution, plus a wide one that only sees input entries beyond 4 in magnitude (a hard threshold)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.near = nn.Conv2d(1, 1, 3, padding=1)
        self.far = nn.Conv2d(1, 1, 9, padding=4)

    def forward(self, x):
        return self.near(x) + self.far(x * (x.abs() > 4))


def test_a_dependency_only_large_perturbations_reveal_is_caught_in_a_single_trial():
    model = Threshold()
    near = sweep(model.near, (1, 1, 24, 24), [(12, 12), (0, 0), (5, 17)], keep_masks="all", verify=False)
    masks = np.stack([near.masks[tuple(p)] for p in near.positions.tolist()])   # the far path left out: a lie
    x = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    float64 = model.double()
    with torch.no_grad():    # perturbations of the base's own scale leave every output as it was: the lie hides
        for (i, j), mask in zip(near.positions.tolist(), masks):
            assert float64(torch.where(torch.as_tensor(mask), x, r))[0, 0, i, j] == float64(x)[0, 0, i, j]
    caught = verify(Threshold(), (1, 1, 24, 24), Target(), near.positions, masks, samples=1)
    assert caught.violations.tolist() == [1, 1, 1]


def expensive(monkeypatch) -> None:
    """Make every float64 pass count against the sweep's rows: no free work."""
    monkeypatch.setattr("rfreport.compute.verify.FREE_FLOPS", 0)


def test_a_sweep_of_few_rows_checks_its_centre_and_corners_once(monkeypatch):
    expensive(monkeypatch)
    result = sweep(large_kernels(), (1, 2, 20, 20), ["center", "corners"])
    assert result.verified.sum() == 5 == result.verification.checked and result.verification.samples == 1
    assert not result.violations.any()
    assert analyze(result).summary.to_json()["verify_trials"] == 1


def test_a_sweep_of_many_rows_checks_every_planned_position_three_times(monkeypatch):
    expensive(monkeypatch)
    result = sweep(large_kernels(), (1, 2, 20, 20), "all", method="dense")    # 400 rows buy 200 passes
    assert result.verified.sum() == default_count(2) and result.verification.samples == 3


def test_random_positions_join_when_one_trial_of_all_fits_and_trials_when_all_fit_again(monkeypatch):
    expensive(monkeypatch)
    some = sweep(large_kernels(), (1, 2, 20, 20), "grid:4", method="dense")    # 36 rows buy 18 passes: 2 x (1 + 8)
    assert some.verified.sum() == default_count(2) and some.verification.samples == 2
    more = sweep(large_kernels(), (1, 2, 20, 20), "grid:2", method="dense")    # 121 rows, 60 passes
    assert more.verified.sum() == default_count(2) and more.verification.samples == 3


def test_the_smallest_budget_still_catches_an_under_reporting_engine(monkeypatch):
    expensive(monkeypatch)
    erase_first_column(monkeypatch)
    result = sweep(large_kernels(), (1, 2, 20, 20), ["center", "corners"], method="dense")
    assert result.verified.sum() == 5 and (result.violations[result.verified] == 1).all()
    assert analyze(result).summary.to_json()["violations"] == 5


def test_two_runs_check_the_same_positions_the_same_way(monkeypatch):
    expensive(monkeypatch)
    first, second = (sweep(large_kernels(), (1, 2, 20, 20), "grid:4").verification for _ in range(2))
    np.testing.assert_array_equal(first.positions, second.positions)
    np.testing.assert_array_equal(first.deviation, second.deviation)
    assert first.samples == second.samples


class Tied(TiedHead):
    """A body, then a convolution with another module's weight; the head after them is never read."""

    def forward(self, x):
        return F.conv2d(self.body(x), self.shared.weight, padding=1)


class ValueBranch(TiedHead):
    """The same pass, branching on a value: it does not run on meta tensors."""

    def forward(self, x):
        y = self.body(x)
        return y if bool((y > 1e9).any()) else F.conv2d(y, self.shared.weight, padding=1)


@pytest.mark.parametrize("meta_kernels_loaded", [True, False])
def test_reads_come_from_a_meta_pass_or_else_a_pass_of_the_model_as_given(monkeypatch, meta_kernels_loaded):
    monkeypatch.setattr(shapes, "dynamo_loaded", lambda: meta_kernels_loaded)     # else the model runs first
    convolutions = [2 * 64 * 4 * 9, 2 * 64 * 4 * 4 * 9]               # two per multiply-add
    for model, others in ((Tied().eval(), []), (ValueBranch().eval(), [4 * 64, 1])):  # y > 1e9, any(): one per entry
        found = reads(model, (1, 1, 8, 8), Target())
        assert {name for name, p in model.named_parameters() if id(p) in found.ids} == {
            "body.weight", "body.bias", "shared.weight"}
        ops = convolutions + others
        assert found.flops == sum(ops)
        assert found.grain == sum(f * f for f in ops) // sum(ops)      # the flop-weighted mean op


def test_reads_are_found_once_per_model_shape_and_target_while_surrogates_are_reused():
    model = Tied().eval()
    with surrogates_reused():
        first = reads(model, (1, 1, 8, 8), Target())
        assert reads(model, (1, 1, 8, 8), Target()) is first
        assert reads(model, (1, 1, 16, 16), Target()) is not first
    assert reads(model, (1, 1, 8, 8), Target()) is not first


def test_the_budget_counts_passes_of_the_sweeps_rows_or_of_free_flops():
    positions = np.array([(4, 4), (0, 0), (0, 8), (8, 0), (8, 8), (2, 5), (6, 1), (3, 7)])
    plan = Plan(positions, np.arange(8) < 5, budgeted=True)
    costly, perturbed = 10 ** 12, np.ones(8, bool)

    def kept(rows: int, flops: int | None, perturbed: np.ndarray = perturbed) -> tuple[int, int]:
        keep, trials = afford(plan, perturbed, rows, flops)
        assert keep[:5].all()                                # the centre and the corners, always
        return int(keep.sum()), trials

    assert kept(0, None) == kept(10, costly) == (5, 1)       # 5 passes buy less than 1 + 5: still one trial
    assert kept(18, costly) == (8, 1) and kept(36, costly) == (8, 2) and kept(10 ** 6, costly) == (8, 3)
    assert kept(0, 0) == (8, 3) and kept(0, FREE_FLOPS // 27) == (8, 3) and kept(0, FREE_FLOPS // 26) == (8, 2)
    assert kept(10, costly, np.arange(8) < 1) == (8, 2)      # only the centre needs perturbing: 2 passes a trial
    keep, trials = afford(Plan(positions, np.ones(8, bool), budgeted=False), perturbed, 0, costly)
    assert keep.all() and trials == SAMPLES


def test_the_largest_seed_a_run_takes_checks_positions_too():
    """A trial's seed mixes the run's seed and the trial number: it stays within torch's 64 bits."""
    found = sweep(conv_stack(), (1, 1, 12, 12), "all", seed=2 ** 63 - 1)
    assert found.verification.samples >= 1 and (found.violations == 0).all() and len(found.verification.positions)
