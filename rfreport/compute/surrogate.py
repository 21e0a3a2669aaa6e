"""The structural surrogate: a positive, linearised copy of a model, exact by construction.

Structural mode must report the theoretical receptive field whatever the weights and the
input. The naive one-hot gradient under-reports wherever a derivative is exactly zero
(max-pooling routes it to the argmax, dead ReLUs, saturated clamps, sorts and medians,
input-dependent gathers, zero-initialised branches) and wherever gradients cancel (the sum of
an all-ones cotangent over the channels of a CReLU or a softmax) or underflow over depth.
The surrogate removes every such zero:

* weights are random positive values normalised so activations stay O(1), biases are zero,
  normalisation statistics neutral, in eval mode (float32 by default, float64 on request);
* during the pass, :class:`StructuralMode` swaps every zero-gradient op for a linear op over
  exactly what its value can depend on (rfreport/replacements.py), catching ``nn`` modules and
  functional calls alike because both end in the same torch functions;
* after every op, the result passes through a *gate*: an identity in the forward pass (the
  value rescaled to a largest magnitude of 1, so residual sums and gates cannot overflow) whose
  backward replaces the incoming cotangent by ``(g != 0) * u``, with ``u`` a positive random
  tensor drawn in the forward pass. Every op therefore differentiates a fresh random positive
  cotangent: a dependency is lost only if one op's own vector-Jacobian product of a random
  positive vector is exactly zero (probability zero), never through cancellation between
  channels or across ops, and magnitudes are reset at every op, so nothing underflows over depth.
  Views and in-place results are left ungated, so writes through views keep their effect.

The same mode records the non-zero padding modes it sees (circular, reflect, replicate, and
``roll``), whether the pass is *local*: made only of ops that keep spatial positions in place
(what the compressed sweep needs to be exact), and in *local* mode it holds global-context
paths constant (spatial reductions, adaptive pooling to one cell, normalisation statistics) to
expose the local receptive field under them.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from rfreport.compute import replacements as rep
from rfreport.compute import sampling, taint
from rfreport.compute.replacements import bind
from rfreport.compute.sizedep import size_dependent
from rfreport.compute.taint import second_is_tensor, tensors_of
from rfreport.errors import GRADIENT_HINT, SweepError

T = TypeVar("T")
IDENTITY_FUNCTIONS = frozenset({
    "relu", "relu6", "hardtanh", "leaky_relu", "rrelu", "elu", "selu", "celu", "gelu", "silu",
    "mish", "softplus", "hardswish", "hardsigmoid", "sigmoid", "tanh", "logsigmoid", "threshold",
    "softshrink", "hardshrink", "prelu", "clamp", "clip", "clamp_min", "clamp_max",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "feature_dropout", "round", "floor", "ceil", "trunc", "sign", "frac", "fix", "nan_to_num",
})
REDUCTIONS = frozenset({
    "mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "norm",
    "logsumexp", "nansum", "nanmean", "median", "nanmedian", "prod",
})
NORMALISATIONS = frozenset({"group_norm", "layer_norm", "instance_norm", "batch_norm", "rms_norm"})
WRAPPING = frozenset({"roll"})
SIGNED = frozenset({
    "sub", "rsub", "isub", "neg", "softmax", "log_softmax", "softmin", "group_norm", "layer_norm",
    "instance_norm", "rms_norm", "var", "std", "var_mean", "std_mean", "cos", "sin", "reciprocal", "rsqrt",
    "cosine_similarity", "normalize", "scaled_dot_product_attention", "multi_head_attention_forward",
})
# Ops that keep every spatial position where it is (pointwise, windowed or reducing over whole axes).
# A pass made of these alone is translation-equivariant up to borders: the compressed sweep may trust
# a periodic prediction of its RFs. Shape, index, padding and concatenation ops are judged by the
# shapes they see (see StructuralMode._keeps_positions); anything else makes the pass non-local.
LOCAL_OPS = frozenset({
    *IDENTITY_FUNCTIONS, *REDUCTIONS, *NORMALISATIONS,
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "lp_pool1d",
    "lp_pool2d", "lp_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate", "upsample",
    "upsample_nearest", "upsample_bilinear", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "div", "rdiv", "idiv", "true_divide",
    "truediv", "rtruediv", "itruediv", "neg", "pos", "abs", "pow", "rpow", "ipow", "exp", "exp2", "expm1", "log",
    "log2", "log10", "log1p", "sqrt", "rsqrt", "reciprocal", "square", "sin", "cos", "erf", "erfc", "lerp",
    "addcmul", "addcdiv", "where", "maximum", "minimum", "fmax", "fmin", "softmax", "log_softmax", "softmin",
    "glu", "silu_", "hardswish_", "relu_", "cumsum", "logcumsumexp", "to", "type_as", "float", "double", "half",
    "bfloat16", "detach", "clone", "contiguous", "requires_grad_", "masked_fill", "dropout_", "copysign",
})
SHAPE_OPS = frozenset({
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "view_as",
    "reshape_as", "broadcast_to", "getitem", "narrow", "select", "split", "chunk", "unbind", "split_with_sizes",
    "tensor_split", "cat", "concat", "concatenate", "stack", "pad", "permute", "transpose", "movedim", "moveaxis",
    "swapaxes", "swapdims", "t",
})
# Ops whose vector-Jacobian product scales each element by itself (or only moves elements): nothing is
# summed inside them, so nothing can cancel there, and the gates of the summing ops around them keep
# magnitudes in range. They are left ungated, which halves the gates of a typical network. Replaced
# ops (ReLU -> identity, max -> mean) stay gated: the replacement changes their Jacobian's signs, and
# relu(h) + relu(-h) would otherwise cancel exactly.
POINTWISE = frozenset({
    "add", "radd", "sub", "rsub", "mul", "rmul", "div", "rdiv", "true_divide", "truediv", "rtruediv", "neg", "pos",
    "abs", "pow", "rpow", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "reciprocal",
    "square", "sin", "cos", "erf", "erfc", "where", "masked_fill", "batch_norm", "cat", "concat", "concatenate",
    "stack", "pad", "to", "type_as", "float", "double", "half", "bfloat16", "clone", "contiguous", "copysign",
    "addcmul", "addcdiv", "lerp",
})
PERMUTING = frozenset({"permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t"})


def base_name(func: Callable) -> str:
    """Return a torch function's name without leading underscores or in-place/indices suffixes."""
    name = getattr(func, "__name__", "").strip("_")
    return name.removesuffix("_with_indices")


def is_differentiable(value: Any) -> bool:
    """Tell whether a value is a floating tensor on the differentiated path."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad


def _is_tainted(value: Any) -> bool:
    """Tell an integer or boolean tensor computed from the input (an argmax, a mask, a sort order)."""
    return isinstance(value, torch.Tensor) and getattr(value, "_rfreport_from_input", False)


NOISE_POOL_MIN = 1 << 20     # values in the smallest pool of positive noise the gates slice from
NOISE_POOL_SEED = 0x5EED
_noise_pools: dict[tuple[torch.dtype, str], torch.Tensor] = {}


def positive_noise(shape: torch.Size, generator: torch.Generator | None, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """Return positive noise in [0.5, 1.5) of `shape`: a view into a shared random pool at a random offset.

    Drawing fresh random numbers for every gated activation cost as much as the gated op itself on
    a CPU; a slice costs nothing and saves no extra memory for the backward pass. The offset comes
    from `generator`, so passes stay reproducible; two gates share values only shifted by a random
    offset, and an exact cancellation would need the model's weights to follow that shift.
    """
    count = math.prod(shape)
    pool = _noise_pool(dtype, torch.device(device), 2 * count)
    start = int(torch.randint(pool.numel() - count + 1, (1,), generator=generator,
                              device=generator.device if generator is not None else "cpu"))
    return pool[start:start + count].view(shape)


def _noise_pool(dtype: torch.dtype, device: torch.device, size: int) -> torch.Tensor:
    """Return the process's pool of positive noise for a dtype and device, grown to at least `size` values."""
    key = (dtype, str(device))
    pool = _noise_pools.get(key)
    if pool is None or pool.numel() < size:
        length = max(NOISE_POOL_MIN, 1 << (size - 1).bit_length())
        generator = torch.Generator(device=device).manual_seed(NOISE_POOL_SEED)
        pool = torch.rand(length, generator=generator, dtype=dtype, device=device) + 0.5
        _noise_pools[key] = pool
    return pool


def _nonzero(grad: torch.Tensor) -> torch.Tensor:
    """Return 1.0 where `grad` is non-zero (NaN included), else 0.0, in grad's dtype: a fresh tensor.

    The comparison writes its floats straight into the fresh tensor: a quarter of the CPU time of
    writing booleans and promoting them (1M float32 entries, one thread: 0.7 ms against 3.8 ms).
    vmap (batched cotangent rows) has no batching rule for a comparison with `out=`: there it goes
    through booleans.
    """
    try:
        return torch.ne(grad, 0, out=torch.empty_like(grad))
    except RuntimeError:
        return grad.ne(0).to(grad.dtype)


class _Gate(torch.autograd.Function):
    """Identity up to a positive scale in the forward pass; backward sends `(g != 0) * u` on.

    `u` is a positive random tensor drawn in the forward pass, so the gate works unchanged under
    `is_grads_batched` (vmap): every row of cotangents gets the same fresh positive values wherever
    it is non-zero.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x / scale

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.set_materialize_grads(False)   # a gradient cut behind a captured layer (LayerEngine) stays free

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is None:
            return None, None, None
        (u,) = ctx.saved_tensors
        return _nonzero(grad).mul_(u), None, None


class _Identity(torch.autograd.Function):
    """Identity in the forward pass (a copy); subclasses say what the backward does with the cotangent."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class _Held(_Identity):
    """Backward passes no gradient to the non-finite elements (nan included)."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(torch.isfinite(inputs[0]))
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is None:
            return None
        (finite,) = ctx.saved_tensors
        return torch.where(finite, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


class _Cleaned(_Identity):
    """Backward turns nan cotangents into zeros.

    The inputs of an op that meets a non-finite value get one: its backward multiplies zero cotangents
    (held elements) by infinite partial derivatives (`x * inf`, a matmul with a `-inf` entry), and
    0 * inf is nan, which would spread to positions that never read the non-finite value.
    """

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is None:
            return None
        return torch.where(torch.isnan(grad), torch.zeros((), dtype=grad.dtype, device=grad.device), grad)


NONFINITE = "_rfreport_nonfinite"   # marks a surrogate activation holding nan or inf
PAST_GRID = "_rfreport_past_grid"   # the spatial axes on which a value reads through a kernel tap past the grid


def past_grid(value: Any) -> frozenset[int]:
    """Return the spatial axes on which a value of the pass was computed, here or upstream, through a kernel
    whose window at the centre is cut without showing it (see replacements.taps_past_grid): windows seen at this
    input size are narrower than the kernel there."""
    return getattr(value, PAST_GRID, frozenset())


def _mark_past_grid(result: Any, axes: frozenset[int], inputs: list[torch.Tensor]) -> Any:
    """Mark every tensor of a result with the past-grid axes of the op and of its inputs."""
    axes = axes.union(*map(past_grid, inputs))
    if axes:
        for tensor in tensors_of(result):
            setattr(tensor, PAST_GRID, axes)
    return result


class StructuralMode(TorchFunctionMode):
    """Swap zero-gradient operations for linear ones of the same reach, gate every result, observe the pass.

    `linearise` turns on the surrogate (structural mode: replacements and gates); `local` additionally
    holds global-context paths constant; `input_rank` is the rank of the model input, used to tell
    spatial reductions from channel reductions and spatial axes in shape ops; `generator` draws the
    gates' positive cotangents.
    """

    def __init__(self, *, linearise: bool, local: bool = False, input_rank: int = 4,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.linearise, self.local, self.input_rank = linearise, local, input_rank
        self.generator = generator
        self.padding_modes: set[str] = set()
        self.signed = False
        self.nonlocal_ops: set[str] = set()
        self.ops_seen: set[str] = set()
        self.size_dependent_ops: set[str] = set()  # ops that make the geometry depend on the input size
        self.nonfinite_ops: set[str] = set()  # ops whose results held non-finite values (see _held_if_nonfinite)
        self.unexplained_nonfinite: set[str] = set()  # such ops whose operands were all finite

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = base_name(func)
        inputs = list(tensors_of((args, kwargs)))
        differentiable = any(is_differentiable(t) for t in inputs)
        carrying = self.linearise and taint.shadowed(inputs)
        if differentiable:
            if name.startswith("quantize_per"):
                raise SweepError(f"the model quantizes its activations ({name}), and quantized tensors carry no "
                                 "gradient: analyse its float version (e.g. quantize=False), whose RFs are the same")
            self._observe(name, args, kwargs)
        nonfinite = self.linearise and differentiable and _meets_nonfinite(args, kwargs)
        if nonfinite:
            args, kwargs = _cleaned(args), _cleaned(kwargs)
        result = NotImplemented
        if self.linearise and (differentiable or carrying):
            # a replacement averages what it reads: one -inf there would make the whole window -inf
            replaced = (_finite_only(args), _finite_only(kwargs)) if nonfinite else (args, kwargs)
            result = self._linearised(func, name, *replaced, carrying)
        if result is NotImplemented:
            result = func(*args, **kwargs)
        if differentiable or any(map(_is_tainted, inputs)):
            _taint(result)
        if self.linearise and (differentiable or carrying):
            result = self._held_if_nonfinite(func, name, self._carried(func, name, args, kwargs, result, carrying),
                                             nonfinite)
        if not (differentiable or any(is_differentiable(t) for t in tensors_of(result))):
            return result
        if any(True for _ in tensors_of(result)):  # metadata queries (dim, size, shape) move nothing
            self._judge_locality(name, args, kwargs, result)
        result = self._held_if_global(name, args, kwargs, result)
        if size_dependent(name, args, kwargs, result, self.input_rank):
            self.size_dependent_ops.add(name)
        result = self._gated(func, result, inputs) if self._gates(name) else result
        return _mark_past_grid(result, rep.taps_past_grid(name, args, kwargs, result), inputs)

    def _carried(self, func: Callable, name: str, args, kwargs, result: Any, carrying: bool) -> Any:
        """Give integer and boolean results their shadows, and floating results computed from shadowed
        arguments the dependency those carry (see taint.py)."""
        outputs = list(tensors_of(result))
        ints = [t for t in outputs if not t.is_floating_point() and not t.is_complex()]
        values = outputs[0] if len(outputs) == 2 and is_differentiable(outputs[0]) else None
        if values is not None and ints and values.shape == ints[0].shape:   # (values, indices): the same reads
            deps: list = [values]
        else:
            deps = taint.carried(func, name, args, kwargs, ints, floats=True)
        for out, dep in zip(ints, deps):
            if dep is not None:
                setattr(out, taint.SHADOW, dep)
        floats = [t for t in outputs if t.is_floating_point()]
        if not (carrying and floats):
            return result
        carried = dict(zip(map(id, floats), taint.carried(func, name, args, kwargs, floats, floats=False)))
        return _map_tensors(result, lambda t: self._with_dependency(t, carried.get(id(t)), _in_place(func)))

    def _with_dependency(self, value: torch.Tensor, dep: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
        """Add to a floating value a term that is zero in the forward pass and whose backward sends a fresh
        positive cotangent to `dep` wherever the value's own cotangent is non-zero."""
        if dep is None or not dep.requires_grad:
            return value
        dep = torch.broadcast_to(dep.to(value.dtype), value.shape)
        u = positive_noise(dep.shape, self.generator, dep.dtype, dep.device)
        gated = _Gate.apply(dep, u, torch.ones((), dtype=dep.dtype, device=dep.device))
        term = gated - gated.detach()
        return value.add_(term) if in_place else value + term

    def _held_if_nonfinite(self, func: Callable, name: str, result: Any, met: bool) -> Any:
        """Hold the non-finite elements of floating results constant: no gradient passes through them.

        A `-inf` mask or a `nan` constant makes those elements non-finite in the model whatever the input:
        they depend on nothing. Their values are kept (a softmax over a partly `-inf` row must still ignore
        those entries), and the ops reading them clean the nan their backward makes (see _Cleaned). `met`
        tells whether the op read a non-finite operand; one made from finite values alone (an overflow, the
        square root of a value negative only in the surrogate) is recorded in `unexplained_nonfinite`.
        """
        def hold(value: torch.Tensor) -> torch.Tensor:
            if not is_differentiable(value) or _all_finite(value):
                return value
            (self.nonfinite_ops if met else self.unexplained_nonfinite).add(name)
            held = _Held.apply(value) if not _in_place(func) else value.copy_(_Held.apply(value.clone()))
            setattr(held, NONFINITE, True)
            return held

        return _map_tensors(result, hold)

    def _gates(self, name: str) -> bool:
        """Tell whether an op's result is gated: every op that sums over elements, so no dependency cancels or
        underflows (replaced ReLUs carry their own noise instead: see _linearised)."""
        return self.linearise and name not in POINTWISE and name not in IDENTITY_FUNCTIONS

    def _observe(self, name: str, args, kwargs) -> None:
        """Record padding modes that make borders wrap or mirror, and ops that can mix gradient signs."""
        self.ops_seen.add(name)
        if not self.signed and self._may_cancel(name, args, kwargs):
            self.signed = True
        if name == "pad":
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            if mode != "constant":
                self.padding_modes.add(mode)
        elif name in WRAPPING:
            self.padding_modes.add("circular")

    @staticmethod
    def _may_cancel(name: str, args, kwargs) -> bool:
        """Tell whether an op can mix gradient signs on the differentiated path.

        The gates make a single probe exact up to a probability-zero accident; when signs can
        mix, a second, independent probe makes even that accident need to happen twice.
        """
        values = [*args, *kwargs.values()]
        if name in SIGNED:
            return True
        if name in ("div", "true_divide", "floor_divide", "idiv") and len(args) > 1 and is_differentiable(args[1]):
            return True
        return any(_has_negative(v) for v in values)

    def _linearised(self, func, name: str, args, kwargs, carrying: bool = False):
        """Return the linear same-reach replacement of a zero-gradient op, or NotImplemented."""
        tainted = any(_is_tainted(t) for t in tensors_of((args[1:], kwargs)))
        if tainted and name in rep.SCATTERING:
            rep.refuse_scatter(name)
        if sampling.samples_from_input(name, args, kwargs):
            real = func(*args, **kwargs)
            value = sampling.sampled(name, args, kwargs, real, self.local)
            return self._with_dependency(value, sampling.sampler_dependency(name, args, kwargs, value))
        if name == "grid_sample":
            return sampling.fixed_grid_sample(func, args, kwargs)
        if carrying:
            replaced = self._gated_by_values(func, name, args, kwargs)
            if replaced is not NotImplemented:
                return replaced
        first = args[0] if args else next(iter(kwargs.values()), None)
        if not is_differentiable(first):
            return NotImplemented
        if name in IDENTITY_FUNCTIONS:
            # scaled by its own positive noise, so relu(h) and relu(-h) (or h - relu(h)) carry independent
            # cotangents and cannot cancel; cheaper than a gate, and nothing is summed here to underflow
            if _in_place(func):
                return first
            return first * positive_noise(first.shape, self.generator, first.dtype, first.device)
        if name == "batch_norm" and not bind(BATCH_NORM, args, kwargs).get("training", False):
            return _affine_batch_norm(**bind(BATCH_NORM, args, kwargs))
        if name.startswith("max_pool") and name[-2:] in ("1d", "2d", "3d"):
            return rep.max_pool(func, name, args, kwargs)
        if name.startswith("adaptive_max_pool"):
            return rep.adaptive_max_pool(func, name, args, kwargs)
        if name.startswith("fractional_max_pool"):
            return rep.fractional_max_pool(func, name, args, kwargs)
        if name.startswith("max_unpool"):
            return rep.max_unpool(func, name, args, kwargs)
        if name in rep.ROUTED_ALONG_DIM:
            return rep.routed(func, name, args, kwargs)
        if name in ("amax", "amin") or (name in ("max", "min") and not second_is_tensor(args, kwargs)):
            return _mean_reduction(func, args, kwargs)
        if name in ("max", "min", "maximum", "minimum", "fmax", "fmin"):
            other = args[1] if len(args) > 1 else kwargs["other"]
            return (args[0] + other) / 2
        if tainted and name in rep.INDEXED:
            return rep.indexed(func, name, args, kwargs)
        return NotImplemented

    def _gated_by_values(self, func, name: str, args, kwargs):
        """Replace a floating op whose integer or boolean operands come from the input by one of the same reach.

        Those operands gate or scale what they meet (`where`, `masked_fill`, `x * mask`): where they are zero
        the other operands' derivative is zero although, for another input, the value would read them. So
        `where` becomes the mean of its two branches, `masked_fill` its input, `embedding` the mean of its rows,
        and any other elementwise op sees positive noise in place of those operands; their own dependency is
        carried by their shadows (see _carried).
        """
        if name not in taint.ELEMENTWISE and name != "embedding":
            return NotImplemented
        if _in_place(func):   # the mutated tensor says the result's dtype; computing it first would mutate it
            if not args[0].is_floating_point():
                return NotImplemented
            if name == "masked_fill":
                return args[0]
            dtype = args[0].dtype
        else:
            real = func(*args, **kwargs)
            if not isinstance(real, torch.Tensor) or not real.is_floating_point():
                return real
            dtype = real.dtype
            if name == "where" and taint.shadowed(args[:1]):
                bound = bind(("condition", "input", "other"), args, kwargs)
                mean = (_zero_if_nonfinite(bound["input"]) + _zero_if_nonfinite(bound["other"])) / 2
                return torch.broadcast_to(torch.as_tensor(mean, dtype=dtype, device=real.device), real.shape)
            if name == "masked_fill" and taint.shadowed((args[1:], kwargs)):
                return args[0].clone()
            if name == "embedding":
                weight = bind(("input", "weight"), args, kwargs)["weight"]
                return weight.mean(0).expand(real.shape) if is_differentiable(weight) else real

        def noise(value):
            if isinstance(value, torch.Tensor) and not value.is_floating_point() and taint.shadow(value) is not None:
                return positive_noise(value.shape, self.generator, dtype, value.device)
            return value

        return func(*[noise(a) for a in args], **{k: noise(v) for k, v in kwargs.items()})

    def _judge_locality(self, name: str, args, kwargs, result) -> None:
        """Mark the pass non-local when an op can move spatial positions (see LOCAL_OPS)."""
        if name in LOCAL_OPS:
            return
        if name in SHAPE_OPS and self._keeps_positions(name, args, kwargs, result):
            return
        if all(_positionless(t, self.input_rank) for t in tensors_of((args, kwargs, result))
               if t.is_floating_point()):
            return
        self.nonlocal_ops.add(name)

    def _keeps_positions(self, name: str, args, kwargs, result) -> bool:
        """Tell a shape op that leaves the spatial axes untouched (it only regroups batch or channels)."""
        spatial = self.input_rank - 2
        if name == "pad" and kwargs.get("mode", args[2] if len(args) > 2 else "constant") != "constant":
            return True  # a border condition (wrap, mirror, repeat) the compressed sweep's prediction models
        shapes = [tuple(t.shape) for t in tensors_of((args, kwargs, result)) if t.is_floating_point()]
        if any(len(s) < spatial + 2 for s in shapes) or len({s[-spatial:] for s in shapes}) != 1:
            return False
        if name in PERMUTING:
            return _permutation_keeps_tail(name, args, kwargs, spatial)
        return True

    def _held_if_global(self, name: str, args, kwargs, result):
        """In local mode, cut the gradient of results that pool over space (global context)."""
        if not (self.local and args and is_differentiable(args[0])):
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
        dims = reduced_dims(args, kwargs, x.dim())
        return dims is None or any(d >= 2 for d in dims)

    def _gated(self, func: Callable, result: Any, inputs: list[torch.Tensor]) -> Any:
        """Gate every new differentiable result; views of inputs and in-place results stay as they are."""
        if _in_place(func):
            return result
        owners = {id(t) for t in inputs} | {id(t._base) for t in inputs if t._base is not None}

        def gate(value: torch.Tensor) -> torch.Tensor:
            if not is_differentiable(value) or not value.numel() or id(value) in owners or (
                    value._base is not None and id(value._base) in owners):
                return value
            u = positive_noise(value.shape, self.generator, value.dtype, value.device)
            nonfinite = _marked(value)
            low, high = torch.aminmax(value.detach().nan_to_num(0.0, 0.0, 0.0) if nonfinite else value.detach())
            scale = torch.maximum(high, -low)
            gated = _Gate.apply(value, u, torch.where(scale > 0, scale, torch.ones_like(scale)))
            if nonfinite:
                setattr(gated, NONFINITE, True)
            return gated

        return _map_tensors(result, gate)


BATCH_NORM = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _affine_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                       eps=1e-5):
    """Evaluate an eval-mode batch norm as the per-channel affine map it is (a cheaper backward)."""
    shape = (1, -1, *([1] * (input.dim() - 2)))
    scale = torch.rsqrt(running_var + eps) * (weight if weight is not None else 1)
    shift = (bias if bias is not None else 0) - running_mean * scale
    return input * scale.view(shape) + shift.view(shape) if torch.is_tensor(shift) else input * scale.view(shape)


def _taint(result: Any) -> None:
    """Mark the integer and boolean tensors of a result as computed from the input."""
    for tensor in tensors_of(result):
        if not tensor.is_floating_point() and not tensor.is_complex():
            tensor._rfreport_from_input = True


def _zero_if_nonfinite(value: Any) -> Any:
    """Return a number or tensor with nan and inf replaced by zeros (a `where` branch that is `-inf` reads nothing)."""
    if isinstance(value, torch.Tensor):
        return torch.where(torch.isfinite(value), value, torch.zeros((), dtype=value.dtype, device=value.device))
    return value if math.isfinite(value) else 0.0


def _all_finite(value: torch.Tensor) -> bool:
    """Tell a tensor free of nan and inf: its sum is finite (one pass, no mask), or else every element is."""
    return bool(torch.isfinite(value.detach().sum())) or bool(torch.isfinite(value).all())


def _marked(value: Any) -> bool:
    """Tell a surrogate activation (or a view of one) marked as holding nan or inf."""
    return isinstance(value, torch.Tensor) and (getattr(value, NONFINITE, False) or (
        value._base is not None and getattr(value._base, NONFINITE, False)))


def _meets_nonfinite(args, kwargs) -> bool:
    """Tell an op whose operands hold nan or inf: a marked activation, a constant tensor or a Python number."""
    for value in [*args, *kwargs.values()]:
        if isinstance(value, float) and not math.isfinite(value):
            return True
        for tensor in tensors_of(value):
            if _marked(tensor) or (tensor.is_floating_point() and not tensor.requires_grad and not isinstance(
                    tensor, nn.Parameter) and tensor.numel() and not _all_finite(tensor)):
                return True
    return False


def _cleaned(values: Any) -> Any:
    """Pass every differentiable tensor of a nest of arguments through _Cleaned."""
    if is_differentiable(values):
        return _Cleaned.apply(values)
    if isinstance(values, (list, tuple)) and not hasattr(values, "_fields"):
        return type(values)(_cleaned(v) for v in values)
    if isinstance(values, dict):
        return {k: _cleaned(v) for k, v in values.items()}
    return values


def _finite_only(values: Any) -> Any:
    """Replace the nan and inf of every marked activation in a nest of arguments by zeros that pass no gradient."""
    if _marked(values):
        return torch.where(torch.isfinite(values), values, torch.zeros((), dtype=values.dtype, device=values.device))
    if isinstance(values, (list, tuple)) and not hasattr(values, "_fields"):
        return type(values)(_finite_only(v) for v in values)
    if isinstance(values, dict):
        return {k: _finite_only(v) for k, v in values.items()}
    return values


def _map_tensors(result: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply fn to a tensor or to every tensor of a tuple, list or named tuple result."""
    if isinstance(result, torch.Tensor):
        return fn(result)
    if isinstance(result, (tuple, list)):
        mapped = [fn(r) if isinstance(r, torch.Tensor) else r for r in result]
        if hasattr(result, "_fields"):
            return type(result)(*mapped)
        try:
            return type(result)(mapped)
        except TypeError:
            return tuple(mapped)
    return result


def _positionless(tensor: torch.Tensor, input_rank: int) -> bool:
    """Tell a tensor with no spatial extent left: (N, C) or (N, C, 1, ..., 1)."""
    return tensor.dim() <= 2 or math.prod(tensor.shape[2:]) == 1


def _permutation_keeps_tail(name: str, args, kwargs, spatial: int) -> bool:
    """Tell whether a permute/transpose/movedim leaves the last `spatial` axes where they are."""
    x = args[0]
    rank = x.dim()
    order = list(range(rank))
    if name == "permute":
        dims = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
        order = [int(d) % rank for d in kwargs.get("dims", dims)]
    elif name == "t":
        order = order[::-1]
    else:
        first, second = (args[1], args[2]) if len(args) > 2 else (kwargs.get("dim0", kwargs.get("source")),
                                                                  kwargs.get("dim1", kwargs.get("destination")))
        if isinstance(first, (list, tuple)):
            return False
        first, second = int(first) % rank, int(second) % rank
        if name in ("movedim", "moveaxis"):
            order.insert(second, order.pop(first))
        else:
            order[first], order[second] = order[second], order[first]
    return order[rank - spatial:] == list(range(rank - spatial, rank))


def reduced_dims(args, kwargs, rank: int) -> tuple[int, ...] | None:
    """Return the normalised dims a reduction runs over, or None for a reduction over everything."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
    if dim is None or isinstance(dim, str):
        return None
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    return tuple(int(d) % rank for d in dims) if rank else ()


def _mean_reduction(func, args, kwargs):
    """Replace a max/min-like reduction by the mean over the same dims, keeping real indices."""
    x = args[0]
    dims = reduced_dims(args, kwargs, x.dim())
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    mean = x.mean() if dims is None else x.mean(dim=dims, keepdim=bool(keepdim))
    name = base_name(func)
    if name in ("amax", "amin") or dims is None:
        return mean
    indices = func(x.detach(), *args[1:], **kwargs).indices
    return getattr(torch.return_types, name)((mean, indices))


def _in_place(func: Callable) -> bool:
    """Tell in-place ops (`add_`, `__iadd__`, `__setitem__`), whose result is the mutated tensor itself."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__"


def _has_negative(value: Any) -> bool:
    """Tell whether a constant operand (not differentiated) holds a negative number."""
    if isinstance(value, nn.Parameter):
        return False  # the surrogate's own parameters: positive or zero by construction
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not value.requires_grad and value.numel() > 0 and bool(
            (value < 0).any())
    return isinstance(value, float) and value < 0


def _pools_to_one_cell(result) -> bool:
    """Tell whether an adaptive pool's output has a single cell on every spatial axis."""
    first = result[0] if isinstance(result, tuple) else result
    return isinstance(first, torch.Tensor) and first.dim() > 2 and math.prod(first.shape[2:]) == 1


def _detach_all(result):
    """Detach a tensor or every tensor of a tuple-like result."""
    return _map_tensors(result, lambda t: t.detach())


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """Replace every `torch.compile`d module (an OptimizedModule) of a model copy by its original module."""
    model = getattr(model, "_orig_mod", model)
    for name, child in list(model.named_children()):
        setattr(model, name, unwrap_compiled(child))
    return model


MODULE_STATE = frozenset(vars(nn.Module()))   # nn.Module's own bookkeeping: parameters, buffers, hooks, flags


def own_attributes(module: nn.Module) -> dict[str, Any]:
    """Return the attributes a module's class set (not nn.Module's bookkeeping: parameters, buffers, submodules,
    hooks and flags live there)."""
    return {key: value for key, value in vars(module).items() if key not in MODULE_STATE}


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore train/eval flags, requires_grad flags, buffers and the modules' own attributes on exit, even
    after an error.

    Buffers matter in gradient mode: a train-mode BatchNorm updates its running statistics on
    every forward pass of the model as given. Attributes matter to every pass: a module that caches
    what it computes from its parameters (LeViT's attention biases, in a dict filled by an eval-mode
    forward) would keep a tensor of this pass's autograd graph, which holds the graph's memory and
    which no deep copy of the model (the surrogate) can take. Hooks are not touched here: whoever
    registers one keeps its handle and removes it (the engine on exit, the others in a `finally`).
    """
    training = {m: m.training for m in model.modules()}
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    grads = {p: p.requires_grad for p in model.parameters()}
    attributes = [(m, _own_attributes(m)) for m in model.modules() if not isinstance(m, torch.jit.ScriptModule)]
    try:
        yield
    finally:
        for module, flag in training.items():
            module.training = flag
        for param, flag in grads.items():
            param.requires_grad_(flag)
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
        for module, kept in attributes:
            _restore_attributes(module, kept)


def _own_attributes(module: nn.Module) -> dict[str, tuple[Any, Any]]:
    """Return a module's own attributes (not nn.Module's bookkeeping) as (object, contents of a dict or list)."""
    return {key: (value, dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else None)
            for key, value in own_attributes(module).items()}


def _restore_attributes(module: nn.Module, kept: dict[str, tuple[Any, Any]]) -> None:
    """Put a module's own attributes back as `_own_attributes` found them: set what a pass rebound, refill the
    dicts and lists it filled (in place: the same objects), drop what it added."""
    for key in [k for k in own_attributes(module) if k not in kept]:
        delattr(module, key)
    for key, (value, contents) in kept.items():
        if vars(module).get(key) is not value:
            object.__setattr__(module, key, value)
        if isinstance(value, dict):
            value.clear()
            value.update(contents)
        elif isinstance(value, list):
            value[:] = contents


def deep_copy(model: nn.Module, memo: dict[int, Any] | None = None,
              stand_in: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.detach().clone()) -> nn.Module:
    """Return a deep copy of a model (`memo`: stand-ins already chosen, by the id of what they replace).

    A tensor of an autograd graph held beside the parameters and buffers (a cache an earlier forward pass
    with gradients filled, `torch.nn.utils.weight_norm`'s `weight`) is copied as `stand_in` makes it,
    detached by default: torch deep-copies graph leaves only.
    """
    chosen = dict(memo or {})
    for module in model.modules():
        chosen.update((id(t), stand_in(t)) for t in tensors_of(list(own_attributes(module).values()))
                      if t.grad_fn is not None and id(t) not in chosen)
    return copy.deepcopy(model, chosen)


def refuse_torchscript(model: nn.Module) -> None:
    """Refuse scripted or traced modules: their ops run in TorchScript, out of the surrogate's reach."""
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            where = f"submodule {name!r}" if name else "the model"
            raise SweepError(f"{where} is a TorchScript module (torch.jit.script/trace): structural mode cannot "
                             "see its ops; pass the original nn.Module (before scripting), or use "
                             f"{GRADIENT_HINT}")


@contextmanager
def eager_forward() -> Iterator[None]:
    """Run compiled functions eagerly and checkpointed blocks as plain calls during a forward pass.

    `torch.compile` would trace past the TorchFunctionMode, and activation checkpointing would
    recompute the block in backward outside it; both would hide ops from the surrogate.
    """
    import torch.utils.checkpoint as checkpointing

    with ExitStack() as stack:
        if dynamo_loaded():
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        else:   # nothing is compiled yet (torch.compile loads dynamo); what the pass compiles runs eagerly
            stack.callback(setattr, torch, "compile", torch.compile)
            torch.compile = _eager_compile
        original = checkpointing._checkpoint_impl
        checkpointing._checkpoint_impl = lambda function, args, kwargs, **_options: function(*args, **kwargs)
        stack.callback(setattr, checkpointing, "_checkpoint_impl", original)
        yield


def dynamo_loaded() -> bool:
    """Tell whether torch.compile's machinery is loaded (importing it costs as much CPU as importing torch)."""
    return "torch._dynamo" in sys.modules


def _eager_compile(model: Any = None, **_options: Any) -> Any:
    """Stand in for torch.compile under force_eager: the function or module itself (as a decorator too)."""
    return model if model is not None else (lambda function: function)


def _write_surrogate_parameter(name: str, param: torch.Tensor, transposed: bool, generator: torch.Generator) -> None:
    """Overwrite one parameter with its surrogate value: zero biases, ones for scales, and positive weights
    (noise in [0.5, 1.5) over the fan-in), so every fan-in sums to about one and activations stay O(1)."""
    if name.endswith("bias"):
        param.zero_()
    elif param.dim() >= 2:
        fan_in = param.numel() // param.shape[1 if transposed else 0]
        # slices of at most NOISE_POOL_MIN values: a 100M-weight classifier would otherwise grow the pool to 1 GB
        flat = param if param.is_contiguous() else torch.empty_like(param, memory_format=torch.contiguous_format)
        for part in flat.view(-1).split(NOISE_POOL_MIN):
            torch.div(positive_noise(part.shape, generator, param.dtype, param.device), fan_in, out=part)
        if flat is not param:   # a channels-last weight: no flat view of it exists
            param.copy_(flat)
    else:
        param.fill_(1.0)


_reused: ContextVar[dict | None] = ContextVar("rfreport_reused_surrogates", default=None)


@contextmanager
def surrogates_reused() -> Iterator[None]:
    """Build each model's surrogate once during the block (per seed and dtype), not once per pass, and
    likewise what else a pass derives from the model alone (`reused`: the verification's reads).

    For a caller that owns its model for the block and never changes it (the pipeline, for one job):
    a job runs ten or more passes on the same model, and copying it each time was a tenth of the
    job. Passes leave the shared surrogate as they found it (engines remove their hooks).
    """
    token = _reused.set({})
    try:
        yield
    finally:
        _reused.reset(token)


def build_surrogate(model: nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Return an eval-mode copy of the model in `dtype` with positive weights and neutral statistics.

    Compiled submodules are replaced by their original modules; TorchScript modules are refused.
    Inside `surrogates_reused`, the copy is built once per model, seed and dtype.
    """
    return reused(model, ("surrogate", seed, dtype), lambda: _built_surrogate(model, seed, dtype))


def _built_surrogate(model: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    """Build a model's surrogate (see build_surrogate), never memoized."""
    refuse_torchscript(model)
    surrogate = unwrap_compiled(deep_copy(getattr(model, "_orig_mod", model))).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _neutralise(surrogate, generator)
    return surrogate


def reused(model: nn.Module, key: tuple, make: Callable[[], T]) -> T:
    """Return what `make` derives from a model, made once per model and key inside `surrogates_reused`
    (every time outside it)."""
    kept = _reused.get()
    if kept is None:
        return make()
    slot = (id(model), *key)
    if slot not in kept:
        kept[slot] = (model, make())   # the model is kept so its id cannot be reused during the block
    return kept[slot][1]


def _neutralise(surrogate: nn.Module, generator: torch.Generator) -> None:
    """Overwrite parameters and normalisation statistics in place with their surrogate values."""
    for module in surrogate.modules():
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        for name, param in module.named_parameters(recurse=False):
            param.requires_grad_(False)
            _write_surrogate_parameter(name, param, transposed, generator)
        for name, buffer in module.named_buffers(recurse=False):
            if name == "running_mean":
                buffer.zero_()
            elif name == "running_var":
                buffer.fill_(1.0)
