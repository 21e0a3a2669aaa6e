"""The seed's API (NumericRF heatmap/info/plot) and its verification procedure."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from rfreport import NumericRF, examples
from rfreport.compat import verify
from rfreport.errors import SweepError

SEED_SHAPE = (1, 1, 60, 130)


@pytest.fixture(scope="module")
def seed_rf():
    """The seed README's example: its conv stack, input shape and output position (3, 10)."""
    torch.manual_seed(0)
    rf = NumericRF(model=examples.seed_convs(), input_shape=SEED_SHAPE)
    return rf, rf.heatmap(pos=(3, 10))


def test_heatmap_and_info_reproduce_the_seed_readme(seed_rf):
    rf, mask = seed_rf
    assert rf.info() == {"h": {"bounds": (3, 51), "range": 48}, "w": {"bounds": (24, 66), "range": 42}}
    assert mask.shape == (60, 130) and mask.dtype == bool
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3, 51, 24, 66)
    assert set(rows.tolist()) == set(range(3, 52))
    assert set(cols.tolist()) == set(range(24, 67, 3))     # the (7, 1) kernel at stride 3 reads every 3rd column
    assert rf.pos == (3, 10)


def test_plot_draws_image_box_and_bounds_without_pyplot(seed_rf):
    rf, _ = seed_rf
    figure = rf.plot(image=torch.rand(SEED_SHAPE), add_text=True)
    assert isinstance(figure, Figure) and figure.canvas.manager is None   # not registered with pyplot
    (ax,) = figure.axes
    (box,) = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (23.5, 2.5, 43, 49)
    assert len(ax.images) == 2
    assert "h: bounds (3, 51), range 48" in ax.texts[0].get_text()
    bare = rf.plot(add_text=False)
    assert len(bare.axes[0].images) == 1 and not bare.axes[0].texts


def test_plot_accepts_common_image_layouts(seed_rf):
    rf, _ = seed_rf
    for image in (np.random.rand(60, 130), np.random.rand(60, 130, 3), torch.rand(1, 60, 130), torch.rand(3, 60, 130)):
        assert rf.plot(image=image).axes[0].images[0].get_array().shape[:2] == (60, 130)
    with pytest.raises(SweepError, match=r"image of shape \(10, 10\) does not match the input's spatial shape"):
        rf.plot(image=np.zeros((10, 10)))


def test_info_before_heatmap_is_an_error():
    rf = NumericRF(examples.seed_convs(), SEED_SHAPE)
    with pytest.raises(SweepError, match=r"call heatmap\(pos\) before info\(\) or plot\(\)"):
        rf.info()


def test_one_spatial_axis_uses_the_l_axis():
    model = nn.Sequential(nn.Conv1d(2, 2, 5, padding=2), nn.Conv1d(2, 2, 3, stride=2))
    rf = NumericRF(model, (1, 2, 20))
    assert rf.heatmap((4,)).tolist() == [6 <= i <= 12 for i in range(20)]   # 8..10, then +-2
    assert rf.info() == {"l": {"bounds": (6, 12), "range": 6}}
    assert isinstance(rf.plot(np.arange(20.0)), Figure)


def state(model: nn.Module) -> tuple:
    """Snapshot everything the API must leave alone: weights, flags, hooks."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], [len(m._forward_hooks) for m in model.modules()])


def test_model_is_left_as_found():
    model = examples.resnet_small(width=4, blocks=1).train()
    model.stem[0].weight.requires_grad_(False)
    before = state(model)
    rf = NumericRF(model, (1, 3, 16, 16), layer="stages")
    rf.heatmap((1, 2))
    rf.plot()
    assert verify(model, (1, 3, 16, 16), (1, 2), layer="stages")
    after = state(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


def test_structural_mode_ignores_dead_units_gradient_mode_does_not():
    model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(), nn.Conv2d(1, 1, 3))
    with torch.no_grad():
        model[0].weight.fill_(-1.0)
        model[0].bias.fill_(-1.0)     # the ReLU is dead for positive inputs
    assert NumericRF(model, (1, 1, 9, 9)).heatmap((2, 2)).sum() == 25
    assert NumericRF(model, (1, 1, 9, 9), mode="gradient").heatmap((2, 2)).sum() < 25


@pytest.mark.parametrize(("factory", "shape", "pos", "layer"), [
    (examples.seed_convs, SEED_SHAPE, (3, 10), None),
    (examples.seed_convs, SEED_SHAPE, (0, 0), None),
    (examples.dilated_net, (1, 3, 16, 16), (8, 8), None),
    (examples.unet, (1, 3, 16, 16), (5, 6), None),
    (examples.transposed_decoder, (1, 3, 16, 16), (7, 8), None),
    (examples.circular_net, (1, 3, 16, 16), (0, 0), None),
    (examples.resnet_small, (1, 3, 16, 16), (0, 3), "stages"),
])
def test_verify_accepts_the_exact_rf(factory, shape, pos, layer):
    torch.manual_seed(1)
    assert verify(factory(), shape, pos, layer=layer)


def test_verify_rejects_a_mask_missing_one_rf_pixel(seed_rf):
    rf, mask = seed_rf
    for pixel in [(3, 24), (51, 66), (27, 45)]:
        smaller = mask.copy()
        smaller[pixel] = False
        assert not verify(rf.model, SEED_SHAPE, (3, 10), mask=smaller)


def test_verify_rejects_a_mask_of_another_position(seed_rf):
    rf, _ = seed_rf
    shifted = NumericRF(rf.model, SEED_SHAPE).heatmap((3, 11))
    assert not verify(rf.model, SEED_SHAPE, (3, 10), mask=shifted)


class Product(nn.Module):
    """y = x0 * (1 + x3): zeroing x0 zeroes y whatever x3 is, so only the perturbation check sees x3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1] * (1 + x[..., 3:4])


def test_verify_perturbation_catches_what_blanking_cannot():
    assert verify(Product(), (1, 1, 4), (0,), mask=np.array([True, False, False, True]))
    assert not verify(Product(), (1, 1, 4), (0,), mask=np.array([True, False, False, False]))
    assert NumericRF(Product(), (1, 1, 4)).heatmap((0,)).tolist() == [True, False, False, True]


def test_verify_ignores_biases_on_a_copy():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 1, 3, stride=2))
    original = copy.deepcopy(model.state_dict())
    assert verify(model, (1, 2, 12, 12), (2, 3))
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
