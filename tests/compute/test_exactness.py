"""Exact by construction: cancellation, value routing, hidden forwards, views, layouts and precision.

Two independent truths: set propagation (tests/oracle.py) for separable stacks, and forward
perturbation of single input pixels on the model itself (no autograd) for random graphs that mix
convolutions with upsampling, pixel shuffle, norms, softmax, attention, shifts built from slicing
and padding, unpooling, medians and sorts.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from rfreport.cli import cli
from rfreport.compute.sweep import sweep
from rfreport.errors import SweepError
from tests.oracle import (
    VALUE_KINDS,
    Block,
    Layer,
    Median,
    Sort,
    Unpool,
    lengths,
    nonfinite_positions,
    perturbation_masks,
    support_mask,
)

# Unpooling, medians and sorts are left to the set-propagation test (test_new_op_families_...), whose
# oracle is exact by construction: whether moving one pixel changes an unpooled output or an order
# statistic of a window with repeated values depends on the base input, which one perturbation from
# one base cannot show. They appear here once each, alone, where it can.
# Value kinds, sampling and -inf masks join them; `warp` samples at an input-derived grid, where forward
# perturbation is only a lower bound of the structural RF (the whole input), and `nan` makes positions nan.
KINDS = ["conv", "strided", "upsample", "bilinear", "shuffle", "groupnorm", "softmax", "attention", "shift",
         "residual", "crelu"]
EXTRA_KINDS = [*VALUE_KINDS, "grid", "warp", "neginf", "nan"]
LINEAR_KINDS = ("conv", "strided", "upsample")


@st.composite
def random_graphs(draw, kinds: list[str] = KINDS):
    """Draw 1-3 blocks and an input size that every block accepts.

    At most one block thresholds (a value kind), after linear blocks only: forward perturbation crosses a
    threshold by pushing a pixel far, which a bounded block before it (a softmax) or the O(1) change of
    another flipped threshold need not do, and would then miss what the threshold reads.
    """
    size = draw(st.integers(4, 9))
    kinds = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3))
    thresholds = [i for i, kind in enumerate(kinds) if kind in VALUE_KINDS]
    assume(len(thresholds) <= 1 and all(kind in LINEAR_KINDS for kind in kinds[:thresholds[0] if thresholds else 0]))
    n = size
    for kind in kinds:
        n = {"strided": (n - 3) // 2 + 1, "upsample": 2 * n, "bilinear": 2 * n, "shuffle": 2 * n}.get(kind, n)
        assume(1 <= n <= 20)
    torch.manual_seed(draw(st.integers(0, 100)))
    return nn.Sequential(*(Block(k, size) for k in kinds)), (1, 2, size, size)


def assert_equals_oracle(model: nn.Module, shape: tuple[int, ...], truth: dict, **options) -> None:
    """Sweep the oracle's positions densely and compare their support masks with the oracle's."""
    result = sweep(model, shape, sorted(truth), keep_masks="all", method="dense", **options)
    for pos in map(tuple, result.positions.tolist()):
        np.testing.assert_array_equal(result.masks[pos], truth[pos], err_msg=f"position {pos}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(random_graphs())
def test_random_graphs_equal_forward_perturbation(case):
    model, shape = case
    truth = perturbation_masks(model, shape)
    assert_equals_oracle(model, shape, truth)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(random_graphs([*LINEAR_KINDS, *EXTRA_KINDS]))
def test_random_graphs_through_values_sampling_and_infinities_equal_forward_perturbation(case):
    """Positions a nan reaches are refused; past an input-derived grid every position that is not constant reads
    everything the grid reads."""
    model, shape = case
    assume(not {"nan", "warp"} <= {block.kind for block in model})   # where nan lands would change with the input
    truth, reached = perturbation_masks(model, shape, big=1e6), nonfinite_positions(model, shape)
    if reached:
        with pytest.raises(SweepError, match="nan or inf at"):
            sweep(model, shape, "all", method="dense")
    truth = {pos: mask for pos, mask in truth.items() if pos not in reached}
    if not truth:
        return
    if any(block.kind == "warp" for block in model):
        result = sweep(model, shape, sorted(truth), keep_masks="all", method="dense")
        masks = {pos: result.masks[pos] for pos in truth if result.masks[pos].any()}   # empty: a constant output
        assert all(pos in masks for pos in truth if truth[pos].any())
        reads = np.logical_or.reduce(list(truth.values()))
        assert all((mask == next(iter(masks.values()))).all() and (mask >= reads).all() for mask in masks.values())
        return
    assert_equals_oracle(model, shape, truth)


@pytest.mark.parametrize("model", [Median((3, 3), (0, 0)), Sort()], ids=["median", "sort"])
def test_order_statistics_equal_forward_perturbation(model):
    assert_equals_oracle(model, (1, 1, 7, 7), perturbation_masks(model, (1, 1, 7, 7)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(random_graphs())
def test_compressed_and_float64_equal_dense_float32(case):
    model, shape = case
    dense = sweep(model, shape, "all", method="dense")
    for other in (sweep(model, shape, "all", method="compressed"), sweep(model, shape, "all", dtype="float64")):
        for name in ("lo", "hi", "support"):
            np.testing.assert_array_equal(getattr(other, name), getattr(dense, name))


@st.composite
def new_family_stacks(draw):
    """Draw a 2-D stack mixing convolutions with upsampling, unpooling, median filters and sorts."""
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "max", "up", "unpool", "median", "sort"]))
        k = tuple(draw(st.integers(1, 3)) for _ in range(2))
        s = (2, 2) if kind in ("up", "unpool") else tuple(draw(st.integers(1, 2)) for _ in range(2))
        p = tuple(draw(st.integers(0, k_i // 2)) for k_i in k)
        if kind == "median":
            s = (1, 1)
        layers.append(Layer(kind, k, s, p, (1, 1)))
    shape = tuple(draw(st.integers(4, 12)) for _ in range(2))
    for axis, n in enumerate(shape):
        sizes = lengths(layers, axis, n)
        assume(min(sizes) >= 1 and max(sizes) <= 24)
        assume(all(size % 2 == 0 for layer, size in zip(layers, sizes) if layer.kind == "unpool"))
    return layers, shape


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(new_family_stacks())
def test_new_op_families_match_set_propagation(case):
    layers, shape = case
    torch.manual_seed(0)
    model = nn.Sequential(*(layer.module(2) for layer in layers))
    result = sweep(model, (1, 2, *shape), "all", keep_masks="all", method="dense")
    for pos in map(tuple, result.positions.tolist()):
        np.testing.assert_array_equal(result.masks[pos], support_mask(layers, shape, pos), err_msg=f"at {pos}")


class SoftmaxHead(nn.Module):
    """A segmentation head: class probabilities over channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.softmax(self.conv(x), 1)


class CReLU(nn.Module):
    """Concatenated ReLU: relu(h) and relu(-h) side by side."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        return torch.cat([F.relu(h), F.relu(-h)], 1)


class AbsViaRelus(CReLU):
    """|h| written as relu(h) + relu(-h): the surrogate's identity ReLUs must not cancel."""

    def forward(self, x):
        h = self.conv(x)
        return F.relu(h) + F.relu(-h)


class NegativePart(CReLU):
    """h - relu(h) = min(h, 0), with the ReLU computed before any op that can mix signs."""

    def forward(self, x):
        h = self.conv(x)
        return h - F.relu(h)


@pytest.mark.parametrize("model", [SoftmaxHead(), CReLU(), AbsViaRelus(), NegativePart()],
                         ids=["softmax-head", "crelu", "abs", "negative-part"])
def test_cancellation_across_channels_loses_nothing(model):
    result = sweep(model, (1, 3, 12, 12), "center", keep_masks=True)
    assert result.support.tolist() == [9]
    assert result.masks[(5, 5)].sum() == 9


def test_sixty_layers_in_float32_keep_every_corner():
    model = nn.Sequential(*(nn.Conv2d(2, 2, 3, padding=1) for _ in range(60)))
    result = sweep(model, (1, 2, 125, 125), "center")
    assert result.support.tolist() == [121 * 121]


def max_pool_chain() -> nn.Module:
    return nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(2), nn.MaxPool2d(2))


def test_compiled_model_is_analysed_through_its_original_module():
    assert sweep(torch.compile(max_pool_chain()), (1, 1, 16, 16), "center").support.tolist() == [64]


def test_compiled_submodule_is_unwrapped_and_the_user_model_kept():
    model = nn.Sequential(torch.compile(nn.Conv2d(1, 1, 3)), nn.MaxPool2d(2))
    assert sweep(model, (1, 1, 10, 10), "center").support.tolist() == [16]
    assert type(model[0]).__name__ == "OptimizedModule"


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_block_is_analysed_as_if_plain(reentrant):
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d(2))

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=reentrant)

    assert sweep(Checkpointed(), (1, 1, 16, 16), "center").support.tolist() == [16]


def test_torchscript_is_refused_in_one_line_and_in_the_cli(tmp_path):
    scripted = torch.jit.script(max_pool_chain())
    with pytest.raises(SweepError, match=r"TorchScript module.*pass the original nn\.Module"):
        sweep(scripted, (1, 1, 16, 16), "center")
    assert sweep(scripted, (1, 1, 16, 16), "center", mode="gradient").support.tolist() == [1]
    path = tmp_path / "scripted.py"
    path.write_text("import torch\nfrom torch import nn\n\ndef build():\n"
                    "    return torch.jit.script(nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(2)))\n")
    done = CliRunner().invoke(cli, ["inspect", f"{path}:build", "--input-shape", "1,1,8,8"])
    assert done.exit_code == 1, done.output
    assert "TorchScript" in done.output and "Traceback" not in done.output


def median_filter() -> nn.Module:
    return Median((3, 3), (1, 1))


@pytest.mark.parametrize(("model", "shape", "size"), [
    (median_filter(), (1, 1, 8, 8), None),
    (Sort(), (1, 1, 8, 8), 8),
    (Unpool(2, 2), (1, 1, 8, 8), 4),
    (nn.FractionalMaxPool2d(3, output_size=4), (1, 1, 9, 9), None),
], ids=["median", "sort", "unpool", "fractional"])
def test_value_routing_ops_get_their_whole_window(model, shape, size):
    structural = sweep(model, shape, "all", method="dense")
    gradient = sweep(model, shape, "all", mode="gradient", method="dense")
    assert (structural.support >= gradient.support).all()
    if size is not None:
        assert set(structural.support.tolist()) == {size}
    elif isinstance(model, Median):
        assert structural.support.max() == 9 and gradient.support.max() == 1
    else:  # the union of every window the random draw can take: floor(i * a) .. floor(i * a) + k
        assert structural.support.max() == 16 and structural.hi[-1].tolist() == [8, 8]


def test_gather_through_input_dependent_indices_reads_the_whole_axis():
    class ArgmaxGather(nn.Module):
        def forward(self, x):
            index = x.sum(1, keepdim=True).argmax(-1, keepdim=True).expand(-1, x.shape[1], -1, -1)
            return torch.gather(x, -1, index)

    result = sweep(ArgmaxGather(), (1, 2, 6, 5), "all", method="dense")
    assert result.lo[:, 1].tolist() == [0] * 6 and result.hi[:, 1].tolist() == [4] * 6


def test_scatter_through_input_dependent_indices_is_refused():
    class ArgmaxScatter(nn.Module):
        def forward(self, x):
            index = x.argmax(-1, keepdim=True)
            return torch.zeros_like(x).scatter(-1, index, x[..., :1])

    with pytest.raises(SweepError, match="cannot analyse `scatter`"):
        sweep(ArgmaxScatter(), (1, 1, 4, 4), "center")


def test_in_place_write_through_a_view_keeps_its_effect():
    class WriteThroughView(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            y = self.conv(x)
            y.narrow(-1, 0, 1).add_(x[..., -1:])
            return y

    result = sweep(WriteThroughView(), (1, 1, 6, 6), "all", method="dense")
    first = result.positions[:, 1] == 0
    assert (result.support[first] == 2).all() and (result.support[~first] == 1).all()
    assert (result.hi[first, 1] == 5).all()


class FarPixel(nn.Module):
    """A 3x3 conv plus one far connection: the last row also reads the first row, by slicing and padding."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        far = F.pad(x[..., :1, :], (0, 0, x.shape[-2] - 1, 0))
        return self.conv(x) + far


def test_compressed_sweep_is_never_fooled_by_a_far_connection():
    shape = (1, 1, 40, 40)
    dense = sweep(FarPixel(), shape, "all", method="dense")
    for method in ("compressed", "auto"):
        result = sweep(FarPixel(), shape, "all", method=method)
        np.testing.assert_array_equal(result.lo, dense.lo)
        np.testing.assert_array_equal(result.hi, dense.hi)
        assert "move spatial positions" in result.method_note
    assert dense.lo[-1].tolist() == [0, 38]


def test_local_model_still_compresses():
    model = nn.Sequential(*(nn.Conv2d(2, 2, 3, padding=1) for _ in range(3)))
    result = sweep(model, (1, 2, 48, 48), "all", method="compressed")
    assert "compressed" in set(result.path) and result.method_note == ""
    dense = sweep(model, (1, 2, 48, 48), "all", method="dense")
    np.testing.assert_array_equal(result.lo, dense.lo)


def test_float32_equals_float64_on_a_deep_gated_model():
    torch.manual_seed(0)
    blocks = []
    for _ in range(12):
        blocks += [nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU()]
    model = nn.Sequential(*blocks, nn.Conv2d(4, 4, 3, stride=2))
    one, two = (sweep(model, (1, 4, 16, 16), "corners", dtype=d) for d in ("float32", "float64"))
    np.testing.assert_array_equal(one.support, two.support)


def state_of(model: nn.Module) -> list[torch.Tensor | bool]:
    """Snapshot everything a sweep must leave as it was: parameters, buffers, flags and hooks."""
    return [*(t.detach().clone() for t in model.state_dict().values()), *(m.training for m in model.modules()),
            *(p.requires_grad for p in model.parameters()),
            *((len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules())]


@pytest.mark.parametrize("mode", ["structural", "gradient"])
def test_train_mode_model_with_batchnorm_and_dropout_is_untouched(mode):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU()).train()
    before = state_of(model)
    sweep(model, (2, 3, 8, 8), "all", mode=mode)
    after = state_of(model)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_inspect_json_of_a_softmax_head(tmp_path):
    path = tmp_path / "head.py"
    path.write_text("import torch\nfrom torch import nn\n\nclass Head(nn.Module):\n"
                    "    def __init__(self):\n        super().__init__()\n"
                    "        self.conv = nn.Conv2d(3, 4, 3, padding=1)\n"
                    "    def forward(self, x):\n        return torch.softmax(self.conv(x), 1)\n")
    done = CliRunner().invoke(cli, ["inspect", f"{path}:Head", "--input-shape", "1,3,9,9", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["positions"][0]["support"] == 9


def test_metadata_queries_do_not_stop_compression():
    class Queries(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            assert x.dim() == 4 and x.shape[1] == x.size(1) == 2
            return self.conv(x)

    result = sweep(Queries(), (1, 2, 48, 48), "all", method="compressed")
    assert result.method_note == "" and "compressed" in set(result.path)


class MaskedPosition(nn.Module):
    """A conv whose output gets an additive -inf mask at one position (on every channel, or one), then a softmax
    over channels: nan at that position when every channel is masked."""

    def __init__(self, channels: slice = slice(None)):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        mask = torch.zeros(1, 3, 6, 6)
        mask[0, channels, 4, 4] = float("-inf")
        self.register_buffer("mask", mask)

    def forward(self, x):
        return torch.softmax(self.conv(x) + self.mask, 1)


def test_a_nan_position_spreads_to_no_other_and_is_refused_in_one_line():
    torch.manual_seed(0)
    shape = (1, 2, 8, 8)
    result = sweep(MaskedPosition(), shape, [(2, 2)])
    assert result.lo.tolist() == [[2, 2]] and result.hi.tolist() == [[4, 4]] and result.support.tolist() == [9]
    truth = perturbation_masks(MaskedPosition(), shape)
    assert_equals_oracle(MaskedPosition(), shape, {pos: mask for pos, mask in truth.items() if pos != (4, 4)})
    with pytest.raises(SweepError, match=r"nan or inf at 1 of 36 swept positions \(first \(4, 4\)\)"):
        sweep(MaskedPosition(), shape, "all")


def test_a_nan_constant_is_refused_in_one_line_in_the_cli(tmp_path):
    path = tmp_path / "nan.py"
    path.write_text("from torch import nn\n\nclass Nan(nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.conv = nn.Conv2d(1, 1, 3)\n"
                    "    def forward(self, x):\n        return self.conv(x) * float('nan')\n")
    done = CliRunner().invoke(cli, ["inspect", f"{path}:Nan", "--input-shape", "1,1,8,8"])
    assert done.exit_code == 1, done.output
    assert "model output is nan or inf at 1 of 1 swept positions" in done.output and "Traceback" not in done.output


def test_a_mask_on_some_channels_stays_exact_everywhere():
    torch.manual_seed(0)
    model = MaskedPosition(slice(0, 2))
    assert_equals_oracle(model, (1, 2, 8, 8), perturbation_masks(MaskedPosition(slice(0, 2)), (1, 2, 8, 8)))


def test_nan_made_by_the_surrogate_from_finite_values_is_refused():
    class RootOfDifference(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return torch.sqrt(self.conv(x) - 2 * x)   # negative in the surrogate: weights average to one

    with pytest.raises(SweepError, match=r"from finite values at sqrt.*--mode gradient; config: mode = \"gradient\""):
        sweep(RootOfDifference(), (1, 1, 8, 8), "center")


def test_a_function_compiled_during_the_pass_runs_eagerly_before_dynamo_loads(monkeypatch):
    """Without torch.compile's machinery loaded, what the forward pass compiles runs as plain calls."""
    from rfreport.compute import surrogate

    class CompilesInForward(nn.Module):
        def forward(self, x):
            return torch.compile(max_pool_chain())(x)

    monkeypatch.setattr(surrogate, "dynamo_loaded", lambda: False)
    original = torch.compile
    assert sweep(CompilesInForward(), (1, 1, 16, 16), "center").support.tolist() == [64]
    assert torch.compile is original


def test_a_sweep_does_not_load_torch_compile(tmp_path):
    """Loading torch.compile's machinery costs as much as importing torch: a sweep of a plain model spares it."""
    code = ("import sys; from torch import nn; from rfreport.compute.sweep import sweep; "
            "sweep(nn.Conv2d(1, 1, 3), (1, 1, 8, 8), 'center'); print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=tmp_path).stdout.strip() == "False"


@given(st.lists(st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 2.5, -3.0, float("inf"), -float("inf"), float("nan")]),
                min_size=1, max_size=40), st.sampled_from([torch.float32, torch.float64]))
def test_the_gates_mark_exactly_the_non_zero_gradients(values, dtype):
    """The gates' backward marks the entries `grad != 0` marks (NaN and subnormals included), in the grad's dtype."""
    from rfreport.compute.surrogate import _nonzero

    grad = torch.tensor(values, dtype=dtype)
    marked = _nonzero(grad.clone())
    assert marked.dtype == dtype
    assert torch.equal(marked, (grad != 0).to(dtype))
