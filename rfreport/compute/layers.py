"""Per-layer growth: RF size, effective stride and padding at the centre of every layer's output.

One forward pass of a :class:`~rfreport.compute.engine.LayerEngine` keeps every leaf module's output.
Per layer, one small batched backward from its centre, its next and previous neighbour per axis
and its first corner runs only as far as the layer's nearest captured predecessors (or the input);
gradients stop behind every other captured layer, so a window on a predecessor counts only the
paths that meet no other captured layer (a block read through residual sums that no module owns,
as in ConvNeXt or a transformer, would otherwise see every earlier block of its stage). The boxes
found there are composed with those predecessors' unclipped affine geometry (a box [a, b] on a
predecessor with size r, stride s and padding P covers the input from a*s - P to b*s - P + r - 1,
anchored at the predecessor's centre so a window on that centre alone needs no stride),
so the whole table costs about one backward pass however deep the model is.

Under the channels-first layout, outputs whose dim 1 changes with the input size are channels-last
tensors, not grids (ConvNeXt's norms and linear layers between permutes): two shape-only passes on
the meta device find them, and they are composed through rather than read as layers.

Composition is exact for affine layers whose local window stays clear of the predecessor's grid
border. A window counts as cut where it meets the border, where a cell past the border lies within the
widest gap between the cells it reads (a dilated kernel's taps), or where another probe row's window is
wider than the centre's. Where the border cuts a window (deep grids of one or two cells at small inputs) the
unclipped values are only lower bounds, and they are taken, axis by axis, from reruns on an
input doubled along that axis (the other axes shrunk to an eighth: windows along one axis do not
depend on the others) when the model accepts one and the pass shows no op that makes the
geometry depend on the input size (see sizedep.py). A rerun measures the windows of the layers not yet
exact on its axis only: the others enter its composition with their exact geometry. A layer whose
windows are not affine at its centre (the previous and next neighbours' windows move by different
steps or not at all, as through upsampling or a transposed convolution, or change size away from any
border) cannot be composed: it, and every layer reading from it, is measured directly by a backward
from its centre and corner rows to the input, and reported with its size at the centre, no stride and
`rf_exact` false.
A layer read through a predecessor whose geometry is unknown (an output whose
centre sees nothing, e.g. a window lying wholly in padding) reports size 0 and `rf_exact` false.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from rfreport.compute.dense import one_hot_weights
from rfreport.compute.engine import LayerEngine, Target, check_input_shape, forward_target, preserved
from rfreport.compute.shapes import meta_pass, on_meta, scaled
from rfreport.compute.verify import shifted_ops
from rfreport.errors import SweepError
from rfreport.options import POOLED_LAYER
from rfreport.positions import axis_names, center
from rfreport.results import mask_bounds
from rfreport.schema import Column, Schema, register

MAX_DOUBLINGS = 3
STRETCH_MIN = 32  # a rerun stretched along one axis keeps the others at least this size
ENLARGE_LIMIT = 1 << 18  # input pixels (spatial) a rerun may use
REPEAT = "#"  # a module's later calls are captured as `name#2`, `name#3`, ... (composed through, not reported)
POOLED_GRID = 4  # a one-cell output whose window spans a whole grid this large per axis is global pooling
# autograd node kinds that can stand behind a size-dependent op (sizedep.py): when the pass has one, a
# layer reading through any of them is measured directly
RESIZING = ("Upsample", "Adaptive", "Cat", "Slice", "Select", "Split", "Flip", "Roll", "Index", "Gather", "Scatter",
            "View", "Reshape", "Unsafe", "Im2Col", "Col2Im", "Mm", "Permute", "Transpose", "Expand", "Repeat")

LAYERS = register(Schema(
    name="layers",
    row="layer (leaf module or chosen name) whose output is a spatial tensor of the input's rank, in forward order "
        "(channels-last tensors inside a channels-first model are left out)",
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
               "(NaN when the axis has a single position at every size tried, or the layer is not affine)"),
        Column("{a}_padding", "float64", "input pixels", "effective padding P: the unclipped RF of output "
               "position p starts at input index -P + p * stride"),
        Column("rf_exact", "bool", "flag", "the unclipped values are exact; false when a local window met a grid "
               "border at every input size tried, or when the layer's geometry is not affine (it reads through "
               "upsampling or a transposed convolution: then the size is measured directly, with no stride)"),
        Column("border", "bool", "flag", "border layer: the centre position's RF already covers the whole input, "
               "so this layer's depth adds no context at this resolution"),
        Column("global", "bool", "flag", "both the centre and the first corner position see the whole input"),
        Column("estimated", "string", "", "why the unclipped values are not exact (empty when rf_exact)"),
        Column("target", "bool", "flag", "the analysed tensor is this layer's output (the outermost module whose "
               "output it is, captured as a row even when it is not a leaf)"),
    ),
))
NOT_AFFINE = ("not affine at its centre (its windows do not move in equal steps, as through upsampling or a "
              "transposed convolution, or it reads through a size-dependent op): the size is measured at the centre, "
              "with no stride or padding")
UNKNOWN = "its centre reads a layer whose geometry is unknown"
CLIPPED = ("a grid border cuts a local window on {axes} (here or upstream) and no larger input tried gave exact "
           "values: the RF is a lower bound")


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
    exact: np.ndarray  # per axis

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
    direct: bool = False      # measured by a backward to the input: its geometry is not affine
    unknown: bool = False     # its centre reads a predecessor whose geometry is unknown


def probe_rows(shape: tuple[int, ...], axis: int | None = None, corner: bool = True) -> np.ndarray:
    """Return the output positions probed per layer: centre, next and previous neighbour per axis, first corner.

    A missing neighbour (an axis of one or two cells) repeats the centre, or the other side for the next one.
    With `axis`, only the neighbours on that axis are probed besides the centre (the other rows repeat
    it); without `corner`, the corner row repeats the centre too. Repeated rows cost nothing.
    """
    mid = np.array(center(shape), dtype=np.int64)
    following, previous = [], []
    for a, n in enumerate(shape):
        after, before = mid.copy(), mid.copy()
        after[a] = mid[a] + 1 if mid[a] + 1 < n else max(mid[a] - 1, 0)
        before[a] = max(mid[a] - 1, 0)
        following.append(after)
        previous.append(before)
    if axis is not None:
        following = [f if a == axis else mid for a, f in enumerate(following)]
        previous = [p if a == axis else mid for a, p in enumerate(previous)]
    first = np.zeros(len(shape), dtype=np.int64) if corner and axis is None else mid
    return np.stack([mid, *following, *previous, first])


@dataclass(frozen=True)
class _Windows:
    """What one capture pass saw of a layer: its grid and its local windows on its predecessors.

    `windows` maps each nearest predecessor (None for the input) to (lo, hi, count, gap) per probe row (gap:
    the widest run of unread cells between read ones per axis, as between a dilated kernel's taps); `direct`,
    set for layers measured by a backward to the input, holds (lo, hi, count) of the centre and first corner
    rows (the other rows are read by composition alone); `given`, set for layers whose geometry on the probed
    axis is exact already, holds that geometry anchored at this grid's centre (no windows measured).
    """

    name: str
    type: str
    channels: int
    out: tuple[int, ...]
    twin: str | None
    windows: dict
    rows: np.ndarray
    direct: tuple | None = None
    given: _Affine | None = None
    past_grid: frozenset[int] = frozenset()   # axes where a kernel upstream hides a cut window (see surrogate)


@dataclass(frozen=True)
class _Capture:
    """One capture pass: every layer's windows in forward order, the size-dependent ops of the pass, and whether
    it stacked its probes (see LayerEngine's `stacked`)."""

    layers: list[_Windows]
    size_dependent: tuple[str, ...]
    stacked: bool


def _capture(model: nn.Module, input_shape: tuple[int, ...], layers, mode: str, device: str,
             seed: int, layout: str = "nchw", upto: str | None = None,
             force: frozenset[str] = frozenset(), axis: int | None = None, corner: bool = True,
             skip: frozenset[str] = frozenset(), reuse: tuple[_Windows, ...] = (), stacked: bool = False,
             given: dict[str, _Affine] | None = None) -> _Capture:
    """Run one capture pass: every layer's local windows on its predecessors, in forward order.

    With `upto`, only that layer and the layers it reads from, transitively, are measured; the
    layers in `force` (and those reading from them) are measured directly. `axis` and `corner`
    choose the probe rows (see probe_rows). `reuse` holds the windows an earlier pass of the same
    input and options measured: they are taken as they are, with no backward pass. `stacked`: an earlier pass
    of the model stacked its probes, so this one does from the start. `given` maps layers whose geometry on
    `axis` is exact already to that geometry: their windows are not measured, the layers reading them compose
    with it.
    Layers whose window map is not affine, and every layer reading from one, are measured directly
    instead: one backward from their probe rows to the input.
    """
    with _EveryCall(model, input_shape, layers=layers, layout=layout, mode=mode, device=device,
                    seed=seed, skip=skip, stacked=stacked) as engine:
        wanted = _cone(engine, upto) if upto else set(engine.layers)
        earlier = {w.name: w for w in reuse}
        seen = []
        for name, captured in engine.layers.items():
            if name not in wanted:
                continue
            if name in earlier:
                seen.append(earlier[name])
                continue
            out = tuple(captured.value.shape[2:])
            twin = engine.same_as(name)
            rows = probe_rows(out, axis, corner)
            if twin is None and axis is not None and name in (given or {}):
                seen.append(_Windows(name, captured.type, int(captured.value.shape[1]), out, None, {}, rows,
                                     given=_anchored(given[name], axis, rows[0])))
                continue
            unique, back = np.unique(rows, axis=0, return_inverse=True)
            masks = {} if twin else _windows_of(engine, name, one_hot_weights(unique, out))
            seen.append(_Windows(name, captured.type, int(captured.value.shape[1]), out, twin,
                                 {source: tuple(v[back.ravel()] for v in (*mask_bounds(mask)[:3], _gaps(mask)))
                                  for source, mask in masks.items()}, rows, past_grid=captured.past_grid))
        # a channels-last or token layout reshapes on purpose: there the window checks alone decide
        resizing = {w.name for w in seen if engine.size_dependent_ops and str(layout) == "nchw"
                    and _reads_through_resizing(engine, w.name)}
        blocked = _not_composable(seen, tuple(input_shape[2:]), resizing | force)
        # for one target, a non-composable layer on its way only makes it inexact: no backward per layer
        seen = _measured_directly(engine, seen, blocked) if upto is None else _unmeasured(seen, blocked)
        return _Capture(seen, engine.size_dependent_ops, engine.probes > 1)


def _anchored(affine: _Affine, axis: int, centre: np.ndarray) -> _Affine:
    """Return a geometry anchored at another grid's centre (the same size, stride and padding), exact on `axis`
    only."""
    anchor = centre.astype(float)
    start = np.where(anchor == 0, 0.0, anchor * affine.stride) - affine.padding
    return _Affine(affine.rf, affine.stride, anchor, start, np.arange(len(anchor)) == axis)


def _windows_of(engine: LayerEngine, name: str, rows: torch.Tensor) -> dict:
    """Return a layer's supports of one-hot probe rows on its nearest predecessors: one backward pass for all rows
    where the layer reads them position by position (see LayerEngine.pointwise_sources), else a pass per row."""
    sources = engine.pointwise_sources(name)
    return engine.local_support(name, rows) if sources is None else engine.pointwise_support(name, rows, sources)


def _unmeasured(seen: list[_Windows], names: set[str]) -> list[_Windows]:
    """Mark the named layers as measured directly with nothing seen (size 0, never exact)."""
    def nothing(w: _Windows) -> tuple:
        ndim = len(w.out)
        return np.full((2, ndim), -1), np.full((2, ndim), -1), np.zeros(2, dtype=np.int64)
    return [replace(w, direct=nothing(w)) if w.name in names and w.direct is None else w for w in seen]


def _measured_directly(engine: LayerEngine, seen: list[_Windows], names: set[str]) -> list[_Windows]:
    """Measure the named layers (not measured yet) by a backward from their centre and first corner rows to the
    input (a direct row reads nothing else: see `_direct_layer`)."""
    def direct(w: _Windows) -> tuple:
        unique, back = np.unique(w.rows[[0, -1]], axis=0, return_inverse=True)
        mask = engine.local_support(w.name, one_hot_weights(unique, w.out), sources=[None])[None]
        return tuple(v[back.ravel()] for v in mask_bounds(mask)[:3])
    return [replace(w, direct=direct(w)) if w.name in names and w.direct is None else w for w in seen]


class _EveryCall(LayerEngine):
    """A layer engine that also keeps a module's later calls, as `name#2`, `name#3`, ...

    A module called several times (torchvision's blocks reuse one ReLU) would otherwise leave its
    later outputs uncaptured, and windows reaching through them span whole stages: wide enough to
    meet grid borders, and one backward through the stage per layer.
    """

    def _recorder(self, name: str, wanted: set[str]):
        """Return a hook that keeps every spatial output of a module, the first under its own name."""
        recorder = super()._recorder

        def record(module, inputs, out):
            key, calls = name, 1
            while key in self.layers:
                calls += 1
                key = f"{name}{REPEAT}{calls}"
            recorder(key, wanted, name)(module, inputs, out)

        return record


def _cone(engine: LayerEngine, name: str) -> set[str]:
    """Return a captured layer and every captured layer it reads from, transitively."""
    if name not in engine.layers:
        raise SweepError(f"layer {name!r} has no spatial output of the input's rank")
    found, stack = set(), [name]
    while stack:
        layer = stack.pop()
        if layer in found:
            continue
        found.add(layer)
        twin = engine.same_as(layer)
        stack.extend([twin] if twin else [s for s in engine.predecessors(layer) if s is not None])
    return found


def _reads_through_resizing(engine: LayerEngine, name: str) -> bool:
    """Tell whether the autograd nodes between a layer and its captured predecessors include one of the
    kinds (RESIZING) behind size-dependent ops, whose windows a few probe rows cannot vouch for."""
    owned = {(layer.edge.node, layer.edge.output_nr) for layer in engine.layers.values() if layer.name != name}
    start = engine.layers[name].edge.node
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        if any(kind in type(node).__name__ for kind in RESIZING):
            return True
        for child, nr in node.next_functions:
            if child is not None and (child, nr) not in owned and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


def _gaps(masks: torch.Tensor) -> np.ndarray:
    """Return the widest run of unread cells between read ones per axis of each boolean mask (B, *grid)."""
    masks = np.asarray(masks)
    ndim = masks.ndim - 1
    gaps = np.zeros((len(masks), ndim), dtype=np.int64)
    for axis in range(ndim):
        read = masks.any(axis=tuple(d + 1 for d in range(ndim) if d != axis)) if ndim > 1 else masks
        cells = np.arange(read.shape[1])
        last = np.maximum.accumulate(np.where(read, cells, -1), axis=1)   # the last read cell up to each cell
        before = np.concatenate([np.full((len(read), 1), -1), last[:, :-1]], axis=1)
        gaps[:, axis] = np.where(read & (before >= 0), cells - before - 1, 0).max(axis=1, initial=0)
    return gaps


def _not_composable(seen: list[_Windows], input_spatial: tuple[int, ...], resizing: set[str]) -> set[str]:
    """Return the layers whose window map is not affine at their centre or that read through a resizing
    op, and every layer reading from one."""
    grids = {None: input_spatial, **{w.name: w.out for w in seen}}
    found: set[str] = set()
    for w in _dependency_order(seen):
        if (w.name in resizing or w.twin in found or any(source in found for source in w.windows)
                or any(_window_flags(w.rows, *bounds, np.array(grids[source]))[1]
                       for source, bounds in w.windows.items())):
            found.add(w.name)
    return found


def _window_flags(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, count: np.ndarray, gap: np.ndarray,
                  grid: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return (clipped per axis, nonaffine) for a layer's windows on one predecessor grid.

    Clipped: the centre window meets the grid border, or another probe row's window is wider than the
    centre's on that axis, or a next neighbour's window differs in size from the centre's where one of them
    meets it (a border may have cut it); a window meets the border where a cell past it lies within the widest
    gap between read cells. Not affine: a neighbour's window differs from the centre's in size, or on another
    axis, with no border to explain it, or the previous and next neighbours' windows move by different steps
    with no border to explain it (a border that cuts them explains it: then the axis is clipped), or a
    neighbour's window does not move with no border to pin it (upsampling, transposed convolutions).
    """
    ndim, hit = len(grid), count > 0
    # a window meets the border when a cell past it could be read: within the widest gap between read cells
    reach = np.where(hit[:, None], gap, 0).max(axis=0)
    touch = (lo <= reach) | (hi >= grid - 1 - reach)
    size = hi - lo + 1
    # clipping only shrinks the translates of one window: one wider than the centre's shows the centre cut, even
    # where the cut leaves it clear of the border (a dilated kernel's taps beyond it)
    clipped = (touch[0] | ((size > size[0]) & hit[:, None]).any(axis=0)) & hit[0]
    nonaffine = bool(hit[1:-1].any() and not hit[0])
    for axis in range(ndim):
        sides = [r for r in (1 + axis, 1 + ndim + axis) if rows[r, axis] != rows[0, axis] and hit[r] and hit[0]]
        for r in sides:
            if (size[r] == size[0]).all():
                nonaffine = nonaffine or (lo[r, axis] == lo[0, axis] and not touch[[0, r], axis].any())
                continue
            if not (touch[r].any() or touch[0].any()):
                nonaffine = True
            elif r <= ndim:  # the composition reads the next neighbours; the previous ones only check steps
                clipped[axis] = True
        if len(sides) == 2 and all((size[r] == size[0]).all() for r in sides):
            after, before = lo[sides[0], axis] - lo[0, axis], lo[0, axis] - lo[sides[1], axis]
            if after != before and touch[[0, *sides], axis].any():
                clipped[axis] = True   # a border cut one of them to the same size (a dilated kernel's taps)
            else:
                nonaffine = nonaffine or after != before
    return clipped, nonaffine


def _compose(windows: dict, done: dict, rows: np.ndarray, single: bool) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """Union the predecessors' composed boxes per probe row (NaN where a row sees nothing).

    Also say per axis whether the result is exact (no window clipped by a predecessor's grid
    border there, see `_window_flags`, every predecessor exact there) and whether it is pooled: a
    `single`-cell output whose window spans a whole predecessor grid of at least POOLED_GRID cells
    per axis, or a layer depending on one (global pooling: no larger input would make it exact).
    """
    lows, highs, exact, pooled = [], [], np.ones(rows.shape[1], dtype=bool), False
    for source, (lo, hi, count, gap) in windows.items():
        hit = count > 0
        first, last = done[source].affine.box(lo, hi)
        lows.append(np.where(hit[:, None], first, np.inf))
        highs.append(np.where(hit[:, None], last, -np.inf))
        grid = np.array(done[source].out)
        clipped, _ = _window_flags(rows, lo, hi, count, gap, grid)
        exact = exact & done[source].affine.exact & ~clipped
        pooled = pooled or bool(hit.any() and done[source].pooled) or bool(
            single and hit[0] and (grid >= POOLED_GRID).all() and (lo[0] == 0).all() and (hi[0] == grid - 1).all())
    lo, hi = np.min(lows, axis=0), np.max(highs, axis=0)
    return np.where(np.isinf(lo), np.nan, lo), np.where(np.isinf(hi), np.nan, hi), exact, pooled


def _measure(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, exact: np.ndarray) -> _Affine:
    """Read RF size, stride and start at the centre row from composed unclipped bounds."""
    mid = rows[0]
    ndim = len(mid)
    steps = np.array([rows[1 + a, a] - mid[a] for a in range(ndim)], dtype=float)
    moved = np.array([lo[1 + a, a] - lo[0, a] for a in range(ndim)], dtype=float)
    stride = np.divide(moved, steps, out=np.full(ndim, np.nan), where=steps != 0)
    stride[(moved == 0) & ~exact] = np.nan  # a window pinned to the border does not move: no stride there
    return _Affine(rf=hi[0] - lo[0] + 1, stride=stride, anchor=mid.astype(float), start=lo[0], exact=exact)


def _input_layer(input_shape: tuple[int, ...]) -> _Layer:
    """Return the model input as a pseudo-layer: RF 1, stride 1, padding 0 on every axis."""
    ndim = len(input_shape) - 2
    identity = _Affine(np.ones(ndim), np.ones(ndim), np.zeros(ndim), np.zeros(ndim), np.ones(ndim, dtype=bool))
    return _Layer("", "input", input_shape[1], tuple(input_shape[2:]), np.ones(ndim, dtype=np.int64), identity,
                  False, False, False)


def _measure_layer(seen: _Windows, n: np.ndarray, done: dict, known: dict) -> _Layer:
    """Measure one layer by composing its windows; an exact geometry from a larger input overrides its own."""
    if seen.twin is not None:
        return replace(done[seen.twin], name=seen.name, type=seen.type)
    rows = seen.rows
    if seen.direct is not None:
        return _direct_layer(seen, rows, n)
    if seen.given is not None:   # a rerun reads only the geometry of such a layer (and the size, for its record)
        first, last = seen.given.box(rows[0], rows[0])
        size = np.nan_to_num(np.minimum(last, n - 1) - np.maximum(first, 0) + 1).astype(np.int64)
        return _Layer(seen.name, seen.type, seen.channels, seen.out, size, seen.given, False, False, False)
    lo, hi, exact, pooled = _compose(seen.windows, done, rows, single=max(seen.out) == 1)
    blind = np.isnan(lo[0]) | np.isnan(hi[0])  # the centre sees nothing, or reads through an unknown layer
    unknown = bool(blind.any() and any(window[2][0] > 0 for window in seen.windows.values()))
    if blind.all():
        nothing = _Affine(np.zeros(len(n)), np.full(len(n), np.nan), np.zeros(len(n)), np.full(len(n), np.nan),
                          np.zeros(len(n), dtype=bool))
        return _Layer(seen.name, seen.type, seen.channels, seen.out, np.zeros(len(n), dtype=np.int64),
                      known.get(seen.name, nothing), False, False, pooled, unknown=unknown)
    past = np.isin(np.arange(len(n)), list(seen.past_grid))   # windows narrower than their kernels there
    affine = _with_known(_measure(rows, lo, hi, exact & ~blind & ~past), known.get(seen.name))
    covers = (lo <= 0) & (hi >= n - 1)
    size = np.nan_to_num(np.minimum(hi[0], n - 1) - np.maximum(lo[0], 0) + 1).astype(np.int64)
    return _Layer(seen.name, seen.type, seen.channels, seen.out, size, affine, bool(covers[0].all()),
                  bool(covers[0].all() and covers[-1].all()), pooled, unknown=unknown)


def _with_known(affine: _Affine, known: _Affine | None) -> _Affine:
    """Take the axes a larger input measured exactly from `known`, the others from `affine`."""
    if known is None:
        return affine
    take = known.exact & ~affine.exact
    return _Affine(*(np.where(take, getattr(known, f), getattr(affine, f))
                     for f in ("rf", "stride", "anchor", "start", "exact")))


def _direct_layer(seen: _Windows, rows: np.ndarray, n: np.ndarray) -> _Layer:
    """Measure a layer from its centre and first corner rows' boxes on the input: the centre's extent, with no
    stride or padding (its geometry is not affine) and never exact."""
    lo, hi, count = seen.direct
    ndim = len(n)
    size = np.where(count[0], hi[0] - lo[0] + 1, 0)
    unknown = np.full(ndim, np.nan)
    affine = _Affine(rf=size.astype(float), stride=unknown, anchor=rows[0].astype(float), start=unknown,
                     exact=np.zeros(ndim, dtype=bool))
    covers = (lo <= 0) & (hi >= n - 1) & (count > 0)[:, None]
    return _Layer(seen.name, seen.type, seen.channels, seen.out, size.astype(np.int64), affine,
                  bool(covers[0].all()), bool(covers[0].all() and covers[-1].all()), False, direct=True)


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


def _refined(model: nn.Module, input_shape: tuple[int, ...], options: dict,
             global_context: bool = False) -> list[_Layer]:
    """Measure every layer, taking the unclipped geometry of inexact axes from inputs stretched along them.

    The windows of the given input are recomposed with those exact geometries, so RF extents at
    the given size stay exact too. Per axis, stops when every layer is exact there, pooled or measured directly,
    after MAX_DOUBLINGS, when the input would exceed ENLARGE_LIMIT pixels, when the model refuses
    the size or places some window differently there (TF "same" padding: verify.shifted_ops), or at once
    when the pass has size-dependent ops. Layers whose centre box is still
    unknown then (read through a predecessor without a stride) are measured directly (not when
    only the layer `upto` of the options is wanted: its reruns stop once it is settled). With
    `global_context` (the model's RFs are global through global pooling), layers whose centre RF
    covers the input here are not rerun (honestly inexact): global context keeps them so at every size.
    """
    if str(options.get("layout", "nchw")) == "nchw":
        options = {**options, "skip": channels_last_outputs(model, input_shape, options.get("layers"))}
    base = _capture(model, input_shape, **options)
    # reruns capture the layers of this pass only (what the base pass could not read, a rerun need not either),
    # their probes stacked from the start where this pass found ops that cancel
    options = {**options, "layers": list(dict.fromkeys(w.name.split(REPEAT)[0] for w in base.layers)),
               "stacked": base.stacked}
    known: dict[str, _Affine] = {}
    measured = _compose_all(base.layers, input_shape, known)
    for axis in range(len(input_shape) - 2):
        for doubling in range(1, MAX_DOUBLINGS + 1):
            bigger = _stretched(input_shape, axis, doubling)
            chosen = [m for m in measured if m.name == options.get("upto")] or measured
            done = _settled(measured, base.layers, axis, global_context)
            if (base.size_dependent or all(m.name in done for m in chosen)
                    or math.prod(bigger[2:]) > ENLARGE_LIMIT):
                break
            if shifted_ops(model, input_shape, _doubled_on(input_shape, axis, doubling), Target(options.get("upto"))):
                break   # that size places some window differently (TF "same" padding): its geometry is not this one's
            # layers exact on this axis here enter the rerun with their geometry: only the others' windows are measured
            exact = {m.name: m.affine for m in measured
                     if m.affine.exact[axis] and np.isfinite(m.affine.stride[axis]) and not m.direct}
            try:
                larger = _compose_all(_capture(model, bigger, **options, axis=axis, given=exact).layers, bigger, known)
            except SweepError:
                break
            fixed = {m.name: _with_known(known[m.name], _on_axis(m.affine, axis)) if m.name in known
                     else _on_axis(m.affine, axis) for m in larger
                     if m.affine.exact[axis] and np.isfinite(m.affine.stride[axis])}
            if fixed:
                known.update(fixed)
                measured = _compose_all(base.layers, input_shape, known)
    unknown = frozenset(m.name for m in measured if m.unknown)
    if unknown and not options.get("upto"):  # geometry unknown at every size: measure those layers directly
        again = _capture(model, input_shape, **options, force=unknown, reuse=tuple(base.layers))
        measured = _compose_all(again.layers, input_shape, known)
    return measured


def _settled(measured: list[_Layer], captured: list[_Windows], axis: int, global_context: bool) -> set[str]:
    """Return the layers no larger input can make exact on an axis: exact there already, pooled, measured
    directly, and with `global_context` border layers and the unknown layers reading only from settled ones
    (their unknown predecessor stays so: e.g. every stage after a squeeze-and-excitation block)."""
    sources = {w.name: {w.twin} if w.twin else set(w.windows) for w in captured}
    rows = {m.name: m for m in measured}
    done: set[str | None] = {None}
    for w in _dependency_order(captured):
        m = rows[w.name]
        if (m.affine.exact[axis] or m.pooled or m.direct or (global_context and m.border)
                or (global_context and m.unknown and sources[w.name] <= done)):
            done.add(w.name)
    return {name for name in done if name is not None}


def _stretched(input_shape: tuple[int, ...], axis: int, doubling: int) -> tuple[int, ...]:
    """Return the input shape with one spatial axis doubled `doubling` times and the others at an eighth.

    Windows along one axis do not depend on the other axes' sizes, so those shrink to keep the
    rerun cheap (never below STRETCH_MIN, nor above their given size).
    """
    spatial = [min(n, max(n // 8, STRETCH_MIN)) for n in input_shape[2:]]
    spatial[axis] = input_shape[2 + axis] << doubling
    return (*input_shape[:2], *spatial)


def _doubled_on(input_shape: tuple[int, ...], axis: int, doubling: int) -> tuple[int, ...]:
    """Return the input shape with one spatial axis doubled `doubling` times and the others as they are."""
    spatial = list(input_shape[2:])
    spatial[axis] <<= doubling
    return (*input_shape[:2], *spatial)


def _on_axis(affine: _Affine, axis: int) -> _Affine:
    """Keep only one axis of a geometry as exact."""
    return replace(affine, exact=np.arange(len(affine.exact)) == axis)


def _estimated(layer: _Layer, letters: str) -> str:
    """Say why a layer's unclipped values are not exact (empty when they are)."""
    if layer.affine.exact.all():
        return ""
    if layer.direct:
        return NOT_AFFINE
    if layer.unknown or not layer.size.any():
        return UNKNOWN
    if layer.pooled:
        return POOLED_LAYER
    cut = [a for a, ok in zip(letters, layer.affine.exact) if not ok]
    return CLIPPED.format(axes=f"{'axes' if len(cut) > 1 else 'axis'} {', '.join(cut)}")


def _frame(measured: list[_Layer], ndim: int, target: str | None = None) -> pd.DataFrame:
    """Build the layers frame from measured rows (a module's later calls are left out); `target` names the row
    whose output is the analysed tensor."""
    measured = [m for m in measured if REPEAT not in m.name]
    letters = axis_names(ndim)
    data: dict[str, object] = {
        "order": np.arange(len(measured)), "layer": [m.name for m in measured], "type": [m.type for m in measured],
        "channels": [m.channels for m in measured], "rf_exact": [bool(m.affine.exact.all()) for m in measured],
        "border": [m.border for m in measured], "global": [m.is_global for m in measured],
        "estimated": [_estimated(m, letters) for m in measured], "target": [m.name == target for m in measured],
    }
    for axis, a in enumerate(letters):
        data[f"out_{a}"] = [m.out[axis] for m in measured]
        data[f"{a}_size"] = [m.size[axis] for m in measured]
        data[f"{a}_rf"] = [int(m.affine.rf[axis]) if np.isfinite(m.affine.rf[axis]) else 0 for m in measured]
        data[f"{a}_stride"] = [m.affine.stride[axis] for m in measured]
        data[f"{a}_padding"] = [m.affine.padding[axis] for m in measured]
    return LAYERS.frame(data, ndim)


@dataclass(frozen=True)
class TargetGeometry:
    """The unclipped RF size, stride and padding per axis of a layer's centre, composed at one input size."""

    rf: np.ndarray
    stride: np.ndarray
    padding: np.ndarray
    exact: bool     # every value is exact
    pooled: bool    # the layer reads through global pooling: its RF is global at every size


def target_geometry(model: nn.Module, input_shape, layer: str, *, mode: str = "structural", device: str = "auto",
                    seed: int = 0) -> TargetGeometry:
    """Compose a layer's centre geometry from the windows of every leaf module it reads from.

    Axes whose windows a grid border cuts are taken from inputs stretched along them (see
    `_refined`); not exact when that fails, a non-affine layer is on the way or a single-cell axis
    has no stride.
    """
    shape = check_input_shape(tuple(input_shape))
    leaves = [n for n in leaf_names(model) if n]
    names = leaves if layer in leaves else [*leaves, layer]
    options = {"layers": names, "mode": mode, "device": device, "seed": seed, "upto": layer, "corner": False}
    row = {m.name: m for m in _refined(model, shape, options)}[layer]
    exact = bool(row.affine.exact.all() and np.isfinite(row.affine.stride).all())
    return TargetGeometry(row.affine.rf, row.affine.stride, row.affine.padding, exact, row.pooled)


def layer_growth(model: nn.Module, input_shape, *, layers: list[str] | None = None, mode: str = "structural",
                 device: str = "auto", seed: int = 0, layout: str = "nchw", global_context: bool = False,
                 target: Target | None = None) -> pd.DataFrame:
    """Return the layers frame: RF size, stride, padding and border flags per layer, in forward order.

    `layout` says how captured layer outputs are read (see rfreport.layouts); outputs that do not fit
    it are skipped. `global_context` (known from a local sweep) spares larger inputs for layers whose
    RF is global here. The row of the outermost module whose output is the `target` tensor is flagged
    (default: the model's output); a given target's module is captured even when it is not a leaf or
    not among `layers`.
    """
    shape = check_input_shape(tuple(input_shape))
    owner = target_module(model, shape, target or Target())
    names = layers or leaf_names(model)
    if target is not None and owner is not None and owner not in names:
        names = [*names, owner]
    options = {"layers": names, "mode": mode, "device": device, "seed": seed, "layout": layout}
    return _frame(_refined(model, shape, options, global_context), len(shape) - 2, owner)


def leaf_names(model: nn.Module) -> list[str]:
    """Return the names of a model's leaf modules (the layers captured by default), in definition order."""
    return [name for name, module in model.named_modules() if not list(module.children())]


def target_module(model: nn.Module, input_shape: tuple[int, ...], target: Target) -> str | None:
    """Return the outermost module whose first call outputs the target tensor, or None when no module's does."""
    return next((name for name in output_layers(model, input_shape, target) if REPEAT not in name), None)


def channels_last_outputs(model: nn.Module, input_shape: tuple[int, ...],
                           names: list[str] | None = None) -> frozenset[str]:
    """Return the modules (leaves, or `names`) whose output of the input's rank has a dim 1 that changes with the
    input size.

    Read as (N, C, *grid), a channels-last tensor inside a channels-first model (ConvNeXt's norms and linear
    layers between permutes, a Swin block) has a spatial size for its channels; a grid's channels never
    depend on the input size. Two shape-only passes on the meta device (the input, then the input doubled
    per axis) tell them apart, on a copy of the model whose parameters and buffers are meta stand-ins (no
    weight copied, no value computed, and state a forward pass keeps stays out of the user's model). A module
    is compared call by call; one that either pass does not reach is kept (the window checks decide).
    """
    shadow = on_meta(model)
    modules = dict(shadow.named_modules())
    wanted = names or [n for n, m in modules.items() if n and not list(m.children())]
    calls: dict[str, list[list[int]]] = {name: [[], []] for name in wanted if name in modules}

    def record(name: str, size: int):
        def hook(_module, _inputs, out):
            if isinstance(out, torch.Tensor) and out.dim() == len(input_shape):
                calls[name][size].append(int(out.shape[1]))
        return hook

    for size, scale in enumerate((1, 2)):
        handles = [modules[name].register_forward_hook(record(name, size)) for name in calls]
        meta_pass(shadow, scaled(input_shape, scale))
        for handle in handles:
            handle.remove()
    return frozenset(name for name, (given, doubled) in calls.items()
                     if any(a != b for a, b in zip(given, doubled)))


def output_layers(model: nn.Module, input_shape, target: Target) -> tuple[str, ...]:
    """Return the modules whose output is the target tensor itself, outermost first (empty when none is).

    A `features_only` backbone or an FPN returns its levels as the very outputs of named modules, so
    their layer-growth rows describe the levels. A module's later calls are named as the layer growth
    captures them (`name#2`, ...): a reused ReLU's first row describes its first call only. One forward
    pass of the model as given, in eval mode.
    """
    found: list[tuple[str, weakref.ref]] = []   # weak: outputs are freed as usual, and a freed one matches nothing
    calls: dict[str, int] = {}

    def record(name: str):
        def hook(_module, _inputs, out):
            if isinstance(out, torch.Tensor):
                calls[name] = calls.get(name, 0) + 1
                key = name if calls[name] == 1 else f"{name}{REPEAT}{calls[name]}"
                found.insert(0, (key, weakref.ref(out)))   # inner modules finish first
        return hook

    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = torch.zeros(check_input_shape(tuple(input_shape)), dtype=first.dtype if first is not None else None)
    x = x.to(first.device if first is not None else torch.device("cpu"))
    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    with preserved(model), torch.no_grad():
        model.eval()
        try:
            selected = forward_target(model, x, Target(target.layer, target.output), read_layout=False)
        except SweepError:
            return ()
        finally:
            for handle in handles:
                handle.remove()
    return tuple(name for name, ref in found if ref() is selected)


def exact_geometry(frame: pd.DataFrame | None, names: tuple[str, ...]) -> list[tuple] | None:
    """Return (size, stride, padding) per axis from the first exact layers-frame row among `names`, else None."""
    if frame is None or not names:
        return None
    rows = frame[frame["layer"].isin(names) & frame["rf_exact"]]
    if rows.empty:
        return None
    row = rows.set_index("layer").loc[next(n for n in names if n in set(rows["layer"]))]
    letters = axis_names(sum(c.endswith("_stride") for c in frame.columns))
    axes = [(int(row[f"{a}_rf"]), float(row[f"{a}_stride"]), float(row[f"{a}_padding"])) for a in letters]
    return axes if all(math.isfinite(v) for axis in axes for v in axis) else None
