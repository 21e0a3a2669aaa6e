"""Structural replacements: linear ops over exactly the windows a zero-gradient op reads.

The one-hot gradient under-reports wherever an op's derivative is exactly zero although its
value depends on an input: max-pooling routes the gradient to the argmax, a sort or a median to
one element, a gather through input-dependent indices to the gathered element only, and
unpooling to the remembered argmax. Each function here returns, for one such op, a linear
(positive, averaging) op whose result has the same shape and depends on *everything the op's
value could depend on*: the same windows, the whole sorted axis, every element an
input-dependent index could address. Index outputs (argmax positions) keep their real values.

Pure functions of torch tensors, called by :class:`rfreport.compute.surrogate.StructuralMode` with the
mode switched off (so nothing here is traced twice).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rfreport.errors import GRADIENT_HINT, SweepError

# Ops whose value at an output position is one element chosen (by value) along `dim`.
ROUTED_ALONG_DIM = frozenset({"sort", "msort", "topk", "kthvalue", "median", "nanmedian", "mode", "quantile",
                              "nanquantile", "cummax", "cummin"})
# Ops that read their data argument at positions given by an index tensor.
INDEXED = frozenset({"gather", "take_along_dim", "index_select", "take", "getitem", "index"})
# Ops that write through an index tensor: refused when the index depends on the input.
SCATTERING = frozenset({"scatter", "scatter_add", "scatter_reduce", "index_put", "index_add", "index_copy",
                        "index_fill", "index_reduce", "setitem", "masked_scatter", "put"})


def ntuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """Broadcast an int or a sequence to an n-tuple of ints."""
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * n


def bind(names: Sequence[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind positional and keyword arguments to parameter names."""
    return dict(zip(names, args)) | kwargs


def pool_output_length(length: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Return max_pool's output length on one axis, with PyTorch's ceil_mode rule."""
    span = length + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= length + p:
        out -= 1
    return out


WINDOW_ARGS = {
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "max_pool": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
}


def taps_past_grid(name: str, args: tuple, kwargs: dict, result: Any) -> frozenset[int]:
    """Return the spatial axes on which a convolution or pool hides a cut window at the centre of its output or
    next to it: some kernel tap lies past the input grid (in padding) and at most one tap, away from the grid's
    border cells, reads the grid.

    Such a window looks like a 1-tap kernel's: a 3-tap kernel dilated by 4 on a grid of 4 cells reads one cell
    at every position, so no window seen at this input size tells its extent. A cut window that reads two taps
    or a border cell shows the cut itself (a cell past the border within its widest gap) and is not reported
    here. Empty for other ops.
    """
    family = next((f for f in WINDOW_ARGS if name.startswith(f) and name[-2:] in ("1d", "2d", "3d")), None)
    out = result[0] if isinstance(result, tuple) and result else result   # a max-pool's (values, indices)
    if family is None or name.startswith("conv_transpose") or not isinstance(out, torch.Tensor):
        return frozenset()
    bound = bind(WINDOW_ARGS[family], args, kwargs)
    rank = int(name[-2])
    kernel = tuple(bound["weight"].shape[2:]) if family == "conv" else ntuple(bound["kernel_size"], rank)
    s = ntuple(bound.get("stride") or (1 if family == "conv" else kernel), rank)
    d = ntuple(bound.get("dilation", 1), rank)
    padding = bound.get("padding", 0)
    if isinstance(padding, str):   # a convolution's "valid" or "same"
        padding = [di * (k - 1) // 2 if padding == "same" else 0 for k, di in zip(kernel, d)]
    axes = zip(bound["input"].shape[-rank:], out.shape[-rank:], kernel, s, ntuple(padding, rank), d)
    return frozenset(axis for axis, geometry in enumerate(axes) if _hides_cut(*geometry))


def _hides_cut(n: int, out: int, k: int, s: int, p: int, d: int) -> bool:
    """Tell whether a window at the centre of an axis's output or next to it has a tap past the grid of n cells
    while reading at most one cell, away from the border (see taps_past_grid)."""
    middle = np.arange(max((out - 1) // 2 - 1, 0), min((out - 1) // 2 + 2, out))
    taps = middle[:, None] * s - p + np.arange(k)[None, :] * d
    inside = (taps >= 0) & (taps < n)
    inner = inside & (taps > 0) & (taps < n - 1)
    reads = inside.sum(axis=1)
    return k > 1 and bool(((~inside).any(axis=1) & (reads <= 1) & (inner.sum(axis=1) == reads)).any())


def _depthwise_conv(rank: int) -> Callable:
    """Return conv1d/2d/3d for a spatial rank."""
    return (F.conv1d, F.conv2d, F.conv3d)[rank - 1]


def window_mean(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                ceil_mode: bool = False) -> torch.Tensor:
    """Average over exactly the windows a max-pool with these arguments would take a max over."""
    rank = x.dim() - 2
    k = ntuple(kernel_size, rank)
    s = ntuple(stride if stride not in (None, []) else kernel_size, rank)
    p, d = ntuple(padding, rank), ntuple(dilation, rank)
    sizes = x.shape[2:]
    outs = [pool_output_length(n, *args, ceil_mode) for n, *args in zip(sizes, k, s, p, d)]
    right = [max(p_i, (o - 1) * s_i + d_i * (k_i - 1) + 1 - n - p_i)
             for n, o, k_i, s_i, p_i, d_i in zip(sizes, outs, k, s, p, d)]
    padded = F.pad(x, [v for pair in reversed(list(zip(p, right))) for v in pair])
    channels = x.shape[1]
    weight = torch.full((channels, 1, *k), 1.0 / math.prod(k), dtype=x.dtype, device=x.device)
    y = _depthwise_conv(rank)(padded, weight, stride=s, dilation=d, groups=channels)
    return y[(Ellipsis, *(slice(0, o) for o in outs))]


def _with_real_indices(func: Callable, args: tuple, kwargs: dict, values: torch.Tensor, wanted: bool):
    """Return the values alone, or (values, the real op's indices) when indices were asked for."""
    if not wanted:
        return values
    real = func(args[0].detach(), *args[1:], **kwargs)
    return values, real[1]


def max_pool(func: Callable, name: str, args: tuple, kwargs: dict):
    """Replace a max-pool by the window mean, keeping the real indices when they are asked for."""
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    bound = bind(names, args, kwargs)
    x = bound.pop("input")
    wants = bool(bound.pop("return_indices", False)) or func.__name__.endswith("_with_indices")
    return _with_real_indices(func, args, kwargs, window_mean(x, **bound), wants)


def adaptive_max_pool(func: Callable, name: str, args: tuple, kwargs: dict):
    """Replace an adaptive max-pool by the adaptive mean over the same bins."""
    bound = bind(("input", "output_size", "return_indices"), args, kwargs)
    x = bound["input"]
    mean = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[x.dim() - 3](x, bound["output_size"])
    wants = bool(bound.get("return_indices")) or func.__name__.endswith("_with_indices")
    return _with_real_indices(func, args, kwargs, mean, wants)


def fractional_max_pool(func: Callable, name: str, args: tuple, kwargs: dict):
    """Replace a fractional max-pool by a mean over the union of every window it could draw.

    Its windows start at floor((i + u) * a) - floor(u * a) for a random u in [0, 1) with
    a = (n - k) / (out - 1): that is floor(i * a) or one more, and the last window ends at n - 1.
    """
    bound = bind(("input", "kernel_size", "output_size", "output_ratio", "return_indices", "_random_samples"),
                 args, kwargs)
    x = bound["input"]
    real = func(x.detach(), *args[1:], **kwargs)
    values = real[0] if isinstance(real, tuple) else real
    rank = x.dim() - 2
    kernel, sizes, outs = ntuple(bound["kernel_size"], rank), x.shape[2:], values.shape[2:]
    mixed = x
    for axis, (k, n, out) in enumerate(zip(kernel, sizes, outs)):
        mixed = _apply_along(mixed, 2 + axis, _fractional_windows(k, n, out, x))
    return (mixed, real[1]) if isinstance(real, tuple) else mixed


def _fractional_windows(k: int, n: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """Return the (out, n) averaging matrix over the union of a fractional pool's possible windows."""
    alpha = (n - k) / (out - 1) if out > 1 else 0.0
    matrix = torch.zeros((out, n), dtype=like.dtype, device=like.device)
    for i in range(out):
        start = n - k if i == out - 1 else math.floor(i * alpha)
        stop = n if i == out - 1 else min(start + k + 1, n)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def _apply_along(x: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
    """Multiply one axis of x by an (out, n) matrix."""
    return torch.movedim(torch.movedim(x, dim, -1) @ matrix.T, -1, dim)


def max_unpool(func: Callable, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """Replace max-unpooling by spreading every pooled cell over its whole window (any argmax it could hold)."""
    bound = bind(("input", "indices", "kernel_size", "stride", "padding", "output_size"), args, kwargs)
    x = bound["input"]
    real = func(x.detach(), *args[1:], **kwargs)
    rank = x.dim() - 2
    k = ntuple(bound["kernel_size"], rank)
    s = ntuple(bound.get("stride") or bound["kernel_size"], rank)
    p = ntuple(bound.get("padding") or 0, rank)
    channels = x.shape[1]
    weight = torch.full((channels, 1, *k), 1.0 / math.prod(k), dtype=x.dtype, device=x.device)
    spread = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1](
        x, weight, stride=s, padding=p, groups=channels)
    extra = [target - have for have, target in zip(spread.shape[2:], real.shape[2:])]
    return F.pad(spread, [v for e in reversed(extra) for v in (0, e)])[(Ellipsis, *map(slice, real.shape[2:]))]


def _dim_of(name: str, bound: dict[str, Any], x: torch.Tensor) -> int | None:
    """Return the axis a value-routing op works along (None: all axes)."""
    if name == "msort":
        return 0
    default = None if name in ("quantile", "nanquantile", "median", "nanmedian") else -1
    dim = bound.get("dim", default)
    return None if dim is None else int(dim) % max(x.dim(), 1)


ROUTED_SIGNATURES = {
    "sort": ("input", "dim", "descending"), "msort": ("input",), "topk": ("input", "k", "dim"),
    "kthvalue": ("input", "k", "dim", "keepdim"), "median": ("input", "dim", "keepdim"),
    "nanmedian": ("input", "dim", "keepdim"), "mode": ("input", "dim", "keepdim"),
    "quantile": ("input", "q", "dim", "keepdim"), "nanquantile": ("input", "q", "dim", "keepdim"),
    "cummax": ("input", "dim"), "cummin": ("input", "dim"),
}


def routed(func: Callable, name: str, args: tuple, kwargs: dict):
    """Replace a value-routing op by the mean along its axis (cumulative for cummax/cummin), real indices kept."""
    bound = bind(ROUTED_SIGNATURES[name], args, kwargs)
    x = bound["input"]
    real = func(x.detach(), *args[1:], **kwargs)
    values = real[0] if isinstance(real, tuple) else real
    dim = _dim_of(name, bound, x)
    if name in ("cummax", "cummin"):
        counts = torch.arange(1, x.shape[dim] + 1, dtype=x.dtype, device=x.device)
        mixed = torch.movedim(torch.movedim(x, dim, -1).cumsum(-1) / counts, -1, dim)
    elif dim is None:
        mixed = x.mean().expand(values.shape)
    else:
        keep = name in ("sort", "msort", "topk") or bool(bound.get("keepdim", False))
        mean = x.mean(dim, keepdim=keep)
        mixed = mean.expand(values.shape) if values.dim() >= mean.dim() else mean
    if isinstance(real, tuple):
        return type(real)((mixed, real[1]))
    return mixed


def _zeros_like_index(index: torch.Tensor) -> torch.Tensor:
    """Return an all-zero index of the same shape (every lookup hits the single averaged cell)."""
    return torch.zeros_like(index)


def indexed(func: Callable, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """Replace a lookup through input-dependent indices by the mean over every position the index could address."""
    if name in ("getitem", "index"):
        return _advanced_index(args[0], args[1])
    if name == "take":
        x, index = args[0], args[1] if len(args) > 1 else kwargs["index"]
        return x.mean().expand(index.shape)
    if name == "take_along_dim":
        bound = bind(("input", "indices", "dim"), args, kwargs)
        x, index, dim = bound["input"], bound["indices"], bound.get("dim")
        if dim is None:
            return x.mean().expand(index.shape)
        return torch.take_along_dim(x.mean(int(dim), keepdim=True), _zeros_like_index(index), int(dim))
    bound = bind(("input", "dim", "index"), args, kwargs)
    x, dim, index = bound["input"], int(bound["dim"]), bound["index"]
    mean = x.mean(dim, keepdim=True)
    return mean.gather(dim, _zeros_like_index(index)) if name == "gather" else \
        mean.index_select(dim, _zeros_like_index(index))


def _advanced_index(x: torch.Tensor, index: Any) -> torch.Tensor:
    """Index x where tensor indices are averaged out: each tensor-indexed axis becomes its mean."""
    parts = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(_axes_consumed(p) for p in parts)
    if any(p is Ellipsis for p in parts):
        at = parts.index(Ellipsis)
        parts[at:at + 1] = [slice(None)] * (x.dim() - consumed)
    dims, axis, rewritten = [], 0, []
    for part in parts:
        if isinstance(part, torch.Tensor) and not part.is_floating_point():
            width = part.dim() if part.dtype == torch.bool else 1
            dims.extend(range(axis, axis + width))
            count = int(part.sum()) if part.dtype == torch.bool else None
            rewritten.extend([torch.zeros(count, dtype=torch.long, device=part.device)] * width
                             if count is not None else [_zeros_like_index(part)])
            axis += width
        else:
            rewritten.append(part)
            axis += _axes_consumed(part)
    return x.mean(dims, keepdim=True)[tuple(rewritten)]


def _axes_consumed(part: Any) -> int:
    """Return how many input axes one index entry consumes."""
    if part is None or part is Ellipsis:
        return 0
    if isinstance(part, torch.Tensor) and part.dtype == torch.bool:
        return part.dim()
    return 1


def refuse_scatter(name: str) -> None:
    """Refuse a write through input-dependent indices, whose structural dependency is not modelled."""
    raise SweepError(f"structural mode cannot analyse `{name}` through indices computed from the input; "
                     f"use {GRADIENT_HINT} for its data-dependent support")
