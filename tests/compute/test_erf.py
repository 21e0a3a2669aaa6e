"""The effective receptive field against closed forms: box convolutions, sqrt-depth growth, residual shrinkage."""

from __future__ import annotations

import json
import math
from functools import reduce

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rfreport.compute.erf import ERF, ErfError, draw_samples, effective_rf, map_metrics
from rfreport.compute.sweep import sweep
from rfreport.errors import RfReportError
from rfreport.positions import axis_names
from rfreport.schema import SCHEMAS

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def box_stack(n: int, k: int = 3, rank: int = 2, padding: int = 0) -> nn.Module:
    """Return n single-channel k-wide convolutions with all-ones weights, no bias, no nonlinearity."""
    convs = [CONVS[rank](1, 1, k, padding=padding, bias=False) for _ in range(n)]
    for conv in convs:
        nn.init.ones_(conv.weight)
    return nn.Sequential(*convs).double()


class Residual(nn.Module):
    """x + f(x)."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def box_power(n: int, k: int) -> np.ndarray:
    """Return the n-fold 1-D convolution of a k-wide box of ones, with numpy alone."""
    return reduce(np.convolve, [np.ones(k)] * n, np.ones(1))


def outer(profiles: list[np.ndarray]) -> np.ndarray:
    """Return the separable product of per-axis profiles."""
    return reduce(np.multiply.outer, profiles)


def slope(depths, sizes) -> float:
    """Return the least-squares slope of log(size) against log(depth)."""
    return float(np.polyfit(np.log(depths), np.log(sizes), 1)[0])


@pytest.mark.parametrize(("n", "k", "rank"), [(1, 3, 2), (3, 3, 2), (6, 3, 2), (4, 5, 2), (7, 3, 1), (2, 3, 3)])
def test_uniform_stack_erf_is_the_n_fold_box_convolution(n, k, rank):
    extent = n * (k - 1) + 1
    spatial = (extent + 4,) * rank
    result = effective_rf(box_stack(n, k, rank), (1, 1, *spatial), "center", samples=3)
    (pos,) = result.maps
    expected = np.zeros(spatial)
    expected[(slice(2, 2 + extent),) * rank] = outer([box_power(n, k)] * rank)
    np.testing.assert_allclose(result.maps[pos], expected, rtol=1e-12, atol=0)
    row = result.metrics.iloc[0]
    for axis in axis_names(rank):
        assert row[f"sigma_{axis}"] ** 2 == pytest.approx(n * (k * k - 1) / 12, rel=1e-12)
        assert row[f"com_{axis}"] == pytest.approx(2 + (extent - 1) / 2, abs=1e-9)
        assert row[f"offset_{axis}"] == pytest.approx(0, abs=1e-9)
    assert row["rf_support"] == extent ** rank


def test_erf_grows_like_the_square_root_of_depth_while_the_rf_grows_linearly():
    depths = [4, 8, 16, 32]
    rows, rf = [], []
    for n in depths:
        result = effective_rf(box_stack(n, padding=1), (1, 1, 2 * n + 3, 2 * n + 3), "center", samples=2)
        rows.append(result.metrics.iloc[0])
        rf.append(result.summary().to_json()["erf_rf_size"][0])
    assert rf == [2 * n + 1 for n in depths]
    assert slope(depths, [r["sigma_h"] for r in rows]) == pytest.approx(0.5, abs=1e-9)
    assert slope(depths, [r["side90"] for r in rows]) == pytest.approx(0.5, abs=0.05)
    assert slope(depths, [r["radius90"] for r in rows]) == pytest.approx(0.5, abs=0.05)
    assert slope(depths, rf) == pytest.approx(1, abs=0.06)
    assert slope(depths, [r["area95"] for r in rows]) == pytest.approx(1, abs=0.1)  # an area: twice sqrt growth
    ratios = [r["area95_ratio"] for r in rows]
    assert ratios == sorted(ratios, reverse=True)
    assert all(r["gauss_r2"] > 0.99 for r in rows)


def test_a_residual_stack_has_a_smaller_erf_than_a_plain_stack_of_the_same_rf():
    n, k = 6, 3
    plain = box_stack(n, k, padding=1)
    residual = nn.Sequential(*(Residual(conv) for conv in box_stack(n, k, padding=1))).double()
    shape = (1, 1, 2 * n + 5, 2 * n + 5)
    plain_erf = effective_rf(plain, shape, "center", samples=2).metrics.iloc[0]
    residual_erf = effective_rf(residual, shape, "center", samples=2).metrics.iloc[0]
    assert residual_erf["rf_support"] == plain_erf["rf_support"] == (2 * n + 1) ** 2
    # per block the kernel is delta + a k x k box: variance per axis k^2 (k^2 - 1) / 12 / (k^2 + 1)
    assert residual_erf["sigma_h"] ** 2 == pytest.approx(n * k * k * (k * k - 1) / 12 / (k * k + 1), rel=1e-12)
    assert plain_erf["sigma_h"] ** 2 == pytest.approx(n * (k * k - 1) / 12, rel=1e-12)
    assert residual_erf["sigma_h"] < plain_erf["sigma_h"]
    assert residual_erf["side90"] <= plain_erf["side90"]


def relu_stack(blocks: int, residual: bool, channels: int = 4) -> nn.Module:
    """Return He-initialised conv-ReLU-conv blocks (3x3, padding 1, zero bias), with or without skips."""
    torch.manual_seed(0)
    made = []
    for _ in range(blocks):
        convs = [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2)]
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        branch = nn.Sequential(convs[0], nn.ReLU(), convs[1])
        made.append(Residual(branch) if residual else nn.Sequential(branch, nn.ReLU()))
    return nn.Sequential(nn.Conv2d(1, channels, 1), *made)


def test_relu_stacks_run_and_the_residual_one_has_the_smaller_erf():
    shape = (1, 1, 21, 21)
    plain = effective_rf(relu_stack(4, residual=False), shape, ["center", "corners"], samples=8)
    residual = effective_rf(relu_stack(4, residual=True), shape, ["center", "corners"], samples=8)
    assert len(plain.metrics) == len(residual.metrics) == 5
    for result in (plain, residual):
        assert all(m.shape == (21, 21) and m.min() >= 0 for m in result.maps.values())
        assert np.isfinite(result.metrics.to_numpy(dtype=float)).all()
    centre = plain.headline_row()
    plain_row, residual_row = plain.metrics.iloc[centre], residual.metrics.iloc[centre]
    assert residual_row["rf_support"] == plain_row["rf_support"] == 17 * 17
    # the measure: sigma on each axis, and the share of the theoretical RF holding 95% of the mass
    assert residual_row["sigma_h"] < plain_row["sigma_h"] and residual_row["sigma_w"] < plain_row["sigma_w"]
    assert residual_row["area95_ratio"] < plain_row["area95_ratio"]


def test_erf_lies_inside_the_theoretical_rf():
    model = relu_stack(2, residual=False)
    shape = (1, 1, 15, 15)
    theory = sweep(model, shape, "grid:5", keep_masks="grid:5")
    result = effective_rf(model, shape, "grid:5", samples=4, theoretical=theory)
    assert len(result.maps) == 16  # 0, 5, 10, 14 per axis
    for pos, erf_map in result.maps.items():
        assert (erf_map[~theory.masks[pos]] == 0).all()
        assert erf_map[theory.masks[pos]].sum() > 0


def per_sample_erf(model: nn.Module, x: torch.Tensor, pos: tuple[int, ...]) -> np.ndarray:
    """Return the mean over samples of |d(sum_c y_c[pos])/dx| summed over channels, one sample at a time."""
    total = torch.zeros(x.shape[2:], dtype=torch.float64)
    for sample in x:
        sample = sample[None].float().requires_grad_(True)
        y = model(sample)
        (grad,) = torch.autograd.grad(y[(slice(None), slice(None), *pos)].sum(), sample)
        total += grad.abs().sum(dim=(0, 1)).double()
    return (total / len(x)).numpy()


def test_batched_erf_equals_the_mean_of_per_sample_gradients_and_the_model_is_restored():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(3, 2, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    shape = (1, 2, 12, 10)
    result = effective_rf(model, shape, ["center", [0, 0], [7, 5]], samples=6, seed=3, batch_size=2)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    x = draw_samples(shape, 6, seed=3)
    model.eval()
    for pos, erf_map in result.maps.items():
        np.testing.assert_allclose(erf_map, per_sample_erf(model, x, pos), rtol=1e-5, atol=1e-7)


def test_chunking_and_seeds():
    model = relu_stack(2, residual=False)
    shape = (1, 1, 11, 11)
    whole = effective_rf(model, shape, "grid:5", samples=5, seed=7)
    chunked = effective_rf(model, shape, "grid:5", samples=5, seed=7, batch_size=1)
    again = effective_rf(model, shape, "grid:5", samples=5, seed=7)
    other = effective_rf(model, shape, "grid:5", samples=5, seed=8, distribution="uniform")
    for pos in whole.maps:
        np.testing.assert_allclose(chunked.maps[pos], whole.maps[pos], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(again.maps[pos], whole.maps[pos])
    assert any(not np.allclose(other.maps[pos], whole.maps[pos]) for pos in whole.maps)
    assert draw_samples(shape, 3, distribution="uniform", seed=1).abs().max() <= 1


def test_metrics_of_a_hand_made_map():
    erf_map = np.array([0, 1, 1, 6, 1, 1, 0], dtype=float)
    m = map_metrics(erf_map, [1], [5], 5)
    assert (m["peak_l"], m["mass"]) == (3, 10)
    assert [m[f"side{q}"] for q in (20, 50, 90, 99)] == [1, 1, 5, 5]
    assert [m[f"radius{q}"] for q in (20, 50, 90, 99)] == [0, 0, 2, 2]
    assert (m["area95"], m["area95_ratio"]) == (5, 1.0)
    assert m["com_l"] == 3 and m["offset_l"] == 0
    assert m["sigma_l"] == pytest.approx(math.sqrt((2 * 1 + 2 * 4) / 10))
    plateau = map_metrics(np.pad(np.ones((3, 3)), 2), [2, 2], [4, 4], 9)
    assert (plateau["peak_h"], plateau["peak_w"], plateau["side90"], plateau["radius20"]) == (3, 3, 3, 1)
    empty = map_metrics(np.zeros((4, 4)), [0, 0], [3, 3], 16)
    assert (empty["mass"], empty["side90"], empty["peak_h"]) == (0, 0, -1) and math.isnan(empty["sigma_w"])


def test_frame_schema_summary_and_arrays():
    result = effective_rf(box_stack(2, padding=1), (1, 1, 9, 9), ["corners", "center"], samples=2)
    assert "erf" in SCHEMAS
    assert list(result.metrics.columns) == ERF.names(2)
    assert result.metrics[["pos_h", "pos_w"]].to_numpy().tolist() == [[0, 0], [0, 8], [4, 4], [8, 0], [8, 8]]
    summary = result.summary().to_json()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["erf_position"] == [4, 4] and summary["erf_rf_size"] == [5, 5] and summary["erf_side90"] == 5
    assert summary["erf_side90_ratio"] == 1
    corner = result.metrics.iloc[0]
    assert (corner["rf_h_lo"], corner["rf_h_hi"], corner["rf_support"]) == (0, 2, 9)
    assert corner["offset_h"] < 0  # clipped at the border, the mass leans towards the border
    arrays = result.arrays()
    assert sorted(arrays) == ["h0_w0", "h0_w8", "h4_w4", "h8_w0", "h8_w8"]
    np.testing.assert_array_equal(arrays["h4_w4"], result.maps[(4, 4)])


def test_images_from_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "b.jpg")
    np.save(tmp_path / "c.npy", rng.normal(size=(3, 8, 40)))
    np.save(tmp_path / "d.npy", rng.normal(size=(16, 16)))
    (tmp_path / "notes.txt").write_text("ignored")
    x = draw_samples((1, 3, 10, 10), 8, images=tmp_path)
    assert x.shape == (4, 3, 10, 10) and x.dtype == torch.float64
    np.testing.assert_allclose(x.mean(dim=(2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(x.std(dim=(2, 3), unbiased=False), 1, rtol=1e-12)
    assert draw_samples((1, 3, 10, 10), 2, images=tmp_path, seed=5).shape[0] == 2
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    result = effective_rf(model, (1, 3, 10, 10), "center", samples=8, images=tmp_path)
    assert (result.samples, result.distribution) == (4, "images")


def test_image_folder_errors(tmp_path):
    with pytest.raises(RfReportError, match="holds no"):
        draw_samples((1, 3, 8, 8), 2, images=tmp_path)
    with pytest.raises(RfReportError, match="does not exist"):
        draw_samples((1, 3, 8, 8), 2, images=tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ErfError, match=r"broken\.png"):
        draw_samples((1, 3, 8, 8), 2, images=tmp_path)
    (tmp_path / "broken.png").unlink()
    np.save(tmp_path / "odd.npy", np.zeros((2, 8, 8)))
    with pytest.raises(ErfError, match=r"odd\.npy"):
        draw_samples((1, 3, 8, 8), 2, images=tmp_path)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"samples": 0}, "positive integer"),
    ({"distribution": "cauchy"}, "unknown ERF distribution"),
    ({"distribution": "images"}, "needs an images folder"),
    ({"distribution": "uniform", "images": "."}, "conflicts"),
])
def test_bad_options_raise_domain_errors(kwargs, message):
    with pytest.raises(ErfError, match=message):
        effective_rf(box_stack(1), (1, 1, 5, 5), "center", **kwargs)


def test_a_theoretical_sweep_must_cover_the_positions():
    model = box_stack(1, padding=1)
    theory = sweep(model, (1, 1, 6, 6), "center")
    with pytest.raises(ErfError, match="lacks ERF positions"):
        effective_rf(model, (1, 1, 6, 6), "corners", samples=1, theoretical=theory)
    with pytest.raises(ErfError, match="input grid"):
        effective_rf(model, (1, 1, 7, 7), "center", samples=1, theoretical=theory)
