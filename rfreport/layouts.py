"""Output layouts: how an analysed tensor's axes map to (batch, channels, spatial grid).

rfreport reads every analysed tensor as ``(N, C, *spatial)``. Channels-last stages (timm's Swin
returns ``(N, H, W, C)``) and token sequences (ViT blocks return ``(N, L, C)``, with leading class
or register tokens) are read through a layout instead of being misread as NCHW:

* ``nchw`` (default): ``(N, C, *spatial)``;
* ``nhwc``: ``(N, *spatial, C)``;
* ``tokens``: ``(N, L, C)`` whose last tokens form a grid with the input's aspect (the leading
  extra tokens, class and register, are dropped); the grid is inferred from the input's spatial
  shape and the token count;
* ``tokens:HxW`` (``tokens:L``, ``tokens:DxHxW``): the same with an explicit grid.

Pure Python: the config validates layouts without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from rfreport.errors import LayoutError

MAX_EXTRA_TOKENS = 16   # class + register tokens a ViT-like model may put before its patch tokens


class LayoutKind(StrEnum):
    """The three ways an output's axes can be laid out."""

    NCHW = "nchw"
    NHWC = "nhwc"
    TOKENS = "tokens"


@dataclass(frozen=True)
class Layout:
    """A parsed layout: its kind and, for tokens, an explicit grid (None: inferred)."""

    kind: LayoutKind = LayoutKind.NCHW
    grid: tuple[int, ...] | None = None

    def __str__(self) -> str:
        if self.grid:
            return f"{self.kind}:{'x'.join(map(str, self.grid))}"
        return str(self.kind)

    def rank(self, spatial_rank: int) -> int:
        """Return the tensor rank this layout expects for an input with `spatial_rank` spatial axes."""
        return 3 if self.kind is LayoutKind.TOKENS else spatial_rank + 2


NCHW = Layout()


def parse_layout(text: str | Layout | None) -> Layout:
    """Parse `nchw`, `nhwc`, `tokens` or `tokens:HxW`; raise LayoutError naming what is accepted."""
    if isinstance(text, Layout):
        return text
    if text is None:
        return NCHW
    kind, _, grid = str(text).strip().lower().partition(":")
    try:
        parsed = LayoutKind(kind)
    except ValueError:
        raise LayoutError(f"unknown layout {text!r}; use nchw, nhwc, tokens or tokens:HxW") from None
    if not grid:
        return Layout(parsed)
    sizes = grid.split("x")
    if parsed is not LayoutKind.TOKENS or not all(s.isdigit() and int(s) > 0 for s in sizes):
        raise LayoutError(f"layout {text!r}: only tokens takes a grid, written like tokens:14x14")
    return Layout(parsed, tuple(int(s) for s in sizes))


def token_grid(tokens: int, input_spatial: tuple[int, ...], layout: Layout) -> tuple[int, tuple[int, ...]]:
    """Return (leading extra tokens, grid) of a token sequence of length `tokens`.

    An explicit grid must fit within the sequence; an inferred one is the grid with the input's
    aspect (every axis the same patch size) that leaves the fewest leading tokens.
    """
    if layout.grid is not None:
        if len(layout.grid) != len(input_spatial):
            raise LayoutError(f"layout {layout} has {len(layout.grid)} axes; the input has {len(input_spatial)}")
        extra = tokens - math.prod(layout.grid)
        if not 0 <= extra <= MAX_EXTRA_TOKENS:
            raise LayoutError(f"layout {layout} needs {math.prod(layout.grid)} grid tokens; the output has {tokens}")
        return extra, layout.grid
    for extra in range(min(tokens, MAX_EXTRA_TOKENS + 1)):
        grid = _aspect_grid(tokens - extra, input_spatial)
        if grid is not None:
            return extra, grid
    raise LayoutError(f"{tokens} tokens form no grid with the input's aspect {'x'.join(map(str, input_spatial))} "
                     f"after up to {MAX_EXTRA_TOKENS} leading tokens; give the grid as tokens:HxW")


def _aspect_grid(count: int, input_spatial: tuple[int, ...]) -> tuple[int, ...] | None:
    """Return the grid of `count` cells whose axes are the input's divided by one common patch size."""
    if count < 1:
        return None
    patch = (math.prod(input_spatial) / count) ** (1 / len(input_spatial))
    grid = tuple(max(1, round(n / patch)) for n in input_spatial)
    if math.prod(grid) != count:
        return None
    return grid if all(abs(n / g - patch) <= 1e-6 * patch for n, g in zip(input_spatial, grid)) else None
