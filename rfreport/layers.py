"""Per-layer growth: RF size, effective stride and padding at the centre of every layer's output.

One forward pass of a :class:`~rfreport.engine.LayerEngine` keeps every leaf module's output.
Per layer, one small batched backward from its centre, one neighbour per axis and its first
corner runs only as far as the layer's nearest captured predecessors (or the input). The boxes
found there are composed with those predecessors' unclipped affine geometry (a box [a, b] on a
predecessor with size r, stride s and padding P covers the input from a*s - P to b*s - P + r - 1,
anchored at the predecessor's centre so a window on that centre alone needs no stride),
so the whole table costs about one backward pass however deep the model is.

Composition is exact for affine layers whose local window stays clear of the predecessor's grid
border. Where a window touches it (deep grids of one or two cells at small inputs) the unclipped
values are only lower bounds, and they are taken from a rerun at a doubled input instead when the
model accepts one. A layer read through a predecessor whose geometry is unknown (an output whose
centre sees nothing, e.g. a window lying wholly in padding) reports size 0 and `rf_exact` false.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from torch import nn

from rfreport.engine import LayerEngine, check_input_shape
from rfreport.errors import SweepError
from rfreport.positions import axis_names, center
from rfreport.schema import Column, Schema, register
from rfreport.sweep import mask_bounds, one_hot_weights

MAX_DOUBLINGS = 3
ENLARGE_LIMIT = 1 << 18  # input pixels (spatial) a rerun may use
POOLED_GRID = 4  # a one-cell output whose window spans a whole grid this large per axis is global pooling

LAYERS = register(Schema(
    name="layers",
    row="layer (leaf module or chosen name) whose output is a spatial tensor of the input's rank, in forward order",
    columns=(
        Column("order", "int64", "", "forward order of the layer's first call (0-based)"),
        Column("layer", "string", "", "qualified module name"),
        Column("type", "string", "", "module class name"),
        Column("channels", "int64", "channels", "output channels"),
        Column("out_{a}", "int64", "output positions", "output size on this axis"),
        Column("{a}_size", "int64", "input pixels", "RF extent of the centre output position at this input size "
               "(clipped to the input)"),
        Column("{a}_rf", "int64", "input pixels", "unclipped RF size of the centre output position (its extent "
               "on an input large enough; a lower bound when rf_exact is false)"),
        Column("{a}_stride", "float64", "input pixels", "effective stride: how far the RF moves per output step "
               "(NaN when the axis has a single position at every size tried)"),
        Column("{a}_padding", "float64", "input pixels", "effective padding P: the unclipped RF of output "
               "position p starts at input index -P + p * stride"),
        Column("rf_exact", "bool", "flag", "the unclipped values are exact; false when a local window met a grid "
               "border at every input size tried"),
        Column("border", "bool", "flag", "border layer: the centre position's RF already covers the whole input, "
               "so this layer's depth adds no context at this resolution"),
        Column("global", "bool", "flag", "both the centre and the first corner position see the whole input"),
    ),
))


@dataclass(frozen=True)
class _Affine:
    """Unclipped affine geometry of one layer's output per axis, anchored at its centre position.

    `start` is the unclipped RF start of output position `anchor`; boxes of other positions move by
    `stride` per step, so a box at the anchor itself needs no stride (single-cell or padding-only
    neighbours leave the stride unknown).
    """

    rf: np.ndarray
    stride: np.ndarray
    anchor: np.ndarray
    start: np.ndarray
    exact: bool

    @property
    def padding(self) -> np.ndarray:
        """Return the effective padding P, with start = -P + anchor * stride."""
        return np.where(self.anchor == 0, 0.0, self.anchor * self.stride) - self.start

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the unclipped input bounds covered by output boxes [lo, hi] of this layer."""
        first = self.start + np.where(lo == self.anchor, 0.0, (lo - self.anchor) * self.stride)
        last = self.start + np.where(hi == self.anchor, 0.0, (hi - self.anchor) * self.stride) + self.rf - 1
        return first, last


@dataclass(frozen=True)
class _Layer:
    """One row of the layers frame before it becomes a DataFrame."""

    name: str
    type: str
    channels: int
    out: tuple[int, ...]
    size: np.ndarray
    affine: _Affine
    border: bool
    is_global: bool
    pooled: bool


def probe_rows(shape: tuple[int, ...]) -> np.ndarray:
    """Return the output positions probed per layer: centre, one neighbour per axis, first corner."""
    mid = np.array(center(shape), dtype=np.int64)
    rows = [mid]
    for axis, n in enumerate(shape):
        neighbour = mid.copy()
        neighbour[axis] = mid[axis] + 1 if mid[axis] + 1 < n else max(mid[axis] - 1, 0)
        rows.append(neighbour)
    rows.append(np.zeros(len(shape), dtype=np.int64))
    return np.stack(rows)


@dataclass(frozen=True)
class _Windows:
    """What one capture pass saw of a layer: its grid and its local windows on its predecessors.

    `windows` maps each nearest predecessor (None for the input) to (lo, hi, count) per probe row.
    """

    name: str
    type: str
    channels: int
    out: tuple[int, ...]
    twin: str | None
    windows: dict


def _capture(model: nn.Module, input_shape: tuple[int, ...], layers, mode: str, device: str,
             seed: int, layout: str) -> list[_Windows]:
    """Run one capture pass: every layer's local windows on its predecessors, in forward order."""
    seen = []
    with LayerEngine(model, input_shape, layers=layers, layout=layout, mode=mode, device=device,
                     seed=seed) as engine:
        for name, captured in engine.layers.items():
            out = tuple(captured.value.shape[2:])
            twin = engine.same_as(name)
            masks = {} if twin else engine.local_support(name, one_hot_weights(probe_rows(out), out))
            seen.append(_Windows(name, captured.type, int(captured.value.shape[1]), out, twin,
                                 {source: mask_bounds(mask)[:3] for source, mask in masks.items()}))
    return seen


def _compose(windows: dict, done: dict, single: bool) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """Union the predecessors' composed boxes per probe row (NaN where a row sees nothing).

    Also say whether the result is exact (no centre/neighbour window touched a predecessor's grid
    border, every predecessor exact) and whether it is pooled: a `single`-cell output whose window
    spans a whole predecessor grid of at least POOLED_GRID cells per axis, or a layer depending on
    one (global pooling: no larger input would make it exact).
    """
    lows, highs, exact, pooled = [], [], True, False
    for source, (lo, hi, count) in windows.items():
        hit = count > 0
        first, last = done[source].affine.box(lo, hi)
        lows.append(np.where(hit[:, None], first, np.inf))
        highs.append(np.where(hit[:, None], last, -np.inf))
        grid = np.array(done[source].out)
        touched = ((lo == 0) | (hi == grid - 1))[:-1][hit[:-1]]
        exact = exact and done[source].affine.exact and not touched.any()
        pooled = pooled or bool(hit.any() and done[source].pooled) or bool(
            single and hit[0] and (grid >= POOLED_GRID).all() and (lo[0] == 0).all() and (hi[0] == grid - 1).all())
    lo, hi = np.min(lows, axis=0), np.max(highs, axis=0)
    return np.where(np.isinf(lo), np.nan, lo), np.where(np.isinf(hi), np.nan, hi), exact, pooled


def _measure(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, exact: bool) -> _Affine:
    """Read RF size, stride and start at the centre row from composed unclipped bounds."""
    mid = rows[0]
    ndim = len(mid)
    steps = np.array([rows[1 + a, a] - mid[a] for a in range(ndim)], dtype=float)
    moved = np.array([lo[1 + a, a] - lo[0, a] for a in range(ndim)], dtype=float)
    stride = np.divide(moved, steps, out=np.full(ndim, np.nan), where=steps != 0)
    if not exact:  # a window pinned to the border does not move: that says nothing about the stride
        stride[moved == 0] = np.nan
    return _Affine(rf=hi[0] - lo[0] + 1, stride=stride, anchor=mid.astype(float), start=lo[0], exact=exact)


def _input_layer(input_shape: tuple[int, ...]) -> _Layer:
    """Return the model input as a pseudo-layer: RF 1, stride 1, padding 0 on every axis."""
    ndim = len(input_shape) - 2
    identity = _Affine(np.ones(ndim), np.ones(ndim), np.zeros(ndim), np.zeros(ndim), True)
    return _Layer("", "input", input_shape[1], tuple(input_shape[2:]), np.ones(ndim, dtype=np.int64), identity,
                  False, False, False)


def _measure_layer(seen: _Windows, n: np.ndarray, done: dict, known: dict) -> _Layer:
    """Measure one layer by composing its windows; an exact geometry from a larger input overrides its own."""
    if seen.twin is not None:
        return replace(done[seen.twin], name=seen.name, type=seen.type)
    rows = probe_rows(seen.out)
    lo, hi, exact, pooled = _compose(seen.windows, done, single=max(seen.out) == 1)
    if np.isnan(lo[0]).any():  # gradient mode: the centre may see nothing at all
        nothing = _Affine(np.zeros(len(n)), np.full(len(n), np.nan), np.zeros(len(n)), np.full(len(n), np.nan), False)
        return _Layer(seen.name, seen.type, seen.channels, seen.out, np.zeros(len(n), dtype=np.int64),
                      known.get(seen.name, nothing), False, False, pooled)
    affine = known.get(seen.name) or _measure(rows, lo, hi, exact)
    covers = (lo <= 0) & (hi >= n - 1)
    size = np.nan_to_num(np.minimum(hi[0], n - 1) - np.maximum(lo[0], 0) + 1).astype(np.int64)
    return _Layer(seen.name, seen.type, seen.channels, seen.out, size, affine, bool(covers[0].all()),
                  bool(covers[0].all() and covers[-1].all()), pooled)


def _compose_all(captured: list[_Windows], input_shape: tuple[int, ...], known: dict) -> list[_Layer]:
    """Measure every captured layer in forward order."""
    n = np.array(input_shape[2:])
    done: dict[str | None, _Layer] = {None: _input_layer(input_shape)}
    for seen in _dependency_order(captured):
        done[seen.name] = _measure_layer(seen, n, done, known)
    return [done[seen.name] for seen in captured]


def _dependency_order(captured: list[_Windows]) -> list[_Windows]:
    """Order layers so each comes after the layers it reads from.

    Forward (hook) order is not enough: an identity-like module that fires late (a residual
    shortcut called after the body) can own the tensor that the body's first layer reads.
    """
    pending, ordered, ready = list(captured), [], {None}
    while pending:
        runnable = [w for w in pending if {w.twin} | set(w.windows) <= ready | {None}]
        if not runnable:
            raise SweepError(f"layer graph has a cycle around {pending[0].name!r}")
        for w in runnable:
            ordered.append(w)
            ready.add(w.name)
        pending = [w for w in pending if w.name not in ready]
    return ordered


def _refined(model: nn.Module, input_shape: tuple[int, ...], options: dict) -> list[_Layer]:
    """Measure every layer, taking the unclipped geometry of inexact ones from doubled inputs.

    The windows of the given input are recomposed with those exact geometries, so RF extents at
    the given size stay exact too. Stops when every layer is exact or pooled, after MAX_DOUBLINGS,
    when the input would exceed ENLARGE_LIMIT pixels, or when the model refuses the size.
    """
    base = _capture(model, input_shape, **options)
    known: dict[str, _Affine] = {}
    measured = _compose_all(base, input_shape, known)
    for doubling in range(1, MAX_DOUBLINGS + 1):
        bigger = (*input_shape[:2], *(n << doubling for n in input_shape[2:]))
        if all(m.affine.exact or m.pooled for m in measured) or math.prod(bigger[2:]) > ENLARGE_LIMIT:
            break
        try:
            larger = _compose_all(_capture(model, bigger, **options), bigger, known)
        except SweepError:
            break
        fixed = {m.name: m.affine for m in larger
                 if m.affine.exact and np.isfinite(m.affine.stride).all() and m.name not in known}
        if fixed:
            known.update(fixed)
            measured = _compose_all(base, input_shape, known)
    return measured


def _frame(measured: list[_Layer], ndim: int) -> pd.DataFrame:
    """Build the layers frame from measured rows."""
    data: dict[str, object] = {
        "order": np.arange(len(measured)), "layer": [m.name for m in measured], "type": [m.type for m in measured],
        "channels": [m.channels for m in measured], "rf_exact": [m.affine.exact for m in measured],
        "border": [m.border for m in measured], "global": [m.is_global for m in measured],
    }
    for axis, a in enumerate(axis_names(ndim)):
        data[f"out_{a}"] = [m.out[axis] for m in measured]
        data[f"{a}_size"] = [m.size[axis] for m in measured]
        data[f"{a}_rf"] = [int(m.affine.rf[axis]) if np.isfinite(m.affine.rf[axis]) else 0 for m in measured]
        data[f"{a}_stride"] = [m.affine.stride[axis] for m in measured]
        data[f"{a}_padding"] = [m.affine.padding[axis] for m in measured]
    return LAYERS.frame(data, ndim)


def layer_growth(model: nn.Module, input_shape, *, layers: list[str] | None = None, mode: str = "structural",
                 device: str = "auto", seed: int = 0, layout: str = "nchw") -> pd.DataFrame:
    """Return the layers frame: RF size, stride, padding and border flags per layer, in forward order.

    `layout` says how captured layer outputs are read (see rfreport.layouts); outputs that do not fit
    it are skipped.
    """
    shape = check_input_shape(tuple(input_shape))
    options = {"layers": layers, "mode": mode, "device": device, "seed": seed, "layout": layout}
    return _frame(_refined(model, shape, options), len(shape) - 2)
