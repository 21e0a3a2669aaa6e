"""Output layouts: how an analysed tensor's axes map to (batch, channels, spatial grid).

rfreport reads every analysed tensor as ``(N, C, *spatial)``. Channels-last stages (timm's Swin
returns ``(N, H, W, C)``) and token sequences (ViT blocks return ``(N, L, C)``, with leading class
or register tokens) are read through a layout instead of being misread as NCHW:

* ``nchw`` (default): ``(N, C, *spatial)``;
* ``nhwc``: ``(N, *spatial, C)``;
* ``tokens``: ``(N, L, C)`` whose last tokens form a grid with the input's aspect (the leading
  extra tokens, class and register, are dropped); the grid is inferred from the input's spatial
  shape and the token count, and where several grids fit, from the grids the forward pass shows
  (see token_grid);
* ``tokens:HxW`` (``tokens:L``, ``tokens:DxHxW``): the same with an explicit grid.

Pure Python: the config validates layouts without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Collection
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


def token_grid(tokens: int, input_spatial: tuple[int, ...], layout: Layout,
               seen: Collection[tuple[int, ...]] = ()) -> tuple[int, tuple[int, ...]]:
    """Return (leading extra tokens, grid) of a token sequence of length `tokens`.

    An explicit grid must fit within the sequence. An inferred one is a grid with the input's aspect
    (every axis the same patch size) after 0 to MAX_EXTRA_TOKENS leading tokens. Small sequences fit
    several (9 tokens at a square input: a 3x3 grid, or 5 leading tokens and a 2x2 grid, or 8 and a
    1x1 grid); then the grid is the one among them that the forward pass shows as the spatial size of a
    grid tensor (`seen`: a patch embedding's convolution output), and without exactly one such grid the
    layout is refused, asking for an explicit grid.
    """
    if layout.grid is not None:
        if len(layout.grid) != len(input_spatial):
            raise LayoutError(f"layout {layout} has {len(layout.grid)} axes; the input has {len(input_spatial)}")
        extra = tokens - math.prod(layout.grid)
        if not 0 <= extra <= MAX_EXTRA_TOKENS:
            raise LayoutError(f"layout {layout} needs {math.prod(layout.grid)} grid tokens; the output has {tokens}")
        return extra, layout.grid
    options = [(extra, grid) for extra in range(min(tokens, MAX_EXTRA_TOKENS + 1))
               if (grid := _aspect_grid(tokens - extra, input_spatial)) is not None]
    shown = [option for option in options if option[1] in set(seen)]
    if len(options) == 1 or len(shown) == 1:
        return options[0] if len(options) == 1 else shown[0]
    aspect = "x".join(map(str, input_spatial))
    if not options:
        raise LayoutError(f"{tokens} tokens form no grid with the input's aspect {aspect} after up to "
                          f"{MAX_EXTRA_TOKENS} leading tokens; give the grid as tokens:HxW")
    fits = ", ".join(f"{_text(grid)} after {extra} leading tokens" for extra, grid in options)
    found = "several of them" if shown else "none of them"
    raise LayoutError(f"{tokens} tokens fit several grids with the input's aspect {aspect} ({fits}) and the "
                      f"forward pass shows {found} as a grid; give the grid as tokens:HxW")


def resolved(layout: Layout, shape: tuple[int, ...], input_spatial: tuple[int, ...],
             seen: Collection[tuple[int, ...]] = ()) -> Layout:
    """Return the layout with an inferred token grid made explicit for a tensor of `shape` (see token_grid);
    other layouts, and tensors of another rank, as they are."""
    if layout.kind is not LayoutKind.TOKENS or layout.grid is not None or len(shape) != 3:
        return layout
    return Layout(LayoutKind.TOKENS, token_grid(shape[1], input_spatial, layout, seen)[1])


def _text(grid: tuple[int, ...]) -> str:
    """Return a grid as `HxW`."""
    return "x".join(map(str, grid))


def _aspect_grid(count: int, input_spatial: tuple[int, ...]) -> tuple[int, ...] | None:
    """Return the grid of `count` cells whose axes are the input's divided by one common patch size."""
    if count < 1:
        return None
    patch = (math.prod(input_spatial) / count) ** (1 / len(input_spatial))
    grid = tuple(max(1, round(n / patch)) for n in input_spatial)
    if math.prod(grid) != count:
        return None
    return grid if all(abs(n / g - patch) <= 1e-6 * patch for n, g in zip(input_spatial, grid)) else None
