"""Shape-only passes: the model run on the meta device (a small one run itself while torch's meta kernels are
not loaded), at the input size and at the input doubled per axis.

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
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from rfreport.compute.surrogate import (
    base_name,
    deep_copy,
    dynamo_loaded,
    eager_forward,
    preserved,
    reused,
    unwrap_compiled,
)
from rfreport.compute.taint import tensors_of
from rfreport.errors import LayoutError
from rfreport.layouts import Layout, LayoutKind

T = TypeVar("T")
Select = Callable[[nn.Module, torch.Tensor], torch.Tensor]   # runs a model and returns the analysed tensor
PASS_FLOPS = 10 ** 10   # a shape-only pass of the model as given stops here (about 0.2 s of two CPU cores)


@dataclass(frozen=True)
class Reads:
    """What a forward pass reads of the model, and what it costs."""

    ids: frozenset[int] | None   # the parameters and buffers read (by id); None: unknown, copy them all
    flops: int | None            # floating-point operations of one pass (the input's whole batch); None: unknown
    grain: int | None = None     # flop-weighted mean flops of its ops (the work one op hands its threads)
    offsets: tuple[tuple[str, Any], ...] | None = None   # where each op places its windows or slices (see _offsets)


def on_meta(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of the model (compiled modules unwrapped) with meta parameters and buffers."""
    source = getattr(model, "_orig_mod", model)
    memo: dict[int, torch.Tensor] = {}
    for tensor in [*source.parameters(), *source.buffers()]:
        stand_in = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(stand_in, requires_grad=False) if isinstance(tensor, nn.Parameter) \
            else stand_in
    return unwrap_compiled(deep_copy(source, memo, lambda t: torch.empty_like(t, device="meta"))).eval()


def shape_pass(model: nn.Module, input_shape: tuple[int, ...],
               run: Callable[[nn.Module, torch.Tensor], T]) -> tuple[T, Reads] | None:
    """Return what `run(model, x)` returns for an input of `input_shape`, and what that pass read and cost, from
    shapes alone; None when the pass does not run.

    The pass runs on a meta copy of the model (no weight copied, no value computed, and state a
    forward pass keeps stays out of the user's model), its reads named by the model's own tensors.
    Most of torch's meta kernels are Python code that loads torch.compile's machinery on first use
    (1.5-2 s once per process; torchvision and timm load it on import): until it is loaded, the model
    as given runs first (see real_pass) and is abandoned past PASS_FLOPS, so a small model's shapes
    cost milliseconds. Both passes see the same shapes and count the same flops.
    """
    if not dynamo_loaded():
        found = real_pass(model, input_shape, run, budget=PASS_FLOPS)
        if found is not None:
            return found
    try:
        shadow = on_meta(model)
    except Exception:  # a model that cannot be deep-copied: only a pass of the model as given can tell
        return None
    stand_ins, originals = _tensors(shadow), _tensors(getattr(model, "_orig_mod", model))
    found = _recorded(shadow, torch.empty(input_shape, device="meta"), run)
    if found is None or len(stand_ins) != len(originals):
        return None
    result, read = found
    original = {id(m): id(t) for m, t in zip(stand_ins, originals)}
    return result, replace(read, ids=frozenset(original.get(i, i) for i in read.ids or ()))


def real_pass(model: nn.Module, input_shape: tuple[int, ...], run: Callable[[nn.Module, torch.Tensor], T],
              budget: int | None = None) -> tuple[T, Reads] | None:
    """Return what `run(model, x)` returns and what the pass read and cost, run on the model as given on zeros
    in eval mode without gradients (its flags, buffers, attributes and random state restored after);
    None when it raises or runs past `budget` flops."""
    parameters = list(model.parameters())
    dtype = next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)
    device = next((p.device for p in parameters), torch.device("cpu"))
    with preserved(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.eval()
        return _recorded(model, torch.zeros(input_shape, dtype=dtype, device=device), run, budget)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Return every parameter and buffer of a module, shared ones as often as they are registered."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [t for _, t in named]


def _recorded(model: nn.Module, x: torch.Tensor, run: Callable[[nn.Module, torch.Tensor], T],
              budget: int | None = None) -> tuple[T, Reads] | None:
    """Run `run(model, x)` recording the tensors read and counting flops; None when it raises (or runs past
    `budget` flops)."""
    recorder = _Recorder(budget)
    try:
        with torch.no_grad(), eager_forward(), recorder:
            result = run(model, x)
    except Exception:  # the model may raise anything; the caller falls back
        return None
    return result, recorder.found()


class _Recorder(TorchFunctionMode):
    """Record the ids of every tensor an op receives, count the pass's floating-point operations, and note where
    each windowed or slicing op places its windows (_offsets).

    Convolutions and matrix products count two per multiply-add; every other op one per output
    entry. Counted at the level of torch functions, which needs no dispatch mode (entering one
    loads torch.compile's machinery).
    """

    def __init__(self, budget: int | None = None):
        super().__init__()
        self.ids: set[int] = set()
        self.flops = 0
        self.squares = 0   # the sum of each op's flops squared: flops-weighted, the mean op size
        self.budget = budget
        self.offsets: list[tuple[str, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ids.update(id(t) for t in tensors_of((args, kwargs)))
        name = base_name(func)
        placed = _offsets(name, args, kwargs)
        if placed is not None:
            self.offsets.append((name, placed))
        out = func(*args, **kwargs)
        flops = _flops(getattr(func, "__name__", ""), args, out)
        self.flops += flops
        self.squares += flops * flops
        if self.budget is not None and self.flops > self.budget:
            raise _OverBudget
        return out

    def found(self) -> Reads:
        """Return what the pass read and cost."""
        return Reads(frozenset(self.ids), self.flops, self.squares // self.flops if self.flops else None,
                     tuple(self.offsets))


def _offsets(name: str, args: tuple, kwargs: dict) -> Any:
    """Return what places an op's windows or slices against the start of each axis, None for other ops: a
    convolution's or pooling's padding, the amounts `pad` adds before each axis, the starts of a slice or index.

    The end of an axis never moves a window (a border there only clips), so the amounts after are left out:
    Swin's padding up to a multiple of its window, a crop of that padding, ceil-mode pooling.
    """
    if name.startswith("conv"):   # conv*(input, weight, bias, stride, padding, ...), conv_transpose* alike
        return _plain(args[4] if len(args) > 4 else kwargs.get("padding", 0))
    if name.startswith(("max_pool", "avg_pool")):   # *_pool*(input, kernel_size, stride, padding, ...)
        return _plain(args[3] if len(args) > 3 else kwargs.get("padding", 0))
    if name == "pad":
        return _plain(tuple(args[1] if len(args) > 1 else kwargs["pad"])[0::2])
    if name == "narrow":   # narrow(input, dim, start, length)
        return _plain(args[1:3])
    if name == "getitem" and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return tuple(_plain(part.start if isinstance(part, slice) else part) for part in index)
    return None


def _plain(value: Any) -> Any:
    """Return an op argument as a comparable value: ints and strings as they are, sequences as tuples, a tensor
    (an index tensor, whose values a shape-only pass does not compute) as one mark."""
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (int, float, str, bool)) or value is None or value is Ellipsis:
        return value
    return repr(value)


class _OverBudget(Exception):
    """A shape-only pass of the model as given ran past its budget of flops."""


def _flops(name: str, args: tuple, out: Any) -> int:
    """Return the floating-point operations of one op from its name, its operands and its output."""
    if not isinstance(out, torch.Tensor):
        return 0
    first, second = [*args, None, None][:2]
    if name.startswith("conv_transpose") and isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return 2 * first.numel() * math.prod(second.shape[1:])      # weight (C_in, C_out / groups, *kernel)
    if name.startswith("conv") and isinstance(second, torch.Tensor) and second.dim() > 2:
        return 2 * out.numel() * math.prod(second.shape[1:])        # weight (C_out, C_in / groups, *kernel)
    if name == "linear" and isinstance(second, torch.Tensor):
        return 2 * out.numel() * second.shape[-1]
    if name in ("matmul", "mm", "bmm", "__matmul__") and isinstance(first, torch.Tensor) and first.dim():
        return 2 * out.numel() * first.shape[-1]
    return out.numel()


def scaled(input_shape: tuple[int, ...], scale: int) -> tuple[int, ...]:
    """Return the input shape with every spatial axis multiplied by `scale`."""
    return (*input_shape[:2], *(n * scale for n in input_shape[2:]))


def meta_pass(shadow: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Run a meta copy on a meta input, for what its hooks see (a model error ends the pass)."""
    with torch.no_grad(), eager_forward(), contextlib.suppress(Exception):
        shadow(torch.empty(input_shape, device="meta"))


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
    doubled = reused(model, ("shape at", scaled(input_shape, 2), where),   # every sweep of a job asks again
                     lambda: _shape_of(shape_pass(model, scaled(input_shape, 2), select)))
    if doubled is not None and len(doubled) == rank:
        problem = _growing_channels(given, doubled, layout, input_shape)
    else:
        problem = _strided_grid(given, layout, input_shape)
    if problem:
        raise LayoutError(f"{where} has shape {given} at input {_text(input_shape[2:])}{problem}")


def _shape_of(found: tuple[torch.Tensor, Reads] | None) -> tuple[int, ...] | None:
    """Return the shape of a shape-only pass's tensor (None: no pass, or no tensor)."""
    return tuple(found[0].shape) if found is not None and isinstance(found[0], torch.Tensor) else None


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
