"""Data-dependent sampling: input-derived grids, offsets and boxes reach the whole input, labelled like global
context; fixed grids and offsets keep their exact taps.

For an input-derived sampler forward perturbation is only a lower bound (it tries one input), so the
whole input and the label are asserted, and that it contains what perturbation finds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rfreport.compute.global_context import global_ops
from rfreport.compute.sweep import sweep
from rfreport.results import GlobalOp
from tests.oracle import perturbation_masks

torchvision_ops = pytest.importorskip("torchvision.ops")
SHAPE = (1, 2, 9, 9)


class Warp(nn.Module):
    """Flow warping: grid_sample at a grid predicted from the input by a 3x3 conv."""

    def __init__(self):
        super().__init__()
        self.flow = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return F.grid_sample(x, torch.tanh(self.flow(x)).permute(0, 2, 3, 1), align_corners=False)


class FixedGrid(nn.Module):
    """grid_sample at a fixed affine grid (a buffer): four bilinear taps per output."""

    def __init__(self):
        super().__init__()
        theta = torch.tensor([[[0.8, 0.3, 0.1], [-0.3, 0.8, -0.05]]])
        self.register_buffer("grid", F.affine_grid(theta, [1, 2, 9, 9], align_corners=False))

    def forward(self, x):
        return F.grid_sample(x, self.grid.expand(x.shape[0], -1, -1, -1), align_corners=False)


class Deformable(nn.Module):
    """deform_conv2d with offsets and a mask predicted from the input (or fixed zeros: a plain 3x3 conv)."""

    def __init__(self, predicted: bool = True):
        super().__init__()
        self.predicted = predicted
        self.offsets = nn.Conv2d(2, 27, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(3, 2, 3, 3))

    def forward(self, x):
        if not self.predicted:
            return torchvision_ops.deform_conv2d(x, x.new_zeros(x.shape[0], 18, *x.shape[2:]), self.weight,
                                                 padding=1)
        predicted = self.offsets(x)
        return torchvision_ops.deform_conv2d(x, predicted[:, :18], self.weight, padding=1,
                                             mask=torch.sigmoid(predicted[:, 18:]))


class BoxCrop(nn.Module):
    """roi_align of a box whose corners are predicted from the input's first row."""

    def forward(self, x):
        corner = 4 * torch.sigmoid(x[:, :1, 0, :2].flatten(1))
        boxes = torch.cat([x.new_zeros(x.shape[0], 1), corner, corner + 4], 1)
        return torchvision_ops.roi_align(x, boxes, 3)


@pytest.mark.parametrize(("model", "op"), [(Warp(), "grid_sample"), (Deformable(), "deform_conv2d"),
                                           (BoxCrop(), "roi_align")], ids=["warp", "deform", "roi"])
def test_input_derived_sampling_reaches_the_whole_input_and_is_labelled(model, op):
    torch.manual_seed(0)
    result = sweep(model, SHAPE, "all", keep_masks="all", method="dense")
    assert (result.support == 81).all()
    truth = perturbation_masks(model, SHAPE)
    assert all((result.masks[pos] >= truth[pos]).all() for pos in truth)
    assert GlobalOp("", op) in global_ops(model, SHAPE)


@pytest.mark.parametrize("model", [FixedGrid(), Deformable(predicted=False)], ids=["grid", "deform"])
def test_fixed_grids_and_offsets_keep_their_exact_taps(model):
    torch.manual_seed(0)
    truth = perturbation_masks(model, SHAPE)
    result = sweep(model, SHAPE, "all", keep_masks="all", method="dense")
    for pos in truth:
        np.testing.assert_array_equal(result.masks[pos], truth[pos], err_msg=f"position {pos}")
    assert result.support.max() <= 9 and not global_ops(model, SHAPE)
