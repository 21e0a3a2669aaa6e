"""Attention: the modules that mix tokens, and how far RFs reach around them.

Attention is found by the operations a forward pass calls, not by model names:
``scaled_dot_product_attention``, ``multi_head_attention_forward`` (``nn.MultiheadAttention``) and
a softmax over a square token-by-token matrix whose result feeds a matmul (hand-written attention).
Only the calls the analysed tensor depends on count (the pass stops at the analysed layer, and a
backward pass from it drops other branches). Each call is attributed to the innermost module
running it (the attention module; its parent is the *block*). From the call's shapes come the
tokens attended over together and the number of such groups per image: one group is global
attention (every token attends to every other), several are windows (Swin) or grids (MaxViT)
whose reach the sweeps then measure.

:func:`reach` sweeps the centre of chosen blocks (the job's own sweep, so exact) to say how far a
token's RF reaches after them. Global pooling (squeeze-and-excitation, ASPP image pooling) is not
looked for here: :func:`context.global_ops` finds every global operation the analysed output
depends on, once per job, and :func:`with_context` adds them to the record as its `pooling` list.
The records are plain dicts for the summary; analysis.py words the findings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from rfreport.compute.engine import Target, forward_target, preserved
from rfreport.compute.surrogate import base_name, tensors_of
from rfreport.errors import RfReportError
from rfreport.options import ContextKind
from rfreport.results import GlobalOp

PASS_THROUGH = frozenset({"dropout", "contiguous", "to", "type_as", "clone"})   # keep marking an attention matrix
RfOf = Callable[[str, str], tuple[list[int], bool] | None]   # (layer, layout) -> (centre RF size, global) or None


@dataclass(frozen=True)
class AttentionCall:
    """One module that runs attention: its kind, tokens per group and groups per image (first call)."""

    module: str      # innermost module running the operation
    block: str       # its parent: the block whose output mixes the attended tokens
    kind: str        # scaled_dot_product_attention, multi_head_attention or softmax-matmul
    tokens: int      # tokens attending to each other in one group
    groups: int      # groups per image: 1 is global attention, more are windows or grids
    order: int       # forward order of the block's first call
    before: str | None   # the last module to finish before the block, with the block's input shape
    shape: tuple[int, ...] = ()   # the block's output shape (its input's for `before`)


class _Recorder(TorchFunctionMode):
    """Record attention operations with the module stack at the time of the call."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self.calls: list[tuple[str, str, int, int, Any]] = []   # (module, kind, tokens, batch dimension, result)
        self.marked: dict[int, torch.Tensor] = {}          # softmax outputs over square token matrices

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        found = recognise(base_name(func), args, kwargs, out, self.marked)
        if found is not None:
            kind, tokens, batch = found
            first = out[0] if isinstance(out, tuple) else out
            self.calls.append((self.stack[-1] if self.stack else "", kind, int(tokens), int(batch), first))
        return out


def recognise(name: str, args: Sequence[Any], kwargs: dict, out: Any,
              marked: dict[int, torch.Tensor]) -> tuple[str, int, int] | None:
    """Return (kind, tokens per group, batch dimension) when a torch function call runs attention, else None.

    A softmax over square token-by-token matrices (or one passed through dropout or a copy) is remembered in
    `marked`; the matmul that reads it is the attention call.
    """
    first = args[0] if args else next(iter(kwargs.values()), None)
    if name == "scaled_dot_product_attention":
        return name, first.shape[-2], first.shape[0] if first.dim() > 2 else 1
    if name == "multi_head_attention_forward":
        return "multi_head_attention", first.shape[0], first.shape[1] if first.dim() == 3 else 1
    if (name in ("softmax", "log_softmax") and _square(out)) or (
            name in PASS_THROUGH and isinstance(first, torch.Tensor) and id(first) in marked):
        marked[id(out)] = out
    elif name in ("matmul", "bmm", "einsum"):
        matrix = next((a for a in args if isinstance(a, torch.Tensor) and id(a) in marked), None)
        if matrix is not None:
            return "softmax-matmul", matrix.shape[-1], matrix.shape[0] if matrix.dim() > 2 else 1
    return None


def _square(value: Any) -> bool:
    """Tell whether a value is a batch of square (token x token) matrices."""
    return isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[-1] == value.shape[-2] > 1


def _parent(name: str) -> str:
    """Return a module's parent name ('' for a top-level child)."""
    return name.rpartition(".")[0]


def detect(model: nn.Module, input_shape: Sequence[int], target: Target | None = None) -> tuple[AttentionCall, ...]:
    """Run the model once on one random input and return, in forward order, its attention modules that the
    analysed tensor (`target`: a layer or output; every output by default) depends on."""
    stack: list[str] = []
    events: list[tuple[str, str, tuple]] = []   # (module, "start"/"end", input/output shape)
    handles = []

    def pre(name):
        def hook(_module, inputs):
            stack.append(name)
            first = inputs[0] if inputs else None
            events.append((name, "start", tuple(first.shape) if isinstance(first, torch.Tensor) else ()))
        return hook

    def post(name):
        def hook(_module, _inputs, out):
            stack.pop()
            events.append((name, "end", tuple(out.shape) if isinstance(out, torch.Tensor) else ()))
        return hook

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.randn((1, *input_shape[1:]), generator=torch.Generator().manual_seed(0)).to(device)
    recorder = _Recorder(stack)
    with preserved(model), torch.enable_grad():
        model.eval()
        try:
            for name, module in model.named_modules():
                if name:
                    handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
            with recorder:
                x.requires_grad_(True)
                y = model(x) if target is None else forward_target(model, x, target, tuple(input_shape),
                                                                   read_layout=False)
        except Exception as exc:  # the user's model (or a scripted one refusing hooks) may raise anything
            raise RfReportError(f"attention detection failed ({type(exc).__name__}: {exc})") from exc
        finally:
            for handle in handles:
                handle.remove()
    return _calls(_depended_on(recorder.calls, y), events)


def _depended_on(calls: list[tuple[str, str, int, int, Any]], y: Any) -> list[tuple[str, str, int, int]]:
    """Keep the calls whose result the analysed tensors reach through the autograd graph.

    A walk over the graph, not a backward pass: the model as given may have changed tensors the backward
    would need in place (in-place activations), and only which results are connected matters here.
    """
    reached = _reached_edges([t for t in tensors_of(y) if t.requires_grad])
    return [tuple(call) for *call, out in calls if isinstance(out, torch.Tensor) and out.requires_grad
            and _edge(out) in reached]


def _edge(tensor: torch.Tensor) -> tuple[Any, int]:
    """Return a tensor's place in the autograd graph: (node, output number)."""
    edge = torch.autograd.graph.get_gradient_edge(tensor)
    return edge.node, edge.output_nr


def _reached_edges(ends: list[torch.Tensor]) -> set[tuple[Any, int]]:
    """Return every graph edge (node, output number) the given tensors are computed from, their own included."""
    found = {_edge(t) for t in ends}
    stack, seen = [node for node, _ in found], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, number in node.next_functions:
            if child is not None:
                found.add((child, number))
                stack.append(child)
    return found


def _calls(raw: list[tuple[str, str, int, int]], events: list[tuple[str, str, tuple]]) -> tuple[AttentionCall, ...]:
    """Keep the first call per module and attach each block's forward order and predecessor."""
    starts = {}
    for i, (name, kind, _shape) in enumerate(events):
        if kind == "start":
            starts.setdefault(name, i)
    found: dict[str, AttentionCall] = {}
    for module, kind, tokens, batch in raw:
        if module in found:
            continue
        block = _parent(module) if module else ""
        order = starts.get(block, starts.get(module, 0))
        ends = [out for name, kind, out in events if name == block and kind == "end"]
        found[module] = AttentionCall(module, block, kind, tokens, batch, order, _before(events, block, order),
                                      ends[0] if ends else ())
    return tuple(sorted(found.values(), key=lambda c: c.order))


def _before(events: list[tuple[str, str, tuple]], block: str, index: int) -> str | None:
    """Return the last module outside `block` to finish before it starts with an output shaped like its input."""
    if not block or index >= len(events):
        return None
    shape = events[index][2]
    for name, kind, out in reversed(events[:index]):
        if kind == "end" and out == shape and not (name == block or name.startswith(block + ".")):
            return name
    return None


def stages(calls: Sequence[AttentionCall]) -> list[list[AttentionCall]]:
    """Group consecutive attention calls with the same tokens and groups (a stage of blocks)."""
    grouped: list[list[AttentionCall]] = []
    for call in calls:
        if grouped and (grouped[-1][-1].tokens, grouped[-1][-1].groups) == (call.tokens, call.groups):
            grouped[-1].append(call)
        else:
            grouped.append([call])
    return grouped


def layout_of(shape: Sequence[int], input_spatial: Sequence[int], preferred: str) -> str | None:
    """Return how to read a block's output: tokens for rank 3, else the preferred layout if its grid fits the
    input (one stride on every axis), else the other of nchw/nhwc that fits; None if none does."""
    if len(shape) == 3 and len(input_spatial) > 1:
        return "tokens"
    grids = {"nchw": tuple(shape[2:]), "nhwc": tuple(shape[1:-1])}
    fits = [name for name, grid in grids.items() if _fits(grid, input_spatial)]
    return preferred if preferred in fits else (fits[0] if fits else None)


def _fits(grid: Sequence[int], input_spatial: Sequence[int]) -> bool:
    """Tell whether a grid divides the input by one common stride."""
    if len(grid) != len(input_spatial) or not all(0 < g <= n for g, n in zip(grid, input_spatial)):
        return False
    ratios = [n / g for g, n in zip(grid, input_spatial)]
    return max(ratios) - min(ratios) <= 1e-6 * max(ratios)


def reach(calls: Sequence[AttentionCall], rf_of: RfOf, input_spatial: Sequence[int], preferred: str) -> dict:
    """Measure how far RFs reach around attention, as the summary's `attention` record.

    Global attention: the first global block's RF and the local RF before it (its predecessor's).
    Windowed: the RF after the first two blocks of the first stage and after the last block of
    every stage, until a block's RF is global.
    """
    record: dict[str, Any] = {"modules": [asdict(c) for c in calls], "blocks": [], "local": None,
                              "stages": [{"first": s[0].block, "last": s[-1].block, "blocks": len(s),
                                          "tokens": s[0].tokens, "groups": s[0].groups, "kind": s[0].kind}
                                         for s in stages(calls)]}
    if not calls:
        return record
    for call in _chosen_blocks(calls):
        layout = layout_of(call.shape, input_spatial, preferred)
        if layout is None:
            continue
        measured = rf_of(call.block, layout)
        if measured is None:
            continue
        size, is_global = measured
        record["blocks"].append({"block": call.block, "tokens": call.tokens, "groups": call.groups,
                                 "rf_size": size, "global": is_global})
        if is_global:
            local = rf_of(call.before, layout) if call.before and call.groups == 1 else None
            if local is not None:
                record["local"] = {"layer": call.before, "rf_size": local[0], "block": call.block}
            break
    return record


def _chosen_blocks(calls: Sequence[AttentionCall]) -> list[AttentionCall]:
    """Return the blocks whose reach is measured, in forward order, without repeats."""
    grouped = stages(calls)
    if grouped[0][0].groups == 1:
        return [grouped[0][0]]
    picks = [*grouped[0][:2], *(stage[-1] for stage in grouped)]
    seen: set[str] = set()
    return [c for c in picks if c.block and not (c.block in seen or seen.add(c.block))]


def with_context(record: dict | None, global_ops: Sequence[GlobalOp]) -> dict | None:
    """Return the attention record with the global pooling operations the output depends on (of
    `context.global_ops`) as its `pooling` list of {module, op} (empty without one); None when there is neither
    attention nor global pooling."""
    pooling = [{"module": op.layer, "op": op.op} for op in global_ops if op.kind == ContextKind.POOLING]
    if record is None and not pooling:
        return None
    return (record or {}) | {"pooling": pooling}
