"""Analyze a job's measurements once: geometry, edges, coverage, the typed summary and the findings.

Pure (no torch). :func:`analyze` is the one entry point of the analysis stage; run.plan calls it
once per job (and once per pyramid level) on what the plan measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rfreport.analysis.edges import (
    FALLOFF_RATIO,
    NONUNIFORM_RATIO,
    coverage_stats,
    covering,
    edges_frame,
    no_coverage_resolution,
)
from rfreport.analysis.findings import RULES, Finding, FindingContext
from rfreport.analysis.geometry import (
    AxisFit,
    Boxes,
    center_sizes,
    fit_geometry,
    geometry_frame,
    one_box,
    position_sizes,
    sized,
    with_composed,
    with_enlarged,
)
from rfreport.options import EXACT_FITS, POOLED_LAYER
from rfreport.positions import axis_names
from rfreport.results import GlobalOp
from rfreport.summary import Summary, build

if TYPE_CHECKING:
    from rfreport.results import SweepResult


@dataclass(frozen=True)
class Analysis:
    """Everything the report shows about one model at one input shape, computed once."""

    geometry: pd.DataFrame
    positions: pd.DataFrame
    coverage: np.ndarray
    layers: pd.DataFrame | None
    findings: tuple[Finding, ...]
    summary: Summary


def border_layers_from(layers: pd.DataFrame) -> str | None:
    """Return the first layer from which every later layer is a border layer, or None."""
    if layers is None or layers.empty or not layers["border"].iloc[-1]:
        return None
    tail = np.flatnonzero(~layers["border"].to_numpy())
    return str(layers["layer"].iloc[tail[-1] + 1 if len(tail) else 0])


def no_border_resolution(layers: pd.DataFrame, ndim: int) -> list[int] | None:
    """Return per axis the smallest input size at which no layer's unclipped RF covers it (rf + 1).

    Layers whose RF is global at every size (read through global pooling) are left out; any other
    inexact layer makes the answer unknown (None), one that covers this input too (at a tiny input every RF
    does, and that says nothing of a larger one).
    """
    if layers is None or layers.empty:
        return None
    exact = layers["rf_exact"].to_numpy()
    pooled = (layers["estimated"] == POOLED_LAYER).to_numpy()
    if (~exact & ~pooled).any() or not exact.any():
        return None
    return [int(layers.loc[exact, f"{a}_rf"].max()) + 1 for a in axis_names(ndim)]


def global_from(layers: pd.DataFrame | None) -> str | None:
    """Return the first layer whose output has a global RF (centre and corner see everything), or None."""
    if layers is None or not layers["global"].any():
        return None
    return str(layers.loc[layers["global"], "layer"].iloc[0])


def _json(value: Any) -> Any:
    """Turn numpy scalars, NaN and NA into JSON-ready Python values."""
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return _json(value.item())
    return value


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
    first = global_ops[0] if global_ops else None
    is_global_context = _global_context(global_ops, result, geo)
    return {
        "global": is_global_context, "global_from": first.layer if first else None,
        "global_op": first.op if first else None, "covers_input": bool(len(covers) and covers.all()),
        "covering_positions": count, "covering_fraction": count / len(covers) if len(covers) else 0.0,
        "no_coverage_resolution": no_coverage_resolution(geo, is_global_context),
    }


def _global_context(global_ops: Sequence[GlobalOp] | None, result: SweepResult, geo: pd.DataFrame) -> bool | None:
    """Tell whether the output has global context: True when a global op was found; False only where that is
    proven, else None (unknown).

    A global op gives every output position the same RF (all that the map it reads sees), so RFs in several
    boxes rule it out. Where every RF has one box, a search that found no op rules it out only when the
    architecture RF is exact on every axis (a finite size, measured beyond this input where the input clips it):
    otherwise the one box may come from a mixing op the search does not recognise as well as from saturation.
    """
    if global_ops:
        return True
    if not one_box(Boxes.of(result)):
        return False
    return False if global_ops is not None and geo["fit"].isin(EXACT_FITS).all() else None


def _summary(result: SweepResult, geo: pd.DataFrame, edges: pd.DataFrame, local_fits: list[AxisFit] | None,
             modes: list[str], layers: pd.DataFrame | None,
             global_ops: Sequence[GlobalOp] | None) -> tuple[dict, dict]:
    """Collect the JSON-ready summary scalars of an analysis, and the coverage statistics."""
    positions, edge = _edge_counts(geo, edges)
    valid = None if geo["valid_lo"].isna().any() else {"lo": geo["valid_lo"].tolist(), "hi": geo["valid_hi"].tolist()}
    fill = edges.loc[edges["support"] > 0, "fill"]
    nonaffine = "; ".join(geo.loc[geo["fit"] == "nonaffine", "problem"])
    context = _context_summary(result, geo, global_ops)
    summary = {
        "arch_rf_size": None if context["global"] else [
            None if fit == "nonaffine" else size for size, fit in zip(geo["arch_rf_size"], geo["fit"])],
        "arch_rf_fit": geo["fit"].tolist(), "in_input_rf_size": geo["in_input_rf_size"].tolist(),
        "stride": geo["stride"].tolist(), "padding": geo["padding"].tolist(),
        "center_offset": geo["center_offset"].tolist(), "affine": bool(geo["fit"].isin(EXACT_FITS).all()),
        "nonaffine": nonaffine or None, "resolution_stride": geo["resolution_stride"].tolist(),
        "position_rf_min": geo["size_min"].tolist() if nonaffine else None,
        "position_rf_max": geo["size_max"].tolist() if nonaffine else None,
        "positions": positions, "edge_positions": edge, "edge_fraction": edge / positions if positions else 0.0,
        "valid_region": valid, "asymmetric_axes": geo.loc[geo["asymmetric"], "axis"].tolist(),
        "holes": bool((fill < 1).any()), "min_fill": float(fill.min()) if len(fill) else 1.0,
        "wrapped": bool(result.wrapped.any()), "padding_modes": modes,
        **context,
        "local_rf_size": [f.size for f in local_fits] if local_fits else None,
        "local_rf_clipped": any(f.fit not in EXACT_FITS for f in local_fits) if local_fits else None,
        "border_layers_from": border_layers_from(layers),
        "no_border_resolution": None if global_ops else no_border_resolution(layers, result.ndim),
        "size_dependent": list(result.size_dependent_ops) or None,
    }
    coverage = _coverage_summary(result)
    summary.update({k: coverage[k] for k in ("unseen_pixels", "unseen_fraction", "coverage_nonuniform")})
    summary.update(verification_summary(result))
    return {key: _json(value) for key, value in summary.items()}, coverage


def analyze(result: SweepResult, *, geometry: SweepResult | None = None, local: SweepResult | None = None,
            gradient: SweepResult | None = None, layers: pd.DataFrame | None = None,
            enlarged: SweepResult | None = None, composed: Sequence[tuple] | None = None,
            global_ops: Sequence[GlobalOp] | None = None, attention: dict | None = None,
            global_before: dict | None = None) -> Analysis:
    """Analyse a sweep: affine geometry, edge effects, coverage, holes, wrap-around, global context, layers.

    `geometry` is an extra sweep of the fit's positions (merged into the fit; run.plan decides them),
    `enlarged` a sweep of a few positions on a larger input used where every RF is clipped here, `composed` the
    exact (size, stride, padding) per axis of the target composed from per-layer windows
    (`layers.target_geometry`), used there likewise, `local` a
    `local=True` sweep (the local RF under global context), `gradient` a gradient-mode sweep
    (padding modes, data-dependent support), `layers` the frame of `layers.layer_growth` and
    `global_ops` the global operations the output depends on (`context.global_ops`; None: not
    looked for, so global context is unknown wherever some RF covers the input).
    `attention` the record of run.plan.attention_record (attention modules and their reach), `global_before`
    that of run.plan.global_before (for the audit rule `global_not_before`).
    """
    boxes = Boxes.of(result, geometry)
    fits = with_enlarged(fit_geometry(boxes, result.input_spatial, result.output_spatial), enlarged)
    fits = with_composed(fits, composed)
    fits = [sized(fit, result.size_dependent_ops) for fit in fits]
    local_fits = (fit_geometry(Boxes.of(local), result.input_spatial, result.output_spatial)
                  if local is not None and holds_context(global_ops) else None)
    geo = geometry_frame(fits, result.input_spatial, result.output_spatial,
                         center_sizes(boxes, result.output_spatial), local_fits,
                         position_sizes(boxes, result.input_spatial))
    edges = edges_frame(result, fits)
    modes = sorted({m for r in (result, geometry, gradient) if r is not None for m in r.padding_modes})
    values, coverage = _summary(result, geo, edges, local_fits, modes, layers, global_ops)
    summary = build(Summary, values | {"attention": attention, "global_before": global_before})
    context = FindingContext(result, geo, summary, coverage, gradient, layers)
    findings = tuple(f for rule in RULES for f in rule(context))
    return Analysis(geometry=geo, positions=edges, coverage=result.coverage, layers=layers, findings=findings,
                    summary=summary)


def holds_context(global_ops: Sequence[GlobalOp] | None) -> bool:
    """Tell whether a local sweep holds every global operation constant: it holds pooling, not attention or token
    mixing, so its RF is no local RF under those."""
    return all(op.kind.held_by_local_sweep for op in global_ops or ())


def verification_summary(result: SweepResult) -> dict:
    """Return the summary keys of the run-time check: positions verified, positions that failed it, trials each."""
    verified = 0 if result.verified is None else int(np.sum(result.verified))
    failed = 0 if result.violations is None else int(np.sum(np.asarray(result.violations) > 0))
    trials = result.verification.samples if verified and result.verification is not None else 0
    return {"verified": verified, "violations": failed, "verify_trials": trials}

