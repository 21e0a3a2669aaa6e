"""The compressed sweep gives exactly the dense sweep's answer, on models built to break it too."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from rfreport.analysis.frames import positions_frame
from rfreport.compute.compress import fit_axis
from rfreport.compute.sweep import sweep
from rfreport.errors import SweepError

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
KEEP = ["center", "corners", "edges"]


def both(model: nn.Module, shape: tuple[int, ...], **kwargs):
    """Sweep every position densely and compressed; assert identical frames, coverage and kept masks."""
    dense = sweep(model, shape, method="dense", keep_masks=KEEP, **kwargs)
    compressed = sweep(model, shape, method="compressed", keep_masks=KEEP, **kwargs)
    expected = positions_frame(dense).drop(columns="path")
    assert positions_frame(compressed).drop(columns="path").equals(expected)
    assert np.array_equal(dense.coverage, compressed.coverage)
    assert dense.masks.keys() == compressed.masks.keys()
    for pos, mask in dense.masks.items():
        assert np.array_equal(mask, compressed.masks[pos]), pos
    return compressed


def paths(result) -> set[str]:
    """Return the set of paths that produced the rows of a sweep."""
    return set(result.path.tolist())


class Cat(nn.Module):
    """Two branches (a wide and a narrow one) concatenated on channels."""

    def __init__(self, rank: int):
        super().__init__()
        self.wide = CONV[rank](1, 2, 5, padding=2)
        self.narrow = CONV[rank](1, 2, 1)

    def forward(self, x):
        return torch.cat([self.wide(x), self.narrow(x)], dim=1)


class TinyUNet(nn.Module):
    """Two-level U-Net: conv, pool, conv, upsample, concatenate the skip, conv."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 2, 3, padding=1)
        self.mid = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(2, 2, 3, padding=1), nn.Upsample(scale_factor=2))
        self.dec = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        skip = self.enc(x)
        return self.dec(torch.cat([skip, self.mid(skip)], dim=1))


class SqueezeExcite(nn.Module):
    """A convolution gated by its global average: global context."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))


class Growing(nn.Module):
    """1-D: position p also reads input p + p*p // 150, an RF that grows non-affinely."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1)
        p = torch.arange(n)
        self.register_buffer("index", torch.clamp(p + p * p // 150, max=n - 1))

    def forward(self, x):
        return self.conv(x) + x[..., self.index]


class Spill(nn.Module):
    """1-D: positions 10 and 11 (no pilot there) also read input p + 3; the pilots see a plain 3-tap conv."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1)
        p = torch.arange(n)
        self.register_buffer("index", torch.where((p >= 10) & (p <= 11), p + 3, p))

    def forward(self, x):
        return self.conv(x) + x[..., self.index]


def test_stride_one_net_compresses_and_matches():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 1, 3, padding=1))
    assert paths(both(model, (1, 1, 24, 24))) == {"compressed"}


def test_auto_compresses_a_local_net_and_keeps_global_context_dense():
    local = sweep(nn.Conv2d(1, 1, 3, padding=1), (1, 1, 24, 24), method="auto")
    assert paths(local) == {"compressed"}
    assert paths(sweep(SqueezeExcite(), (1, 1, 20, 20), method="auto")) == {"dense"}
    assert paths(sweep(nn.Conv2d(1, 1, 3, padding=1), (1, 1, 24, 24), mode="gradient")) == {"dense"}


def test_global_context_matches():
    both(SqueezeExcite(), (1, 1, 10, 10))


def test_local_mode_compresses_global_context():
    assert paths(both(SqueezeExcite(), (1, 1, 24, 24), local=True)) == {"compressed"}


def test_circular_padding_wraps_the_cores():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"),
                          nn.Conv2d(2, 1, 3, padding=2, dilation=2, padding_mode="circular"))
    result = both(model, (1, 1, 20, 18))
    assert result.wrapped.any() and "compressed" in paths(result)


def test_circular_padding_on_a_long_axis_uses_the_periodic_fit():
    model = nn.Sequential(nn.Conv1d(1, 2, 5, padding=2, padding_mode="circular"), nn.MaxPool1d(2),
                          nn.Conv1d(2, 1, 3, padding=1, padding_mode="circular"))
    result = both(model, (1, 1, 150))
    assert result.wrapped.any() and "compressed" in paths(result)


def test_dilation_holes():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=2, dilation=2), nn.Conv2d(2, 1, 3, padding=4, dilation=4))
    result = both(model, (1, 1, 22, 22))
    assert (positions_frame(result)["fill"] < 1).all() and paths(result) == {"compressed"}


def test_input_smaller_than_the_rf():
    model = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(8)])
    both(model, (1, 1, 9, 9))


def test_transposed_convolution_and_u_net():
    transposed = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ConvTranspose2d(2, 1, 3, stride=2))
    assert "compressed" in paths(both(transposed, (1, 1, 12, 12)))
    assert "compressed" in paths(both(TinyUNet(), (1, 1, 24, 24)))


def test_long_1d_stack_with_strides_uses_the_periodic_fit():
    model = nn.Sequential(nn.Conv1d(1, 2, 3, padding=1), nn.MaxPool1d(2), nn.Conv1d(2, 2, 3, padding=1),
                          nn.MaxPool1d(2, ceil_mode=True), nn.ConvTranspose1d(2, 1, 4, stride=4))
    assert paths(both(model, (1, 1, 203))) == {"compressed"}


def test_branches_and_three_dimensions():
    assert "compressed" in paths(both(Cat(1), (1, 1, 40)))
    assert "compressed" in paths(both(Cat(3), (1, 1, 7, 8, 9)))


def test_rf_that_grows_with_position_matches():
    both(Growing(120), (1, 1, 120))


def test_verification_falls_back_where_the_pilots_were_fooled():
    result = both(Spill(100), (1, 1, 100))
    dense_rows = result.positions[result.path == "dense", 0]
    assert paths(result) == {"compressed", "dense"}
    assert {10, 11} <= set(dense_rows.tolist()) and len(dense_rows) < 50


def test_positions_subset_and_small_batches():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(2, 1, 3, padding=1))
    for positions in ("grid:3", [[0, 0], [5, 7], [11, 11]]):
        dense = sweep(model, (1, 1, 24, 24), positions, method="dense", batch_size=5)
        compressed = sweep(model, (1, 1, 24, 24), positions, method="compressed", batch_size=5)
        assert positions_frame(compressed).drop(columns="path").equals(positions_frame(dense).drop(columns="path"))
        assert np.array_equal(dense.coverage, compressed.coverage)


def test_fit_axis_learns_a_period_and_refuses_a_non_periodic_line():
    line = np.arange(10, 30)
    lo, hi = line // 2 - 1, line // 2 + 1
    axis = fit_axis(line, lo, hi, np.ones(20, dtype=int), 60, 30, False, 2)
    assert np.array_equal(axis.lo, np.maximum(np.arange(60) // 2 - 1, 0))
    assert np.array_equal(axis.hi, np.minimum(np.arange(60) // 2 + 1, 29))
    assert fit_axis(line, line * line // 40, line * line // 40 + 2, np.ones(20, dtype=int), 60, 400, False, 2) is None


@st.composite
def stacks(draw):
    """Draw a random 1-D or 2-D stack of conv / max-pool / avg-pool layers and an input that fits it."""
    rank = draw(st.sampled_from([1, 2]))
    layers, n = [], draw(st.integers(40, 90)) if rank == 1 else draw(st.integers(14, 26))
    length, channels = n, 1
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "max", "avg"]))
        k, s, d = draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        p = draw(st.integers(0, k // 2))
        if kind == "conv":
            mode = draw(st.sampled_from(["zeros", "circular"])) if p else "zeros"
            layers.append(CONV[rank](channels, 2, k, stride=s, padding=p, dilation=d, padding_mode=mode))
            channels = 2
        else:
            pool = {"max": (nn.MaxPool1d, nn.MaxPool2d), "avg": (nn.AvgPool1d, nn.AvgPool2d)}[kind][rank - 1]
            extra = {"dilation": d} if kind == "max" else {}
            d = d if kind == "max" else 1
            layers.append(pool(k, stride=s, padding=p, ceil_mode=draw(st.booleans()), **extra))
        length = (length + 2 * p - d * (k - 1) - 1) // s + 1
        if length < 2:
            break
    return nn.Sequential(*layers), (1, 1, *([n] * rank))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks())
def test_random_stacks_match_dense(case):
    model, shape = case
    try:
        sweep(model, shape, positions="center", method="dense")
    except SweepError:  # the drawn stack does not fit its input
        assume(False)
    both(model, shape)


class Mirror(nn.Module):
    """Each position also sees its mirror image: a far connection no local prediction expects."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + self.conv(torch.flip(x, dims=[3]))


def test_auto_stays_dense_when_the_pass_connects_distant_pixels():
    result = sweep(Mirror(), (1, 1, 24, 24), method="auto")
    assert paths(result) == {"dense"}
    dense = sweep(Mirror(), (1, 1, 24, 24), method="dense")
    assert positions_frame(result).equals(positions_frame(dense))
    assert (dense.hi[:, 1] - dense.lo[:, 1]).max() > 20
