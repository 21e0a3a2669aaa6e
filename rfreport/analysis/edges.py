"""Edges and coverage: which output positions see padding, and how evenly the swept RFs cover the input.

Pure pandas/numpy (no torch). An edge position is one whose unclipped RF crosses the input border
(so part of what it sees is padding); coverage counts, per input pixel, the swept positions that see it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rfreport.analysis.frames import POSITIONS, positions_frame
from rfreport.analysis.geometry import AxisFit
from rfreport.options import EXACT_FITS
from rfreport.positions import axis_names
from rfreport.schema import Column, Schema, register

if TYPE_CHECKING:
    from rfreport.results import SweepResult


NONUNIFORM_RATIO = 1.5       # interior coverage max/min at or above this is a checkerboard


FALLOFF_RATIO = 0.5          # border coverage below this fraction of the interior median is a fall-off


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
             Column("in_input_share", "float64", "ratio", "share of the position's unclipped RF box (the exact "
                    "geometry's size r per axis, placed by the fit) that lies inside the input, the product over "
                    "axes of the in-input part of [start, end] over r; 1 clear of the border, NaN without an exact "
                    "fit"),
             ),
))


def edges_frame(result: SweepResult, fits: list[AxisFit]) -> pd.DataFrame:
    """Return the positions frame of a sweep plus predicted unclipped bounds and edge flags per position."""
    frame = positions_frame(result)
    data = {name: frame[name] for name in frame.columns}
    edge = np.zeros(len(frame), dtype=bool)
    share = np.ones(len(frame))
    for a, (name, fit, n) in enumerate(zip(axis_names(result.ndim), fits, result.input_spatial)):
        start = fit.start(result.positions[:, a])
        end = start + fit.size - 1
        known = ~np.isnan(start)
        inside = np.clip(np.minimum(end, n - 1) - np.maximum(start, 0) + 1, 0, None) / fit.size
        share *= inside if fit.fit in EXACT_FITS else np.nan
        data[f"{name}_start"], data[f"{name}_end"] = start, end
        data[f"{name}_out_lo"] = np.maximum(0.0, -start) + 0.0
        data[f"{name}_out_hi"] = np.maximum(0.0, end - (n - 1)) + 0.0
        data[f"{name}_clip_lo"] = np.where(known, start < 0, result.lo[:, a] <= 0)
        data[f"{name}_clip_hi"] = np.where(known, end > n - 1, result.hi[:, a] >= n - 1)
        edge |= data[f"{name}_clip_lo"] | data[f"{name}_clip_hi"]
    data["edge"] = edge
    data["in_input_share"] = share
    return EDGES.frame(data, result.ndim)


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
    return [int(size) + 1 for size in geo["arch_rf_size"]]

