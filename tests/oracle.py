"""Independent oracles: exact receptive fields of separable stacks by set propagation, and forward perturbation.

No autograd: each layer maps an output index o on one axis to the input indices it reads, and a
stack composes these maps. Windowed layers (conv, max/avg pooling, a median filter) read
{o*s - p + j*d : 0 <= j < k} inside the input; `up` (nearest upsampling by s) reads o // s;
`unpool` (MaxPool(s) then MaxUnpool(s)) reads the whole pooling window of o; `sort` (sorting
along the last axis) reads the whole last axis. For layers connecting every channel the support
of an output position is the Cartesian product of its per-axis index sets.

Forward perturbation (:func:`perturbation_masks`) pushes single input pixels far away on the model
itself, without autograd; :class:`Block` is the vocabulary of the random graphs it judges.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Layer:
    """One separable layer: kind ('conv', 'max', 'avg') and per-axis window parameters."""

    kind: str
    k: tuple[int, ...]
    s: tuple[int, ...]
    p: tuple[int, ...]
    d: tuple[int, ...]
    ceil: bool = False

    def out_length(self, axis: int, n: int) -> int:
        """Output length on one axis, with PyTorch's formula (ceil_mode rule for pooling)."""
        k, s, p, d = self.k[axis], self.s[axis], self.p[axis], self.d[axis]
        if self.kind == "up":
            return n * s
        if self.kind in ("unpool", "sort"):
            return n - n % s if self.kind == "unpool" else n
        span = n + 2 * p - d * (k - 1) - 1
        if not self.ceil:
            return span // s + 1
        out = (span + s - 1) // s + 1
        return out - 1 if (out - 1) * s >= n + p else out

    def window(self, axis: int, o: int, n: int) -> set[int]:
        """Input indices on one axis that output index o reads."""
        k, s, p, d = self.k[axis], self.s[axis], self.p[axis], self.d[axis]
        if self.kind == "up":
            return {o // s}
        if self.kind == "unpool":
            return {o // s * s + j for j in range(s)} & set(range(n))
        if self.kind == "sort":
            return set(range(n)) if axis == len(self.k) - 1 else {o}
        return {o * s - p + j * d for j in range(k)} & set(range(n))

    def module(self, channels: int) -> nn.Module:
        """Build the PyTorch module of this layer for a spatial rank of len(k)."""
        rank = len(self.k)
        if self.kind == "conv":
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
            return conv(channels, channels, self.k, self.s, self.p, self.d)
        if self.kind == "max":
            pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[rank - 1]
            return pool(self.k, self.s, self.p, self.d, ceil_mode=self.ceil)
        if self.kind == "avg":
            pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[rank - 1]
            return pool(self.k, self.s, self.p, ceil_mode=self.ceil)
        return {"up": lambda: nn.Upsample(scale_factor=self.s, mode="nearest"),
                "unpool": lambda: Unpool(self.s[0], rank), "sort": lambda: Sort(),
                "median": lambda: Median(self.k, self.p)}[self.kind]()


class Unpool(nn.Module):
    """Max-pool with indices, then max-unpool: each output keeps its window's argmax only."""

    def __init__(self, size: int, rank: int):
        super().__init__()
        self.pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[rank - 1](size, return_indices=True)
        self.unpool = (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d)[rank - 1](size)

    def forward(self, x):
        pooled, indices = self.pool(x)
        return self.unpool(pooled, indices)


class Sort(nn.Module):
    """Sort every row along the last axis."""

    def forward(self, x):
        return x.sort(-1).values


class Median(nn.Module):
    """A 2-D median filter (stride 1) built from replicate padding, unfold and median, per channel.

    Replicate padding, because with zero padding a corner window can hold more zeros than half its
    entries: its median is then 0 whatever the input, and no pixel can change it.
    """

    def __init__(self, k: tuple[int, ...], p: tuple[int, ...]):
        super().__init__()
        self.k, self.p = k, p

    def forward(self, x):
        n, c, h, w = x.shape
        out = [(h + 2 * self.p[0] - self.k[0]) + 1, (w + 2 * self.p[1] - self.k[1]) + 1]
        padded = nn.functional.pad(x, (self.p[1], self.p[1], self.p[0], self.p[0]), mode="replicate")
        patches = nn.functional.unfold(padded, self.k).view(n, c, -1, out[0] * out[1])
        return patches.median(2).values.view(n, c, *out)


def lengths(layers: list[Layer], axis: int, n: int) -> list[int]:
    """Return the length of one axis before each layer and after the last."""
    sizes = [n]
    for layer in layers:
        sizes.append(layer.out_length(axis, sizes[-1]))
    return sizes


def axis_support(layers: list[Layer], axis: int, n: int, o: int) -> set[int]:
    """Propagate one output index back through the stack to the set of input indices."""
    sizes = lengths(layers, axis, n)
    current = {o}
    for layer, n_in in zip(reversed(layers), reversed(sizes[:-1])):
        current = set().union(*(layer.window(axis, i, n_in) for i in current)) if current else set()
    return current


def support_mask(layers: list[Layer], shape: tuple[int, ...], pos: tuple[int, ...]) -> np.ndarray:
    """Return the exact boolean support over the input grid of one output position."""
    mask = np.zeros(shape, dtype=bool)
    per_axis = [sorted(axis_support(layers, a, n, o)) for a, (n, o) in enumerate(zip(shape, pos))]
    for index in itertools.product(*per_axis):
        mask[index] = True
    return mask


BIG = 1e3


def perturbation_masks(model: nn.Module, input_shape: tuple[int, ...], big: float = BIG) -> dict[tuple[int, ...],
                                                                                           np.ndarray]:
    """Return, per output position, the input pixels whose perturbation changes any of its channels.

    Each pixel (all channels at once) is pushed far along a random positive direction and its opposite in
    turn, on a float64 copy of the model, one batch of forward passes; an output changes when it moves
    beyond rounding noise. A threshold (a mask, an argmax) read through small weights needs a larger push
    `big` to be crossed.
    """
    model = model.double().eval()
    torch.manual_seed(1)
    base = torch.rand(input_shape, dtype=torch.float64)
    spatial = input_shape[2:]
    pixels = list(np.ndindex(*spatial))
    batch = base.repeat(2 * len(pixels), *([1] * (len(input_shape) - 1)))
    for i, pixel in enumerate(pixels):
        push = big * (1 + torch.rand(input_shape[1], dtype=torch.float64))
        for sign, row in ((1, 2 * i), (-1, 2 * i + 1)):   # one direction, both ways: a threshold is crossed
            batch[(row, slice(None), *pixel)] = sign * push
    with torch.no_grad():
        y0, y = model(base).double(), model(batch).double()   # an argmax or a mask compares as numbers
    changed = ((y - y0).abs() > 1e-9 * (1 + y0.abs())).reshape(len(pixels), 2, *y.shape[1:]).any(dim=(1, 2))
    masks = {}
    for pos in np.ndindex(*y.shape[2:]):
        masks[pos] = changed[(slice(None), *pos)].numpy().reshape(spatial)
    return masks


def nonfinite_positions(model: nn.Module, input_shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """Return the output positions where a float64 copy of the model is nan or inf on a random input."""
    model = model.double().eval()
    with torch.no_grad():
        y = model(torch.rand(input_shape, dtype=torch.float64))
    return {tuple(p) for p in np.argwhere(~torch.isfinite(y).flatten(0, 1).all(0).numpy()).tolist()}


class Block(nn.Module):
    """One random-graph block on a 2-channel 2-D tensor.

    The value kinds (where, masked_fill, mask_mul, onehot, codebook, bucket, floor) gate or select
    through integers and booleans computed from a window that reaches beyond the 3x3 conv they gate
    (a 5x1 column or a 1x5 row); grid samples at a fixed affine grid, warp at a grid computed from
    the input; neginf adds -inf to one channel at one position before a softmax over channels, nan
    to every channel at the last position (nan there).
    """

    def __init__(self, kind: str, size: int):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.wide = nn.Conv2d(2, 8, 1)
        self.mix = nn.Conv2d(4, 2, 1)
        self.mix8 = nn.Conv2d(8, 2, 1)
        self.flow = nn.Conv2d(2, 2, 3, padding=1)
        self.register_buffer("codes", torch.randn(5, 8))
        self.register_buffer("table", torch.randn(5, 2))
        self.register_buffer("bounds", torch.tensor([-0.5, 0.0, 0.5, 1.0]))
        self.register_buffer("theta", torch.tensor([[[0.83, 0.21, 0.137], [-0.19, 0.87, 0.071]]]))   # off pixel centres
        self.size = size

    def extra_repr(self) -> str:
        return self.kind

    def forward(self, x):
        kind = self.kind
        if kind == "conv":
            return self.conv(x)
        if kind == "strided":
            return F.conv2d(x, self.conv.weight, stride=2)
        if kind == "upsample":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if kind == "bilinear":
            return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if kind == "shuffle":
            return F.pixel_shuffle(self.wide(x), 2)[:, :2]
        if kind == "groupnorm":
            return F.group_norm(x, 1)
        if kind == "softmax":
            return torch.softmax(x, 1)
        if kind == "attention":
            n, c, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)
            return F.scaled_dot_product_attention(tokens, tokens, tokens).transpose(1, 2).reshape(n, c, h, w)
        if kind == "shift":
            far = F.pad(x[..., :1, :], (0, 0, x.shape[-2] - 1, 0))
            return self.conv(x) + far
        if kind == "residual":
            return x + self.conv(x)
        if kind == "crelu":
            h = self.conv(x)
            return self.mix(torch.cat([F.relu(h), F.relu(-h)], 1))
        return self._by_value(x) if kind in VALUE_KINDS else self._sampled_or_masked(x)

    def _by_value(self, x):
        """The kinds that gate or select through integers and booleans computed from the input."""
        kind, h = self.kind, self.conv(x)
        column = F.avg_pool2d(x[:, :1], (5, 1), 1, (2, 0))[:, 0]   # not a channel mean: softmax sums to 1
        mask = (column > 0.5)[:, None]
        if kind == "where":
            return torch.where(mask, h, 2 * h)
        if kind == "masked_fill":
            return h.masked_fill(mask, 0.0) + h
        if kind == "mask_mul":
            return h * mask.float() + h
        if kind == "onehot":
            index = F.avg_pool2d(self.wide(x), (1, 5), 1, (0, 2)).argmax(1)
            return self.mix8(F.one_hot(index, 8).permute(0, 3, 1, 2).to(x.dtype))
        if kind == "codebook":
            z = F.avg_pool2d(self.wide(x), (5, 1), 1, (2, 0)).permute(0, 2, 3, 1)
            index = ((z[..., None, :] - self.codes) ** 2).sum(-1).argmin(-1)
            return F.embedding(index, self.table).permute(0, 3, 1, 2)
        if kind == "bucket":
            return self.table[torch.bucketize(column, self.bounds)].permute(0, 3, 1, 2)
        index = (torch.sigmoid(column) * 5).floor().long().clamp(0, 4)
        return self.table[:, 0][index][:, None] + self.table[:, 1][index][:, None] * h

    def _sampled_or_masked(self, x):
        """The kinds that sample at a grid (fixed or computed from the input) or meet -inf."""
        kind = self.kind
        if kind == "grid":
            grid = F.affine_grid(self.theta.expand(x.shape[0], -1, -1), list(x.shape), align_corners=False)
            return F.grid_sample(x, grid, align_corners=False)
        if kind == "warp":
            return F.grid_sample(x, torch.tanh(self.flow(x)).permute(0, 2, 3, 1), align_corners=False)
        h = self.conv(x)
        mask = torch.zeros_like(h[:1])
        if kind == "neginf":
            mask[0, 0, 0, 0] = float("-inf")
        else:
            mask[0, :, -1, -1] = float("-inf")
        return torch.softmax(h + mask, 1)


VALUE_KINDS = ("where", "masked_fill", "mask_mul", "onehot", "codebook", "bucket", "floor")
