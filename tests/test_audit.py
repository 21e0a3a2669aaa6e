"""Audit rules on hand-made summary entries."""

from __future__ import annotations

import pytest

from rfreport import audit
from rfreport.config import AUDIT_RULES

ENTRY = {"status": "ok", "center_rf_size": [11, 9], "edge_fraction": 0.25, "unseen_pixels": 0, "global": False,
         "center_offset": [0.5, -1.0], "min_fill": 0.75, "covering_positions": 0, "covering_fraction": 0.0}


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
def test_rf_size_rules_check_every_axis_at_the_centre(rule, limit, passed):
    assert verdict(rule, limit) == ([11, 9], passed)


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


def test_a_missing_value_fails():
    assert verdict("min_fill", 0.5, min_fill=None) == (None, False)


def test_a_failed_model_fails_its_audit_whatever_the_rules():
    rows = audit.evaluate({"min_rf": 1}, {"status": "failed", "error": "boom"})
    assert rows == [{"rule": "status", "limit": "ok", "value": "failed", "passed": False}]
    assert not audit.passed(rows)
    assert not audit.passed(audit.evaluate({}, {"status": "failed"}))


def test_passed_needs_every_row():
    rows = audit.evaluate({"min_rf": 9, "max_rf": 10}, ENTRY)
    assert [r["passed"] for r in rows] == [True, False]
    assert not audit.passed(rows)
    assert audit.passed(rows[:1]) and audit.passed([])
