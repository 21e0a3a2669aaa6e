"""An independent oracle: exact receptive fields of separable stacks by set propagation.

No autograd: each layer maps an output index o on one axis to the input indices it reads, and a
stack composes these maps. Windowed layers (conv, max/avg pooling, a median filter) read
{o*s - p + j*d : 0 <= j < k} inside the input; `up` (nearest upsampling by s) reads o // s;
`unpool` (MaxPool(s) then MaxUnpool(s)) reads the whole pooling window of o; `sort` (sorting
along the last axis) reads the whole last axis. For layers connecting every channel the support
of an output position is the Cartesian product of its per-axis index sets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
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
