"""An independent oracle: exact receptive fields of separable conv/pool stacks by set propagation.

No autograd: each layer maps an output index o on one axis to the input indices
{o*s - p + j*d : 0 <= j < k} inside the input, and a stack composes these maps. For
convolutions connecting every channel, and for pooling, the support of an output position is
the Cartesian product of its per-axis index sets.
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
        span = n + 2 * p - d * (k - 1) - 1
        if not self.ceil:
            return span // s + 1
        out = (span + s - 1) // s + 1
        return out - 1 if (out - 1) * s >= n + p else out

    def window(self, axis: int, o: int, n: int) -> set[int]:
        """Input indices on one axis that output index o reads."""
        k, s, p, d = self.k[axis], self.s[axis], self.p[axis], self.d[axis]
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
        pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[rank - 1]
        return pool(self.k, self.s, self.p, ceil_mode=self.ceil)


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
