"""Audit rules: limits on a model's summary entry, checked by `rfreport check` and stored in every run.

A config's `[model.audit]` table maps rule names (config.AUDIT_RULES, validated there) to limits.
Each rule reads one analysis summary key of a model entry and yields one result row
`{rule, limit, value, passed}`; a model whose job failed fails its audit. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rfreport.config import AUDIT_RULES


@dataclass(frozen=True)
class Check:
    """How a rule is checked: the summary key it reads and its test of (limit, value)."""

    key: str
    test: Callable[[Any, Any], bool]


def _per_axis(compare: Callable[[float, float], bool]) -> Callable[[Any, Any], bool]:
    """Lift a scalar comparison to per-axis values, broadcasting a scalar limit over every axis."""
    def test(limit: Any, value: Any) -> bool:
        values = list(value)
        limits = list(limit) if isinstance(limit, (list, tuple)) else [limit] * len(values)
        return len(limits) == len(values) and all(compare(v, lim) for v, lim in zip(values, limits, strict=True))
    return test


CHECKS: dict[str, Check] = {
    "min_rf": Check("center_rf_size", _per_axis(lambda v, lim: v >= lim)),
    "max_rf": Check("center_rf_size", _per_axis(lambda v, lim: v <= lim)),
    "max_edge_fraction": Check("edge_fraction", lambda lim, v: v <= lim),
    "no_unseen": Check("unseen_pixels", lambda lim, v: v == 0),
    "no_global": Check("global", lambda lim, v: not v),
    "max_center_offset": Check("center_offset", _per_axis(lambda v, lim: abs(v) <= lim)),
    "min_fill": Check("min_fill", lambda lim, v: v >= lim),
    "anchors_fit": Check("anchors_fit", lambda lim, v: bool(v)),
    "min_anchor_share": Check("anchor_min_share", lambda lim, v: v >= lim),
}


def evaluate(rules: Mapping[str, Any], entry: Mapping[str, Any]) -> list[dict]:
    """Check every rule on one model entry; a failed job yields a single failing `status` row."""
    if entry.get("status") != "ok":
        return [{"rule": "status", "limit": "ok", "value": entry.get("status"), "passed": False}]
    results = []
    for name, limit in rules.items():
        if AUDIT_RULES[name].kind == "flag" and not limit:
            continue
        check = CHECKS[name]
        value = entry.get(check.key)
        results.append({"rule": name, "limit": limit, "value": value,
                        "passed": value is not None and bool(check.test(limit, value))})
    return results


def passed(results: Sequence[Mapping[str, Any]]) -> bool:
    """Return whether every result row of a model passed."""
    return all(row["passed"] for row in results)
