"""Findings: plain-language observations about a model's receptive fields, one rule per topic.

Pure (no torch). Each rule reads a :class:`FindingContext` (the sweep, the geometry frame, the typed
summary, coverage statistics, the layers frame) and returns its findings; :data:`RULES` runs in order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rfreport.options import ContextKind
from rfreport.positions import axis_names
from rfreport.results import context_kind
from rfreport.summary import Summary

if TYPE_CHECKING:
    from rfreport.results import SweepResult


MIRRORING = ("reflect", "replicate")
CONTEXT_VERBS = {ContextKind.POOLING: "pools over a whole feature map",
                 ContextKind.ATTENTION: "lets every token attend to every token",
                 ContextKind.MIXING: "mixes every token in one dense map over the token axis",
                 ContextKind.SAMPLING: "samples at positions computed from the input, which can reach any pixel"}


@dataclass(frozen=True)
class Finding:
    """One plain-language observation about a model's receptive fields."""

    code: str        # stable id, e.g. "edge", "unseen", "global", "covers", "wrap", "holes", "nonaffine", "enlarged",
    #                  "composed", "border"; one finding per code and topic (axes that agree share one)
    severity: str    # "info" | "warning"
    message: str     # a plain sentence for the report


def _reach(pixels: float, where: str) -> str:
    """Describe how far an RF reaches past a border: `reaches 1 pixel(s) before the input` or `stops 1 short`."""
    if pixels < 0:
        return f"stops {-pixels:g} pixel(s) short of the border"
    return f"reaches {pixels + 0.0:g} pixel(s) {where}"


def _axes_text(values: Sequence) -> str:
    """Format per-axis values as `7 x 5`."""
    return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclass(frozen=True)
class FindingContext:
    """What the finding rules read."""

    result: SweepResult
    geo: pd.DataFrame
    summary: Summary
    coverage: dict
    gradient: SweepResult | None
    layers: pd.DataFrame | None


def _geometry_findings(c: FindingContext) -> list[Finding]:
    """Report non-affine and estimated geometry."""
    found = [Finding("nonaffine", "warning", f"The RF geometry is not affine: {c.summary.nonaffine}.")
             ] if c.summary.nonaffine else []
    estimated = c.geo.loc[c.geo["fit"] == "estimated", "problem"]
    ops = c.summary.size_dependent
    sized = [Finding("size_dependent", "info", f"The RF geometry depends on the input size ({', '.join(ops)}): "
                     f"it holds at {_axes_text(c.result.input_spatial)} only and was measured there.")] if ops else []
    return found + [Finding("estimated", "info", f"Geometry estimated: {p}.") for p in estimated] + [
        Finding(fit, "info", f"{_axes_label(axes)}: {problem}.") for fit, problem, axes in _fits_beyond(c.geo)
    ] + sized


def _fits_beyond(geo: pd.DataFrame) -> list[tuple[str, str, list[str]]]:
    """Return (fit, problem, axes) of the axes made exact beyond this input (enlarged or composed), axes merged."""
    rows = geo.loc[geo["fit"].isin(["enlarged", "composed"])]
    return [(fit, problem, group["axis"].tolist()) for (fit, problem), group in rows.groupby(["fit", "problem"],
                                                                                               sort=False)]


def _axes_label(axes: Sequence[str]) -> str:
    """Return `Axis h` or `Axes h, w`."""
    return f"Axis {axes[0]}" if len(axes) == 1 else f"Axes {', '.join(axes)}"


def _edge_findings(c: FindingContext) -> list[Finding]:
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


def _coverage_findings(c: FindingContext) -> list[Finding]:
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


def _support_findings(c: FindingContext) -> list[Finding]:
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


def _context_findings(c: FindingContext) -> list[Finding]:
    """Report global context (op, layer, local RF) apart from RFs that merely cover the input; border layers."""
    s = c.summary
    found = []
    size = _axes_text(c.result.input_spatial)
    where = f"layer {s.global_from}" if s.global_from else "the model's own forward"
    if s.global_context:
        bound = (" at least", " (every local RF is clipped by the input border here: a lower bound)"
                 ) if s.local_rf_clipped else ("", "")
        local = (f"; with global-context paths held constant the local RF is{bound[0]} {_axes_text(s.local_rf_size)}"
                 f"{bound[1]}" if s.local_rf_size else "")
        found.append(Finding("global", "warning", f"Global context: {s.global_op} in {where} "
                             f"{CONTEXT_VERBS[context_kind(s.global_op or '')]}, so every output position depends "
                             f"on every input pixel at any input size{local}."))
    elif s.covering_positions:
        found.append(_covers_finding(c, size))
    if s.border_layers_from:
        fix = (f"; no layer would be a border layer from an input of {_axes_text(s.no_border_resolution)} on"
               if s.no_border_resolution else "")
        if s.global_context:
            fix = (f"; global context ({s.global_op} in {where}) makes every layer after it cover the input at any "
                   "input size, so no larger input ends the border layers")
        found.append(Finding("border", "info", f"From layer {s.border_layers_from} on, every layer's RF covers "
                             f"the whole {size} input (border layers: their depth adds no context here){fix}."))
    return found


def _covers_finding(c: FindingContext, size: str) -> Finding:
    """Describe RFs that cover the whole input without global context: saturation at this resolution."""
    s = c.summary
    who = ("Every swept output position's RF covers" if s.covers_input else
           f"The RFs of {s.covering_positions} of {len(c.result.positions)} swept output positions "
           f"({s.covering_fraction:.0%}) cover")
    if s.global_context is False:
        why = ": the RF saturates at this resolution (no global operation)"
    elif s.affine:   # every axis exact: the search was not run
        why = " (global operations were not looked for)"
    else:
        why = (" (global context is not ruled out: no global operation was recognised, but the architecture RF is "
               "only a lower bound here, so an unrecognised mixing op cannot be told from saturation)")
    stops = (f"; from an input of {_axes_text(s.no_coverage_resolution)} on, no RF can cover it"
             if s.no_coverage_resolution else "")
    return Finding("covers", "warning" if s.covers_input else "info", f"{who} the whole {size} input{why}{stops}.")


def _gradient_findings(c: FindingContext) -> list[Finding]:
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


def _verification_findings(c: FindingContext) -> list[Finding]:
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


def _attention_findings(c: FindingContext) -> list[Finding]:
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

