"""Dependencies through integer and boolean values: masks, argmax/one_hot, codebook lookups, buckets.

Forward perturbation on the model itself is the judge; every model here thresholds a window that
reaches beyond what the gated or selected value reads, so a reported RF missing the threshold's
pixels, or one that gained any other pixel, fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from rfreport.cli import cli
from rfreport.compute.sweep import sweep
from rfreport.errors import NoGradient
from tests.oracle import VALUE_KINDS, Block, perturbation_masks

SHAPE = (1, 2, 9, 9)


def assert_exact(model: nn.Module, shape: tuple[int, ...] = SHAPE) -> None:
    """Sweep every position and compare with forward perturbation; the sweep's own verification agrees."""
    truth = perturbation_masks(model, shape, big=1e6)
    result = sweep(model, shape, "all", keep_masks="all", method="dense")
    for pos in truth:
        np.testing.assert_array_equal(result.masks[pos], truth[pos], err_msg=f"position {pos}")
    assert result.violations.sum() == 0


@pytest.mark.parametrize("kind", VALUE_KINDS)
def test_gates_and_lookups_through_values_equal_forward_perturbation(kind):
    torch.manual_seed(3)
    assert_exact(nn.Sequential(Block("conv", 9), Block(kind, 9)))


class Searched(nn.Module):
    """A constant table indexed through `searchsorted` of a row window's mean."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bounds", torch.tensor([0.2, 0.4, 0.6, 0.8]))
        self.register_buffer("table", torch.randn(5, 2))

    def forward(self, x):
        row = F.avg_pool2d(x[:, :1], (1, 5), 1, (0, 2))[:, 0]
        return self.table[torch.searchsorted(self.bounds, row.contiguous())].permute(0, 3, 1, 2)


class VectorQuantiser(nn.Module):
    """VQ-VAE: the nearest codebook entry (indexing the codebook itself) of a 3x3 conv's features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.register_buffer("codebook", torch.randn(6, 4))

    def forward(self, x):
        z = self.conv(x).permute(0, 2, 3, 1)
        index = torch.cdist(z.reshape(-1, 4), self.codebook).argmin(-1)
        return self.codebook[index].reshape(z.shape).permute(0, 3, 1, 2)


@pytest.mark.parametrize("model", [Searched(), VectorQuantiser()], ids=["searchsorted", "vq"])
def test_constant_tables_indexed_by_the_input_equal_forward_perturbation(model):
    torch.manual_seed(0)
    assert_exact(model)


def test_a_mask_reduced_over_channels_reads_every_channel_and_nothing_more():
    class ChannelVote(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, (1, 3), padding=(0, 1))

        def forward(self, x):
            votes = (self.conv(x) > 0).any(1, keepdim=True)
            return x * votes.float() + x

    torch.manual_seed(0)
    result = sweep(ChannelVote(), SHAPE, "center", keep_masks=True)
    assert result.support.tolist() == [3] and result.lo.tolist() == [[4, 3]] and result.hi.tolist() == [[4, 5]]


def test_a_where_with_an_infinite_branch_keeps_the_finite_one():
    class MaskedScores(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            keep = F.avg_pool2d(x[:, :1], (5, 1), 1, (2, 0)) > 0.5
            return torch.softmax(torch.where(keep, self.conv(x), float("-inf")), 1).nan_to_num()

    torch.manual_seed(0)
    result = sweep(MaskedScores(), SHAPE, "center", keep_masks=True)
    assert result.support.tolist() == [11] and result.lo.tolist() == [[2, 3]] and result.hi.tolist() == [[6, 5]]


class Decided(nn.Module):
    """A per-pixel decision as the model's output: the argmax over channels, or a mask, of a 3x3 then 5x5 chain."""

    def __init__(self, decide):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 5, padding=2))
        self.decide = decide

    def forward(self, x):
        return self.decide(self.convs(x))


@pytest.mark.parametrize("decide", [lambda y: y.argmax(1, keepdim=True), lambda y: y > 0],
                         ids=["argmax", "mask"])
def test_an_integer_or_boolean_output_has_the_rf_of_what_it_was_decided_from(decide):
    torch.manual_seed(4)
    assert_exact(Decided(decide))


def test_an_integer_output_is_refused_in_gradient_mode_and_by_the_erf_in_one_line(tmp_path):
    model = Decided(lambda y: y.argmax(1, keepdim=True))
    with pytest.raises(NoGradient, match=r"^model output is an integer or boolean tensor \(int64\) and has no "
                                         r"gradient \(structural mode follows"):
        sweep(model, SHAPE, "center", mode="gradient")
    config = tmp_path / "run.toml"
    config.write_text('[[model]]\nname = "argmax"\nfactory = "tests.compute.test_taint:argmax_net"\n'
                      'input_shape = [1, 2, 9, 9]\nerf = true\n')
    result = CliRunner().invoke(cli, ["run", str(config), "--out", str(tmp_path / "out"), "-q", "--workers", "1"])
    assert result.exit_code == 1
    log = (tmp_path / "out" / "log.txt").read_text()
    assert ("argmax-9x9: failed: erf: model output is an integer or boolean tensor (int64) and has no gradient, so "
            "it has no effective RF; set erf = false for this model") in log


def argmax_net() -> nn.Module:
    """The argmax model as a config factory."""
    torch.manual_seed(4)
    return Decided(lambda y: y.argmax(1, keepdim=True))
