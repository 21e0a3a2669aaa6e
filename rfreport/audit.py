"""Audit rules: limits on a model's summary entry, checked by `rfreport check` and stored in every run.

A config's `[model.audit]` table maps rule names (config.AUDIT_RULES, validated there) to limits.
Each rule reads one key of a model entry's summary in its JSON view (rfreport.summary, the keys of
docs/summary.md; a level's rules read its level record) and yields one result row
`{rule, limit, value, passed, note}`: a geometry rule judges only exact axes and the architecture RF is
unbounded under global context, and the note says so (:func:`judge`); a model whose job failed fails its audit, and so
does one whose run-time verification found violations (an implicit `exact` row). The verdicts of a
`check` are also written for CI: one JSON object (:func:`verdicts_json`) or a JUnit XML file
(:func:`junit_xml`). Pure Python, no torch.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rfreport.config import AUDIT_RULES
from rfreport.options import EXACT_FITS, AuditVerdict
from rfreport.positions import axis_names
from rfreport.summary import finite

ANSI_CODE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")          # a terminal control sequence (colours, cursor moves)
FORBIDDEN_IN_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")   # XML 1.0's Char


@dataclass(frozen=True)
class Check:
    """How a rule is checked: the summary key it reads, its test of (limit, value), and what it needs to be exact.

    `fitted` names the fitted quantity a geometry rule judges ("architecture RF", "stride"): it is judged only
    where every axis's fit (`arch_rf_fit`) is exact, else the row fails saying so. `unbounded` is the verdict of
    an architecture-RF rule under global context, where that RF is unbounded (None: not such a rule). `unknown`
    is the note of a row whose value could not be established (null in the summary): it fails, saying why.
    """

    key: str
    test: Callable[[Any, Any], bool]
    fitted: str = ""
    unbounded: bool | None = None
    unknown: str | None = None


def _per_axis(compare: Callable[[float, float], bool]) -> Callable[[Any, Any], bool]:
    """Lift a scalar comparison to per-axis values, broadcasting a scalar limit over every axis."""
    def test(limit: Any, value: Any) -> bool:
        values = list(value)
        limits = list(limit) if isinstance(limit, (list, tuple)) else [limit] * len(values)
        return len(limits) == len(values) and all(compare(v, lim) for v, lim in zip(values, limits, strict=True))
    return test


AT_LEAST = _per_axis(lambda v, lim: v >= lim)
AT_MOST = _per_axis(lambda v, lim: v <= lim)
CHECKS: dict[str, Check] = {
    "min_rf": Check("arch_rf_size", AT_LEAST, "architecture RF", unbounded=True),
    "max_rf": Check("arch_rf_size", AT_MOST, "architecture RF", unbounded=False),
    "min_rf_in_input": Check("in_input_rf_size", AT_LEAST),
    "max_rf_in_input": Check("in_input_rf_size", AT_MOST),
    "min_stride": Check("stride", AT_LEAST, "stride"),
    "max_stride": Check("stride", AT_MOST, "stride"),
    "max_edge_fraction": Check("edge_fraction", lambda lim, v: v <= lim),
    "no_unseen": Check("unseen_pixels", lambda lim, v: v == 0),
    "no_global": Check("global", lambda lim, v: v is False, unknown=(
        "global context not ruled out: every RF has one box, no global operation was recognised and the "
        "architecture RF is not exact (an unrecognised mixing op cannot be told from saturation)")),
    "global_not_before": Check("global_before", lambda lim, v: isinstance(v, Mapping) and v.get("layer") == lim
                               and v.get("module") is None),
    "no_full_coverage": Check("covering_positions", lambda lim, v: v == 0),
    "max_covering_fraction": Check("covering_fraction", lambda lim, v: v <= lim),
    "max_center_offset": Check("center_offset", _per_axis(lambda v, lim: abs(v) <= lim), "centre offset"),
    "min_fill": Check("min_fill", lambda lim, v: v >= lim),
    "anchors_fit": Check("anchors_fit", lambda lim, v: bool(v)),
    "min_anchor_share": Check("anchor_min_share", lambda lim, v: v >= lim),
}


def evaluate(rules: Mapping[str, Any], entry: Mapping[str, Any]) -> list[dict]:
    """Check every rule on one model entry; a failed job yields a single failing `status` row."""
    if entry.get("status") != "ok":
        return [{"rule": "status", "limit": "ok", "value": entry.get("status"), "passed": False, "note": None}]
    results = [judge(name, limit, entry) for name, limit in active(rules).items()]
    if entry.get("violations"):  # implicit: a reported RF the model itself contradicts fails every audit
        results.append({"rule": "exact", "limit": 0, "value": entry["violations"], "passed": False, "note": None})
    return results


def judge(name: str, limit: Any, entry: Mapping[str, Any]) -> dict:
    """Return one rule's row `{rule, limit, value, passed, note}`; the note says why a value was not judged as is."""
    check = CHECKS[name]
    value = entry.get(check.key)
    if check.unbounded is not None and entry.get("global"):
        where = f"{entry.get('global_op')} in {entry.get('global_from') or 'the forward'}"
        return {"rule": name, "limit": limit, "value": "unbounded", "passed": check.unbounded,
                "note": f"architecture RF unbounded: global context ({where}) reaches every input pixel at any size"}
    inexact = inexact_axes(entry) if check.fitted else {}
    if inexact:
        axes = ", ".join(f"{axis} ({fit})" for axis, fit in inexact.items())
        return {"rule": name, "limit": limit, "value": value, "passed": False,
                "note": f"{check.fitted} not exact on axis {axes}: not judged"}
    return {"rule": name, "limit": limit, "value": value,
            "passed": value is not None and bool(check.test(limit, value)),
            "note": check.unknown if value is None else None}


def inexact_axes(entry: Mapping[str, Any]) -> dict[str, str]:
    """Return {axis: fit} of the axes whose geometry is not exact (`arch_rf_fit` estimated, nonaffine or none)."""
    fits = list(entry.get("arch_rf_fit") or [])
    return {axis: fit for axis, fit in zip(axis_names(len(fits)), fits) if fit not in EXACT_FITS} if fits else {
        "every axis": "no fit recorded"}


def passed(results: Sequence[Mapping[str, Any]]) -> bool:
    """Return whether every result row of a model passed."""
    return all(row["passed"] for row in results)


def verdict(results: Sequence[Mapping[str, Any]] | None) -> AuditVerdict:
    """Summarise a model's result rows: pass, fail, or none without rows."""
    if not results:
        return AuditVerdict.NONE
    return AuditVerdict.PASS if passed(results) else AuditVerdict.FAIL


def failed_rules(results: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """Return the names of the rules that failed, in row order."""
    return [row["rule"] for row in results or [] if not row["passed"]]


def active(rules: Mapping[str, Any]) -> dict[str, Any]:
    """Return the rules that check something: every rule but flags set to false."""
    return {name: limit for name, limit in rules.items() if AUDIT_RULES[name].kind != "flag" or limit}


def checked(entries: Sequence[Mapping[str, Any]]) -> bool:
    """Tell whether a check has anything to judge: a result row in some entry (a failed job is one)."""
    return any(entry.get("audit") for entry in entries)


def verdicts_json(entries: Sequence[Mapping[str, Any]]) -> dict:
    """Return the machine-readable verdicts of a check: overall and per model, with every rule's row."""
    models = [{"name": e.get("name"), "slug": e.get("slug"), "status": e.get("status"), "error": e.get("error"),
               "passed": passed(e.get("audit") or []), "audit": list(e.get("audit") or [])} for e in entries]
    return finite({"passed": all(m["passed"] for m in models), "models": models})


def junit_xml(entries: Sequence[Mapping[str, Any]], name: str = "rfreport check") -> str:
    """Return a JUnit XML report: a testsuite per model, a testcase per rule (failure) or failed job (error)."""
    root = ET.Element("testsuites", name=name)
    for entry in entries:
        root.append(_testsuite(entry))
    for key in ("tests", "failures", "errors"):
        root.set(key, str(sum(int(suite.get(key, "0")) for suite in root)))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _testsuite(entry: Mapping[str, Any]) -> ET.Element:
    """Return one model's testsuite: its rules as testcases, or one erroring `job` testcase if its job failed."""
    slug = xml_text(str(entry.get("slug")))
    suite = ET.Element("testsuite", name=slug, time=f"{float(entry.get('seconds') or 0):.3f}")
    failures = errors = 0
    for row in entry.get("audit") or []:
        case = ET.SubElement(suite, "testcase", classname=slug, name="job" if row["rule"] == "status" else row["rule"])
        if row["rule"] == "status":
            errors += 1
            message = xml_text(f"the job failed: {entry.get('error') or row['value']}")
            ET.SubElement(case, "error", message=message, type="JobFailed").text = message
        elif not row["passed"]:
            failures += 1
            note = f" ({row['note']})" if row.get("note") else ""
            message = xml_text(f"{row['rule']}: value {_text(row['value'])}, limit {_text(row['limit'])}{note}")
            ET.SubElement(case, "failure", message=message, type="AuditFailure").text = (
                f"{message} ({rule_help(row['rule'])})")
    suite.set("tests", str(len(suite)))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", "0")
    return suite


def rule_help(rule: str) -> str:
    """Return what a result row's rule checks: a configured rule (a level's too, `rule (level name)`), or the
    implicit `exact` row of the run-time verification."""
    base = rule.split(" (level ", 1)[0]
    if base in AUDIT_RULES:
        return AUDIT_RULES[base].help
    return ("positions checked on the model itself whose output moved when input outside their reported RF was "
            "perturbed: the reported RF is too small there")


def xml_text(text: str) -> str:
    """Return text that XML 1.0 can hold: terminal colour codes dropped, other forbidden characters as `\\xNN`.

    Library and CUDA errors often carry ANSI colour codes; an ESC character (or any control
    character but tab and newlines) makes the whole JUnit file unreadable to a strict parser.
    """
    return FORBIDDEN_IN_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", ANSI_CODE.sub("", text))


def _text(value: Any) -> str:
    """Format a rule's value or limit for a message: lists per axis as `a x b`."""
    if isinstance(value, (list, tuple)):
        return " x ".join(_text(v) for v in value)
    return "none" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
