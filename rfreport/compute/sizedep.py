"""Which ops make the RF geometry depend on the input size (so a larger input cannot stand in for it).

An RF geometry fitted on an enlarged input holds at the reported size only when every op on the
differentiated path takes the same windows at every size. That is decided op by op, from the op's
name, its arguments and its result, with a whitelist: an op on a spatial tensor is
size-independent when

* it keeps the tensor's shape and does not reorder positions against the border (elementwise
  maths, normalisations, softmax, convolutions with "same" padding; not flip, roll, rot90 or
  gathers with index tensors),
* it only relabels or regroups non-spatial axes (permute, transpose, a view that keeps the
  trailing spatial sizes), or reduces (a spatial reduction sees everything at every size),
* or it is a windowed op whose windows are fixed in input pixels: convolutions and their
  transposes, non-adaptive pooling, padding, pixel (un)shuffle, `interpolate` by a
  `scale_factor`, adaptive pooling to one cell, slicing and narrowing from a non-negative start.

Anything else on a spatial tensor is size-dependent: adaptive pooling to a grid of more than
one cell, `interpolate(size=...)`, concatenation or chunking along a spatial axis, slicing from
the end, reshapes that merge or split spatial axes, matrix products, unfold.

A *spatial tensor* is a differentiated floating tensor of at least the model input's rank whose
trailing (rank - 2) axes are not all of size one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

REORDERING = frozenset({"flip", "fliplr", "flipud", "rot90", "roll"})
INDEXING = frozenset({
    "gather", "index_select", "take", "take_along_dim", "scatter", "scatter_add", "scatter_reduce", "index_put",
    "index_add", "index_copy", "index_fill", "masked_select", "masked_scatter",
})
RELABELLING = frozenset({
    "permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t", "linear", "contiguous", "clone",
    "detach", "to", "type", "float", "double", "half", "bfloat16",
})
VIEWS = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"})
REDUCING = frozenset({
    "mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "norm", "logsumexp",
    "nansum", "nanmean", "median", "nanmedian", "prod", "argmax", "argmin", "sort", "msort", "topk", "kthvalue",
    "mode", "quantile", "nanquantile", "all", "any", "count_nonzero", "aminmax",
})
WINDOWED = ("conv", "avg_pool", "max_pool", "lp_pool", "pad", "constant_pad_nd", "reflection_pad",
            "replication_pad", "circular_pad", "pixel_shuffle", "pixel_unshuffle")
SPLITTING = frozenset({"chunk", "tensor_split"})
JOINING = frozenset({"cat", "concat", "concatenate"})


def size_dependent(name: str, args: tuple, kwargs: dict, result: Any, rank: int) -> bool:
    """Tell whether an op on a spatial tensor of a rank-`rank` model makes the geometry size-dependent.

    Arguments this rule cannot read count as size-dependent: it must never break the user's pass.
    """
    try:
        return _judged(name, args, kwargs, result, rank)
    except (TypeError, ValueError, IndexError, AttributeError, RuntimeError):
        return True


def _judged(name: str, args: tuple, kwargs: dict, result: Any, rank: int) -> bool:
    """Apply the rule of the module docstring to one op call."""
    x = _spatial_operand(args, kwargs, rank)
    if x is None:
        return False
    if name in REORDERING or name in INDEXING or (name == "getitem" and _indexes_from_end(args, x, rank)):
        return True
    if name in ("narrow", "select"):
        return _negative(args[2] if len(args) > 2 else kwargs.get("start", kwargs.get("index", 0)))
    if name in SPLITTING or name in JOINING:
        return _along_space(_dim_of(args, kwargs), x.dim())
    if name == "split":
        sizes = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
        return not isinstance(sizes, int) and _along_space(_dim_of(args[1:], kwargs), x.dim())
    if name.startswith("adaptive_"):
        return not _one_cell(args[1] if len(args) > 1 else kwargs.get("output_size"))
    if name == "interpolate" or name.startswith("upsample"):
        return _sized_resample(name, args, kwargs)
    return not _keeps_windows(name, x, _first_tensor(result), rank)


def _keeps_windows(name: str, x: torch.Tensor, y: torch.Tensor | None, rank: int) -> bool:
    """Tell whether an op outside the special cases keeps every position's window fixed in pixels."""
    if name in RELABELLING or name in REDUCING or name.startswith(WINDOWED) or name in ("getitem", "unbind"):
        return True
    if y is None:
        return True  # sizes, shapes and Python numbers carry no gradient path
    if y.dim() == x.dim() and all(b == a or a == 1 for a, b in zip(x.shape, y.shape)):
        return True  # the same shape, or broadcast along axes of size one
    spatial = rank - 2
    return name in VIEWS and y.dim() >= spatial and tuple(y.shape[-spatial:]) == tuple(x.shape[-spatial:])


def _spatial_operand(args: tuple, kwargs: dict, rank: int) -> torch.Tensor | None:
    """Return the first differentiated floating tensor of at least `rank` axes with a spatial extent, or None."""
    values = [*args, *kwargs.values()]
    flat = [v for value in values for v in (value if isinstance(value, (list, tuple)) else (value,))]
    for value in flat:
        if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad
                and value.dim() >= rank and math.prod(value.shape[value.dim() - (rank - 2):]) > 1):
            return value
    return None


def _first_tensor(result: Any) -> torch.Tensor | None:
    """Return the result itself when it is a tensor, else its first tensor element, else None."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (list, tuple)):
        return next((r for r in result if isinstance(r, torch.Tensor)), None)
    return None


def _negative(value: Any) -> bool:
    """Tell whether an index or start counts from the end."""
    return isinstance(value, int) and value < 0


def _indexes_from_end(args: tuple, x: torch.Tensor, rank: int) -> bool:
    """Tell whether `x[index]` addresses a spatial axis from its end, or with tensors, or shifts axes with None."""
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    if any(isinstance(p, torch.Tensor) or p is None for p in parts):
        return True
    if Ellipsis in parts:
        at = parts.index(Ellipsis)
        parts = (*parts[:at], *[slice(None)] * (x.dim() - len(parts) + 1), *parts[at + 1:])
    first_spatial = x.dim() - (rank - 2)
    for axis, part in enumerate(parts):
        if axis < first_spatial:
            continue
        if _negative(part) or (isinstance(part, slice) and _negative(part.start)):
            return True
    return False


def _dim_of(args: tuple, kwargs: dict) -> int:
    """Return the `dim` argument of cat/chunk-like ops (0 when not given)."""
    if "dim" in kwargs:
        return int(kwargs["dim"])
    extra = [a for a in args[1:] if isinstance(a, int) and not isinstance(a, bool)]
    return extra[-1] if extra else 0


def _along_space(dim: int, ndim: int) -> bool:
    """Tell whether a dim (possibly negative) is one of the trailing spatial axes (from axis 2 on)."""
    return dim % ndim >= 2 if ndim else False


def _one_cell(output_size: Any) -> bool:
    """Tell whether an adaptive pool's output size is one cell on every axis (None keeps an axis as it is)."""
    sizes = output_size if isinstance(output_size, (list, tuple)) else (output_size,)
    return all(s in (1, None) for s in sizes)


def _sized_resample(name: str, args: tuple, kwargs: dict) -> bool:
    """Tell whether a resampling is given an output size (or recomputes its scale from one)."""
    if name == "interpolate":
        size = args[1] if len(args) > 1 else kwargs.get("size")
        recompute = args[5] if len(args) > 5 else kwargs.get("recompute_scale_factor")
        return size is not None or bool(recompute)
    size = args[1] if len(args) > 1 else kwargs.get("output_size", kwargs.get("size"))
    return size is not None
