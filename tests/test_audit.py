"""Audit rules on hand-made summary entries."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from rfreport import audit
from rfreport.config import AUDIT_RULES
from rfreport.summary import Summary

ENTRY = {"status": "ok", "arch_rf_size": [11, 9], "arch_rf_fit": ["affine", "composed"], "in_input_rf_size": [7, 9],
         "stride": [4.0, 2.0], "edge_fraction": 0.25, "unseen_pixels": 0, "global": False, "center_offset": [0.5, -1.0],
         "min_fill": 0.75, "covering_positions": 0, "covering_fraction": 0.0}


def resnet18_summary() -> Summary:
    """Analyse torchvision's resnet18 (weights=None) at layer4 on a 224 x 224 input as a job does where every RF is
    clipped: the centre swept, the exact geometry composed from per-layer windows (a few seconds, no layer growth)."""
    torchvision = pytest.importorskip("torchvision")
    from rfreport.analysis.analyze import analyze
    from rfreport.compute.layers import target_geometry
    from rfreport.compute.surrogate import surrogates_reused
    from rfreport.compute.sweep import sweep

    model, shape = torchvision.models.resnet18(weights=None).eval(), (1, 3, 224, 224)
    with surrogates_reused():
        main = sweep(model, shape, "center", layer="layer4", verify=False, device="cpu")
        found = target_geometry(model, shape, "layer4", device="cpu")
    return analyze(main, composed=list(zip(found.rf, found.stride, found.padding)), global_ops=()).summary


def verdict(rule: str, limit, **changes) -> tuple:
    """Return (value, passed) of one rule on ENTRY with some keys changed."""
    (row,) = audit.evaluate({rule: limit}, {**ENTRY, **changes})
    assert row["rule"] == rule and row["limit"] == limit
    return row["value"], row["passed"]


def test_every_config_rule_has_a_check():
    assert audit.CHECKS.keys() == AUDIT_RULES.keys()


@pytest.mark.parametrize("rule, limit, passed", [
    ("min_rf", 9, True), ("min_rf", 10, False), ("min_rf", [11, 9], True), ("min_rf", [12, 1], False),
    ("max_rf", 11, True), ("max_rf", 10, False), ("max_rf", [11, 8], False), ("max_rf", [20, 9], True),
])
def test_rf_rules_judge_the_architecture_rf_on_every_axis(rule, limit, passed):
    assert verdict(rule, limit) == ([11, 9], passed)


@pytest.mark.parametrize("rule, limit, passed", [
    ("min_rf_in_input", 7, True), ("min_rf_in_input", 8, False), ("min_rf_in_input", [7, 9], True),
    ("max_rf_in_input", 9, True), ("max_rf_in_input", [6, 9], False),
])
def test_in_input_rules_judge_the_clipped_box_at_the_centre(rule, limit, passed):
    assert verdict(rule, limit) == ([7, 9], passed)


@pytest.mark.parametrize("rule, limit, passed", [
    ("min_stride", 2, True), ("min_stride", 3, False), ("min_stride", [4, 2], True), ("min_stride", [2, 4], False),
    ("max_stride", 4, True), ("max_stride", 2.5, False), ("max_stride", [4, 2], True), ("max_stride", [8, 1], False),
])
def test_stride_rules_check_every_axis(rule, limit, passed):
    assert verdict(rule, limit) == ([4.0, 2.0], passed)


@pytest.mark.parametrize("rule", ["min_rf", "max_rf", "min_stride", "max_stride", "max_center_offset"])
@pytest.mark.parametrize("fit", ["estimated", "nonaffine", "none"])
def test_geometry_rules_never_judge_an_inexact_axis(rule, fit):
    """A limit the estimated number would meet still fails: the row says the axis was not judged, and why."""
    (row,) = audit.evaluate({rule: 1000 if rule.startswith("max") else 1}, {**ENTRY, "arch_rf_fit": ["affine", fit]})
    assert not row["passed"] and row["note"].endswith(f"not exact on axis w ({fit}): not judged")
    assert row["note"].startswith({"min_rf": "architecture RF", "max_rf": "architecture RF", "min_stride": "stride",
                                   "max_stride": "stride", "max_center_offset": "centre offset"}[rule])


def test_in_input_rules_are_judged_whatever_the_fit():
    estimated = {**ENTRY, "arch_rf_fit": ["estimated", "estimated"]}
    assert audit.evaluate({"min_rf_in_input": 7}, estimated)[0] == {
        "rule": "min_rf_in_input", "limit": 7, "value": [7, 9], "passed": True, "note": None}


@pytest.mark.parametrize("rule, passed", [("min_rf", True), ("max_rf", False)])
def test_global_context_makes_the_architecture_rf_unbounded(rule, passed):
    entry = {**ENTRY, "global": True, "global_op": "adaptive_avg_pool2d", "global_from": "avgpool",
             "arch_rf_size": None, "arch_rf_fit": ["estimated", "estimated"]}
    (row,) = audit.evaluate({rule: 300}, entry)
    assert (row["value"], row["passed"]) == ("unbounded", passed)
    assert row["note"] == ("architecture RF unbounded: global context (adaptive_avg_pool2d in avgpool) reaches "
                           "every input pixel at any size")


def test_resnet18_is_judged_on_its_architecture_rf_at_224():
    """resnet18's layer4 sees 435 x 435 pixels with no border in the way, though every RF is clipped to 224 x 224."""
    entry = {"status": "ok", **resnet18_summary().to_json()}
    assert entry["arch_rf_size"] == [435, 435] and entry["in_input_rf_size"] == [224, 224]
    assert entry["arch_rf_fit"] == ["composed", "composed"] and entry["stride"] == [32.0, 32.0]
    rows = audit.evaluate({"min_rf": 300, "max_rf": 435, "min_rf_in_input": 224, "max_stride": 32}, entry)
    assert all(row["passed"] and row["note"] is None for row in rows), rows
    rows = audit.evaluate({"min_rf": 500, "max_rf": 434, "min_rf_in_input": 300, "min_stride": 33}, entry)
    assert not any(row["passed"] for row in rows) and [row["value"] for row in rows] == [
        [435, 435], [435, 435], [224, 224], [32.0, 32.0]]


@pytest.mark.parametrize("limit, fraction, passed", [(0.25, 0.25, True), (0.2, 0.25, False), (0.0, 0.0, True)])
def test_max_edge_fraction(limit, fraction, passed):
    assert verdict("max_edge_fraction", limit, edge_fraction=fraction) == (fraction, passed)


@pytest.mark.parametrize("unseen, passed", [(0, True), (3, False)])
def test_no_unseen(unseen, passed):
    assert verdict("no_unseen", True, unseen_pixels=unseen) == (unseen, passed)


@pytest.mark.parametrize("is_global, passed", [(False, True), (True, False), (None, False)])
def test_no_global_fails_on_a_global_op_or_when_unknown(is_global, passed):
    assert verdict("no_global", True, **{"global": is_global}) == (is_global, passed)


def test_no_global_ignores_rfs_that_merely_cover_the_input():
    assert verdict("no_global", True, covering_positions=25, covering_fraction=0.4) == (False, True)


@pytest.mark.parametrize("count, passed", [(0, True), (1, False), (25, False)])
def test_no_full_coverage_fails_when_any_swept_position_covers_the_input(count, passed):
    assert verdict("no_full_coverage", True, covering_positions=count) == (count, passed)


@pytest.mark.parametrize("limit, fraction, passed", [(0.5, 0.39, True), (0.25, 0.39, False), (0.0, 0.0, True)])
def test_max_covering_fraction(limit, fraction, passed):
    assert verdict("max_covering_fraction", limit, covering_fraction=fraction) == (fraction, passed)


def test_a_false_flag_disables_its_rule():
    assert audit.evaluate({"no_unseen": False, "no_global": False, "no_full_coverage": False},
                          {**ENTRY, "unseen_pixels": 5}) == []
    assert audit.active({"no_unseen": False, "min_rf": 3, "no_global": True}) == {"min_rf": 3, "no_global": True}


@pytest.mark.parametrize("limit, passed", [(1.0, True), (0.99, False), (2, True)])
def test_max_center_offset_uses_the_absolute_offset(limit, passed):
    assert verdict("max_center_offset", limit) == ([0.5, -1.0], passed)


@pytest.mark.parametrize("limit, passed", [(0.75, True), (0.8, False)])
def test_min_fill(limit, passed):
    assert verdict("min_fill", limit) == (0.75, passed)


def test_every_row_has_a_note():
    rows = audit.evaluate({"min_fill": 0.5}, {**ENTRY, "violations": 2})
    assert [(row["rule"], row["note"]) for row in rows] == [("min_fill", None), ("exact", None)]
    assert audit.evaluate({"min_fill": 0.5}, {"status": "failed"})[0]["note"] is None


def test_a_missing_value_fails():
    assert verdict("min_fill", 0.5, min_fill=None) == (None, False)


def test_a_failed_model_fails_its_audit_whatever_the_rules():
    rows = audit.evaluate({"min_rf": 1}, {"status": "failed", "error": "boom"})
    assert rows == [{"rule": "status", "limit": "ok", "value": "failed", "passed": False, "note": None}]
    assert not audit.passed(rows)
    assert not audit.passed(audit.evaluate({}, {"status": "failed"}))


def test_passed_needs_every_row():
    rows = audit.evaluate({"min_rf": 9, "max_rf": 10}, ENTRY)
    assert [r["passed"] for r in rows] == [True, False]
    assert not audit.passed(rows)
    assert audit.passed(rows[:1]) and audit.passed([])


def test_junit_failure_messages_carry_the_note():
    entry = {**ENTRY, "slug": "net-32x32", "global": True, "global_op": "mean", "global_from": "gate",
             "arch_rf_size": None}
    entry["audit"] = audit.evaluate({"max_rf": 300}, entry)
    xml = audit.junit_xml([entry])
    assert ('message="max_rf: value unbounded, limit 300 (architecture RF unbounded: global context (mean in gate) '
            'reaches every input pixel at any size)"') in xml


def test_junit_explains_a_levels_rule_and_the_implicit_exact_row():
    """A level's rules are named `rule (level name)`, and verification's violations add an `exact` row: both are
    failures in the JUnit file, each with what it checks."""
    entry = {**ENTRY, "slug": "net-32x32", "violations": 3, "levels": [{"level": "mid", "stride": [2, 2]}]}
    entry["audit"] = [*audit.evaluate({}, entry), {"rule": "max_stride (level mid)", "limit": 1, "value": [2, 2],
                                                   "passed": False, "note": None}]
    failures = {f.get("message").split(":")[0]: f.text for f in ET.fromstring(audit.junit_xml([entry])).iter("failure")}
    assert failures["max_stride (level mid)"].endswith(f"({AUDIT_RULES['max_stride'].help})")
    assert "outside their reported RF was perturbed" in failures["exact"]
