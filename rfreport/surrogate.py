"""The structural surrogate: a positive, linearised float64 copy of a model.

Structural mode must report the theoretical receptive field whatever the weights and the
input. The naive one-hot gradient under-reports wherever the derivative is exactly zero
(max-pooling routes it to the argmax, dead ReLUs, saturated clamps, zero-initialised
branches, float32 underflow). The surrogate removes every such zero:

* weights are random positive values normalised so activations stay O(1), biases are zero,
  normalisation statistics neutral, in float64 and eval mode, so every path carries a
  strictly positive product and no cancellation or underflow happens;
* during the pass, :class:`StructuralMode` swaps argmax-like and saturating operations for
  operations of the same window (max-pool to a mean over the same window, with the same
  kernel, stride, padding, dilation and ceil_mode; adaptive max to adaptive mean; ReLU-like
  and clamping functions to the identity), catching ``nn`` modules and functional calls
  alike because both end in the same torch functions.

The same mode records the non-zero padding modes it sees (circular, reflect, replicate,
and ``roll``) so the analysis can explain wrap-around and mirrored borders, and in *local*
mode it holds global-context paths constant (spatial reductions, adaptive pooling to one
cell, normalisation statistics) to expose the local receptive field under them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from rfreport.sizedep import size_dependent

IDENTITY_FUNCTIONS = frozenset({
    "relu", "relu6", "hardtanh", "leaky_relu", "rrelu", "elu", "selu", "celu", "gelu", "silu",
    "mish", "softplus", "hardswish", "hardsigmoid", "sigmoid", "tanh", "logsigmoid", "threshold",
    "softshrink", "hardshrink", "prelu", "clamp", "clip", "clamp_min", "clamp_max",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "feature_dropout", "round", "floor", "ceil", "trunc", "sign",
})
REDUCTIONS = frozenset({
    "mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "norm",
    "logsumexp", "nansum", "nanmean", "median", "nanmedian",
})
NORMALISATIONS = frozenset({"group_norm", "layer_norm", "instance_norm", "batch_norm", "rms_norm"})
WRAPPING = frozenset({"roll"})
NONLOCAL = frozenset({
    "flip", "fliplr", "flipud", "rot90", "roll", "gather", "index_select", "take", "take_along_dim", "scatter",
    "scatter_add", "scatter_reduce", "index_put", "index_add", "index_copy", "matmul", "bmm", "baddbmm", "einsum",
    "scaled_dot_product_attention", "multi_head_attention_forward", "grid_sample", "fft_fftn", "fft_rfftn",
    "fft_fft2", "fft_rfft2",
})
SIGNED = frozenset({
    "sub", "rsub", "isub", "neg", "softmax", "log_softmax", "softmin", "group_norm", "layer_norm",
    "instance_norm", "rms_norm", "var", "std", "var_mean", "std_mean", "cos", "sin", "reciprocal", "rsqrt",
    "cosine_similarity", "normalize", "scaled_dot_product_attention", "multi_head_attention_forward",
})


def base_name(func: Callable) -> str:
    """Return a torch function's name without leading underscores or in-place/indices suffixes."""
    name = getattr(func, "__name__", "").strip("_")
    return name.removesuffix("_with_indices")


def _is_differentiable(value: Any) -> bool:
    """Tell whether a value is a floating tensor on the differentiated path."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad


def _ntuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """Broadcast an int or a sequence to an n-tuple of ints."""
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * n


def pool_output_length(length: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Return max_pool's output length on one axis, with PyTorch's ceil_mode rule."""
    span = length + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= length + p:
        out -= 1
    return out


def window_mean(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                ceil_mode: bool = False) -> torch.Tensor:
    """Average over exactly the windows a max-pool with these arguments would take a max over."""
    rank = x.dim() - 2
    k = _ntuple(kernel_size, rank)
    s = _ntuple(stride if stride not in (None, []) else kernel_size, rank)
    p, d = _ntuple(padding, rank), _ntuple(dilation, rank)
    sizes = x.shape[2:]
    outs = [pool_output_length(n, *args, ceil_mode) for n, *args in zip(sizes, k, s, p, d)]
    right = [max(p_i, (o - 1) * s_i + d_i * (k_i - 1) + 1 - n - p_i)
             for n, o, k_i, s_i, p_i, d_i in zip(sizes, outs, k, s, p, d)]
    pads = [v for pair in reversed(list(zip(p, right))) for v in pair]
    padded = F.pad(x, pads)
    channels = x.shape[1]
    weight = torch.full((channels, 1, *k), 1.0 / math.prod(k), dtype=x.dtype, device=x.device)
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    y = conv(padded, weight, stride=s, dilation=d, groups=channels)
    return y[(Ellipsis, *(slice(0, o) for o in outs))]


def _max_pool(func, args, kwargs):
    """Replace a max-pool by the window mean, keeping the real indices when they are asked for."""
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    bound = dict(zip(names, args)) | kwargs
    x = bound.pop("input")
    wants_indices = bound.pop("return_indices", False) or func.__name__.endswith("_with_indices")
    mean = window_mean(x, **bound)
    if not wants_indices:
        return mean
    _, indices = func(x.detach(), *args[1:], **kwargs)
    return mean, indices


def _adaptive_max_pool(func, args, kwargs):
    """Replace an adaptive max-pool by the adaptive mean over the same bins."""
    x, output_size = args[0], args[1] if len(args) > 1 else kwargs["output_size"]
    rank = x.dim() - 2
    mean = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[rank - 1](x, output_size)
    wants_indices = (len(args) > 2 and args[2]) or kwargs.get("return_indices") or func.__name__.endswith(
        "_with_indices")
    if not wants_indices:
        return mean
    _, indices = func(x.detach(), *args[1:], **kwargs)
    return mean, indices


def _reduced_dims(args, kwargs, rank: int) -> tuple[int, ...] | None:
    """Return the normalised dims a reduction runs over, or None for a reduction over everything."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
    if dim is None or isinstance(dim, str):
        return None
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    return tuple(int(d) % rank for d in dims) if rank else ()


def _mean_reduction(func, args, kwargs):
    """Replace a max/min-like reduction by the mean over the same dims, keeping real indices."""
    x = args[0]
    dims = _reduced_dims(args, kwargs, x.dim())
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    mean = x.mean() if dims is None else x.mean(dim=dims, keepdim=bool(keepdim))
    name = base_name(func)
    if name in ("amax", "amin") or dims is None:
        return mean
    indices = func(x.detach(), *args[1:], **kwargs).indices
    return getattr(torch.return_types, name)((mean, indices))


class StructuralMode(TorchFunctionMode):
    """Swap zero-gradient operations for same-window linear ones and record padding modes.

    `linearise` turns on the surrogate replacements (structural mode); `local` additionally
    holds global-context paths constant; `input_rank` is the rank of the model input, used to
    tell spatial reductions from channel reductions.
    """

    def __init__(self, *, linearise: bool, local: bool = False, input_rank: int = 4):
        super().__init__()
        self.linearise, self.local, self.input_rank = linearise, local, input_rank
        self.padding_modes: set[str] = set()
        self.signed = False
        self.nonlocal_ops: set[str] = set()
        self.size_dependent_ops: set[str] = set()  # ops that make the geometry depend on the input size

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = base_name(func)
        self._observe(name, args, kwargs)
        result = NotImplemented
        if self.linearise and args and _is_differentiable(args[0]):
            result = self._linearised(func, name, args, kwargs)
        if result is NotImplemented:
            result = func(*args, **kwargs)
        result = self._held_if_global(name, args, kwargs, result)
        if size_dependent(name, args, kwargs, result, self.input_rank):
            self.size_dependent_ops.add(name)
        return _max_normalised(result) if self.linearise and not _in_place(func) else result

    def _observe(self, name: str, args, kwargs) -> None:
        """Record padding modes that make borders wrap or mirror, and ops that can cancel gradients."""
        if not self.signed and self._may_cancel(name, args, kwargs):
            self.signed = True
        if (name in NONLOCAL or (name == "getitem" and _indexes_with_tensors(args))) and any(
                _is_differentiable(v) for v in args):
            self.nonlocal_ops.add(name)
        if name == "pad":
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            if mode != "constant":
                self.padding_modes.add(mode)
        elif name in WRAPPING:
            self.padding_modes.add("circular")

    @staticmethod
    def _may_cancel(name: str, args, kwargs) -> bool:
        """Tell whether an op can mix gradient signs on the differentiated path.

        With positive weights and inputs every activation is positive and every path product
        too, so one probe is exact; a subtraction, a normalisation, a softmax, a division by
        a differentiated tensor or a negative constant breaks that, and then several probes
        are needed to make an accidental cancellation vanishingly unlikely.
        """
        values = [*args, *kwargs.values()]
        if not any(_is_differentiable(v) for v in values):
            return False
        if name in SIGNED:
            return True
        if name in ("div", "true_divide", "floor_divide", "idiv") and len(args) > 1 and _is_differentiable(args[1]):
            return True
        return any(_has_negative(v) for v in values)

    def _linearised(self, func, name: str, args, kwargs):
        """Return the linear same-window replacement of a zero-gradient op, or NotImplemented."""
        if name in IDENTITY_FUNCTIONS:
            return args[0]
        if name.startswith("max_pool") and name[-2:] in ("1d", "2d", "3d"):
            return _max_pool(func, args, kwargs)
        if name.startswith("adaptive_max_pool"):
            return _adaptive_max_pool(func, args, kwargs)
        if name in ("amax", "amin") or (name in ("max", "min") and not _second_is_tensor(args, kwargs)):
            return _mean_reduction(func, args, kwargs)
        if name in ("max", "min", "maximum", "minimum", "fmax", "fmin"):
            other = args[1] if len(args) > 1 else kwargs["other"]
            return (args[0] + other) / 2
        return NotImplemented

    def _held_if_global(self, name: str, args, kwargs, result):
        """In local mode, cut the gradient of results that pool over space (global context)."""
        if not (self.local and args and _is_differentiable(args[0])):
            return result
        x = args[0]
        if name in NORMALISATIONS and isinstance(result, torch.Tensor):
            return result.detach() + (x - x.detach())
        if name.startswith("adaptive_") and _pools_to_one_cell(result):
            return _detach_all(result)
        if name in REDUCTIONS and self._reduces_space(x, args, kwargs):
            return _detach_all(result)
        return result

    def _reduces_space(self, x: torch.Tensor, args, kwargs) -> bool:
        """Tell whether a reduction runs over a spatial axis (any axis from 2 on, or all)."""
        if x.dim() < 3:
            return False
        dims = _reduced_dims(args, kwargs, x.dim())
        return dims is None or any(d >= 2 for d in dims)


def _indexes_with_tensors(args) -> bool:
    """Tell advanced indexing (`x[idx]` with a tensor index), which can move values anywhere."""
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) for part in parts)


def _in_place(func: Callable) -> bool:
    """Tell in-place ops (`add_`, `__iadd__`), whose result must stay the mutated tensor itself."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")


def _max_normalised(result: Any) -> Any:
    """Scale a differentiable result so its largest magnitude is 1.

    A positive constant factor changes no receptive field, but without it residual sums
    double and gating products square the activations block after block until float64
    overflows (an EfficientNet's squeeze-and-excitation stages reach inf within a few blocks).
    """
    if not (_is_differentiable(result) and result.numel()):
        return result
    scale = result.detach().abs().amax()
    return result / torch.where(scale > 0, scale, torch.ones_like(scale))


def _has_negative(value: Any) -> bool:
    """Tell whether a constant operand (not differentiated) holds a negative number."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not value.requires_grad and value.numel() > 0 and bool(
            (value < 0).any())
    return isinstance(value, float) and value < 0


def _second_is_tensor(args, kwargs) -> bool:
    """Tell max(a, b) (elementwise) from max(a) / max(a, dim)."""
    other = args[1] if len(args) > 1 else kwargs.get("other")
    return isinstance(other, torch.Tensor)


def _pools_to_one_cell(result) -> bool:
    """Tell whether an adaptive pool's output has a single cell on every spatial axis."""
    first = result[0] if isinstance(result, tuple) else result
    return isinstance(first, torch.Tensor) and first.dim() > 2 and math.prod(first.shape[2:]) == 1


def _detach_all(result):
    """Detach a tensor or every tensor of a tuple-like result."""
    if isinstance(result, torch.Tensor):
        return result.detach()
    detached = [r.detach() if isinstance(r, torch.Tensor) else r for r in result]
    return type(result)(detached) if not hasattr(result, "_fields") else type(result)(*detached)


def _positive_weight(param: torch.Tensor, transposed: bool, generator: torch.Generator) -> torch.Tensor:
    """Draw positive weights whose fan-in sums to one, so activations stay O(1)."""
    values = torch.rand(param.shape, generator=generator, dtype=torch.float64) + 0.5
    fan_dims = [d for d in range(param.dim()) if d != (1 if transposed else 0)]
    return values / values.sum(dim=fan_dims, keepdim=True)


def _surrogate_parameter(name: str, param: torch.Tensor, transposed: bool,
                         generator: torch.Generator) -> torch.Tensor:
    """Return the surrogate value of one parameter: zero biases, positive weights and scales."""
    if name.endswith("bias"):
        return torch.zeros(param.shape, dtype=torch.float64)
    if param.dim() >= 2:
        return _positive_weight(param, transposed, generator)
    return torch.ones(param.shape, dtype=torch.float64)


def build_surrogate(model: nn.Module, seed: int) -> nn.Module:
    """Return a float64, eval-mode copy of the model with positive weights and neutral statistics."""
    surrogate = copy.deepcopy(model).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _neutralise(surrogate, generator)
    return surrogate


def _neutralise(surrogate: nn.Module, generator: torch.Generator) -> None:
    """Overwrite parameters and normalisation statistics in place with their surrogate values."""
    for module in surrogate.modules():
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        for name, param in module.named_parameters(recurse=False):
            param.requires_grad_(False)
            param.copy_(_surrogate_parameter(name, param, transposed, generator).to(param.device))
        for name, buffer in module.named_buffers(recurse=False):
            if name == "running_mean":
                buffer.zero_()
            elif name == "running_var":
                buffer.fill_(1.0)
