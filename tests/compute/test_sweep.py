"""The sweep engine against independent truths: set propagation, closed forms, invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

from rfreport.analysis.frames import positions_frame
from rfreport.compute.sweep import sweep
from tests.oracle import Layer, lengths, support_mask
from tests.support import build, layer_stacks


def assert_matches_oracle(layers: list[Layer], shape: tuple[int, ...], mode: str = "structural") -> None:
    """Sweep every output position and compare each support mask with set propagation."""
    model = build(layers)
    result = sweep(model, (1, 2, *shape), "all", keep_masks="all", batch_size=64)
    out_shape = tuple(lengths(layers, a, n)[-1] for a, n in enumerate(shape))
    assert result.output_spatial == out_shape
    for pos, lo, hi, count in zip(result.positions, result.lo, result.hi, result.support):
        expected = support_mask(layers, shape, tuple(pos))
        np.testing.assert_array_equal(result.masks[tuple(pos)], expected, err_msg=f"position {pos}")
        assert count == expected.sum()
        if count:
            nz = np.nonzero(expected)
            assert lo.tolist() == [int(i.min()) for i in nz]
            assert hi.tolist() == [int(i.max()) for i in nz]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(layer_stacks(rank=1))
def test_random_1d_stacks_match_set_propagation(case):
    layers, shape = case
    assert_matches_oracle(layers, shape)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(layer_stacks(rank=2))
def test_random_2d_stacks_match_set_propagation(case):
    layers, shape = case
    assert_matches_oracle(layers, shape)


def test_max_pool_chain_is_64_pixels_structurally_and_one_by_gradient():
    model = nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(2), nn.MaxPool2d(2))
    structural = sweep(model, (1, 1, 32, 32), "all")
    gradient = sweep(model, (1, 1, 32, 32), "all", mode="gradient")
    assert set(structural.support) == {64}
    assert (structural.hi - structural.lo + 1 == 8).all()
    assert set(gradient.support) == {1}


def test_dead_relus_hide_nothing_in_structural_mode():
    conv = nn.Conv2d(1, 4, 3)
    with torch.no_grad():
        conv.bias.fill_(-100.0)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 1, 3), nn.ReLU6(), nn.Hardtanh())
    structural = sweep(model, (1, 1, 9, 9), "all")
    gradient = sweep(model, (1, 1, 9, 9), "all", mode="gradient")
    assert set(structural.support) == {25}
    assert set(gradient.support) == {0}


def test_sixty_layer_stack_keeps_every_corner_pixel():
    model = nn.Sequential(*[nn.Conv2d(1 if i == 0 else 2, 2, 3) for i in range(60)])
    result = sweep(model, (1, 1, 121, 121), "all")
    assert result.support.tolist() == [121 * 121]
    assert result.lo.tolist() == [[0, 0]] and result.hi.tolist() == [[120, 120]]


def test_dilated_convolutions_leave_holes():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), nn.Conv2d(2, 2, 3, dilation=2))
    frame = positions_frame(sweep(model, (1, 1, 11, 11), "center", keep_masks="center"))
    row = frame.iloc[0]
    assert (row.h_size, row.w_size, row.support) == (9, 9, 25)
    assert row.fill == pytest.approx(25 / 81)


def test_transposed_convolution_matches_its_scatter_pattern():
    model = nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1)
    result = sweep(model, (1, 1, 5, 5), "all", keep_masks="all")
    for pos in map(tuple, result.positions.tolist()):
        per_axis = [{i for i in range(5) for j in range(3) if i * 2 - 1 + j == o} for o in pos]
        expected = np.zeros((5, 5), dtype=bool)
        expected[np.ix_(sorted(per_axis[0]), sorted(per_axis[1]))] = True
        np.testing.assert_array_equal(result.masks[pos], expected, err_msg=str(pos))


class Residual(nn.Module):
    """x + conv(conv(x)): the RF of the longer branch, 5x5."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class Concat(nn.Module):
    """cat(conv3(x), conv5(x)): the union of the branches, 5x5."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 5, padding=2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


@pytest.mark.parametrize("model", [Residual(), Concat()], ids=["residual", "concat"])
def test_branching_models_have_the_union_rf(model):
    result = sweep(model, (1, 2, 9, 9), "center")
    assert result.lo.tolist() == [[2, 2]] and result.hi.tolist() == [[6, 6]]
    assert result.support.tolist() == [25]


def test_zero_initialised_residual_branch_is_still_seen():
    model = Residual()
    with torch.no_grad():
        for param in model.body[2].parameters():
            param.zero_()
    assert sweep(model, (1, 2, 9, 9), "center").support.tolist() == [25]
    assert sweep(model, (1, 2, 9, 9), "center", mode="gradient").support.tolist() == [1]


@pytest.mark.parametrize("norm", [nn.GroupNorm(1, 2), nn.AdaptiveAvgPool2d(1)], ids=["groupnorm", "global-pool"])
def test_global_context_sees_the_whole_input(norm):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), norm, nn.Conv2d(2, 2, 1))
    result = sweep(model, (1, 1, 8, 8), "all")
    assert set(result.support) == {64}


def test_one_and_three_dimensional_models():
    one = sweep(nn.Sequential(nn.Conv1d(1, 2, 5, stride=2), nn.MaxPool1d(3)), (1, 1, 40), "center")
    assert one.hi[0, 0] - one.lo[0, 0] + 1 == 9
    three = sweep(nn.Sequential(nn.Conv3d(1, 2, 3), nn.Conv3d(2, 2, (1, 3, 5))), (1, 1, 6, 7, 9), "center")
    assert (three.hi - three.lo + 1).tolist() == [[3, 5, 7]]
    assert three.support.tolist() == [3 * 5 * 7]


def test_circular_padding_unrolls_the_wrapped_box():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"))
    frame = positions_frame(sweep(model, (1, 1, 6, 6), "corners"))
    corner = frame[(frame.pos_h == 0) & (frame.pos_w == 0)].iloc[0]
    assert (corner.h_lo, corner.h_hi, corner.h_size, bool(corner.h_wrap)) == (-1, 1, 3, True)
    assert corner.fill == 1.0


def test_batched_and_one_at_a_time_sweeps_give_identical_frames():
    model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.MaxPool2d(3, 2, ceil_mode=True),
                          nn.Conv2d(3, 2, 3, dilation=2, padding=2))
    batched = sweep(model, (1, 1, 23, 19), "all", keep_masks="corners")
    single = sweep(model, (1, 1, 23, 19), "all", keep_masks="corners", batch_size=1)
    assert positions_frame(batched).equals(positions_frame(single))
    np.testing.assert_array_equal(batched.coverage, single.coverage)
    assert batched.masks.keys() == single.masks.keys()


def test_coverage_counts_positions_that_see_each_pixel():
    model = nn.Conv2d(1, 1, 1, stride=2)
    result = sweep(model, (1, 1, 6, 6), "all")
    expected = np.zeros((6, 6), dtype=np.int64)
    expected[::2, ::2] = 1
    np.testing.assert_array_equal(result.coverage, expected)


def test_sweep_on_cuda_equals_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.MaxPool2d(2))
    cpu = positions_frame(sweep(model, (1, 1, 20, 20), device="cpu"))
    assert positions_frame(sweep(model, (1, 1, 20, 20), device="cuda")).equals(cpu)


class GatedResidualStack(nn.Module):
    """Residual sums and squeeze-and-excitation gates, block after block: values grow without bound."""

    def __init__(self, blocks: int = 30):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 3, padding=1) for _ in range(blocks))

    def forward(self, x):
        for conv in self.convs:
            x = x + conv(x)
            x = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
        return x


def test_deep_gated_residual_stack_does_not_overflow():
    model = GatedResidualStack()
    global_rf = sweep(model, (1, 2, 12, 12), "corners")
    assert set(global_rf.support) == {144}
    local_rf = sweep(model, (1, 2, 12, 12), "center", local=True)
    assert local_rf.support.tolist() == [144] and local_rf.lo.tolist() == [[0, 0]]
    assert sweep(GatedResidualStack(2), (1, 2, 12, 12), "center", local=True).support.tolist() == [25]


def test_a_channels_last_memory_format_model_gives_the_same_rfs():
    """Weights stored channels-last have no flat view; the surrogate writes them all the same."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 5, stride=2), nn.Linear(6, 4))
    plain = sweep(model, (1, 3, 16, 16), "all")
    stored = sweep(model.to(memory_format=torch.channels_last), (1, 3, 16, 16), "all")
    assert not model[2].weight.is_contiguous()
    np.testing.assert_array_equal(plain.lo, stored.lo)
    np.testing.assert_array_equal(plain.hi, stored.hi)
    np.testing.assert_array_equal(plain.support, stored.support)
    assert stored.verified.any() and not stored.violations.any()
