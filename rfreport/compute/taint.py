"""Dependencies that flow through values: the differentiable shadow of every integer or boolean tensor.

An integer or boolean tensor computed from the input (a comparison's mask, an argmax, a bucket
index, a cast) has no derivative, yet whatever it selects or gates depends on everything it was
computed from. In structural mode each such tensor carries a *shadow*: a floating tensor of its
shape, differentiable with respect to the model input, whose gradient support at every element is
exactly what that element was computed from. :func:`carried` maps the shadows (and, for integer
results, the differentiable floating operands) of an op's arguments to each of its results with
the op's own dependency structure:

* elementwise ops (comparisons, arithmetic, casts, `where`, `masked_fill`): the broadcast sum;
* shape and movement ops (views, permutes, slicing, `cat`, `flip`...): the op itself, run on the
  shadows;
* reductions and value-routing ops along a dim (`argmax`, `sort`, `topk`, `any`...): the mean
  over the dims they read;
* lookups (`one_hot`, `embedding`, indexing, `gather`, `index_select`, `take`): every result
  element carries its index element's shadow, plus whatever it could read from the table;
* `bucketize` and `searchsorted`: the value elementwise plus everything in the boundaries.

Factories (`zeros_like`, `new_ones`...) carry nothing: their values do not depend on their arguments'
values. Any other op reading a shadowed tensor makes each element of its result depend on everything
its shadowed arguments depend on: an over-estimate, never an under-estimate. Pure functions of
torch tensors, called by :class:`rfreport.compute.surrogate.StructuralMode` with the mode off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from rfreport.compute import replacements as rep
from rfreport.compute.replacements import bind

SHADOW = "_rfreport_shadow"

COMPARISONS = frozenset({"eq", "ne", "lt", "le", "gt", "ge", "greater", "greater_equal", "less", "less_equal",
                         "not_equal", "isnan", "isinf", "isfinite", "isposinf", "isneginf", "isclose", "signbit",
                         "logical_and", "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or",
                         "bitwise_xor", "bitwise_not", "and", "or", "xor", "invert", "rand", "ror", "rxor", "iand",
                         "ior", "ixor"})
CASTS = frozenset({"to", "type", "type_as", "float", "double", "half", "bfloat16", "long", "int", "short", "bool",
                   "byte", "char"})
ARITHMETIC = frozenset({"add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "div", "rdiv", "idiv",
                        "true_divide", "truediv", "rtruediv", "itruediv", "floor_divide", "floordiv",
                        "rfloordiv", "ifloordiv", "remainder", "mod", "rmod", "imod", "fmod", "neg", "pos", "abs",
                        "pow", "rpow", "ipow", "clamp", "clip", "clamp_min", "clamp_max", "maximum", "minimum",
                        "fmax", "fmin", "sign", "square", "floor", "ceil", "round", "trunc", "where",
                        "masked_fill", "clone", "contiguous", "detach", "lshift", "rshift", "exp", "log", "sqrt"})
ELEMENTWISE = COMPARISONS | CASTS | ARITHMETIC
MOVERS = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as",
                    "view_as", "reshape_as", "broadcast_to", "narrow", "select", "split", "chunk", "unbind",
                    "split_with_sizes", "tensor_split", "cat", "concat", "concatenate", "stack", "permute",
                    "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t", "flip", "fliplr", "flipud",
                    "roll", "repeat", "tile", "pad", "diagonal", "unfold"})
REDUCING = frozenset({"argmax", "argmin", "max", "min", "amax", "amin", "sum", "prod", "any", "all",
                      "count_nonzero", "mean", "nansum", "median", "nanmedian", "mode", "sort", "argsort", "msort",
                      "topk", "kthvalue", "logsumexp", "std", "var", "norm"})
CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"})
LOOKUPS = frozenset({"one_hot", "embedding", "getitem", "index", "gather", "take_along_dim", "take",
                     "index_select"})
SEARCHES = frozenset({"bucketize", "searchsorted"})
# Ops whose values do not depend on their arguments' values (only on shapes, dtypes, devices).
FACTORIES = frozenset({"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like",
                       "full_like", "empty_like", "rand_like", "randn_like", "randint_like", "size", "numel", "dim",
                       "shape", "stride", "element_size", "nelement"})
DIM_SIGNATURES = {"sort": ("input", "dim"), "argsort": ("input", "dim"), "topk": ("input", "k", "dim"),
                  "kthvalue": ("input", "k", "dim", "keepdim")}


def shadow(value: Any) -> torch.Tensor | None:
    """Return the shadow an integer or boolean tensor carries, or None."""
    return getattr(value, SHADOW, None) if isinstance(value, torch.Tensor) else None


def source(value: Any, floats: bool) -> torch.Tensor | None:
    """Return what a tensor argument depends on: its shadow, or (with `floats`) itself when differentiable."""
    found = shadow(value)
    if found is not None:
        return found
    if floats and isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad:
        return value
    return None


def shadowed(values: Any) -> bool:
    """Tell whether any tensor in a nest of arguments carries a shadow."""
    return any(shadow(t) is not None for t in tensors_of(values))


def carried(func: Callable, name: str, args: tuple, kwargs: dict, outputs: list[torch.Tensor],
            floats: bool) -> list[torch.Tensor | None]:
    """Return, per output, a floating tensor of its shape carrying what each element depends on through the
    arguments' shadows (and, with `floats`, their differentiable floating values); None where nothing."""
    if not outputs:
        return []
    deps = [d for d in (source(t, floats) for t in tensors_of((args, kwargs))) if d is not None]
    if not deps or name in FACTORIES:
        return [None] * len(outputs)
    try:
        mapped = _mapped(func, name, args, kwargs, outputs, floats)
    except (RuntimeError, TypeError, ValueError, IndexError):
        mapped = None
    if mapped is None or any(m is not None and tuple(m.shape) != tuple(o.shape) for m, o in zip(mapped, outputs)):
        whole = sum(d.mean() for d in deps)
        mapped = [whole.expand(o.shape) for o in outputs]
    return mapped


def _mapped(func, name: str, args: tuple, kwargs: dict, outputs: list[torch.Tensor], floats: bool):
    """Map the dependencies by the op's structure, or return None for an op of no known structure."""
    if name in SEARCHES:
        return [_searched(name, args, kwargs, outputs[0], floats)]
    if name in ("max", "min") and second_is_tensor(args, kwargs):
        name = "maximum"
    if name in ELEMENTWISE:
        return [_broadcast_sum([source(t, floats) for t in tensors_of((args, kwargs))], o) for o in outputs]
    if name in MOVERS:
        return _moved(func, args, kwargs, outputs, floats)
    if name in REDUCING or name in CUMULATIVE:
        dep = source(args[0], floats) if args else None
        return [None if dep is None else _reduced(name, args, kwargs, dep, o) for o in outputs]
    if name in LOOKUPS:
        return [_looked_up(func, name, args, kwargs, outputs[0], floats)]
    if name.startswith("max_unpool"):   # each cell lands anywhere in its window: spread the index's shadow there
        bound = bind(("input", "indices"), args, kwargs)
        dep = source(bound["indices"], floats)
        spread = None if dep is None else rep.max_unpool(func, name, (dep, *args[1:]), kwargs)
        return [_broadcast_sum([spread], outputs[0])]
    return None


def _broadcast_sum(deps: list[torch.Tensor | None], out: torch.Tensor) -> torch.Tensor | None:
    """Return the sum of the dependencies broadcast to an output's shape (None when there are none)."""
    present = [torch.broadcast_to(d, out.shape) for d in deps if d is not None]
    return sum(present[1:], present[0]) if present else None


def _as_dep(value: torch.Tensor, floats: bool, dtype: torch.dtype) -> torch.Tensor:
    """Return a tensor argument's dependency in its shape, or constant zeros where it has none."""
    dep = source(value, floats)
    if dep is None:
        return torch.zeros(value.shape, dtype=dtype, device=value.device)
    return torch.broadcast_to(dep, value.shape)


def _moved(func, args: tuple, kwargs: dict, outputs: list[torch.Tensor], floats: bool):
    """Run a shape or movement op on the dependencies of its data argument (a tensor or a list of them)."""
    deps = [d for d in (source(t, floats) for t in tensors_of(args[0])) if d is not None]
    if not deps:
        return [None] * len(outputs)
    moved = _nest_map(args[0], lambda t: _as_dep(t, floats, deps[0].dtype))
    return list(tensors_of(func(moved, *args[1:], **kwargs)))


def _reduced(name: str, args: tuple, kwargs: dict, dep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Return the mean of a dependency over the dims a reduction reads, in the output's shape."""
    x = args[0]
    dep = torch.broadcast_to(dep, x.shape)
    if name in CUMULATIVE:
        dim = int(bind(("input", "dim"), args, kwargs)["dim"]) % x.dim()
        return dep.cumsum(dim)
    dims = _reduced_dims(name, args, kwargs, x.dim())
    if dims is None:
        return dep.mean().expand(out.shape)
    mean = dep.mean(dims, keepdim=True) if dims else dep
    if out.dim() == mean.dim():
        return mean.expand(out.shape)
    return mean.reshape(out.shape)


def _reduced_dims(name: str, args: tuple, kwargs: dict, rank: int) -> tuple[int, ...] | None:
    """Return the normalised dims a reduction or routing op reads (None: every dim)."""
    if not rank:
        return ()
    if name == "msort":
        return (0,)
    if name in DIM_SIGNATURES:
        dim = bind(DIM_SIGNATURES[name], args, kwargs).get("dim", -1)
        return (int(dim) % rank,)
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
    if dim is None:
        return None
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    return tuple(int(d) % rank for d in dims)


def _searched(name: str, args: tuple, kwargs: dict, out: torch.Tensor, floats: bool) -> torch.Tensor | None:
    """Return bucketize/searchsorted dependencies: the value elementwise plus every boundary it is compared with."""
    names = ("input", "boundaries") if name == "bucketize" else ("sorted_sequence", "input")
    bound = bind(names, args, kwargs)
    values = bound.get("input", bound.get("self"))
    table = bound.get("boundaries", bound.get("sorted_sequence"))
    parts = [source(values, floats)]
    table_dep = source(table, floats)
    if table_dep is not None:
        parts.append(table_dep.mean() if table_dep.dim() <= 1 or name == "bucketize" else
                     torch.broadcast_to(table_dep, table.shape).mean(-1, keepdim=True))
    return _broadcast_sum(parts, out)


def _looked_up(func, name: str, args: tuple, kwargs: dict, out: torch.Tensor, floats: bool) -> torch.Tensor | None:
    """Return a lookup's dependencies: each element's index element, plus what it could read from the table."""
    if name == "one_hot":
        return _broadcast_sum([_index_dep(args[0], floats)], out)
    if name == "embedding":
        bound = bind(("input", "weight"), args, kwargs)
        table = source(bound["weight"], floats)
        rows = None if table is None else table.mean(0).expand(out.shape)
        return _broadcast_sum([_index_dep(bound["input"], floats), rows], out)
    if name in ("getitem", "index"):
        return _broadcast_sum([_indexed_table(func, name, args, kwargs, floats),
                               _index_positions(args[0], args[1], floats)], out)
    names = {"gather": ("input", "dim", "index"), "take_along_dim": ("input", "indices", "dim"),
             "take": ("input", "index"), "index_select": ("input", "dim", "index")}[name]
    bound = bind(names, args, kwargs)
    index = bound.get("index", bound.get("indices"))
    table = _indexed_table(func, name, args, kwargs, floats)
    if name == "index_select":
        dim = int(bound["dim"]) % max(out.dim(), 1)
        dep = source(index, floats)
        spread = None if dep is None else dep.reshape([-1 if a == dim else 1 for a in range(out.dim())])
        return _broadcast_sum([spread, table], out)
    return _broadcast_sum([source(index, floats), table], out)


def _index_dep(index: torch.Tensor, floats: bool) -> torch.Tensor | None:
    """Return an index's dependency with a trailing axis for what each index element looks up."""
    dep = source(index, floats)
    return None if dep is None else torch.broadcast_to(dep, index.shape).unsqueeze(-1)


def _indexed_table(func, name: str, args: tuple, kwargs: dict, floats: bool) -> torch.Tensor | None:
    """Return the table's dependency looked up: at the real indices when they are constants, over everything an
    input-derived index could address otherwise."""
    if not args:
        args, kwargs = (kwargs["input"],), {k: v for k, v in kwargs.items() if k != "input"}
    dep = source(args[0], floats)
    if dep is None:
        return None
    swapped = (torch.broadcast_to(dep, args[0].shape), *args[1:])
    if shadowed((args[1:], kwargs)):
        return rep.indexed(func, name, swapped, kwargs)
    return func(*swapped, **kwargs)


def _index_positions(table: torch.Tensor, index: Any, floats: bool) -> torch.Tensor | None:
    """Return, in the shape of `table[index]`, the dependency of the index element each result element used.

    The tensor indices broadcast to one shape B; each result element was addressed by one element of B.
    Indexing a stand-in table whose first tensor-indexed axis lists the summed shadows (flattened B)
    with `arange` over B in place of that index (zeros for the others) puts each one where it belongs.
    """
    parts = list(index) if isinstance(index, tuple) else [index]
    tensors = [p for p in parts if isinstance(p, torch.Tensor)]
    deps = [source(t, floats) for t in tensors]
    if not any(d is not None for d in deps):
        return None
    if any(t.dtype == torch.bool for t in tensors):
        raise TypeError("a boolean index selects a data-dependent number of elements")
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    summed = _broadcast_sum(deps, torch.empty(shape))
    if Ellipsis in parts:
        at = parts.index(Ellipsis)
        used = sum(0 if p is None else 1 for p in parts if p is not Ellipsis)
        parts[at:at + 1] = [slice(None)] * (table.dim() - used)
    axes, axis = [], 0
    for part in parts:
        if isinstance(part, torch.Tensor):
            axes.append(axis)
        axis += 0 if part is None else 1
    count = math.prod(shape)
    sizes = [count if a == axes[0] else 1 if a in axes else n for a, n in enumerate(table.shape)]
    stand_in = summed.reshape([-1 if a == axes[0] else 1 for a in range(table.dim())]).expand(sizes)
    first = torch.arange(count, device=summed.device).reshape(shape)
    rewritten, seen = [], False
    for part in parts:
        if isinstance(part, torch.Tensor):
            rewritten.append(torch.zeros(shape, dtype=torch.long, device=part.device) if seen else first)
            seen = True
        else:
            rewritten.append(part)
    return stand_in[tuple(rewritten)]


def second_is_tensor(args: tuple, kwargs: dict) -> bool:
    """Tell max(a, b) (elementwise) from max(a) / max(a, dim)."""
    other = args[1] if len(args) > 1 else kwargs.get("other")
    return isinstance(other, torch.Tensor)


def tensors_of(values: Any) -> Iterator[torch.Tensor]:
    """Yield every tensor in a nest of tuples, lists and dicts."""
    if isinstance(values, torch.Tensor):
        yield values
    elif isinstance(values, (list, tuple)):
        for value in values:
            yield from tensors_of(value)
    elif isinstance(values, dict):
        for value in values.values():
            yield from tensors_of(value)


def _nest_map(values: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply fn to a tensor or to every tensor of a list or tuple of them."""
    if isinstance(values, torch.Tensor):
        return fn(values)
    if isinstance(values, (list, tuple)):
        return type(values)(_nest_map(v, fn) for v in values)
    return values
