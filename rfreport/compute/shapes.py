"""Shape-only passes: the model run on the meta device, at the input size and at the input doubled per axis.

A grid axis of a tensor grows with the input; a channel axis never does. Two passes on a copy of the
model whose parameters and buffers are meta stand-ins (no weight copied, no value computed, and state
a forward pass keeps stays out of the user's model) tell them apart from shapes alone:

* inside a channels-first model, modules whose output has a dim 1 that changes with the input size
  return channels-last tensors (ConvNeXt's norms and linear layers between permutes, a Swin block);
* the analysed tensor itself is judged the same way: the axis its layout reads as channels must keep
  its size (`judge_layout`), else the layout misreads it and the analysis is refused, naming the
  layout that reads it. A model built for one input size only refuses the doubled pass; its tensor
  is judged by the grid each layout reads (one stride from the input, or not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from rfreport.compute.surrogate import deep_copy, eager_forward, unwrap_compiled
from rfreport.errors import LayoutError
from rfreport.layouts import Layout, LayoutKind

Select = Callable[[nn.Module, torch.Tensor], torch.Tensor]   # runs a model and returns the analysed tensor


def on_meta(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of the model (compiled modules unwrapped) with meta parameters and buffers."""
    source = getattr(model, "_orig_mod", model)
    memo: dict[int, torch.Tensor] = {}
    for tensor in [*source.parameters(), *source.buffers()]:
        stand_in = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(stand_in, requires_grad=False) if isinstance(tensor, nn.Parameter) \
            else stand_in
    return unwrap_compiled(deep_copy(source, memo, lambda t: torch.empty_like(t, device="meta"))).eval()


def scaled(input_shape: tuple[int, ...], scale: int) -> tuple[int, ...]:
    """Return the input shape with every spatial axis multiplied by `scale`."""
    return (*input_shape[:2], *(n * scale for n in input_shape[2:]))


def meta_pass(shadow: nn.Module, input_shape: tuple[int, ...], select: Select | None = None) -> torch.Tensor | None:
    """Run a meta copy on a meta input; return the selected tensor (None: not selected, or the pass failed)."""
    x = torch.empty(input_shape, device="meta")
    with torch.no_grad(), eager_forward(), contextlib.suppress(Exception):   # a model error ends the pass
        out = select(shadow, x) if select else shadow(x)
        return out if select and isinstance(out, torch.Tensor) else None
    return None


def judge_layout(model: nn.Module, input_shape: tuple[int, ...], given: tuple[int, ...], layout: Layout,
                 select: Select, where: str) -> None:
    """Raise LayoutError when `layout` misreads the analysed tensor, of shape `given` at the input, naming
    the layout that reads it.

    Judged by growth where the model runs at the input doubled: the axis read as channels must keep
    its size where the other layout's does (a grid flattened into channels, read by no layout as a
    grid, is read as given: its positions' RFs are the union over those channels). A model built for
    one input size only is judged by its grid instead: the layout must read a grid that is the input
    resampled by one stride when the other layout reads one and it does not. Only the channels-first
    and channels-last layouts are judged (a token layout's grid is checked where it is read); a
    tensor of another rank, or a model the shape-only pass cannot run, is left to the reading itself.
    """
    rank = len(input_shape)
    if layout.kind is LayoutKind.TOKENS or len(given) != rank:
        return
    doubled = meta_pass(on_meta(model), scaled(input_shape, 2), select)
    if doubled is not None and doubled.dim() == rank:
        problem = _growing_channels(given, tuple(doubled.shape), layout, input_shape)
    else:
        problem = _strided_grid(given, layout, input_shape)
    if problem:
        raise LayoutError(f"{where} has shape {given} at input {_text(input_shape[2:])}{problem}")


def _growing_channels(given: tuple[int, ...], doubled: tuple[int, ...], layout: Layout,
                      input_shape: tuple[int, ...]) -> str | None:
    """Return why the layout misreads a tensor whose shape at the doubled input is `doubled`, or None."""
    channels = _channels_axis(layout, len(given))
    if given[channels] == doubled[channels]:
        return None
    fixed = [axis for axis in range(1, len(given)) if given[axis] == doubled[axis]]
    fits = {1: "nchw", len(given) - 1: "nhwc"}.get(fixed[0]) if len(fixed) == 1 else None
    if fits is None:   # no other layout reads a grid either (a grid flattened into channels): read as given
        return None
    return (f" and {doubled} at {_text(scaled(input_shape, 2)[2:])}: its axis {channels}, which layout {layout} "
            f"reads as channels, grows with the input; {_hint(fits)}")


def _strided_grid(given: tuple[int, ...], layout: Layout, input_shape: tuple[int, ...]) -> str | None:
    """Return why the layout misreads a tensor of a model that runs at one input size, or None."""
    other = Layout(LayoutKind.NHWC if layout.kind is LayoutKind.NCHW else LayoutKind.NCHW)
    grids = {kind: _grid_of(given, kind) for kind in (layout, other)}
    spatial = tuple(input_shape[2:])
    if uniform_stride(grids[layout], spatial) or not uniform_stride(grids[other], spatial):
        return None
    return (f" (the model runs at this input size only): layout {layout} reads a {_text(grids[layout])} grid, "
            f"not the input resampled by one stride, and {other} a {_text(grids[other])} grid; {_hint(str(other))}")


def _channels_axis(layout: Layout, rank: int) -> int:
    """Return the axis a channels-first or channels-last layout reads as channels."""
    return 1 if layout.kind is LayoutKind.NCHW else rank - 1


def _grid_of(shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    """Return the grid a channels-first or channels-last layout reads from a shape."""
    return shape[2:] if layout.kind is LayoutKind.NCHW else shape[1:-1]


def _hint(layout: str) -> str:
    """Return the one-line advice to analyse with another layout."""
    return f"analyse it with --layout {layout} (config: layout = \"{layout}\")"


def uniform_stride(grid: tuple[int, ...], input_spatial: tuple[int, ...]) -> bool:
    """Tell whether a grid is the input resampled by one stride on every axis, up to rounding (one cell)."""
    stride = max(n / g for n, g in zip(input_spatial, grid))
    return all(abs(n / stride - g) <= 1 for n, g in zip(input_spatial, grid))


def _text(sizes: tuple[int, ...]) -> str:
    """Return sizes as `HxW`."""
    return "x".join(map(str, sizes))
