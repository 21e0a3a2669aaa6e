"""Analysis: what a sweep's receptive fields mean, as documented frames, findings and a summary.

Pure pandas/numpy (no torch). Conventions follow Araujo, Norris & Sim, "Computing Receptive
Fields of Convolutional Neural Networks" (Distill, 2019): bounds are 0-based and inclusive; on
each axis an affine model has an RF size r, an effective stride s and an effective padding P,
so the unclipped RF of output position p spans [-P + p*s, -P + p*s + r - 1] and is centred at
-P + p*s + (r - 1)/2.

The *nominal pixel* of output position p is the centre of its stride cell, p*s + (s - 1)/2:
the input pixels [p*s, p*s + s - 1] that p stands for when the output grid tiles the input
(the alignment of `align_corners=False` resampling). The centre offset is the RF centre minus
the nominal pixel, (r - s)/2 - P, the same for every position of an affine model: 0 means
the feature sits exactly over its stride cell (ResNets have -0.5, half a pixel up-left).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rfreport.analysis.frames import POSITIONS, positions_frame
from rfreport.positions import axis_names, center
from rfreport.results import GlobalOp
from rfreport.schema import Column, Schema, register
from rfreport.summary import Summary, build

if TYPE_CHECKING:
    from rfreport.results import SweepResult

NONUNIFORM_RATIO = 1.5       # interior coverage max/min at or above this is a checkerboard
FALLOFF_RATIO = 0.5          # border coverage below this fraction of the interior median is a fall-off
MIRRORING = ("reflect", "replicate")
EXACT_FITS = ("affine", "enlarged", "composed")    # fits whose size, stride and padding are exact

GEOMETRY = register(Schema(
    name="geometry",
    row="spatial axis of the analysed output (affine RF geometry, Araujo et al. 2019)",
    columns=(
        Column("axis", "string", "", "axis letter"),
        Column("input_size", "int64", "input pixels", "input size on this axis"),
        Column("output_size", "int64", "output positions", "output size on this axis"),
        Column("size", "int64", "input pixels", "RF size r of an output position clear of the border (a lower "
               "bound when fit is `estimated`)"),
        Column("stride", "float64", "input pixels", "effective stride s: how far the RF moves per output step "
               "(NaN when it cannot be measured)"),
        Column("padding", "float64", "input pixels", "effective padding P: the unclipped RF of position p starts "
               "at -P + p * s"),
        Column("center_offset", "float64", "input pixels", "RF centre minus the nominal pixel p*s + (s-1)/2, i.e. "
               "(r - s)/2 - P"),
        Column("center_size", "int64", "input pixels", "RF extent of the centre output position as swept "
               "(clipped to the input)"),
        Column("fit", "string", "", "affine (exact fit), enlarged (every RF is clipped at this input: fitted "
               "exactly on a larger input, see problem), composed (every RF is clipped at this input: composed "
               "exactly from per-layer windows at this size, see problem), nonaffine (see problem), estimated (no "
               "position is clear of the border and no larger input was accepted: best estimate) or none (no "
               "position sees the input)"),
        Column("problem", "string", "", "why the fit is not affine, only estimated, enlarged or composed, and "
               "where; empty "
               "if affine"),
        Column("positions_used", "int64", "output positions", "positions whose unclipped RF the fit used"),
        Column("border_lo", "float64", "input pixels", "how far the first position's unclipped RF reaches before "
               "the input (fed by padding); negative: that many first pixels are beyond its reach"),
        Column("border_hi", "float64", "input pixels", "how far the last position's unclipped RF reaches past the "
               "input's end; negative: that many last pixels are beyond its reach"),
        Column("edge_lo", "Int64", "output positions", "output positions whose RF leaves the input at the low side"),
        Column("edge_hi", "Int64", "output positions", "output positions whose RF leaves the input at the high side"),
        Column("valid_lo", "Int64", "output index", "first output position whose RF lies fully inside the input"),
        Column("valid_hi", "Int64", "output index", "last output position whose RF lies fully inside the input"),
        Column("asymmetric", "bool", "flag", "the low and high borders are treated differently (border reach or "
               "edge count differs)"),
        Column("local_size", "Int64", "input pixels", "RF size with global-context paths held constant (local "
               "sweep); null without one"),
        Column("local_stride", "float64", "input pixels", "effective stride of the local RF"),
        Column("local_padding", "float64", "input pixels", "effective padding of the local RF"),
    ),
))

EDGES = register(Schema(
    name="edges",
    row="swept output position, with its edge effects",
    columns=(*POSITIONS.columns,
             Column("{a}_start", "float64", "input index", "unclipped RF start predicted by the affine fit, "
                    "-P + p*s (NaN without a fit)"),
             Column("{a}_end", "float64", "input index", "unclipped RF end predicted by the fit, start + r - 1"),
             Column("{a}_out_lo", "float64", "input pixels", "RF rows/columns before the input's start (fed by "
                    "padding)"),
             Column("{a}_out_hi", "float64", "input pixels", "RF rows/columns past the input's end (fed by padding)"),
             Column("{a}_clip_lo", "bool", "flag", "the RF is cut (or wraps) at the low border of this axis"),
             Column("{a}_clip_hi", "bool", "flag", "the RF is cut (or wraps) at the high border of this axis"),
             Column("edge", "bool", "flag", "the RF reaches past the input on some side: the position sees padding"),
             ),
))


@dataclass(frozen=True)
class Finding:
    """One plain-language observation about a model's receptive fields."""

    code: str        # stable id, e.g. "edge", "unseen", "global", "covers", "wrap", "holes", "nonaffine", "border"
    severity: str    # "info" | "warning"
    message: str     # a plain sentence for the report


@dataclass(frozen=True)
class Analysis:
    """Everything the report shows about one model at one input shape, computed once."""

    geometry: pd.DataFrame
    positions: pd.DataFrame
    coverage: np.ndarray
    layers: pd.DataFrame | None
    findings: tuple[Finding, ...]
    summary: Summary


@dataclass(frozen=True)
class AxisFit:
    """The affine geometry of one axis: RF size, stride, padding, how it was found and what was wrong."""

    size: int
    stride: float
    padding: float
    fit: str
    problem: str = ""
    used: int = 0

    def start(self, pos: np.ndarray) -> np.ndarray:
        """Return the predicted unclipped RF start of output positions (exact at position 0 without a stride)."""
        pos = np.asarray(pos, dtype=float)
        return np.where(pos == 0, 0.0, pos * self.stride) - self.padding

    @property
    def center_offset(self) -> float:
        """Return the RF centre minus the nominal pixel p*s + (s-1)/2, the same for every position."""
        return (self.size - self.stride) / 2 - self.padding


@dataclass(frozen=True)
class Boxes:
    """Per-position RF boxes of a sweep (non-empty supports only), the input to the fit."""

    positions: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    wrapped: np.ndarray

    @classmethod
    def of(cls, *results: SweepResult | None) -> Boxes:
        """Merge the non-empty rows of one or more sweeps of the same output, one row per position."""
        parts = [r for r in results if r is not None]
        pos = np.concatenate([r.positions for r in parts])
        keep = np.concatenate([r.support > 0 for r in parts])
        _, first = np.unique(pos, axis=0, return_index=True)
        rows = np.intersect1d(first, np.flatnonzero(keep))
        stack = {name: np.concatenate([getattr(r, name) for r in parts])[rows] for name in ("lo", "hi", "wrapped")}
        return cls(pos[rows], stack["lo"], stack["hi"], stack["wrapped"])


def _mode(values: np.ndarray) -> int:
    """Return the most common value, the largest on a tie."""
    uniq, counts = np.unique(values, return_counts=True)
    return int(uniq[counts == counts.max()].max())


def _steps(pos: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Return the sorted distinct positions, the bound's step per output step, and any inconsistency.

    A position with several different bounds means the axis depends on the other axes' positions.
    """
    order = np.argsort(pos, kind="stable")
    pos, bound = pos[order], bound[order]
    uniq, first = np.unique(pos, return_index=True)
    problem = ""
    if len(uniq) < len(pos) and any(len(set(bound[pos == p])) > 1 for p in uniq):
        problem = "the RF bounds on this axis change with the other axes' positions"
    values = bound[first]
    steps = np.diff(values) / np.diff(uniq) if len(uniq) > 1 else np.empty(0)
    return uniq, steps, problem


def _stride_of(steps: np.ndarray, pos: np.ndarray, axis: str) -> tuple[float, str]:
    """Return the stride from per-step moves and a problem when it varies from step to step."""
    if len(steps) == 0:
        return math.nan, ""
    if np.all(steps == steps[0]):
        return float(steps[0]), ""
    varying = pos[1:][steps != np.median(steps)]
    return float(np.mean(steps)), (f"the stride on axis {axis} varies from step to step ({_list(np.unique(steps))} "
                                   f"input pixels; first at output position {int(varying[0])})")


def _list(values) -> str:
    """Format numbers compactly: 1, 2.5, 3."""
    return ", ".join(f"{v:g}" for v in values)


def fit_axis(pos: np.ndarray, lo: np.ndarray, hi: np.ndarray, wrapped: np.ndarray, n: int,
             axis: str = "h") -> AxisFit:
    """Fit the affine geometry of one axis from RF bounds of non-empty positions on an input of size n.

    Clipping (by the input border or by an intermediate layer's padding) only ever shrinks a box,
    so the RF size is the largest box seen, provided boxes of that size at two or more positions lie
    clear of the border (strictly inside the input, or wrapped: unrolled bounds are complete; one
    alone may still be cut by an intermediate layer's padding). The fit uses every box of that size;
    clear boxes of another size that no clipping explains make the axis non-affine. Otherwise the
    geometry is only estimated from positions free on one side.
    """
    if len(pos) == 0:
        return AxisFit(0, math.nan, math.nan, "none", f"no output position sees the input on axis {axis}")
    size = hi - lo + 1
    r = int(size.max())
    used = size == r
    clear = wrapped | ((lo > 0) & (hi < n - 1))
    if len(np.unique(pos[used & clear])) < 2:
        return _estimate(pos, lo, hi, n, axis)
    uniq, steps, problem = _steps(pos[used], lo[used])
    stride, varying = _stride_of(steps, uniq, axis)
    if math.isnan(stride):
        stride = _one_sided_stride(pos, lo, hi, n)
    padding = float(np.median(AxisFit(r, stride, 0.0, "affine").start(pos[used]) - lo[used]))
    fit = AxisFit(r, stride, padding, "affine", used=int(used.sum()))
    problems = [p for p in (problem, varying, _odd_sizes(fit, pos[clear], lo[clear], hi[clear], n, axis)) if p]
    return AxisFit(r, stride, padding, "nonaffine" if problems else "affine", "; ".join(problems), int(used.sum()))


def _odd_sizes(fit: AxisFit, pos: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: int, axis: str) -> str:
    """Describe clear positions whose box the fit does not predict and clipping cannot explain."""
    start = fit.start(pos)
    end = start + fit.size - 1
    predicted = (lo == start) & (hi == end)
    clipped = ((start < 0) | (end > n - 1)) & (lo >= start) & (hi <= end)
    odd = ~(predicted | clipped)
    if math.isnan(fit.stride) or not odd.any():
        return ""
    sizes = np.unique(hi[odd] - lo[odd] + 1)
    if set(sizes.tolist()) == {fit.size}:
        first = int(np.flatnonzero(odd)[0])
        return (f"the RF on axis {axis} does not move by a constant stride (output position {int(pos[first])} "
                f"starts at {int(lo[first])}, not {start[first]:g})")
    return (f"the RF size on axis {axis} varies between interior positions ({_list(sizes)} besides {fit.size}; "
            f"e.g. output position {int(pos[odd][0])})")


def _one_sided_stride(pos: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: int) -> float:
    """Return the most common step of starts free of the low border and ends free of the high border."""
    left = _steps(pos[lo > 0], lo[lo > 0])[1]
    right = _steps(pos[hi < n - 1], hi[hi < n - 1])[1]
    steps = np.concatenate([left, right])
    return float(_mode(steps)) if len(steps) and np.all(steps == np.round(steps)) else (
        float(np.median(steps)) if len(steps) else math.nan)


def _estimate(pos: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: int, axis: str) -> AxisFit:
    """Estimate the geometry of an axis on which no full-size RF is clear of the border.

    The size is the largest box (a lower bound); stride and padding come from starts free of the
    low border or ends free of the high border.
    """
    stride = _one_sided_stride(pos, lo, hi, n)
    probe = AxisFit(int((hi - lo + 1).max()), stride, 0.0, "estimated")
    left, right = lo > 0, hi < n - 1
    if left.any():
        padding = float(np.median(probe.start(pos[left]) - lo[left]))
    elif right.any():
        padding = float(np.median(probe.start(pos[right]) + probe.size - 1 - hi[right]))
    else:
        padding = math.nan
    return AxisFit(probe.size, stride, padding, "estimated",
                   f"fewer than two output positions have a full-size RF clear of the input border on axis {axis}: "
                   "the size is "
                   "a lower bound and stride/padding come from positions free on one side", int((left | right).sum()))


def unwrap_shift(pos: np.ndarray, lo: np.ndarray, hi: np.ndarray, wrapped: np.ndarray, n: int,
                 out: int) -> np.ndarray:
    """Return the multiple of n to add to wrapped boxes so they line up with their neighbours.

    A wrapped box is unrolled either way ([-5, 1] and [7, 13] are the same pixels modulo 12);
    pick the copy whose centre is nearest the position's nominal place, (p + 1/2) * n / out - 1/2.
    """
    nominal = (pos + 0.5) * n / out - 0.5
    middle = (lo + hi) / 2
    shifts = np.array([-n, 0, n])
    best = shifts[np.argmin(np.abs(middle[:, None] + shifts[None, :] - nominal[:, None]), axis=1)]
    return np.where(wrapped, best, 0)


def with_enlarged(fits: list[AxisFit], enlarged: SweepResult | None) -> list[AxisFit]:
    """Replace estimated axes by their exact fit on a larger input (the affine geometry is size-independent)."""
    if enlarged is None:
        return fits
    larger = fit_geometry(Boxes.of(enlarged), enlarged.input_spatial, enlarged.output_spatial)
    sizes = "x".join(map(str, enlarged.input_spatial))
    return [replace(big, fit="enlarged", problem=f"every RF is clipped at this input size; fitted on a {sizes} input")
            if fit.fit == "estimated" and big.fit == "affine" else fit for fit, big in zip(fits, larger)]


def with_composed(fits: list[AxisFit], composed: Sequence[tuple] | None) -> list[AxisFit]:
    """Replace estimated axes by the exact geometry composed from per-layer windows at this input size."""
    if composed is None:
        return fits
    problem = "every RF is clipped at this input size; composed exactly from per-layer windows at this size"
    return [AxisFit(int(size), float(stride), float(padding), "composed", problem)
            if fit.fit == "estimated" else fit for fit, (size, stride, padding) in zip(fits, composed)]


def sized(fit: AxisFit, ops: Sequence[str]) -> AxisFit:
    """Say why an estimated axis was not fitted on a larger input when the geometry depends on the size."""
    if fit.fit != "estimated" or not ops:
        return fit
    return replace(fit, problem=f"{fit.problem}; the geometry depends on the input size ({', '.join(ops)}), so a "
                   "larger input cannot stand in for this one")


def fit_geometry(boxes: Boxes, input_spatial: Sequence[int], output_spatial: Sequence[int]) -> list[AxisFit]:
    """Fit every axis of a sweep's boxes, lining wrapped boxes up with their neighbours first."""
    names = axis_names(len(input_spatial))
    fits = []
    for a, (n, out) in enumerate(zip(input_spatial, output_spatial)):
        pos, lo, hi, wrapped = boxes.positions[:, a], boxes.lo[:, a], boxes.hi[:, a], boxes.wrapped[:, a]
        shift = unwrap_shift(pos, lo, hi, wrapped, n, out)
        fits.append(fit_axis(pos, lo + shift, hi + shift, wrapped, n, names[a]))
    return fits


def _valid_range(fit: AxisFit, n: int, out: int) -> tuple[int, int, int, int] | None:
    """Return (valid_lo, valid_hi, edge_lo, edge_hi) over every output position of an axis, or None."""
    start = fit.start(np.arange(out))
    if np.isnan(start).any():
        return None
    end = start + fit.size - 1
    valid = np.flatnonzero((start >= 0) & (end <= n - 1))
    first, last = (int(valid[0]), int(valid[-1])) if len(valid) else (-1, -1)
    return first, last, int((start < 0).sum()), int((end > n - 1).sum())


def geometry_frame(fits: list[AxisFit], input_spatial, output_spatial, center_size,
                   local: list[AxisFit] | None = None) -> pd.DataFrame:
    """Build the geometry frame, one row per axis, with borders, valid range and asymmetry."""
    rows = []
    for a, (fit, n, out) in enumerate(zip(fits, input_spatial, output_spatial)):
        span = _valid_range(fit, n, out)
        border_lo = 0.0 - float(fit.start(np.array([0]))[0])
        border_hi = float(fit.start(np.array([out - 1]))[0]) + fit.size - 1 - (n - 1)
        valid_lo, valid_hi, edge_lo, edge_hi = span if span else (pd.NA,) * 4
        asymmetric = bool(span is not None and (border_lo != border_hi or edge_lo != edge_hi))
        rows.append({
            "axis": axis_names(len(fits))[a], "input_size": n, "output_size": out, "size": fit.size,
            "stride": fit.stride, "padding": fit.padding, "center_offset": fit.center_offset,
            "center_size": int(center_size[a]), "fit": fit.fit, "problem": fit.problem,
            "positions_used": fit.used, "border_lo": border_lo, "border_hi": border_hi,
            "edge_lo": edge_lo, "edge_hi": edge_hi,
            "valid_lo": valid_lo if span and valid_lo >= 0 else pd.NA,
            "valid_hi": valid_hi if span and valid_hi >= 0 else pd.NA, "asymmetric": asymmetric,
            "local_size": local[a].size if local else pd.NA, "local_stride": local[a].stride if local else math.nan,
            "local_padding": local[a].padding if local else math.nan,
        })
    return GEOMETRY.frame({k: [row[k] for row in rows] for k in GEOMETRY.names(1)}, 1)


def edges_frame(result: SweepResult, fits: list[AxisFit]) -> pd.DataFrame:
    """Return the positions frame of a sweep plus predicted unclipped bounds and edge flags per position."""
    frame = positions_frame(result)
    data = {name: frame[name] for name in frame.columns}
    edge = np.zeros(len(frame), dtype=bool)
    for a, (name, fit, n) in enumerate(zip(axis_names(result.ndim), fits, result.input_spatial)):
        start = fit.start(result.positions[:, a])
        end = start + fit.size - 1
        known = ~np.isnan(start)
        data[f"{name}_start"], data[f"{name}_end"] = start, end
        data[f"{name}_out_lo"] = np.maximum(0.0, -start) + 0.0
        data[f"{name}_out_hi"] = np.maximum(0.0, end - (n - 1)) + 0.0
        data[f"{name}_clip_lo"] = np.where(known, start < 0, result.lo[:, a] <= 0)
        data[f"{name}_clip_hi"] = np.where(known, end > n - 1, result.hi[:, a] >= n - 1)
        edge |= data[f"{name}_clip_lo"] | data[f"{name}_clip_hi"]
    data["edge"] = edge
    return EDGES.frame(data, result.ndim)


def center_sizes(boxes: Boxes, output_spatial: Sequence[int]) -> np.ndarray:
    """Return the box size of the centre output position (or the swept position nearest to it)."""
    if len(boxes.positions) == 0:
        return np.zeros(len(output_spatial), dtype=np.int64)
    nearest = np.argmin(np.abs(boxes.positions - np.array(center(output_spatial))).sum(axis=1))
    return boxes.hi[nearest] - boxes.lo[nearest] + 1


def coverage_stats(coverage: np.ndarray) -> dict:
    """Return unseen pixel count and fraction, the interior max/min ratio of seen pixels, and the ratio of
    mean coverage on the input's outer rim to the mean over its central half."""
    interior = coverage[tuple(slice(n // 4, n - n // 4) if n >= 4 else slice(None) for n in coverage.shape)]
    seen = interior[interior > 0]
    rim = np.ones(coverage.shape, dtype=bool)
    rim[tuple(slice(1, n - 1) if n > 2 else slice(0, 0) for n in coverage.shape)] = False
    return {
        "unseen": int((coverage == 0).sum()),
        "unseen_fraction": float((coverage == 0).mean()),
        "ratio": float(seen.max() / seen.min()) if len(seen) else 1.0,
        "border": float(coverage[rim].mean() / interior.mean()) if interior.mean() else 1.0,
    }


def border_layers_from(layers: pd.DataFrame) -> str | None:
    """Return the first layer from which every later layer is a border layer, or None."""
    if layers is None or layers.empty or not layers["border"].iloc[-1]:
        return None
    tail = np.flatnonzero(~layers["border"].to_numpy())
    return str(layers["layer"].iloc[tail[-1] + 1 if len(tail) else 0])


def no_border_resolution(layers: pd.DataFrame, ndim: int) -> list[int] | None:
    """Return per axis the smallest input size at which no layer's unclipped RF covers it (rf + 1).

    Layers whose RF is global at every size (inexact and global) are left out; any other
    inexact layer makes the answer unknown (None).
    """
    if layers is None or layers.empty:
        return None
    exact = layers["rf_exact"].to_numpy()
    if (~exact & ~layers["global"].to_numpy()).any() or not exact.any():
        return None
    return [int(layers.loc[exact, f"{a}_rf"].max()) + 1 for a in axis_names(ndim)]


def global_from(layers: pd.DataFrame | None) -> str | None:
    """Return the first layer whose output has a global RF (centre and corner see everything), or None."""
    if layers is None or not layers["global"].any():
        return None
    return str(layers.loc[layers["global"], "layer"].iloc[0])


def is_global(boxes: Boxes, input_spatial: Sequence[int]) -> bool:
    """Tell whether every swept position's RF box spans the whole input (by saturation or global context)."""
    n = np.array(input_spatial)
    return bool(len(boxes.positions) and ((boxes.lo <= 0) & (boxes.hi >= n - 1)).all())


def one_box(boxes: Boxes) -> bool:
    """Tell whether every swept position has the same RF box, as a global operation on the path makes them."""
    return bool(len(boxes.positions) and (boxes.lo == boxes.lo[0]).all() and (boxes.hi == boxes.hi[0]).all())


def covering(lo: np.ndarray, hi: np.ndarray, support: np.ndarray, input_spatial: Sequence[int]) -> np.ndarray:
    """Return per position whether its RF box covers the whole input on every axis (unrolled boxes too)."""
    n = np.array(input_spatial)
    return (support > 0) & ((lo <= 0) & (hi >= n - 1)).all(axis=1)


def no_coverage_resolution(geo: pd.DataFrame, is_global_context: bool | None) -> list[int] | None:
    """Return per axis the input size from which no RF can cover the input (RF size + 1), or None.

    Unknown (None) under global context (every RF covers any input) or when some axis's RF size is
    only a lower bound (fit estimated or none).
    """
    if is_global_context or not geo["fit"].isin((*EXACT_FITS, "nonaffine")).all():
        return None
    return [int(size) + 1 for size in geo["size"]]


def _json(value: Any) -> Any:
    """Turn numpy scalars, NaN and NA into JSON-ready Python values."""
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return _json(value.item())
    return value


def _reach(pixels: float, where: str) -> str:
    """Describe how far an RF reaches past a border: `reaches 1 pixel(s) before the input` or `stops 1 short`."""
    if pixels < 0:
        return f"stops {-pixels:g} pixel(s) short of the border"
    return f"reaches {pixels + 0.0:g} pixel(s) {where}"


def _axes_text(values: Sequence) -> str:
    """Format per-axis values as `7 x 5`."""
    return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _edge_counts(geo: pd.DataFrame, edges: pd.DataFrame) -> tuple[int, int]:
    """Return (positions, edge positions): over the whole output grid from the fit, else over swept rows."""
    if (~geo["fit"].isin(EXACT_FITS)).any() or geo["edge_lo"].isna().any():
        return len(edges), int(edges["edge"].sum())
    total = int(np.prod(geo["output_size"]))
    inside = (geo["valid_hi"] - geo["valid_lo"] + 1).fillna(0).clip(lower=0)
    return total, total - int(np.prod(inside.astype(int)))


def _coverage_summary(result: SweepResult) -> dict:
    """Return the coverage keys of the summary; unseen pixels are judged only when every position was swept."""
    if len(result.positions) < math.prod(result.output_spatial):
        return {"unseen_pixels": None, "unseen_fraction": None, "coverage_nonuniform": False, "falloff": None}
    stats = coverage_stats(result.coverage)
    return {"unseen_pixels": stats["unseen"], "unseen_fraction": stats["unseen_fraction"],
            "coverage_nonuniform": stats["ratio"] >= NONUNIFORM_RATIO, "coverage_ratio": stats["ratio"],
            "falloff": stats["border"] if stats["border"] < FALLOFF_RATIO else None}


def _context_summary(result: SweepResult, geo: pd.DataFrame, global_ops: Sequence[GlobalOp] | None) -> dict:
    """Return the keys that tell global context (a global op) from RFs that merely cover the input."""
    covers = covering(result.lo, result.hi, result.support, result.input_spatial)
    count = int(covers.sum())
    known = global_ops is not None or not one_box(Boxes.of(result))   # a global op gives every RF one box
    first = global_ops[0] if global_ops else None
    is_global_context = bool(global_ops) if known else None
    return {
        "global": is_global_context, "global_from": first.layer if first else None, "global_op": first.op if first
        else None, "covers_input": bool(len(covers) and covers.all()), "covering_positions": count,
        "covering_fraction": count / len(covers) if len(covers) else 0.0,
        "no_coverage_resolution": no_coverage_resolution(geo, is_global_context),
    }


def _summary(result: SweepResult, geo: pd.DataFrame, edges: pd.DataFrame, local_fits: list[AxisFit] | None,
             modes: list[str], layers: pd.DataFrame | None,
             global_ops: Sequence[GlobalOp] | None) -> tuple[dict, dict]:
    """Collect the JSON-ready summary scalars of an analysis, and the coverage statistics."""
    positions, edge = _edge_counts(geo, edges)
    valid = None if geo["valid_lo"].isna().any() else {"lo": geo["valid_lo"].tolist(), "hi": geo["valid_hi"].tolist()}
    fill = edges.loc[edges["support"] > 0, "fill"]
    nonaffine = "; ".join(geo.loc[geo["fit"] == "nonaffine", "problem"])
    summary = {
        "rf_size": geo["size"].tolist(), "stride": geo["stride"].tolist(), "padding": geo["padding"].tolist(),
        "center_offset": geo["center_offset"].tolist(), "affine": bool(geo["fit"].isin(EXACT_FITS).all()),
        "nonaffine": nonaffine or None, "center_rf_size": geo["center_size"].tolist(),
        "positions": positions, "edge_positions": edge, "edge_fraction": edge / positions if positions else 0.0,
        "valid_region": valid, "asymmetric_axes": geo.loc[geo["asymmetric"], "axis"].tolist(),
        "holes": bool((fill < 1).any()), "min_fill": float(fill.min()) if len(fill) else 1.0,
        "wrapped": bool(result.wrapped.any()), "padding_modes": modes,
        **_context_summary(result, geo, global_ops),
        "local_rf_size": [f.size for f in local_fits] if local_fits else None,
        "border_layers_from": border_layers_from(layers),
        "no_border_resolution": no_border_resolution(layers, result.ndim),
        "size_dependent": list(result.size_dependent_ops) or None,
    }
    coverage = _coverage_summary(result)
    summary.update({k: coverage[k] for k in ("unseen_pixels", "unseen_fraction", "coverage_nonuniform")})
    summary.update(verification_summary(result))
    return {key: _json(value) for key, value in summary.items()}, coverage


def analyze(result: SweepResult, *, geometry: SweepResult | None = None, local: SweepResult | None = None,
            gradient: SweepResult | None = None, layers: pd.DataFrame | None = None,
            enlarged: SweepResult | None = None, composed: Sequence[tuple] | None = None,
            global_ops: Sequence[GlobalOp] | None = None, attention: dict | None = None) -> Analysis:
    """Analyse a sweep: affine geometry, edge effects, coverage, holes, wrap-around, global context, layers.

    `geometry` is an extra sweep of the fit's positions (merged into the fit; run.plan decides them),
    `enlarged` a sweep of a few positions on a larger input used where every RF is clipped here, `composed` the
    exact (size, stride, padding) per axis of the target composed from per-layer windows
    (`layers.target_geometry`), used there likewise, `local` a
    `local=True` sweep (the local RF under global context), `gradient` a gradient-mode sweep
    (padding modes, data-dependent support), `layers` the frame of `layers.layer_growth` and
    `global_ops` the global operations the output depends on (`context.global_ops`; None: not
    looked for, so global context is unknown wherever some RF covers the input).
    `attention` the record of run.plan.attention_record (attention modules and their reach).
    """
    boxes = Boxes.of(result, geometry)
    fits = with_enlarged(fit_geometry(boxes, result.input_spatial, result.output_spatial), enlarged)
    fits = with_composed(fits, composed)
    fits = [sized(fit, result.size_dependent_ops) for fit in fits]
    local_fits = (fit_geometry(Boxes.of(local), result.input_spatial, result.output_spatial)
                  if local is not None else None)
    geo = geometry_frame(fits, result.input_spatial, result.output_spatial,
                         center_sizes(boxes, result.output_spatial), local_fits)
    edges = edges_frame(result, fits)
    modes = sorted({m for r in (result, geometry, gradient) if r is not None for m in r.padding_modes})
    values, coverage = _summary(result, geo, edges, local_fits, modes, layers, global_ops)
    summary = build(Summary, values | {"attention": attention})
    context = _Context(result, geo, summary, coverage, gradient, layers)
    findings = tuple(f for rule in RULES for f in rule(context))
    return Analysis(geometry=geo, positions=edges, coverage=result.coverage, layers=layers, findings=findings,
                    summary=summary)


@dataclass(frozen=True)
class _Context:
    """What the finding rules read."""

    result: SweepResult
    geo: pd.DataFrame
    summary: Summary
    coverage: dict
    gradient: SweepResult | None
    layers: pd.DataFrame | None


def _geometry_findings(c: _Context) -> list[Finding]:
    """Report non-affine and estimated geometry."""
    found = [Finding("nonaffine", "warning", f"The RF geometry is not affine: {c.summary.nonaffine}.")
             ] if c.summary.nonaffine else []
    estimated = c.geo.loc[c.geo["fit"] == "estimated", "problem"]
    enlarged = c.geo.loc[c.geo["fit"].isin(["enlarged", "composed"]), ["axis", "problem"]]
    ops = c.summary.size_dependent
    sized = [Finding("size_dependent", "info", f"The RF geometry depends on the input size ({', '.join(ops)}): "
                     f"it holds at {_axes_text(c.result.input_spatial)} only and was measured there.")] if ops else []
    return found + [Finding("estimated", "info", f"Geometry estimated: {p}.") for p in estimated] + [
        Finding("enlarged", "info", f"Axis {axis}: {problem}.") for axis, problem in enlarged.itertuples(index=False)
    ] + sized


def _edge_findings(c: _Context) -> list[Finding]:
    """Report the share of positions that see padding, the valid region and asymmetric borders."""
    s = c.summary
    found = []
    if s.edge_positions:
        valid = s.valid_region
        where = (f"; only output positions {_axes_text(valid.lo)} to {_axes_text(valid.hi)} see real input "
                 "alone" if valid else "; no output position sees real input alone")
        found.append(Finding("edge", "warning" if s.edge_fraction >= 0.5 else "info",
                             f"{s.edge_fraction:.0%} of output positions ({s.edge_positions} of "
                             f"{s.positions}) have an RF reaching past the input border into padding{where}."))
    for row in c.geo[c.geo["asymmetric"]].itertuples():
        found.append(Finding("asymmetric", "warning",
                             f"Axis {row.axis} treats its borders differently: the first position's RF "
                             f"{_reach(row.border_lo, 'before the input')}, the last one's "
                             f"{_reach(row.border_hi, 'past its end')} ({row.edge_lo} vs {row.edge_hi} edge "
                             "positions)."))
    return found


def _coverage_findings(c: _Context) -> list[Finding]:
    """Report unseen pixels, checkerboard coverage, border fall-off, or that coverage was sampled."""
    s, cov = c.summary, c.coverage
    if s.unseen_pixels is None:
        return [Finding("sampled", "info", f"Coverage counts only the {len(c.result.positions)} swept positions "
                        f"of {math.prod(c.result.output_spatial)}; unseen pixels and uniformity are not judged.")]
    found = []
    if s.unseen_pixels:
        found.append(Finding("unseen", "warning", f"{s.unseen_pixels} input pixels ({s.unseen_fraction:.0%}) "
                             "are seen by no output position (stride larger than the kernel, or a dropped border)."))
    if s.coverage_nonuniform:
        found.append(Finding("nonuniform", "warning", "Coverage is strongly non-uniform inside the input (max/min "
                             f"{cov['coverage_ratio']:.2g}): a checkerboard from strides that do not divide kernels "
                             "or from transposed convolutions."))
    if cov["falloff"] is not None:
        found.append(Finding("falloff", "info", f"Coverage falls off at the borders: border pixels are seen by "
                             f"{cov['falloff']:.0%} as many positions as interior ones."))
    return found


def _support_findings(c: _Context) -> list[Finding]:
    """Report holes, wrap-around and mirrored borders."""
    s = c.summary
    found = []
    if s.holes:
        found.append(Finding("holes", "warning", "Receptive fields have holes: the support fills as little as "
                             f"{s.min_fill:.0%} of its box (dilation gridding or a kernel smaller than its "
                             "stride)."))
    if s.wrapped:
        axes = [a for a, w in zip(axis_names(c.result.ndim), np.asarray(c.result.wrapped.any(axis=0))) if w]
        found.append(Finding("wrap", "warning", f"Circular padding: {int(c.result.wrapped.any(axis=1).sum())} "
                             f"position(s) have RFs that wrap round to the opposite border on axis {', '.join(axes)}; "
                             "their bounds are given unrolled (lo < 0 or hi >= n, indices modulo n)."))
    elif "circular" in s.padding_modes:
        found.append(Finding("wrap", "info", "Circular padding is used, but no swept RF wraps round the border."))
    for mode in (m for m in s.padding_modes if m in MIRRORING):
        seen = " (seen in the gradient pass too)" if c.gradient is not None and mode in c.gradient.padding_modes else ""
        found.append(Finding("mirror", "info", f"{mode.capitalize()} padding{seen}: pixels near the border are read "
                             "again by the padding, so they are counted more than once and weigh more in gradients."))
    return found


def _context_findings(c: _Context) -> list[Finding]:
    """Report global context (op, layer, local RF) apart from RFs that merely cover the input; border layers."""
    s = c.summary
    found = []
    size = _axes_text(c.result.input_spatial)
    if s.global_context:
        where = f"layer {s.global_from}" if s.global_from else "the model's own forward"
        local = (f"; with global-context paths held constant the local RF is {_axes_text(s.local_rf_size)}"
                 if s.local_rf_size else "")
        found.append(Finding("global", "warning", f"Global context: {s.global_op} in {where} pools over a whole "
                             "feature map, so every output position depends on every input pixel at any input size"
                             f"{local}."))
    elif s.covering_positions:
        found.append(_covers_finding(c, size))
    if s.border_layers_from:
        fix = (f"; no layer would be a border layer from an input of {_axes_text(s.no_border_resolution)} on"
               if s.no_border_resolution else "")
        found.append(Finding("border", "info", f"From layer {s.border_layers_from} on, every layer's RF covers "
                             f"the whole {size} input (border layers: their depth adds no context here){fix}."))
    return found


def _covers_finding(c: _Context, size: str) -> Finding:
    """Describe RFs that cover the whole input without global context: saturation at this resolution."""
    s = c.summary
    who = ("Every swept output position's RF covers" if s.covers_input else
           f"The RFs of {s.covering_positions} of {len(c.result.positions)} swept output positions "
           f"({s.covering_fraction:.0%}) cover")
    why = (": the RF saturates at this resolution (no global operation)" if s.global_context is False else
           " (global operations were not looked for)")
    stops = (f"; from an input of {_axes_text(s.no_coverage_resolution)} on, no RF can cover it"
             if s.no_coverage_resolution else "")
    return Finding("covers", "warning" if s.covers_input else "info", f"{who} the whole {size} input{why}{stops}.")


def _gradient_findings(c: _Context) -> list[Finding]:
    """Report positions whose gradient-mode support is smaller than their structural RF."""
    if c.gradient is None:
        return []
    structural = {tuple(p): s for p, s in zip(c.result.positions.tolist(), c.result.support)}
    pairs = [(structural[tuple(p)], s) for p, s in zip(c.gradient.positions.tolist(), c.gradient.support)
             if tuple(p) in structural]
    fewer = sum(g < s for s, g in pairs)
    if not fewer:
        return []
    return [Finding("gradient", "info", f"In gradient mode {fewer} of {len(pairs)} positions depend on fewer input "
                    "pixels than their structural RF (data-dependent zeros: dead activations, max-pool routing).")]


def verification_summary(result: SweepResult) -> dict:
    """Return the summary keys of the run-time check: positions verified and positions that failed it."""
    verified = 0 if result.verified is None else int(np.sum(result.verified))
    failed = 0 if result.violations is None else int(np.sum(np.asarray(result.violations) > 0))
    return {"verified": verified, "violations": failed}


def _verification_findings(c: _Context) -> list[Finding]:
    """Report positions whose output moved when input outside their reported RF was perturbed, or no check."""
    s, done = c.summary, c.result.verification
    if s.violations:
        worst = f" (by up to {done.max_deviation:.2g} of the output's magnitude)" if done is not None else ""
        return [Finding("not_exact", "warning", f"Not exact: {s.violations} of {s.verified} verified "
                        "positions changed when input outside their reported RF was perturbed on the model "
                        f"itself{worst}; their reported RF is too small.")]
    if done is not None and done.note:
        return [Finding("unverified", "info", f"The reported RFs were not verified on the model: {done.note}.")]
    return []


def _attention_findings(c: _Context) -> list[Finding]:
    """Say where attention is global (first global block, local RF before it) or windowed (reach per block)."""
    record = c.summary.attention
    if not record or not record.get("stages"):
        return []
    first = record["stages"][0]
    if first["groups"] == 1:
        local = record["local"]
        before = (f"; the local RF before it ({local['layer']}) is {_axes_text(local['rf_size'])} input pixels"
                  if local else "")
        return [Finding("attention", "info", f"Attention is global: from block {first['first']} on, every token "
                        f"attends to all {first['tokens']} tokens at once ({first['kind']}), so the first global "
                        f"block is {first['first']}{before}.")]
    stages = "; ".join(f"{s['first']}" + (f" to {s['last']}" if s["blocks"] > 1 else "") +
                       f": {s['groups']} groups of {s['tokens']} tokens" for s in record["stages"])
    return [Finding("attention", "info", f"Attention is windowed: tokens attend only within groups (windows or "
                    f"grids) per image ({stages}).{_window_reach(record['blocks'])}")]


def _window_reach(blocks: Sequence[dict]) -> str:
    """Describe the centre RF after each measured block of windowed attention."""
    if not blocks:
        return ""
    steps = [f"{b['block']} {_axes_text(b['rf_size'])}" + (" (global)" if b["global"] else "") for b in blocks]
    text = f" A centre token's RF after each block: {', '.join(steps)} input pixels"
    one, two = blocks[0], blocks[1] if len(blocks) > 1 else None
    if two and (one["tokens"], one["groups"]) == (two["tokens"], two["groups"]) and two["rf_size"] > one["rf_size"]:
        text += (f"; a token of {one['block']} mixes its window only, one of {two['block']} also the neighbouring "
                 "windows its shifted (or strided) window overlaps")
    return text + "."


RULES = (_verification_findings, _geometry_findings, _edge_findings, _coverage_findings, _support_findings,
         _context_findings, _gradient_findings, _attention_findings)
