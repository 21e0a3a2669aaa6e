"""Compare two saved runs model by model: what an architecture change did to the receptive fields.

Models are matched by slug (name and input size). For each pair the config (spec), the headline
(:data:`HEADLINE`: the architecture RF, how it was found, stride, padding and global context,
compared first: any change there makes the model "changed" even where the in-input RF is the same),
the other geometry, edge and coverage figures, feature-pyramid levels (matched by level name), findings and audit
verdicts are compared; a model present in one run
only is added or removed, and a model whose job failed is shown as failed wherever it appears.
The result, :class:`RunDiff`, feeds every reporter: the text table of the CLI, :func:`to_json`,
:func:`to_markdown` (a PR-comment-sized summary) and the HTML page of :mod:`rfreport.report.diffpage`.
Pure Python, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rfreport import audit
from rfreport.options import AuditVerdict
from rfreport.runfolder import Run
from rfreport.visible import visible

FORMAT = 2
HEADLINE = ("arch_rf_size", "arch_rf_fit", "stride", "padding", "global")   # compared first; any change is a change
FIELDS = ("status", *HEADLINE, "output_shape", "in_input_rf_size", "center_offset", "affine", "edge_fraction",
          "unseen_pixels", "wrapped", "min_fill")
LABELS = {"status": "status", "output_shape": "output shape", "arch_rf_size": "architecture RF",
          "arch_rf_fit": "architecture RF found by", "in_input_rf_size": "in-input RF at the centre",
          "stride": "stride", "padding": "padding",
          "center_offset": "centre offset", "affine": "affine geometry", "edge_fraction": "edge-affected positions",
          "unseen_pixels": "unseen input pixels", "global": "global context", "wrapped": "RF wraps round the border",
          "min_fill": "smallest fill", "findings": "findings", "audit": "audit"}
PERCENT = ("edge_fraction", "min_fill")
LEVEL_FIELDS = (*HEADLINE, "output_shape", "in_input_rf_size", "center_offset", "edge_fraction", "anchors")
SPEC_KEYS = ("factory", "kwargs", "input_shape", "layer", "output", "mode", "positions", "checkpoint", "audit")
SPEC_LABELS = {"factory": "factory", "kwargs": "keyword arguments", "input_shape": "input shape",
               "layer": "analysed layer", "output": "analysed output", "mode": "mode", "positions": "swept positions",
               "checkpoint": "checkpoint", "audit": "audit rules"}
STATES = ("failed", "fixed", "added", "removed", "changed", "unchanged")
MARKDOWN_FIELDS = ("arch_rf_size", "stride", "padding", "global", "in_input_rf_size")   # the markdown table's columns
MARKDOWN_MODELS = 12   # model sections in a markdown summary; the rest are counted
MARKDOWN_CHANGES = 8   # change bullets per model in a markdown summary


@dataclass(frozen=True)
class Change:
    """One summary field of one model that differs between the two runs."""

    slug: str
    field: str
    before: Any
    after: Any

    @property
    def label(self) -> str:
        """Return the human name of the field."""
        return label(self.field)

    @property
    def delta(self) -> str:
        """Return after minus before as text (per axis, percentage points for fractions), or empty."""
        return delta_text(self.field, self.before, self.after)


@dataclass(frozen=True)
class FindingChange:
    """A finding present in one run only."""

    code: str
    severity: str
    message: str


@dataclass(frozen=True)
class LevelChange:
    """One feature-pyramid level of a model (matched by name) added, removed or changed between the runs."""

    level: str
    before: Mapping[str, Any] | None   # run A's level record, None when the level is only in B
    after: Mapping[str, Any] | None
    changes: tuple[Change, ...]        # the level fields (LEVEL_FIELDS) that differ; field is the record key

    @property
    def change(self) -> str:
        """Return added, removed, changed or unchanged."""
        if self.before is None or self.after is None:
            return "added" if self.before is None else "removed"
        return "changed" if self.changes else "unchanged"


@dataclass(frozen=True)
class Verdict:
    """One audit rule of one model in both runs (None where the rule was not evaluated)."""

    rule: str
    before: Mapping[str, Any] | None   # {rule, limit, value, passed}
    after: Mapping[str, Any] | None

    @property
    def change(self) -> str:
        """Return added, removed, now failing, now passing, limit changed, value changed or unchanged."""
        if self.before is None or self.after is None:
            return "added" if self.before is None else "removed"
        if self.before["passed"] != self.after["passed"]:
            return "now passing" if self.after["passed"] else "now failing"
        if not same(self.before.get("limit"), self.after.get("limit")):
            return "limit changed"
        return "unchanged" if same(self.before.get("value"), self.after.get("value")) else "value changed"


@dataclass(frozen=True)
class SpecRow:
    """One config key of a model before and after."""

    key: str
    before: Any
    after: Any

    @property
    def label(self) -> str:
        """Return the human name of the key."""
        return SPEC_LABELS.get(self.key, self.key.replace("_", " "))

    @property
    def changed(self) -> bool:
        """Return whether the key differs."""
        return not same(self.before, self.after)


@dataclass(frozen=True)
class ModelDiff:
    """One model (slug) in run A, run B or both, and what differs."""

    slug: str
    before: Mapping[str, Any] | None   # run A's summary entry, None when the model is only in B
    after: Mapping[str, Any] | None
    changes: tuple[Change, ...]
    findings_added: tuple[FindingChange, ...]
    findings_removed: tuple[FindingChange, ...]
    audit: tuple[Verdict, ...]
    spec: tuple[SpecRow, ...]
    levels: tuple[LevelChange, ...] = ()   # pyramid levels that were added, removed or changed

    @property
    def name(self) -> str:
        """Return the model's name."""
        return str((self.after or self.before or {}).get("name", self.slug))

    @property
    def entry(self) -> Mapping[str, Any]:
        """Return the newest entry of the model (run B's when present)."""
        return self.after or self.before or {}

    @property
    def state(self) -> str:
        """Return failed (in B), fixed (failed in A, ok in B), added, removed, changed or unchanged."""
        if self.after is not None and self.after.get("status") != "ok":
            return "failed"
        if self.after is None:
            return "removed"
        if self.before is None:
            return "added"
        if self.before.get("status") != "ok":
            return "fixed"
        differs = self.changes or self.findings_added or self.findings_removed or self.levels
        return "changed" if differs or self.spec_changed or self.audit_changed else "unchanged"

    @property
    def differs(self) -> bool:
        """Return whether anything differs (a model that failed in both runs with the same error does not)."""
        if self.presence != "both":
            return True
        same_error = (self.before or {}).get("error") == (self.after or {}).get("error")
        return bool(self.changes or self.findings_added or self.findings_removed or self.spec_changed
                    or self.audit_changed or self.levels or not same_error)

    @property
    def presence(self) -> str:
        """Return both, added (only in B) or removed (only in A)."""
        return "both" if self.before is not None and self.after is not None else (
            "added" if self.before is None else "removed")

    @property
    def headline(self) -> tuple[Change, ...]:
        """Return the changes of the headline fields: architecture RF, how it was found, stride, padding, global."""
        return tuple(c for c in self.changes if c.field in HEADLINE)

    @property
    def spec_changed(self) -> bool:
        """Return whether any config key differs."""
        return any(row.changed for row in self.spec)

    @property
    def audit_changed(self) -> bool:
        """Return whether any audit verdict, limit or value differs."""
        return any(v.change != "unchanged" for v in self.audit)

    def status(self, side: str) -> str:
        """Return ok, failed or absent for side a or b."""
        entry = self.before if side == "a" else self.after
        return "absent" if entry is None else str(entry.get("status"))


@dataclass(frozen=True)
class RunDiff:
    """Every difference between run A and run B, one ModelDiff per slug in A's then B's order."""

    run_a: str
    run_b: str
    models: tuple[ModelDiff, ...]

    @property
    def added(self) -> tuple[str, ...]:
        """Return the slugs only in B."""
        return tuple(m.slug for m in self.models if m.presence == "added")

    @property
    def removed(self) -> tuple[str, ...]:
        """Return the slugs only in A."""
        return tuple(m.slug for m in self.models if m.presence == "removed")

    @property
    def changes(self) -> tuple[Change, ...]:
        """Return every field change of the models in both runs."""
        return tuple(change for m in self.models for change in m.changes)

    @property
    def changed(self) -> bool:
        """Return whether the runs differ at all."""
        return any(m.differs for m in self.models)

    def count(self, state: str) -> int:
        """Return how many models are in a state."""
        return sum(m.state == state for m in self.models)


def compare(run_a: Run, run_b: Run) -> RunDiff:
    """Return the differences between two runs, models matched by slug, in run A's then run B's order."""
    entries_a = {model.slug: model.entry for model in run_a.models}
    entries_b = {model.slug: model.entry for model in run_b.models}
    slugs = [*entries_a, *(s for s in entries_b if s not in entries_a)]
    return RunDiff(run_a=str(run_a.path), run_b=str(run_b.path),
                   models=tuple(compare_model(s, entries_a.get(s), entries_b.get(s)) for s in slugs))


def compare_model(slug: str, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> ModelDiff:
    """Compare one model's entries (either may be None); values and findings only when both runs completed it."""
    old, new = before or {}, after or {}
    both = old.get("status") == "ok" and new.get("status") == "ok"
    return ModelDiff(
        slug=slug, before=before, after=after, changes=tuple(compare_entries(slug, old, new)) if both else (),
        findings_added=finding_changes(new, old) if both else (),
        findings_removed=finding_changes(old, new) if both else (),
        audit=verdicts(old, new), spec=spec_rows(old, new), levels=compare_levels(slug, old, new) if both else ())


def compare_levels(slug: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[LevelChange, ...]:
    """Pair the pyramid levels of two entries by name (A's then B's order); return those that differ."""
    old = {str(rec["level"]): rec for rec in before.get("levels") or []}
    new = {str(rec["level"]): rec for rec in after.get("levels") or []}
    found = []
    for name in [*old, *(n for n in new if n not in old)]:
        a, b = old.get(name), new.get(name)
        changes = tuple(Change(slug, key, view(a, key), view(b, key)) for key in LEVEL_FIELDS
                        if not same(view(a, key), view(b, key))) if a is not None and b is not None else ()
        level = LevelChange(name, a, b, changes)
        if level.change != "unchanged":
            found.append(level)
    return tuple(found)


def compare_entries(slug: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Change]:
    """Return the changed summary fields, finding codes and audit status of one model."""
    views = [(field, view(before, field), view(after, field)) for field in FIELDS]
    views.append(("findings", finding_codes(before), finding_codes(after)))
    views.append(("audit", audit_status(before), audit_status(after)))
    return [Change(slug, field, old, new) for field, old, new in views if not same(old, new)]


def view(entry: Mapping[str, Any], field: str) -> Any:
    """Return the value of a field as the diff compares and shows it: the architecture RF is `unbounded` under
    global context (summary.json holds null there: no finite number), a global context that a measured entry
    holds as null (not ruled out) `unknown`, every other field as stored."""
    if field == "arch_rf_size" and entry.get("global") and entry.get(field) is None:
        return "unbounded"
    if field == "global" and field in entry and entry[field] is None:
        return "unknown"
    return entry.get(field)


def findings(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Return an entry's findings."""
    return list(entry.get("findings") or [])


def finding_changes(entry: Mapping[str, Any], other: Mapping[str, Any]) -> tuple[FindingChange, ...]:
    """Return one FindingChange per finding code of `entry` that `other` lacks (its messages joined, e.g. per axis)."""
    absent = set(finding_codes(other))
    by_code: dict[str, list[Mapping[str, Any]]] = {}
    for item in findings(entry):
        if item["code"] not in absent:
            by_code.setdefault(str(item["code"]), []).append(item)
    return tuple(FindingChange(code, _severity(items), " ".join(str(i.get("message", "")) for i in items))
                 for code, items in by_code.items())


def _severity(items: Sequence[Mapping[str, Any]]) -> str:
    """Return the gravest severity of some findings: warning if any is one."""
    return "warning" if any(i.get("severity") == "warning" for i in items) else str(items[0].get("severity", "info"))


def finding_codes(entry: Mapping[str, Any]) -> list[str]:
    """Return the sorted finding codes of an entry (edge, unseen, global, ...)."""
    return sorted({finding["code"] for finding in entry.get("findings") or []})


def verdicts(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[Verdict, ...]:
    """Pair the audit results of two entries by rule, in A's then B's order."""
    old = {row["rule"]: row for row in before.get("audit") or []}
    new = {row["rule"]: row for row in after.get("audit") or []}
    rules = [*old, *(r for r in new if r not in old)]
    return tuple(Verdict(rule, old.get(rule), new.get(rule)) for rule in rules)


def spec_rows(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[SpecRow, ...]:
    """Return the config keys of both entries' `spec` (runs without one show dashes)."""
    old, new = before.get("spec") or {}, after.get("spec") or {}
    keys = [*SPEC_KEYS, *(k for k in [*old, *new] if k not in SPEC_KEYS)]
    return tuple(SpecRow(k, old.get(k), new.get(k)) for k in dict.fromkeys(keys) if k in old or k in new)


def audit_status(entry: Mapping[str, Any]) -> str:
    """Return `pass`, or `fail: <rules>` naming the rules that failed, or `none` without rules."""
    rows = entry.get("audit")
    found = audit.verdict(rows)
    return f"{found}: {', '.join(audit.failed_rules(rows))}" if found is AuditVerdict.FAIL else str(found)


def same(old: Any, new: Any) -> bool:
    """Return whether two JSON values are equal, floats within 1e-9 (recursively in lists)."""
    if isinstance(old, float) and isinstance(new, float):
        return math.isclose(old, new, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(same(a, b) for a, b in zip(old, new))
    return old == new


# --- formatting shared by the text, markdown and HTML reporters -------------------------------------------------

def label(field: str) -> str:
    """Return the human name of a summary field."""
    return LABELS.get(field, field.replace("_", " "))


def value_text(field: str, value: Any) -> str:
    """Format a summary value: per-axis lists as `11 × 11`, fractions as percentages, lists of codes with commas."""
    if value is None:
        return "—"
    if field == "findings":
        return ", ".join(map(str, value)) or "none"
    if field == "anchors":
        return ", ".join(value_text("", anchor) for anchor in value) or "none"
    if field in PERCENT and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{100 * value:.1f}%".replace(".0%", "%")
    if isinstance(value, (list, tuple)):
        return " × ".join(value_text("", v) for v in value)
    return scalar_text(value)


def scalar_text(value: Any) -> str:
    """Format a scalar: yes/no, integers as such, floats to 4 significant digits, a dash for None."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    return str(value)


def spec_text(value: Any) -> str:
    """Format a config value: mappings as `k=v, ...`, lists as `[a, b]`, a dash when unset."""
    if value is None:
        return "—"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={spec_text(v)}" for k, v in value.items()) or "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(spec_text(v) for v in value) + "]"
    return scalar_text(value)


def delta_text(field: str, before: Any, after: Any) -> str:
    """Return after minus before (`+4 × +4`, `-25 pp` for fractions), or empty when not numeric."""
    if _number(before) and _number(after):
        diff = after - before
        return f"{diff * 100:+.1f} pp".replace(".0 pp", " pp") if field in PERCENT else _signed(diff)
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after) and before and all(
            _number(a) and _number(b) for a, b in zip(before, after)):
        return " × ".join(_signed(b - a) for a, b in zip(before, after))
    return ""


def _number(value: Any) -> bool:
    """Return whether a value is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _signed(value: float) -> str:
    """Format a difference with its sign, integers without decimals."""
    return f"{int(value):+d}" if float(value).is_integer() else f"{value:+.4g}"


def verdict_text(row: Mapping[str, Any] | None) -> str:
    """Format one audit result as `pass (value 11 × 11, limit 10)`, or a dash when absent."""
    if row is None:
        return "—"
    word = "pass" if row["passed"] else "FAIL"
    return f"{word} (value {value_text('', row.get('value'))}, limit {value_text('', row.get('limit'))})"


def text_rows(found: RunDiff) -> list[list[str]]:
    """Return the CLI table rows: model, what, before, after, change."""
    rows: list[list[str]] = []
    for m in found.models:
        if m.state == "unchanged":
            continue
        if m.presence != "both" or m.state in ("failed", "fixed"):
            rows.append([m.slug, "status", m.status("a"), _status_after(m), m.state])
        rows += [[m.slug, f"config: {r.label}", spec_text(r.before), spec_text(r.after), "changed"]
                 for r in m.spec if r.changed and m.presence == "both"]
        rows += [[m.slug, c.label, value_text(c.field, c.before), value_text(c.field, c.after), c.delta]
                 for c in m.changes if c.field not in ("status", "findings", "audit")]
        rows += level_rows(m)
        rows += [[m.slug, f"finding: {f.code}", "", "present", "added"] for f in m.findings_added]
        rows += [[m.slug, f"finding: {f.code}", "present", "", "removed"] for f in m.findings_removed]
        rows += [[m.slug, f"audit: {v.rule}", verdict_text(v.before), verdict_text(v.after), v.change]
                 for v in m.audit if v.change != "unchanged"]
    return rows


def level_rows(m: ModelDiff) -> list[list[str]]:
    """Return the CLI table rows of a model's pyramid levels: one per changed field, one per added or removed level."""
    rows = []
    for level in m.levels:
        if level.change == "changed":
            rows += [[m.slug, f"level {level.level}: {c.label}", value_text(c.field, c.before),
                      value_text(c.field, c.after), c.delta] for c in level.changes]
        else:
            rows.append([m.slug, f"level {level.level}", "present" if level.before else "",
                         "present" if level.after else "", level.change])
    return rows


def level_text(level: LevelChange, side: str) -> str:
    """Return one side of an added or removed level as `stride 8 × 8, RF 91 × 91`, or a dash when absent."""
    record = level.before if side == "a" else level.after
    if record is None:
        return "—"
    return (f"stride {value_text('stride', record.get('stride'))}, architecture RF "
            f"{value_text('arch_rf_size', view(record, 'arch_rf_size'))}")


def _status_after(model: ModelDiff) -> str:
    """Return B's status with the error of a failed model."""
    if model.after is not None and model.after.get("status") != "ok":
        return f"failed: {model.after.get('error') or 'no error recorded'}"
    return model.status("b")


# --- JSON and markdown --------------------------------------------------------------------------------------------

def to_json(found: RunDiff) -> dict:
    """Return the diff as a JSON-ready document (format 2: `headline` per model, the RF keys by name)."""
    return {"format": FORMAT, "run_a": found.run_a, "run_b": found.run_b, "changed": found.changed,
            "counts": {state: found.count(state) for state in STATES},
            "models": [model_json(m) for m in found.models]}


def model_json(m: ModelDiff) -> dict:
    """Return one model's diff as JSON values."""
    return {"slug": m.slug, "name": m.name, "state": m.state, "presence": m.presence,
            "headline": [c.field for c in m.headline],
            "status": {"a": m.status("a"), "b": m.status("b")},
            "error": {"a": (m.before or {}).get("error"), "b": (m.after or {}).get("error")},
            "spec": {"a": (m.before or {}).get("spec"), "b": (m.after or {}).get("spec"),
                     "changed": [r.key for r in m.spec if r.changed]},
            "changes": [{"field": c.field, "label": c.label, "a": c.before, "b": c.after, "delta": c.delta}
                        for c in m.changes],
            "findings": {"added": [vars(f) for f in m.findings_added],
                         "removed": [vars(f) for f in m.findings_removed]},
            "audit": [{"rule": v.rule, "a": v.before, "b": v.after, "change": v.change} for v in m.audit],
            "levels": [{"level": lv.level, "change": lv.change, "a": lv.before, "b": lv.after,
                        "changes": [{"field": c.field, "label": c.label, "a": c.before, "b": c.after, "delta": c.delta}
                                    for c in lv.changes]} for lv in m.levels]}


def to_markdown(found: RunDiff, html_name: str | None = None) -> str:
    """Return a PR-comment-sized summary: counts, a table of the models that changed, a few bullets each."""
    shown = [m for m in ordered(found.models) if m.state != "unchanged"]
    lines = [f"### Receptive-field diff: `{found.run_a}` → `{found.run_b}`", "", counts_line(found), ""]
    if not shown:
        return "\n".join([*lines, "No model changed.", ""])
    lines += ["| model | change | " + " | ".join(label(f) for f in MARKDOWN_FIELDS) + " | audit |",
              "|---" * (len(MARKDOWN_FIELDS) + 3) + "|"]
    lines += [_markdown_row(m) for m in shown]
    for m in shown[:MARKDOWN_MODELS]:
        bullets = markdown_bullets(m)
        lines += ["", f"**{_md(m.slug)}** ({m.state})", *bullets[:MARKDOWN_CHANGES]]
        if len(bullets) > MARKDOWN_CHANGES:
            lines.append(f"- … and {len(bullets) - MARKDOWN_CHANGES} more")
    if len(shown) > MARKDOWN_MODELS:
        lines += ["", f"… and {len(shown) - MARKDOWN_MODELS} more changed models."]
    if html_name:
        lines += ["", f"Full side-by-side review: `{html_name}`."]
    return "\n".join(lines) + "\n"


def counts_line(found: RunDiff) -> str:
    """Return `16 models: 2 changed, 1 failed, ...` naming only the states that occur."""
    parts = [f"{found.count(state)} {state}" for state in STATES if found.count(state)]
    return f"{len(found.models)} model{'s' if len(found.models) != 1 else ''}: " + ", ".join(parts) + "."


def _markdown_row(m: ModelDiff) -> str:
    """Return one model's row of the markdown table."""
    def pair(field: str) -> str:
        old, new = view(m.before or {}, field), view(m.after or {}, field)
        return value_text(field, old) if same(old, new) else f"{value_text(field, old)} → **{value_text(field, new)}**"
    cells = " | ".join(pair(field) for field in MARKDOWN_FIELDS)
    return f"| {_md(m.slug)} | {m.state} | {cells} | {_audit_pair(m)} |"


def _audit_pair(m: ModelDiff) -> str:
    """Return `pass → **fail: min_rf**` or the one status when unchanged."""
    old = audit_status(m.before) if m.before is not None else "—"
    new = audit_status(m.after) if m.after is not None else "—"
    return _md(old) if old == new else f"{_md(old)} → **{_md(new)}**"


def markdown_bullets(m: ModelDiff) -> list[str]:
    """Return the change bullets of one model: status, config, fields, findings, audit."""
    bullets = []
    if m.state == "failed":
        bullets.append(f"- failed: {_code(str(m.entry.get('error') or 'no error recorded'))}")
    bullets += [f"- config {r.label}: {_code(spec_text(r.before))} → {_code(spec_text(r.after))}"
                for r in m.spec if r.changed and m.presence == "both"]
    bullets += [f"- {c.label}: {value_text(c.field, c.before)} → {value_text(c.field, c.after)}"
                + (f" ({c.delta})" if c.delta else "") for c in m.changes
                if c.field not in ("status", "findings", "audit")]
    for level in m.levels:
        if level.change == "changed":
            bullets += [f"- level {_md(level.level)} {c.label}: {value_text(c.field, c.before)} → "
                        f"{value_text(c.field, c.after)}" + (f" ({c.delta})" if c.delta else "") for c in level.changes]
        else:
            side = "b" if level.change == "added" else "a"
            bullets.append(f"- level {_md(level.level)} {level.change} ({level_text(level, side)})")
    bullets += [f"- new finding ({f.severity}): {_md(f.message)}" for f in m.findings_added]
    bullets += [f"- finding gone: {_md(f.message)}" for f in m.findings_removed]
    bullets += [f"- audit {_md(v.rule)}: {v.change}" for v in m.audit if v.change != "unchanged" and v.rule != "status"]
    return bullets


def _md(text: str) -> str:
    """Escape the characters that would break a markdown table cell or emphasis; show hidden ones (bidi) as escapes."""
    escaped = visible(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return escaped.replace("|", "\\|").replace("*", "\\*").replace("_", "\\_").replace("`", "'").replace("\n", " ")


def _code(text: str) -> str:
    """Return text as a markdown code span (backticks inside replaced, one line, hidden characters shown)."""
    return "`" + visible(text).replace("`", "'").replace("\n", " ") + "`"


def ordered(models: Sequence[ModelDiff]) -> list[ModelDiff]:
    """Return models in reading order: failed, fixed, added, removed, changed, then unchanged (stable)."""
    return sorted(models, key=lambda m: STATES.index(m.state))
