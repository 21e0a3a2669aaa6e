"""Global context: the operations on the path to the analysed output that pool over a whole feature map.

An RF can cover the whole input for two different reasons. *Saturation*: stacked local
windows grew larger than the input, which stops at a larger input. *Global context*: an
operation reads a whole feature map at once (global average or max pooling, a spatial mean
as in squeeze-and-excitation, group or instance normalisation, a layer norm over space), so
every output position depends on every input pixel at any input size. Data-dependent sampling
(`grid_sample`, `deform_conv2d`, the RoI ops with a grid, offsets or boxes computed from the input:
see sampling.py) is global context too: its sampling can reach any pixel.

:func:`global_ops` tells them apart by construction, not by RF size: one forward pass of the
structural surrogate records, per module, each such operation's result, and one backward pass
from the analysed output says which of them it depends on. Operations recognised are those on
tensors of the input's rank (N, C, *spatial); attention over flattened tokens is not one of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rfreport.compute import sampling
from rfreport.compute.engine import Target, check_input_shape, forward_target, resolve_device
from rfreport.compute.surrogate import (
    REDUCTIONS,
    StructuralMode,
    base_name,
    build_surrogate,
    eager_forward,
    is_differentiable,
    reduced_dims,
)
from rfreport.results import GlobalOp

SPATIAL_NORMS = frozenset({"group_norm", "instance_norm"})   # statistics over every spatial position
TRAILING_NORMS = frozenset({"layer_norm", "rms_norm"})       # over space when they normalise >= 2 trailing dims


def is_global_op(name: str, args: Sequence[Any], kwargs: dict, result: Any, input_rank: int) -> bool:
    """Tell whether a torch function call pools over every spatial position of an (N, C, *spatial) tensor."""
    x = args[0] if args else None
    if not is_differentiable(x):
        return False
    if name in sampling.SAMPLERS:
        return sampling.samples_from_input(name, args, kwargs)
    if x.dim() != input_rank or math.prod(x.shape[2:]) <= 1:
        return False
    if name in SPATIAL_NORMS:
        return True
    if name in TRAILING_NORMS:
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape", ())
        return len(shape) >= 2 if isinstance(shape, (list, tuple, torch.Size)) else False
    if name.startswith("adaptive_"):
        first = result[0] if isinstance(result, tuple) else result
        return isinstance(first, torch.Tensor) and first.dim() > 2 and math.prod(first.shape[2:]) == 1
    if name in REDUCTIONS:
        dims = reduced_dims(args, kwargs, x.dim())
        return dims is None or set(range(2, x.dim())) <= set(dims)
    return False


class _Recorder(StructuralMode):
    """The structural mode, also keeping the result of every global operation with the module it ran in."""

    def __init__(self, input_rank: int, modules: list[str]):
        super().__init__(linearise=True, input_rank=input_rank)
        self.modules = modules
        self.taps: list[tuple[GlobalOp, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs)
        name = base_name(func)
        if is_global_op(name, args, kwargs or {}, result, self.input_rank):
            first = result[0] if isinstance(result, tuple) else result
            if isinstance(first, torch.Tensor) and first.requires_grad:
                self.taps.append((GlobalOp(self.modules[-1] if self.modules else "", name), first))
        return result


@contextmanager
def _track_modules(model: nn.Module) -> Iterator[list[str]]:
    """Keep a stack of the qualified names of the modules running during the block."""
    stack: list[str] = []

    def leave(_module, _args, _output) -> None:
        if stack:
            stack.pop()

    handles = []
    for qualified, module in model.named_modules():
        if qualified:
            handles += [module.register_forward_pre_hook(lambda _m, _a, name=qualified: stack.append(name)),
                        module.register_forward_hook(leave)]
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def global_ops(model: nn.Module, input_shape: Sequence[int], *, target: Target | None = None,
               device: str | torch.device = "auto", seed: int = 0) -> tuple[GlobalOp, ...]:
    """Return the global operations the analysed output depends on, in forward order (empty: none)."""
    shape = check_input_shape(tuple(input_shape))
    where = resolve_device(device)
    surrogate = build_surrogate(model, seed).to(where)
    dtype = next((p.dtype for p in surrogate.parameters() if p.is_floating_point()), torch.float32)
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) + 0.5).to(where)
    with _track_modules(surrogate) as stack, torch.enable_grad(), eager_forward(), _Recorder(len(shape),
                                                                                           stack) as recorder:
        y = forward_target(surrogate, x.requires_grad_(True), target or Target(), shape, read_layout=False)
    if not recorder.taps or not y.requires_grad:
        return ()
    grads = torch.autograd.grad(y.sum(), [tap for _, tap in recorder.taps], allow_unused=True)
    return tuple(op for (op, _), grad in zip(recorder.taps, grads, strict=True)
                 if grad is not None and bool(grad.ne(0).any()))
