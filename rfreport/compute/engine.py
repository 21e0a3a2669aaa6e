"""The autograd core: one forward pass, then batched vector-Jacobian products.

Everything that differentiates lives here. An :class:`Engine` prepares a model (the
structural surrogate or the model as given), runs one forward pass on a random input and
keeps the graph. :meth:`Engine.input_grads` then takes a batch of cotangent *weights over
the output grid* (a one-hot per position for the dense sweep, several positions per row
for the compressed sweep) and returns, per row, the input-gradient magnitude summed over
batch and channels, from a single vmapped backward pass (``is_grads_batched``), with a
per-row fallback for operations that cannot be vmapped.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from rfreport.compute import taint
from rfreport.compute.shapes import judge_layout, uniform_stride
from rfreport.compute.surrogate import (
    StructuralMode,
    build_surrogate,
    deep_copy,
    eager_forward,
    past_grid,
    preserved,
)
from rfreport.errors import PASS_THROUGH, LayoutError, NoGradient, SweepError, first_line, one_line
from rfreport.layouts import NCHW, Layout, LayoutKind, parse_layout, resolved, token_grid
from rfreport.options import Mode, values

OutputKey = str | int | None
# autograd nodes that keep every element in place: what a gradient reaches through them is the same position
POINTWISE_NODES = frozenset({"AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "MulBackward0",
                             "MulBackward1", "DivBackward0", "DivBackward1", "NegBackward0", "CloneBackward0",
                             "ToCopyBackward0", "_GateBackward"})
CPU_BATCH_BYTES = 1 << 30
CPU_TENSOR_BYTES = 4 << 20   # on a CPU, a batch's largest gradient stays under this (see auto_batch_size)
MAX_BATCH = 4096
LIVE_GRADIENTS = 6   # activation-sized gradients a batched backward holds per row at its peak
TRIM_BYTES = 64 << 20   # on a CPU, local gradients of this many bytes in all hand the C heap's free pages back


@dataclass(frozen=True)
class Target:
    """Which tensor is analysed: a named submodule's output and/or an element of a tuple/dict output."""

    layer: str | None = None
    output: OutputKey = None
    layout: Layout = NCHW

    def describe(self) -> str:
        """Return a short human label, e.g. `layer4` or `output['out']` (with a non-default layout)."""
        parts = [self.layer] if self.layer else []
        if self.output is not None:
            parts.append(f"output[{self.output!r}]")
        if self.layout != NCHW:
            parts.append(f"as {self.layout}")
        return " ".join(parts if self.layer or self.output is not None else ["model output", *parts])


class _Captured(Exception):
    """Raised from a forward hook to stop the pass once the chosen layer's output exists."""

    def __init__(self, value: Any):
        super().__init__("captured")
        self.value = value


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Return the surrogate's floating dtype from `float32`/`float64` (or a torch dtype)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise SweepError(f"unknown dtype {dtype!r}; use float32 or float64")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return CUDA when `auto` finds one, else CPU; validate explicit names."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SweepError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SweepError(f"device {device!r} was asked for but CUDA is not available")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise SweepError(f"device {device!r} was asked for but there are {torch.cuda.device_count()} CUDA devices")
    return resolved


def _find_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the named submodule or raise naming the top-level children."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise SweepError(f"model has no submodule {name!r} (top-level children: {children})") from exc


def _select_output(value: Any, key: OutputKey, where: str) -> torch.Tensor:
    """Pick the analysed tensor from a forward result by index or key."""
    if key is not None:
        value, where = _pick(value, key, where), f"{where}[{key!r}]"
    if isinstance(value, dict):
        raise SweepError(f"{where} is a dict with keys {sorted(map(str, value))}; choose one with `output`")
    if isinstance(value, (tuple, list)):
        raise SweepError(f"{where} is a {type(value).__name__} of {len(value)}; choose one with `output`")
    if not isinstance(value, torch.Tensor):
        raise SweepError(f"{where} is a {type(value).__name__}, not a tensor")
    return value


def _pick(value: Any, key: OutputKey, where: str) -> Any:
    """Index a tuple/list by int or a dict by key, with an error that lists what exists."""
    if isinstance(value, dict):
        if key in value:
            return value[key]
        raise SweepError(f"{where} has no key {key!r} (keys: {sorted(map(str, value))})")
    if isinstance(value, (tuple, list)):
        try:
            return value[int(key)]
        except (ValueError, IndexError) as exc:
            raise SweepError(f"{where} has no element {key!r} (it has {len(value)})") from exc
    raise SweepError(f"{where} is a single {type(value).__name__}; it has no element {key!r}")


def forward_target(model: nn.Module, x: torch.Tensor, target: Target,
                   shown_shape: tuple[int, ...] | None = None, *, read_layout: bool = True) -> torch.Tensor:
    """Run the model and return the target tensor read as (N, C, *grid), stopping once a chosen layer has run.

    `shown_shape` is the input shape named in error messages (the user's, not the probe batch);
    `read_layout=False` returns the selected tensor as the model produced it.
    """
    handle = None
    if target.layer:
        def capture(_module, _inputs, out):
            raise _Captured(out)
        handle = _find_layer(model, target.layer).register_forward_hook(capture)
    try:
        value = model(x)
        if target.layer:
            raise SweepError(f"layer {target.layer!r} never ran during the forward pass")
    except _Captured as captured:
        value = captured.value
    except (SweepError, *PASS_THROUGH):
        raise
    except BaseException as exc:  # the user's model may raise anything, sys.exit() included; say where it happened
        shape = shown_shape or tuple(x.shape)
        detail = one_line(exc) if isinstance(exc, SystemExit) else first_line(exc)   # sys.exit(0): say so, not "0"
        raise SweepError(f"the model raised {type(exc).__name__} on input shape {shape}: {detail}") from exc
    finally:
        if handle is not None:
            handle.remove()
    where = f"output of layer {target.layer!r}" if target.layer else "model output"
    selected = _select_output(value, target.output, where)
    return channels_first(selected, target.layout, tuple(x.shape[2:]), where) if read_layout else selected


def shadow_if_integral(value: torch.Tensor) -> torch.Tensor:
    """Return the analysed tensor, or for an integer or boolean one (an argmax, a mask) the floating shadow the
    structural pass gave it: each element's gradient support is exactly what that element was computed from
    (see taint.py). Without a shadow (gradient mode, or computed from no input value) it is returned as it is."""
    if value.is_floating_point() or value.is_complex():
        return value
    found = taint.shadow(value)
    return value if found is None else found


def channels_first(value: torch.Tensor, layout: Layout, input_spatial: tuple[int, ...],
                   where: str = "output") -> torch.Tensor:
    """Return a view of an analysed tensor as (N, C, *grid) according to its layout.

    Raises SweepError when the tensor's rank or size cannot be read with the layout.
    """
    rank = len(input_spatial)
    if value.dim() != layout.rank(rank):
        expected = {LayoutKind.NCHW: f"(N, C, {rank} spatial axes)", LayoutKind.NHWC: f"(N, {rank} spatial axes, C)",
                    LayoutKind.TOKENS: "(N, tokens, C)"}[layout.kind]
        hint = "; choose a spatial layer or output, or a layout (nhwc, tokens)" if layout.kind is LayoutKind.NCHW \
            else ""
        raise LayoutError(f"{where} has shape {tuple(value.shape)}; layout {layout} expects {expected}{hint}")
    if layout.kind is LayoutKind.NCHW:
        return value
    if layout.kind is LayoutKind.NHWC:
        return value.movedim(-1, 1)
    try:
        extra, grid = token_grid(value.shape[1], input_spatial, layout)
    except SweepError as exc:
        raise LayoutError(f"{where} has shape {tuple(value.shape)}: {exc}") from None
    tokens = value[:, extra:]
    return tokens.reshape(value.shape[0], *grid, value.shape[2]).movedim(-1, 1)


def check_input_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Validate an input shape (N, C, *spatial) with 1 to 3 spatial axes."""
    shape = tuple(int(n) for n in input_shape)
    if len(shape) not in (3, 4, 5) or any(n < 1 for n in shape):
        raise SweepError(f"input shape {shape} must be (N, C, *spatial) with 1, 2 or 3 positive spatial "
                         "sizes, e.g. (1, 3, 224, 224)")
    return shape


class Engine:
    """One model, one random input, one forward pass; batched input gradients on demand.

    Use as a context manager: on exit the user's model gets back its flags and hooks.
    In structural mode the work happens on a surrogate copy; in gradient mode on the model as
    given (a copy only when it must move to another device), with parameters frozen.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], *, mode: str = "structural",
                 target: Target = Target(), device: str | torch.device = "auto", seed: int = 0,
                 probes: int = 2, local: bool = False, inputs: torch.Tensor | None = None,
                 dtype: str | torch.dtype = "float32"):
        if mode not in values(Mode):
            raise SweepError(f"unknown mode {mode!r}; use one of {', '.join(values(Mode))}")
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
            raise SweepError("the model has uninitialised lazy parameters; run it once on a real input first")
        self.model, self.mode, self.target = model, mode, target
        self.input_shape = check_input_shape(input_shape)
        self.device = resolve_device(device)
        self.seed, self.local = seed, local
        self.probes = probes if mode == "structural" else 1
        self.dtype = resolve_dtype(dtype)
        self._scales: dict[int, torch.Tensor] = {}
        self._inputs = inputs
        self._batched = True
        self.rows = 0                                # backward rows run so far: the sweep's work (see verify.py)
        self._stack = None
        self._handles: list[RemovableHandle] = []   # hooks this engine put on the working model
        self._grids: list[tuple[int, ...]] = []      # spatial sizes of the grid tensors the pass showed so far
        self._raw_shape: tuple[int, ...] = ()        # the analysed tensor's shape as the model returns it

    def __enter__(self) -> Engine:
        self._stack = preserved(self.model)
        self._stack.__enter__()
        try:
            self._prepare()
        except BaseException:
            self._release(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._x = self._y = None
        self._scales.clear()
        self._release(*exc_info)

    def _release(self, *exc_info) -> None:
        """Remove this engine's hooks (the working model may be the user's), then restore flags and buffers."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.__exit__(*exc_info)

    @property
    def input_spatial(self) -> tuple[int, ...]:
        """Spatial shape of the input grid."""
        return self.input_shape[2:]

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Full shape of the analysed output for one probe (batch as in input_shape)."""
        return (self.input_shape[0], *self._y.shape[1:])

    @property
    def output_spatial(self) -> tuple[int, ...]:
        """Spatial shape of the output grid."""
        return tuple(self._y.shape[2:])

    @property
    def read_layout(self) -> Layout:
        """Return the layout this engine reads its analysed tensors with."""
        return self.target.layout

    def _working_model(self) -> nn.Module:
        """Return the module to differentiate: the surrogate, or the model itself (copied across devices).

        Under a token layout whose grid is inferred, every leaf module reports the spatial size of the
        grid tensors it returns: they tell an ambiguous token count's grid (see layouts.token_grid).
        """
        if self.mode == "structural":
            working = build_surrogate(self.model, self.seed, self.dtype).to(self.device)
        else:
            params = list(self.model.parameters()) + list(self.model.buffers())
            on_device = all(t.device == self.device for t in params)
            working = self.model if on_device else _copy_to(self.model, self.device)
            for param in working.parameters():
                param.requires_grad_(False)
        if self.read_layout.kind is LayoutKind.TOKENS and self.read_layout.grid is None:
            self._handles += [m.register_forward_hook(self._see_grid) for m in working.modules()
                              if not list(m.children())]
        return working

    def _see_grid(self, _module, _inputs, out) -> None:
        """Record the spatial size of a leaf's (N, C, *grid) output."""
        if isinstance(out, torch.Tensor) and out.dim() == len(self.input_shape):
            self._grids.append(tuple(out.shape[2:]))

    def _make_input(self, dtype: torch.dtype) -> torch.Tensor:
        """Draw the probe input: positive uniform for the surrogate, standard normal otherwise."""
        if self._inputs is not None:
            return self._inputs.to(self.device, dtype)
        generator = torch.Generator().manual_seed(self.seed)
        shape = (self.input_shape[0] * self.probes, *self.input_shape[1:])
        if self.mode == "structural":
            x = torch.rand(shape, generator=generator, dtype=dtype) + 0.5
        else:
            x = torch.randn(shape, generator=generator, dtype=dtype)
        return x.to(self.device)

    def _prepare(self) -> None:
        """Build the working model, run the forward pass and check the output's rank.

        The first pass uses one probe. When the pass can cancel gradients (a subtraction, a
        normalisation, a softmax: see StructuralMode), it runs again with `probes` inputs
        stacked along the batch axis so the union of their supports is exact; a model that
        cannot take the larger batch (a hard-coded view, say) keeps the single probe.
        """
        working = self._working_model()
        wanted, self.probes = self.probes, 1
        self._forward(working)
        self._judge_layout()
        if wanted > 1 and self.function_mode.signed and self._inputs is None:
            try:
                self.probes = wanted
                self._forward(working)
            except SweepError:
                self.probes = 1
                self._forward(working)

    def _judge_layout(self) -> None:
        """Refuse a layout that misreads the analysed tensor (a shape-only pass at the input doubled, shapes.py)."""
        plain = Target(self.target.layer, self.target.output)
        judge_layout(self.model, self.input_shape, self._raw_shape, self.target.layout,
                     lambda model, x: forward_target(model, x, plain, read_layout=False), self.target.describe())

    def _forward(self, working: nn.Module) -> None:
        """Run one forward pass on a fresh probe input, keeping the graph.

        An inferred token grid is made explicit in `target` from what the pass showed (see _working_model).
        """
        self._scales.clear()  # keyed by tensor id: a new pass makes new tensors
        self._grids.clear()
        dtype = self.dtype if self.mode == "structural" else _model_dtype(working)
        x = self._make_input(dtype).requires_grad_(True)
        fed = x.clone()   # what the model receives: it may write into its input (`x += 1`), which a leaf refuses
        gates = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        function_mode = StructuralMode(linearise=self.mode == "structural", local=self.local, input_rank=x.dim(),
                                       generator=gates)
        saved = [0, 0]

        def count(tensor):
            size = tensor.numel() * tensor.element_size()
            saved[0], saved[1] = saved[0] + size, max(saved[1], size)
            return tensor

        with torch.enable_grad(), eager_forward(), function_mode, \
                torch.autograd.graph.saved_tensors_hooks(count, _same):
            raw = shadow_if_integral(forward_target(working, fed, self.target, self.input_shape, read_layout=False))
        where, self._raw_shape = self.target.describe(), (self.input_shape[0], *raw.shape[1:])
        try:
            layout = resolved(self.target.layout, tuple(raw.shape), self.input_spatial, self._grids)
        except LayoutError as exc:
            raise LayoutError(f"{where} has shape {tuple(raw.shape)}: {exc}") from None
        y = channels_first(raw, layout, self.input_spatial, where)
        self.target = replace(self.target, layout=layout)
        self._check_output(y)
        self._x, self._y, self.function_mode = x, y, function_mode
        self.saved_bytes, self.largest_saved = saved
        self.past_grid = tuple(sorted(past_grid(raw)))

    def _check_output(self, y: torch.Tensor) -> None:
        """Require an output that depends on the input (forward_target already read it as (N, C, *spatial))."""
        if not (y.is_floating_point() or y.is_complex()):
            kind = f"an integer or boolean tensor ({str(y.dtype).removeprefix('torch.')})"
            if self.mode != "structural":
                raise NoGradient(f"{self.target.describe()} is {kind} and has no gradient")
            raise SweepError(f"{self.target.describe()} does not depend on the input ({kind} computed from no input "
                             "value)")
        if not y.requires_grad:
            raise SweepError(f"{self.target.describe()} does not depend on the input (no gradient path)")

    @property
    def nonlocal_ops(self) -> tuple[str, ...]:
        """Ops seen in the pass that can move spatial positions (shifts, flips, gathers, attention, unknown ops).

        Empty means the pass is local and translation-equivariant up to borders: the compressed
        sweep's periodic prediction of RFs can then be trusted.
        """
        return tuple(sorted(self.function_mode.nonlocal_ops))

    @property
    def size_dependent_ops(self) -> tuple[str, ...]:
        """Ops seen in the pass that make the RF geometry depend on the input size (see sizedep.py)."""
        return tuple(sorted(self.function_mode.size_dependent_ops))

    @property
    def nonfinite_ops(self) -> tuple[str, ...]:
        """Ops of the structural pass whose results held nan or inf (held constant there: see surrogate.py)."""
        return tuple(sorted(self.function_mode.nonfinite_ops | self.function_mode.unexplained_nonfinite))

    @property
    def unexplained_nonfinite(self) -> tuple[str, ...]:
        """Ops of the structural pass that made nan or inf from finite operands alone."""
        return tuple(sorted(self.function_mode.unexplained_nonfinite))

    @property
    def padding_modes(self) -> tuple[str, ...]:
        """Non-zero padding modes (circular, reflect, replicate) seen during the forward pass."""
        return tuple(sorted(self.function_mode.padding_modes))

    def auto_batch_size(self) -> int:
        """Return the cotangent batch: within the memory budget, and on a CPU within the allocator's reuse.

        A batched backward holds, per row, the gradients of the few activations alive at one time
        (a residual block's branches), not of every saved tensor: a few times the largest one.
        On a CPU a larger batch also costs more per row: every gradient tensor above glibc's mmap
        threshold (32 MiB at most) is fresh memory from the kernel, zeroed page by page, and falls
        out of the caches (the FCN of benchmarks/bench_inspect.py at 256x256: 100 ms of CPU per
        row at 32 rows a batch, half of it in the kernel; 45 ms at one row). So a CPU batch keeps
        its largest gradient under CPU_TENSOR_BYTES, and small passes still share one call.
        """
        ends = (self._x.numel() + self._y.numel()) * self._x.element_size()
        per_row = LIVE_GRADIENTS * self.largest_saved + 2 * ends
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(max(1, min(MAX_BATCH, free // 2 // max(per_row, 1))))
        largest = max(self.largest_saved, self._x.numel() * self._x.element_size(),
                      self._y.numel() * self._y.element_size())
        return int(max(1, min(MAX_BATCH, CPU_BATCH_BYTES // max(per_row, 1), CPU_TENSOR_BYTES // max(largest, 1))))

    def input_grads(self, weights: torch.Tensor) -> torch.Tensor:
        """Return |d(sum_p w_p y_p)/dx| summed over batch and channels, one row per row of `weights`.

        `weights` has shape (B, *output_spatial); each row is spread over every batch element
        and output channel of the analysed tensor.
        """
        self.rows += len(weights)
        grads = self._vjp(self.cotangents(weights, self._y)).abs().sum(dim=(1, 2))
        if not torch.isfinite(grads).all():
            raise SweepError(f"the {self.mode} pass gave non-finite gradients for {self.target.describe()} "
                             "(an activation overflowed or divided by zero)")
        return grads

    def cotangents(self, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Spread rows of weights (B, *spatial) over every batch element and channel of a tensor.

        In structural mode each entry is scaled by a fixed positive random number: the sum of a
        constant cotangent over channels could cancel exactly (relu(h) and relu(-h) side by side).
        """
        weights = weights.to(like.device, like.dtype)
        spread = weights[:, None, None].expand(-1, *like.shape)
        if self.mode != "structural":
            return spread
        return spread * self._output_scale(like)

    def _output_scale(self, like: torch.Tensor) -> torch.Tensor:
        """Return the positive random scale of a tensor's cotangents, drawn once per tensor, not per chunk."""
        scale = self._scales.get(id(like))
        if scale is None:
            generator = torch.Generator(device=like.device).manual_seed(self.seed + 2)
            scale = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device) + 0.5
            self._scales[id(like)] = scale
        return scale

    def support(self, weights: torch.Tensor) -> torch.Tensor:
        """Return the boolean input support of each row of cotangent weights."""
        return self.input_grads(weights) > 0

    def _vjp(self, cotangents: torch.Tensor) -> torch.Tensor:
        """Backpropagate a batch of cotangents in one vmapped pass, or row by row where vmap fails."""
        if self._batched and len(cotangents) > 1:
            try:
                return self._grad(cotangents, batched=True)
            except RuntimeError:
                self._batched = False
        return torch.stack([self._grad(row, batched=False) for row in cotangents])

    def _grad(self, cotangent: torch.Tensor, *, batched: bool) -> torch.Tensor:
        """One autograd.grad call that keeps the graph for the next chunk."""
        (grad,) = torch.autograd.grad(self._y, self._x, cotangent, retain_graph=True,
                                      is_grads_batched=batched, allow_unused=True)
        if grad is None:
            shape = (cotangent.shape[0], *self._x.shape) if batched else self._x.shape
            return torch.zeros(shape, dtype=self._x.dtype, device=self._x.device)
        return grad


def _same(tensor: torch.Tensor) -> torch.Tensor:
    """Unpack hook that returns the saved tensor unchanged."""
    return tensor


def _model_dtype(model: nn.Module) -> torch.dtype:
    """Return the floating dtype of the model's parameters (float32 when it has none)."""
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floating[0] if floating else torch.float32


def _copy_to(model: nn.Module, device: torch.device) -> nn.Module:
    """Deep-copy a model onto another device, leaving the original where it is."""
    return deep_copy(model).to(device)


# --------------------------------------------------------------------------------------
# Multi-layer capture (per-layer growth, layers.py). One forward pass keeps the output of
# every chosen leaf module; a local vector-Jacobian product then runs from one layer's
# output back to its nearest captured predecessors only, so all layers together cost
# about one backward pass instead of one per layer.

@dataclass(frozen=True)
class CapturedLayer:
    """One leaf module's output from the forward pass: its reading as (N, C, *grid) and its graph edge.

    The reading is a view of the module's output, not a copy: only its shape is read, and a local VJP
    starts from the edge (the output as the module returned it, before any later in-place op).
    """

    name: str
    type: str
    value: torch.Tensor
    edge: Any
    layout: Layout    # how the raw output reads as (N, C, *grid), an inferred token grid made explicit
    raw: tuple[int, ...]   # the output's shape as the module returned it
    past_grid: frozenset[int] = frozenset()   # spatial axes read through kernel taps past the grid (see surrogate)


class LayerEngine(Engine):
    """An engine whose forward pass also keeps every leaf module's spatial output (or the named ones)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], *, layers: list[str] | None = None,
                 layout: Layout | str | None = None, skip: Collection[str] = (), stacked: bool = False, **kwargs):
        """`skip` names modules whose outputs are never captured (channels-last tensors inside a channels-first
        model, which would read as (N, H, W, C) 'grids'). `stacked` says an earlier pass of the same model stacked
        its probes (its ops can cancel gradients, see `Engine._prepare`): this pass stacks them from its first
        forward pass, sparing the single-probe pass that would find that out again."""
        self.stacked = stacked
        super().__init__(model, input_shape, **kwargs)
        self.layout = parse_layout(layout)
        self.layer_names = list(layers) if layers else None
        self.skip = frozenset(skip)
        self.layers: dict[str, CapturedLayer] = {}
        self._owner: dict = {}   # each captured graph edge -> the first layer that produced it
        self._churn = 0          # bytes of local gradients since the C heap last handed its free pages back
        self._vjp_start = _VjpStart()

    @property
    def read_layout(self) -> Layout:
        """Return the layout every captured layer output is read with."""
        return self.layout

    def _judge_layout(self) -> None:
        """Judge nothing here: layers whose channels grow with the input are skipped by name (`skip`)."""

    def _prepare(self) -> None:
        """Run the forward pass: with `stacked`, with every probe at once (one probe where the model refuses that
        batch), else as any engine does."""
        if not self.stacked or self.probes == 1:
            super()._prepare()
            return
        working = self._working_model()
        try:
            self._forward(working)
        except SweepError:
            self.probes = 1
            self._forward(working)

    def _working_model(self) -> nn.Module:
        """Build the working model and hook its leaves (or the named modules) to record their outputs."""
        working = super()._working_model()
        names = self.layer_names or [n for n, m in working.named_modules() if not list(m.children())]
        wanted = set(names)
        for name in names:
            self._handles.append(_find_layer(working, name).register_forward_hook(self._recorder(name, wanted)))
        # The model's own output may be a dict or logits; stop with the last captured tensor instead.
        self._handles.append(working.register_forward_hook(self._stop))
        return working

    def _forward(self, working: nn.Module) -> None:
        """Run a forward pass, capturing the layers of this pass only."""
        self.layers, self._owner = {}, {}
        try:
            super()._forward(working)
        except LayoutError:
            if self.layers:
                raise
            self._check_output(None)  # nothing captured: say so rather than how the model output looks

    def _recorder(self, name: str, wanted: set[str], module_name: str | None = None):
        """Return a hook that keeps a module's first spatial output and stops once every named one ran
        (`module_name`: the module's own name when `name` is the key of one of its later calls)."""
        skipped = (module_name or name) in self.skip

        def record(module, _inputs, out):
            batch = self.input_shape[0] * self.probes
            ours = (not skipped and name not in self.layers and isinstance(out, torch.Tensor) and out.dim()
                    and out.shape[0] == batch)
            layout = _resolved(out, self.layout, self.input_spatial, self._grids) if ours else None
            value = _spatial_view(out, layout, self.input_spatial) if layout else None
            if value is None or layout is None:
                return
            edge = torch.autograd.graph.get_gradient_edge(out)
            if (edge.node, edge.output_nr) not in self._owner and not hasattr(edge.node, "variable"):
                edge.node.register_prehook(_cut(self._vjp_start, id(edge.node), edge.output_nr))   # not the input
            self.layers[name] = CapturedLayer(name, type(module).__name__, value, edge, layout, tuple(out.shape),
                                              past_grid(out))
            self._owner.setdefault((edge.node, edge.output_nr), name)
            if self.layer_names and wanted <= set(self.layers):
                self._stop()

        return record

    def _stop(self, *_args) -> None:
        """End the forward pass with the last captured tensor as its result."""
        if self.layers:
            raise _Captured(next(reversed(self.layers.values())).value)

    def _check_output(self, y: torch.Tensor) -> None:
        """Require at least one captured layer (the model output itself may have any shape)."""
        if not self.layers:
            raise SweepError(f"no leaf module of {type(self.model).__name__} outputs a tensor that depends on the "
                             f"input and reads as layout {self.layout}")

    def same_as(self, name: str) -> str | None:
        """Return the earlier layer whose output is the very same tensor (e.g. an identity-like module), or None."""
        edge = self.layers[name].edge
        first = self._owner[(edge.node, edge.output_nr)]
        return first if first != name else None

    def predecessors(self, name: str) -> list[str | None]:
        """Return the nearest captured layers (None for the model input) on every path into a layer's output."""
        if hasattr(self.layers[name].edge.node, "variable"):   # the layer returned the model input itself
            return [None]
        found = self._walk(name)
        return [] if found is None else found

    def pointwise_sources(self, name: str) -> list[str | None] | None:
        """Return a layer's nearest captured layers (None: the model input) when every autograd node between them
        is elementwise (POINTWISE_NODES) and every one of them has the layer's grid, else None.

        Each output position of such a layer reads at most the same position of each of them (a structural
        pass's replaced activations, affine batch norms, residual sums, gates), so one backward pass of
        several probe rows at once splits back by position (`pointwise_support`).
        """
        layer = self.layers[name]
        if self.mode != "structural" or type(layer.edge.node).__name__ not in POINTWISE_NODES:
            return None
        found = self._walk(name, POINTWISE_NODES)
        grid = tuple(layer.value.shape[2:])
        same = all((self.input_spatial if s is None else tuple(self.layers[s].value.shape[2:])) == grid
                   for s in found or ())
        return found if found and same else None

    def _walk(self, name: str, kinds: frozenset[str] | None = None) -> list[str | None] | None:
        """Return the captured layers (None: the model input) met first on every path back from a layer's output;
        None when a node on the way is not of one of `kinds` (any kind without them)."""
        start = self.layers[name].edge.node
        found: dict[str | None, None] = {}
        seen, stack = {start}, [start]
        while stack:
            for node, nr in stack.pop().next_functions:
                if node is None:
                    continue
                if self._owner.get((node, nr), name) != name:
                    found[self._owner[(node, nr)]] = None
                elif hasattr(node, "variable"):
                    found[None] = None
                elif kinds is not None and type(node).__name__ not in kinds:
                    return None
                elif node not in seen:
                    seen.add(node)
                    stack.append(node)
        return list(found)

    def pointwise_support(self, name: str, rows: torch.Tensor,
                          sources: list[str | None]) -> dict[str | None, torch.Tensor]:
        """Return `local_support` of one-hot rows (B, *grid) at distinct positions of a layer whose sources
        `pointwise_sources` gave: one backward pass of all rows at once, each row keeping what it reached at its
        own position."""
        reached = self.local_support(name, rows.sum(dim=0, keepdim=True), sources)
        return {source: (rows > 0) & union for source, union in reached.items()}

    def local_support(self, name: str, weights: torch.Tensor,
                      sources: list[str | None] | None = None) -> dict[str | None, torch.Tensor]:
        """Return, per nearest predecessor (or per given source; None is the input), the boolean support
        (B, *its spatial) of rows of weights on a layer, `auto_batch_size` rows per backward pass.

        The layer's cotangent scale is dropped afterwards: drawn again it has the same values (a seeded
        draw per tensor), and kept for every layer the scales would add up to a copy of every output.
        """
        layer = self.layers[name]
        sources = self.predecessors(name) if sources is None else sources
        try:
            parts = [self._support_of(layer, chunk, sources) for chunk in weights.split(self.auto_batch_size())]
        finally:
            self._scales.pop(id(layer.value), None)
        if self.device.type == "cpu" and self._churn > TRIM_BYTES:
            _trim_heap()
            self._churn = 0
        return {source: torch.cat([part[source] for part in parts]) for source in sources}

    def _support_of(self, layer: CapturedLayer, weights: torch.Tensor,
                    sources: list[str | None]) -> dict[str | None, torch.Tensor]:
        """Return `local_support` for one backward pass's rows of weights."""
        cotangents = self._on_raw(self.cotangents(weights, layer.value), layer)
        edges = [self.layers[s].edge if s else self._x for s in sources]
        self._vjp_start.edge = (id(layer.edge.node), layer.edge.output_nr) if sources != [None] else None
        try:
            grads = _local_vjp(layer.edge, edges, cotangents)
        finally:
            self._vjp_start.edge = None
        self._churn += cotangents.nbytes + sum(g.nbytes for g in grads)
        grids = [g if s is None else self._as_grid(g, self.layers[s].layout) for s, g in zip(sources, grads)]
        # summed over batch and channels as one axis: a reduction over two axes at once costs several times more
        return {s: (g.abs().flatten(1, 2).sum(1) > 0).cpu() for s, g in zip(sources, grids)}

    def _on_raw(self, cotangents: torch.Tensor, layer: CapturedLayer) -> torch.Tensor:
        """Carry cotangents (B, N, C, *grid) on a layer's reading back to its raw output (B, *raw): the reading's
        own vector-Jacobian product (a permutation; tokens it leaves out get zeros)."""
        if layer.layout.kind is LayoutKind.NCHW:
            return cotangents
        rows = len(cotangents)
        raw = torch.zeros((rows * layer.raw[0], *layer.raw[1:]), dtype=cotangents.dtype, device=cotangents.device,
                          requires_grad=True)
        reading = channels_first(raw, layer.layout, self.input_spatial)
        (grad,) = torch.autograd.grad(reading, raw, cotangents.reshape(reading.shape))
        return grad.reshape(rows, *layer.raw)

    def _as_grid(self, grad: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Read a batch of gradients on a captured layer's raw output (B, *raw) as (B, N, C, *grid)."""
        rows, batch = grad.shape[:2]
        flat = channels_first(grad.reshape(rows * batch, *grad.shape[2:]), layout, self.input_spatial)
        return flat.reshape(rows, batch, *flat.shape[1:])


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's malloc_trim; nothing where the C library has none).

    Local gradients are freed at once, but their sizes vary from layer to layer: glibc serves them from its
    heap once a freed one raised its mmap threshold, and untrimmed the heap keeps the pages of every size
    met so far (resnet50 at 224 x 224, one thread: 170 MB above the captured graph; trimmed after every
    TRIM_BYTES of gradients, 50 MB, for about a tenth more CPU time).
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


@dataclass
class _VjpStart:
    """The captured output a local VJP starts from, as (id of its graph node, output number); None outside one."""

    edge: tuple[int, int] | None = None


def _cut(start: _VjpStart, node: int, nr: int):
    """Return a node pre-hook that stops the gradient of one captured output during a local VJP from another
    layer (autograd has read it there already): windows on predecessors then count only the paths that meet
    no other captured layer. The node's other outputs pass (one chunk of a split may be a layer, the next not).
    The hook lives on the node, so it holds neither the node nor the engine (that would keep the graph alive)."""
    def hook(grad_outputs):
        if start.edge is None or start.edge == (node, nr) or grad_outputs[nr] is None:
            return None
        return tuple(None if i == nr else grad for i, grad in enumerate(grad_outputs))

    return hook


def _resolved(value: torch.Tensor, layout: Layout, input_spatial: tuple[int, ...],
              seen: list[tuple[int, ...]]) -> Layout | None:
    """Return the layout a captured output reads with (an inferred token grid made explicit), or None when its
    token count fits no single grid."""
    try:
        return resolved(layout, tuple(value.shape), input_spatial, seen)
    except LayoutError:
        return None


def _spatial_view(value: Any, layout: Layout, input_spatial: tuple[int, ...]) -> torch.Tensor | None:
    """Return a module output read as (N, C, *grid) through the layout (a view), or None when it is not one.

    Under a channels-last layout every leaf is read as (N, *grid, C), yet convolutions and pooling
    return (N, C, *grid) whatever the model's layout (a Swin patch embedding's projection): a reading
    whose grid is not the input resampled by one stride on every axis is such a tensor, and skipped.
    """
    if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad):
        return None
    try:
        view = channels_first(value, layout, input_spatial)
    except LayoutError:
        return None
    if layout.kind is LayoutKind.NHWC and not uniform_stride(tuple(view.shape[2:]), input_spatial):
        return None
    return view


def _local_vjp(start: Any, edges: list, cotangents: torch.Tensor) -> list[torch.Tensor]:
    """Backpropagate a batch of cotangents from one graph edge to others: vmapped, or row by row for a single
    row (vmap's set-up costs more than the row) or where vmap fails."""
    if len(cotangents) > 1:
        with contextlib.suppress(RuntimeError):
            return list(torch.autograd.grad([start], edges, [cotangents], retain_graph=True, is_grads_batched=True))
    rows = [torch.autograd.grad([start], edges, [row], retain_graph=True) for row in cotangents]
    return [torch.stack(parts) if len(parts) > 1 else parts[0][None] for parts in zip(*rows)]
