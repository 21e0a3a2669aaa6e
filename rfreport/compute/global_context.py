"""Global context: the operations on the path to the analysed output that see a whole feature map at once.

An RF can cover the whole input for two different reasons. *Saturation*: stacked local
windows grew larger than the input, which stops at a larger input. *Global context*: an
operation reads a whole feature map at once, so every output position depends on every input
pixel at any input size. Four kinds are told apart (`ContextKind`):

- *pooling*: global average or max pooling, a spatial mean as in squeeze-and-excitation, group or
  instance normalisation, a layer norm over space, recognised on tensors of the input's rank;
- *attention*: softmax attention, `scaled_dot_product_attention` or `nn.MultiheadAttention` in which
  every token attends to every token (ViT, DeiT, LeViT, EfficientFormer, bottleneck attention);
- *token mixing*: a dense map over the token axis (the token MLPs of Mixer, ResMLP and gMLP, a linear
  layer on a flattened feature map);
- *sampling*: data-dependent sampling (`grid_sample`, `deform_conv2d`, the RoI ops with a grid, offsets
  or boxes computed from the input: see sampling.py), whose sampling can reach any pixel.

:func:`global_ops` finds them by construction, not by RF size or model name: one forward pass of the
structural surrogate records the pooling operations and every *mixing candidate*, and one backward pass
from the analysed output says which of them it depends on. Attention calls are recognised as in
`attention.recognise`; one is global when it attends over one group of tokens per image with no
blocking or causal mask, windowed (Swin, MaxViT) when over several; an attention module whose class
attended within windows before stays windowed where one window happens to span the whole map (it
spans it at this input size only). A
linear map is a token-mixing candidate when the axis it sums over is as long as the input grid holds
tokens at some integer stride; it is confirmed when the first and last elements along that axis depend
on different input pixels (tokens, not channels).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rfreport.compute import attention, sampling
from rfreport.compute.engine import Target, check_input_shape, forward_target, resolve_device, shadow_if_integral
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
ATTENTION_NAMES = {"softmax-matmul": "softmax-attention"}   # how attention kinds are reported; others as they are
EXTRA_TOKENS = 8   # class, distillation and register tokens a token axis may hold beyond the grid


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


@dataclass(frozen=True)
class _Candidate:
    """A call that may mix every token: its op as reported, its owner's class, result, and how it is judged."""

    order: int
    op: GlobalOp
    owner: str               # class of the innermost user module running it (not a torch.nn building block)
    result: torch.Tensor
    groups: int = 0          # attention: token groups per image (1: one group spans the image); 0 for a linear map
    masked: bool = False     # attention with a causal or blocking mask: some query does not see every key
    summed: torch.Tensor | None = None   # a linear map: its input, summed over the last axis


class _Recorder(StructuralMode):
    """The structural mode, also keeping the result of every global operation and mixing candidate with the
    module it ran in, in call order."""

    def __init__(self, input_shape: Sequence[int], modules: list[str], owners: dict[str, str]):
        super().__init__(linearise=True, input_rank=len(input_shape))
        self.input_shape, self.modules, self.owners = tuple(input_shape), modules, owners
        self.taps: list[tuple[int, GlobalOp, torch.Tensor]] = []
        self.candidates: list[_Candidate] = []
        self.marked: dict[int, torch.Tensor] = {}   # softmax outputs over square token matrices

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = super().__torch_function__(func, types, args, kwargs)
        name = base_name(func)
        first = result[0] if isinstance(result, tuple) else result
        if not (isinstance(first, torch.Tensor) and first.requires_grad):
            return result
        module = self.modules[-1] if self.modules else ""
        order = len(self.taps) + len(self.candidates)
        owner = next((self.owners[m] for m in reversed(self.modules) if self.owners.get(m)), "")
        if is_global_op(name, args, kwargs, result, self.input_rank):
            self.taps.append((order, GlobalOp(module, name), first))
        elif (found := attention.recognise(name, args, kwargs, first, self.marked)) is not None:
            kind, tokens, batch = found
            op = GlobalOp(module, ATTENTION_NAMES.get(kind, kind))
            groups = max(1, batch // self.input_shape[0]) if tokens > 1 else 0
            self.candidates.append(_Candidate(order, op, owner, first, groups=groups,
                                              masked=not self._unmasked(name, args, kwargs)))
        elif name == "linear" and self._over_tokens(args[0] if args else None):
            op = GlobalOp(module, "token-mixing linear")
            self.candidates.append(_Candidate(order, op, owner, first, summed=args[0]))
        return result

    def _unmasked(self, name: str, args: Sequence[Any], kwargs: dict) -> bool:
        """Tell whether an attention call lets every query attend to every key: no causal or blocking mask, and
        hand-written attention weights without an exact zero."""
        if name == "scaled_dot_product_attention":
            bound = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args)) | kwargs
            return not bound.get("is_causal") and _allows_all(bound.get("attn_mask"))
        if name == "multi_head_attention_forward":
            return _allows_all(kwargs.get("attn_mask")) and _allows_all(kwargs.get("key_padding_mask"), block=True)
        matrix = next((a for a in args if isinstance(a, torch.Tensor) and id(a) in self.marked), None)
        return matrix is None or bool((matrix != 0).all())

    def _over_tokens(self, x: Any) -> bool:
        """Tell whether a linear map's input sums over an axis as long as the input grid's tokens at an integer
        stride (up to EXTRA_TOKENS more)."""
        if not (is_differentiable(x) and x.dim() >= 3 and x.shape[-1] > 1):
            return False
        spatial = self.input_shape[2:]
        return any(all(n % s == 0 for n in spatial) and 0 <= x.shape[-1] - math.prod(n // s for n in spatial)
                   <= EXTRA_TOKENS for s in range(1, max(spatial) + 1))


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
    """Return the global operations the analysed output depends on, in forward order (empty: none): every
    pooling operation, and the first global attention or token-mixing operation when one comes before them."""
    shape = check_input_shape(tuple(input_shape))
    where = resolve_device(device)
    surrogate = build_surrogate(model, seed).to(where)
    dtype = next((p.dtype for p in surrogate.parameters() if p.is_floating_point()), torch.float32)
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) + 0.5).to(where)
    fed = x.requires_grad_(True).clone()   # the model may write into its input, which a leaf refuses
    owners = {name: type(module).__qualname__ for name, module in surrogate.named_modules()
              if not type(module).__module__.startswith("torch.nn")}
    with _track_modules(surrogate) as stack, torch.enable_grad(), eager_forward(), _Recorder(
            shape, stack, owners) as recorder:
        y = shadow_if_integral(forward_target(surrogate, fed, target or Target(), shape, read_layout=False))
    tapped = [tap for _, _, tap in recorder.taps] + [c.result for c in recorder.candidates]
    if not tapped or not y.requires_grad:
        return ()
    grads = torch.autograd.grad(y.sum(), tapped, allow_unused=True, retain_graph=True)
    used = [grad is not None and bool(grad.ne(0).any()) for grad in grads]
    pooled = [(order, op) for (order, op, _), on in zip(recorder.taps, used, strict=False) if on]
    before = pooled[0][0] if pooled else math.inf
    candidates = [c for c, on in zip(recorder.candidates, used[len(recorder.taps):], strict=True)
                  if on and c.order < before]
    mixing = _first_global(x, candidates)
    found = pooled + ([(mixing.order, mixing.op)] if mixing else [])
    return tuple(op for _, op in sorted(found, key=lambda item: item[0]))


def _allows_all(mask: Any, *, block: bool = False) -> bool:
    """Tell whether an attention mask blocks nothing (a boolean mask blocks where False, or where True for a
    key padding mask; a float mask where -inf)."""
    if not isinstance(mask, torch.Tensor):
        return True
    if mask.dtype == torch.bool:
        return bool((~mask).all()) if block else bool(mask.all())
    return bool(torch.isfinite(mask).all())


def _first_global(x: torch.Tensor, candidates: Sequence[_Candidate]) -> _Candidate | None:
    """Return the first candidate that mixes every token of the image: attention over one group per image (in
    a module class that never attended within windows), or a linear map over the token axis."""
    windowed: set[str] = set()
    for candidate in candidates:
        if candidate.summed is not None:
            if _mixes_tokens(x, candidate.summed):
                return candidate
        elif candidate.groups > 1:
            windowed.add(candidate.owner)
        elif candidate.groups == 1 and not candidate.masked and candidate.owner not in windowed:
            return candidate
    return None


def _mixes_tokens(x: torch.Tensor, summed: torch.Tensor) -> bool:
    """Tell whether the first and last elements along a tensor's last axis depend on different input pixels."""
    middle = tuple(n // 2 for n in summed.shape[:-1])
    ends = [_support(x, summed[(*middle, i)]) for i in (0, summed.shape[-1] - 1)]
    return bool(ends[0].any() and ends[1].any() and (ends[0] != ends[1]).any())


def _support(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Return the input pixels (N, *spatial, any channel) one value depends on."""
    grad = torch.autograd.grad(value, x, retain_graph=True, allow_unused=True)[0]
    return torch.zeros(x.shape[:1] + x.shape[2:], dtype=torch.bool) if grad is None else grad.ne(0).any(1).cpu()
