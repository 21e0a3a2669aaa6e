"""Data-dependent sampling: ops that read their input where another, input-derived tensor says.

`grid_sample` with a grid computed from the input (flow warping, spatial transformers),
torchvision's `deform_conv2d` with offsets or a mask predicted from the input, and the RoI ops
(`roi_align`, `roi_pool` and their position-sensitive forms) with input-derived boxes read, for
some weights and inputs, any pixel of their input: structurally every output depends on the
whole input, plus whatever the grid, offsets or boxes were computed from at that output. The
replacement is a mean over the whole input (per channel for `grid_sample`) broadcast to the op's
output, and the sampler's own dependency is carried alongside. A grid, offsets and mask that
are constants (fixed buffers or parameters) keep the op's own taps (see fixed_grid_sample).

global_context.py labels these ops like global pooling (summary `global_op`, `global_from`).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from rfreport.compute.replacements import bind
from rfreport.compute.taint import source

# Per op, the positions of the arguments that say where the input is read.
SAMPLERS = {"grid_sample": (1,), "deform_conv2d": (2, 3), "roi_align": (1,), "roi_pool": (1,),
            "ps_roi_align": (1,), "ps_roi_pool": (1,)}
TAP_TOLERANCE = 1e-4   # pixels: a sampling point this near a pixel centre also reads the neighbours across it
SAMPLER_NAMES = {"grid_sample": ("input", "grid"), "deform_conv2d": ("input", "weight", "offset", "mask")}


def _samplers(name: str, args: tuple, kwargs: dict) -> list[Any]:
    """Return the sampling arguments (grid, offsets and mask, boxes) of a call."""
    names = SAMPLER_NAMES.get(name, ())
    found = [args[i] if i < len(args) else kwargs.get(names[i] if i < len(names) else "")
             for i in SAMPLERS[name]]
    return [v for v in found if isinstance(v, torch.Tensor)]


def samples_from_input(name: str, args: tuple, kwargs: dict) -> bool:
    """Tell a sampling op whose grid, offsets, mask or boxes depend on the model input."""
    return name in SAMPLERS and any(source(t, floats=True) is not None for t in _samplers(name, args, kwargs))


def sampled(name: str, args: tuple, kwargs: dict, real: torch.Tensor, local: bool) -> torch.Tensor:
    """Return the replacement of a data-dependent sampling op: the mean over everything it could read.

    `real` is the op's own result (its shape, and its value where the input is a constant);
    `local` holds the whole-input part constant, as local sweeps hold global context.
    """
    x = args[0] if args else kwargs["input"]
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad):
        return real
    if name == "grid_sample":
        mean = x.mean(tuple(range(2, x.dim())), keepdim=True)
    elif name == "deform_conv2d":
        mean = x.mean(tuple(range(1, x.dim())), keepdim=True)
    else:
        mean = x.mean()
    whole = torch.broadcast_to(mean, real.shape)
    return whole.detach() if local else whole


def sampler_dependency(name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor | None:
    """Return, in the output's shape, what the grid, offsets, mask or boxes used at each output depend on."""
    parts = []
    for value in _samplers(name, args, kwargs):
        dep = source(value, floats=True)
        if dep is None:
            continue
        dep = torch.broadcast_to(dep, value.shape)
        if name == "grid_sample":        # (N, *out, d): one point per output position
            parts.append(dep.sum(-1).unsqueeze(1))
        elif name == "deform_conv2d":    # (N, 2 * groups * taps, Ho, Wo) or the mask (N, groups * taps, Ho, Wo)
            parts.append(dep.sum(1, keepdim=True) if dep.dim() == out.dim() else dep.mean())
        else:                            # boxes (K, 5): one box per output element along dim 0
            parts.append(dep.sum(-1).reshape(-1, *([1] * (out.dim() - 1))))
    present = [torch.broadcast_to(p, out.shape) for p in parts]
    return sum(present[1:], present[0]) if present else None


def fixed_grid_sample(func, args: tuple, kwargs: dict) -> torch.Tensor:
    """Run `grid_sample` with a constant grid as the mean over the grid shifted by +-TAP_TOLERANCE pixels per axis.

    A sampling point on a pixel centre gives its neighbour a bilinear weight of exactly zero, yet the same
    model in another precision puts it a hair off the centre (a float32 `theta` read in float64) and reads
    the neighbour: within the tolerance both are taps. Elsewhere the taps are exactly the op's own.
    """
    bound = bind(("input", "grid"), args, kwargs)
    x, grid = bound["input"], bound["grid"]
    rest = {k: v for k, v in kwargs.items() if k not in ("input", "grid")}
    axes = grid.shape[-1]
    step = grid.new_tensor([2 * TAP_TOLERANCE / x.shape[-1 - axis] for axis in range(axes)])
    shifted = [func(x, grid + step * grid.new_tensor(signs), *args[2:], **rest)
               for signs in itertools.product((-1.0, 1.0), repeat=axes)]
    return sum(shifted[1:], shifted[0]) / len(shifted)
