"""Feature-pyramid levels: one row per analysed level of a model, its anchors, findings and audit rows.

A model entry may list `levels` (config.Level): outputs of a `features_only` backbone, the dict
outputs of an FPN, or named layers. The pipeline analyses each level as a sweep with its own
target (pipeline.level_analyses) and hands the analyses here; this module turns them into the
`levels` frame, the summary's `levels` list, anchor findings and per-level audit rows. Pure
pandas (no torch), so reports and audits read it without the engine.

Anchors are object sizes a detector assigns to a level. An anchor is compared with the RF of its
level on every axis; where every RF is global (squeeze-and-excitation, attention pooling) it is
compared with the local RF instead (the RF with global-context paths held constant), since a
global RF holds any anchor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from rfreport import audit
from rfreport.positions import axis_names
from rfreport.schema import Column, Schema, register

if TYPE_CHECKING:
    from rfreport.analysis.analyze import Analysis
    from rfreport.config import Level

LEVELS = register(Schema(
    name="levels",
    row="analysed level of a model (a feature-pyramid output or a layer), in config order",
    columns=(
        Column("level", "string", "", "level name (config `levels`)"),
        Column("target", "string", "", "the analysed tensor, e.g. output[2] or layer3"),
        Column("channels", "int64", "channels", "channels of the level's output"),
        Column("out_{a}", "int64", "output positions", "output size on this axis"),
        Column("{a}_stride", "float64", "input pixels", "effective stride (the level's reduction)"),
        Column("{a}_arch_rf", "Int64", "input pixels", "the architecture RF (summary `arch_rf_size`); null when "
               "global context makes it unbounded"),
        Column("{a}_padding", "float64", "input pixels", "effective padding P"),
        Column("{a}_center_offset", "float64", "input pixels", "RF centre minus the nominal pixel"),
        Column("fit", "string", "", "how the geometry was found: affine, enlarged or composed (exact), estimated, "
               "nonaffine or none; the least exact axis"),
        Column("edge_fraction", "float64", "ratio", "share of the level's output positions whose RF reaches padding"),
        Column("global", "boolean", "flag", "a global operation lies on the path to the level (summary `global`); "
               "null when that is not ruled out: every RF has the same box, none was recognised and the RF is a "
               "lower bound"),
        Column("{a}_local_rf", "Int64", "input pixels", "RF size with global-context paths held constant; null "
               "unless the level is global"),
        Column("anchors", "string", "", "the level's anchor sizes (input pixels), e.g. `32, 64x48`; empty if none"),
        Column("anchor_basis", "string", "", "the RF the anchors are compared with: rf, or local (the level is "
               "global); empty without anchors"),
        Column("anchors_fit", "boolean", "flag", "every anchor fits inside the compared RF on every axis; null "
               "without anchors"),
        Column("anchor_min_share", "float64", "ratio", "smallest anchor size / compared RF size over anchors and "
               "axes; NaN without anchors"),
    ),
))
FIT_ORDER = ("none", "nonaffine", "estimated", "enlarged", "composed", "affine")   # least exact first


def _per_axis(anchor: Sequence[int], ndim: int) -> tuple[int, ...]:
    """Broadcast a square anchor (one size) over every axis."""
    return tuple(anchor) * ndim if len(anchor) == 1 else tuple(anchor)


def anchor_check(anchors: Sequence[Sequence[int]], summary: Mapping[str, Any], ndim: int) -> dict:
    """Compare anchors with the level's RF (its local RF when global): basis, compared RF, fit and smallest share."""
    if not anchors:
        return {"anchors": [], "anchor_basis": None, "anchor_rf": None, "anchors_fit": None, "anchor_min_share": None}
    local = summary.get("global") and summary.get("local_rf_size")
    rf = list(summary["local_rf_size"] if local else summary["arch_rf_size"] or summary["in_input_rf_size"])
    sizes = [_per_axis(a, ndim) for a in anchors]
    return {"anchors": [list(s) for s in sizes], "anchor_basis": "local" if local else "rf", "anchor_rf": rf,
            "anchors_fit": all(a <= r for s in sizes for a, r in zip(s, rf)),
            "anchor_min_share": min(a / r if r else math.inf for s in sizes for a, r in zip(s, rf))}


def record(level: Level, analysed: Analysis, output_shape: Sequence[int], target: str) -> dict:
    """Return the JSON-ready summary record of one level from its analysis."""
    s = analysed.summary.to_json()
    fits = analysed.geometry["fit"].tolist()
    ndim = len(output_shape) - 2
    return {"level": level.name, "target": target, "output_shape": list(output_shape),
            "stride": s["stride"], "arch_rf_size": s["arch_rf_size"], "arch_rf_fit": s["arch_rf_fit"],
            "padding": s["padding"], "center_offset": s["center_offset"],
            "fit": min(fits, key=FIT_ORDER.index) if fits else "none",
            "in_input_rf_size": s["in_input_rf_size"], "edge_fraction": s["edge_fraction"], "global": s["global"],
            "local_rf_size": s["local_rf_size"], "min_fill": s["min_fill"], "affine": s["affine"],
            "verified": s["verified"], "violations": s["violations"],
            **anchor_check(level.anchors, s, ndim)}


def _text(values: Sequence | None) -> str:
    """Format per-axis sizes as `64x48` (one number when square)."""
    return "" if not values else str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def frame(records: Sequence[Mapping[str, Any]], ndim: int) -> pd.DataFrame:
    """Return the levels frame of a model, one row per level record."""
    data: dict[str, list] = {name: [] for name in LEVELS.names(ndim)}
    for rec in records:
        row = {"level": rec["level"], "target": rec["target"], "channels": rec["output_shape"][1],
               "fit": rec["fit"], "edge_fraction": rec["edge_fraction"],
               "global": pd.NA if rec["global"] is None else rec["global"],
               "anchors": ", ".join(_text(a) for a in rec["anchors"]), "anchor_basis": rec["anchor_basis"] or "",
               "anchors_fit": pd.NA if rec["anchors_fit"] is None else rec["anchors_fit"],
               "anchor_min_share": math.nan if rec["anchor_min_share"] is None else rec["anchor_min_share"]}
        for i, a in enumerate(axis_names(ndim)):
            local = rec["local_rf_size"]
            row |= {f"out_{a}": rec["output_shape"][2 + i], f"{a}_stride": _float(rec["stride"][i]),
                    f"{a}_arch_rf": rec["arch_rf_size"][i] if rec["arch_rf_size"] else pd.NA,
                    f"{a}_padding": _float(rec["padding"][i]),
                    f"{a}_center_offset": _float(rec["center_offset"][i]),
                    f"{a}_local_rf": local[i] if local and rec["global"] else pd.NA}
        for name in data:
            data[name].append(row[name])
    return LEVELS.frame(data, ndim)


def _float(value: Any) -> float:
    """Return a float, NaN for None (JSON has no NaN)."""
    return math.nan if value is None else float(value)


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict:
    """Return the model's anchor keys: every anchor fits, and the smallest share (None without anchors)."""
    with_anchors = [r for r in records if r["anchors"]]
    if not with_anchors:
        return {"anchors_fit": None, "anchor_min_share": None}
    return {"anchors_fit": all(r["anchors_fit"] for r in with_anchors),
            "anchor_min_share": min(r["anchor_min_share"] for r in with_anchors)}


def findings(records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Return a warning per level that failed its check on the model, or with an anchor larger than its RF."""
    found = []
    for rec in records:
        if rec.get("violations"):
            found.append({"code": "not_exact", "severity": "warning",
                          "message": f"Level {rec['level']}: not exact: {rec['violations']} of {rec['verified']} "
                                     "verified positions changed when input outside their reported RF was "
                                     "perturbed on the model itself; the level's RF is too small."})
        if rec["anchors_fit"] is False:
            rf = rec["anchor_rf"]
            over = [_text(a) for a in rec["anchors"] if any(x > r for x, r in zip(a, rf))]
            basis = "local RF (the level is global)" if rec["anchor_basis"] == "local" else "RF"
            found.append({"code": "anchor", "severity": "warning",
                          "message": f"Level {rec['level']}: anchor(s) {', '.join(over)} exceed the level's {basis} "
                                     f"of {' x '.join(map(str, rf))} input pixels: no position of this level sees an "
                                     "object of that size whole."})
    return found


def audit_rows(levels: Sequence[Level], records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Evaluate each level's own audit rules on its record; rules are named `rule (level name)`."""
    rows = []
    for level, rec in zip(levels, records, strict=True):
        for row in audit.evaluate(level.audit, {**rec, "status": "ok"}):
            rows.append({**row, "rule": f"{row['rule']} (level {level.name})"})
    return rows
