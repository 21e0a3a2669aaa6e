"""Shape-only passes: the model run on the meta device, at the input size and at the input doubled per axis.

A grid axis of a tensor grows with the input; a channel axis never does. Two passes on a copy of the
model whose parameters and buffers are meta stand-ins (no weight copied, no value computed, and state
a forward pass keeps stays out of the user's model) tell them apart from shapes alone:

* inside a channels-first model, modules whose output has a dim 1 that changes with the input size
  return channels-last tensors (ConvNeXt's norms and linear layers between permutes, a Swin block);
* the analysed tensor itself is judged the same way: the axis its layout reads as channels must keep
  its size (`judge_layout`), else the layout misreads it and the analysis is refused, naming the
  layout that reads it.

A pass the model refuses (a model built for one input size only) shows nothing, and nothing is judged.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import nn

from rfreport.compute.surrogate import eager_forward, unwrap_compiled
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
    return unwrap_compiled(copy.deepcopy(source, memo)).eval()


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


def judge_layout(model: nn.Module, input_shape: tuple[int, ...], layout: Layout, select: Select,
                 where: str) -> None:
    """Raise LayoutError when the axis `layout` reads as channels changes with the input size.

    Only the channels-first and channels-last layouts are judged (a token layout's grid is checked
    where it is read). A tensor of another rank, or a model that does not run at both sizes, is left
    to the reading itself.
    """
    if layout.kind is LayoutKind.TOKENS:
        return
    shadow = on_meta(model)
    shapes = [meta_pass(shadow, scaled(input_shape, scale), select) for scale in (1, 2)]
    if any(s is None or s.dim() != len(input_shape) for s in shapes):
        return
    given, doubled = (tuple(s.shape) for s in shapes)
    channels = 1 if layout.kind is LayoutKind.NCHW else len(given) - 1
    if given[channels] == doubled[channels]:
        return
    fixed = [axis for axis in range(1, len(given)) if given[axis] == doubled[axis]]
    fits = {1: "nchw", len(given) - 1: "nhwc"}.get(fixed[0]) if len(fixed) == 1 else None
    hint = (f"analyse it with --layout {fits} (config: layout = \"{fits}\")" if fits
            else "no channels axis keeps its size, so no layout reads it as a grid")
    raise LayoutError(f"{where} has shape {given} at input {_grid(input_shape)} and {doubled} at "
                      f"{_grid(scaled(input_shape, 2))}: its axis {channels}, which layout {layout} reads as "
                      f"channels, grows with the input; {hint}")


def _grid(input_shape: tuple[int, ...]) -> str:
    """Return an input's spatial size as `HxW`."""
    return "x".join(map(str, input_shape[2:]))
