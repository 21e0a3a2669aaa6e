"""Geometry: the affine fit of RF size, effective stride and padding per axis, from a sweep's RF boxes.

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
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rfreport.positions import axis_names, center
from rfreport.schema import Column, Schema, register

if TYPE_CHECKING:
    from rfreport.results import SweepResult


GEOMETRY = register(Schema(
    name="geometry",
    row="spatial axis of the analysed output (affine RF geometry, Araujo et al. 2019)",
    columns=(
        Column("axis", "string", "", "axis letter"),
        Column("input_size", "int64", "input pixels", "input size on this axis"),
        Column("output_size", "int64", "output positions", "output size on this axis"),
        Column("arch_rf_size", "int64", "input pixels", "the architecture RF r: what an output position sees with "
               "no border in the way (a lower bound when fit is `estimated`)"),
        Column("stride", "float64", "input pixels", "effective stride s: how far the RF moves per output step "
               "(NaN when it cannot be measured, or the fit is nonaffine: position-dependent, see resolution_stride)"),
        Column("padding", "float64", "input pixels", "effective padding P: the unclipped RF of position p starts "
               "at -P + p * s"),
        Column("center_offset", "float64", "input pixels", "RF centre minus the nominal pixel p*s + (s-1)/2, i.e. "
               "(r - s)/2 - P"),
        Column("in_input_rf_size", "int64", "input pixels", "the in-input RF: extent of the centre output "
               "position's RF as swept, clipped to this input"),
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
        Column("asymmetric", "bool", "flag", "the low and high borders are treated differently: a different number "
               "of output positions sees padding at each (a reach that differs alone is (o*s - n) + 2 * centre "
               "offset: the centre offset and an input not a multiple of the stride, which expose no more positions "
               "to padding on one side)"),
        Column("resolution_stride", "float64", "input pixels", "input size / output size: the stride the output's "
               "resolution implies (exact; the stride itself where the geometry is affine and keeps the borders)"),
        Column("size_min", "Int64", "input pixels", "where the fit is nonaffine, the smallest RF extent over the swept "
               "positions clear of the border (all swept positions when none is); null otherwise"),
        Column("size_max", "Int64", "input pixels", "where the fit is nonaffine, the largest such RF extent; null "
               "otherwise"),
        Column("local_size", "Int64", "input pixels", "RF size with global-context paths held constant (local "
               "sweep); null without one"),
        Column("local_stride", "float64", "input pixels", "effective stride of the local RF"),
        Column("local_padding", "float64", "input pixels", "effective padding of the local RF"),
    ),
))


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
    cut: frozenset[int] = frozenset()   # axes where a kernel's taps lie past its grid at the centre (SweepResult)

    @classmethod
    def of(cls, *results: SweepResult | None) -> Boxes:
        """Merge the non-empty rows of one or more sweeps of the same output, one row per position."""
        parts = [r for r in results if r is not None]
        pos = np.concatenate([r.positions for r in parts])
        keep = np.concatenate([r.support > 0 for r in parts])
        _, first = np.unique(pos, axis=0, return_index=True)
        rows = np.intersect1d(first, np.flatnonzero(keep))
        stack = {name: np.concatenate([getattr(r, name) for r in parts])[rows] for name in ("lo", "hi", "wrapped")}
        cut = frozenset().union(*(r.past_grid for r in parts))
        return cls(pos[rows], stack["lo"], stack["hi"], stack["wrapped"], cut)


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
    if stride == 0:   # every clear box the same: an upsampled grid, several positions to a cell
        varying = f"the RF on axis {axis} does not move from one output position to the next (no stride)"
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
                f"starts at {int(lo[first])}, off the constant-stride line of the other positions)")
    return (f"the RF size on axis {axis} varies between interior positions ({_list(sizes)} besides {fit.size}; "
            f"e.g. output position {int(pos[odd][0])})")


def _one_sided_stride(pos: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: int) -> float:
    """Return the most common step of starts free of the low border and ends free of the high border; NaN (unknown)
    when there is none, or when it is 0: ends that stay put from one position to the next are pinned by an
    inner layer's border (a valid convolution before padded ones), not free, and no RF grid has stride 0."""
    left = _steps(pos[lo > 0], lo[lo > 0])[1]
    right = _steps(pos[hi < n - 1], hi[hi < n - 1])[1]
    steps = np.concatenate([left, right])
    stride = float(_mode(steps)) if len(steps) and np.all(steps == np.round(steps)) else (
        float(np.median(steps)) if len(steps) else math.nan)
    return math.nan if stride == 0 else stride


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


TAPS_PAST_GRID = ("a kernel on the way has taps past its grid at the centre at this input size (a dilation at least "
                  "as large as the grid it reads): every RF looks narrower than it is, so the size is a lower bound")


def fit_geometry(boxes: Boxes, input_spatial: Sequence[int], output_spatial: Sequence[int]) -> list[AxisFit]:
    """Fit every axis of a sweep's boxes, lining wrapped boxes up with their neighbours first."""
    names = axis_names(len(input_spatial))
    fits = []
    for a, (n, out) in enumerate(zip(input_spatial, output_spatial)):
        pos, lo, hi, wrapped = boxes.positions[:, a], boxes.lo[:, a], boxes.hi[:, a], boxes.wrapped[:, a]
        shift = unwrap_shift(pos, lo, hi, wrapped, n, out)
        fit = fit_axis(pos, lo + shift, hi + shift, wrapped, n, names[a])
        fits.append(replace(fit, fit="estimated", problem=TAPS_PAST_GRID) if a in boxes.cut and fit.fit == "affine"
                    else fit)
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
                   local: list[AxisFit] | None = None, sizes: Sequence[tuple[int, int]] | None = None) -> pd.DataFrame:
    """Build the geometry frame, one row per axis, with borders, valid range and asymmetry.

    A nonaffine axis has no stride, padding or centre offset (a best fit would print digits no position
    has): it gets its resolution's stride and the range of RF extents over positions (`sizes`) instead.
    """
    rows = []
    for a, (fit, n, out) in enumerate(zip(fits, input_spatial, output_spatial)):
        row = _axis_row(fit, n, out) if fit.fit != "nonaffine" else _position_dependent_row(fit)
        low, high = sizes[a] if sizes is not None and fit.fit == "nonaffine" else (pd.NA, pd.NA)
        rows.append(row | {
            "axis": axis_names(len(fits))[a], "input_size": n, "output_size": out, "arch_rf_size": fit.size,
            "in_input_rf_size": int(center_size[a]), "fit": fit.fit, "problem": fit.problem, "positions_used": fit.used,
            "resolution_stride": n / out if out else math.nan, "size_min": low, "size_max": high,
            "local_size": local[a].size if local else pd.NA, "local_stride": local[a].stride if local else math.nan,
            "local_padding": local[a].padding if local else math.nan,
        })
    return GEOMETRY.frame({k: [row[k] for row in rows] for k in GEOMETRY.names(1)}, 1)


def _axis_row(fit: AxisFit, n: int, out: int) -> dict:
    """Return an axis's fitted stride, padding, centre offset, borders, valid range and asymmetry."""
    span = _valid_range(fit, n, out)
    border_lo = 0.0 - float(fit.start(np.array([0]))[0])
    border_hi = float(fit.start(np.array([out - 1]))[0]) + fit.size - 1 - (n - 1)
    valid_lo, valid_hi, edge_lo, edge_hi = span if span else (pd.NA,) * 4
    return {"stride": fit.stride, "padding": fit.padding, "center_offset": fit.center_offset,
            "border_lo": border_lo, "border_hi": border_hi, "edge_lo": edge_lo, "edge_hi": edge_hi,
            "valid_lo": valid_lo if span and valid_lo >= 0 else pd.NA,
            "valid_hi": valid_hi if span and valid_hi >= 0 else pd.NA,
            "asymmetric": bool(span is not None and edge_lo != edge_hi)}


def _position_dependent_row(fit: AxisFit) -> dict:
    """Return a nonaffine axis's row values: nothing the best fit would predict."""
    return {"stride": math.nan, "padding": math.nan, "center_offset": math.nan, "border_lo": math.nan,
            "border_hi": math.nan, "edge_lo": pd.NA, "edge_hi": pd.NA, "valid_lo": pd.NA, "valid_hi": pd.NA,
            "asymmetric": False}


def position_sizes(boxes: Boxes, input_spatial: Sequence[int]) -> list[tuple[int, int]]:
    """Return per axis the smallest and largest RF extent over the positions clear of the border on that axis
    (over every position when none is clear)."""
    sizes = boxes.hi - boxes.lo + 1
    ranges = []
    for a, n in enumerate(input_spatial):
        clear = boxes.wrapped[:, a] | ((boxes.lo[:, a] > 0) & (boxes.hi[:, a] < n - 1))
        chosen = sizes[clear, a] if clear.any() else sizes[:, a]
        ranges.append((int(chosen.min()), int(chosen.max())) if len(chosen) else (0, 0))
    return ranges


def center_sizes(boxes: Boxes, output_spatial: Sequence[int]) -> np.ndarray:
    """Return the box size of the centre output position (or the swept position nearest to it)."""
    if len(boxes.positions) == 0:
        return np.zeros(len(output_spatial), dtype=np.int64)
    nearest = np.argmin(np.abs(boxes.positions - np.array(center(output_spatial))).sum(axis=1))
    return boxes.hi[nearest] - boxes.lo[nearest] + 1


def is_global(boxes: Boxes, input_spatial: Sequence[int]) -> bool:
    """Tell whether every swept position's RF box spans the whole input (by saturation or global context)."""
    n = np.array(input_spatial)
    return bool(len(boxes.positions) and ((boxes.lo <= 0) & (boxes.hi >= n - 1)).all())


def one_box(boxes: Boxes) -> bool:
    """Tell whether every swept position has the same RF box, as a global operation on the path makes them."""
    return bool(len(boxes.positions) and (boxes.lo == boxes.lo[0]).all() and (boxes.hi == boxes.hi[0]).all())

