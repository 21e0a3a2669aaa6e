"""Compare two saved runs model by model: what an architecture change did to the receptive fields.

Models are matched by slug (name and input size). For each pair the geometry, edge and
coverage figures, findings and audit status are compared; models present in only one run
are listed as added or removed. Pure Python, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rfreport.runfolder import Run

FIELDS = ("status", "output_shape", "rf_size", "center_rf_size", "stride", "padding", "center_offset",
          "affine", "edge_fraction", "unseen_pixels", "global", "wrapped", "min_fill")


@dataclass(frozen=True)
class Change:
    """One field of one model that differs between the two runs."""

    slug: str
    field: str
    before: Any
    after: Any


@dataclass(frozen=True)
class RunDiff:
    """Every difference between run A and run B."""

    added: tuple[str, ...]        # slugs only in B
    removed: tuple[str, ...]      # slugs only in A
    changes: tuple[Change, ...]

    @property
    def changed(self) -> bool:
        """Return whether the runs differ at all."""
        return bool(self.added or self.removed or self.changes)


def compare(run_a: Run, run_b: Run) -> RunDiff:
    """Return the differences between two runs, models matched by slug, in run A's then run B's order."""
    entries_a = {model.slug: model.entry for model in run_a.models}
    entries_b = {model.slug: model.entry for model in run_b.models}
    changes = [change for slug, entry in entries_a.items() if slug in entries_b
               for change in compare_entries(slug, entry, entries_b[slug])]
    return RunDiff(added=tuple(s for s in entries_b if s not in entries_a),
                   removed=tuple(s for s in entries_a if s not in entries_b),
                   changes=tuple(changes))


def compare_entries(slug: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Change]:
    """Return the changed fields, findings and audit status of one model."""
    views = [(field, before.get(field), after.get(field)) for field in FIELDS]
    views.append(("findings", finding_codes(before), finding_codes(after)))
    views.append(("audit", audit_status(before), audit_status(after)))
    return [Change(slug, field, old, new) for field, old, new in views if not _same(old, new)]


def finding_codes(entry: Mapping[str, Any]) -> list[str]:
    """Return the sorted finding codes of an entry (edge, unseen, global, ...)."""
    return sorted({finding["code"] for finding in entry.get("findings") or []})


def audit_status(entry: Mapping[str, Any]) -> str:
    """Return `pass`, or `fail: <rules>` naming the rules that failed, or `none` without rules."""
    rows = entry.get("audit") or []
    if not rows:
        return "none"
    failed = [row["rule"] for row in rows if not row["passed"]]
    return f"fail: {', '.join(failed)}" if failed else "pass"


def _same(old: Any, new: Any) -> bool:
    """Return whether two JSON values are equal, floats within 1e-9."""
    if isinstance(old, float) and isinstance(new, float):
        return math.isclose(old, new, rel_tol=1e-9, abs_tol=1e-12)
    return old == new
