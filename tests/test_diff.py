"""Run diffs on hand-made runs."""

from __future__ import annotations

from pathlib import Path

from rfreport import diff
from rfreport.runfolder import ModelRun, Run

BASE = {"name": "net", "slug": "net-32x32", "status": "ok", "output_shape": [1, 8, 8, 8], "rf_size": [11, 11],
        "center_rf_size": [11, 11], "stride": [4, 4], "padding": [4, 4], "center_offset": [0.0, 0.0],
        "affine": True, "edge_fraction": 0.5, "unseen_pixels": 0, "global": False, "wrapped": False,
        "min_fill": 1.0, "findings": [{"code": "edge", "severity": "warning", "message": "50% see padding"}],
        "audit": [{"rule": "min_rf", "limit": 10, "value": [11, 11], "passed": True}]}


def make_run(*entries: dict) -> Run:
    """Build a run from entries without touching the disk."""
    return Run(Path("run"), {}, tuple(ModelRun(Path("run"), entry) for entry in entries))


def test_identical_runs_have_no_changes():
    found = diff.compare(make_run(BASE), make_run(dict(BASE)))
    assert not found.changed and found.changes == () and found.added == () and found.removed == ()


def test_float_noise_is_not_a_change():
    found = diff.compare(make_run(BASE), make_run({**BASE, "edge_fraction": 0.5 + 1e-15}))
    assert not found.changed


def test_geometry_changes_are_listed_field_by_field():
    after = {**BASE, "rf_size": [15, 15], "stride": [8, 4], "edge_fraction": 0.25}
    found = diff.compare(make_run(BASE), make_run(after))
    assert found.changes == (
        diff.Change("net-32x32", "rf_size", [11, 11], [15, 15]),
        diff.Change("net-32x32", "stride", [4, 4], [8, 4]),
        diff.Change("net-32x32", "edge_fraction", 0.5, 0.25),
    )


def test_findings_and_audit_status_changes():
    after = {**BASE, "findings": [{"code": "unseen", "severity": "warning", "message": "x"}],
             "audit": [{"rule": "min_rf", "limit": 10, "value": [9, 9], "passed": False}]}
    changes = {c.field: (c.before, c.after) for c in diff.compare(make_run(BASE), make_run(after)).changes}
    assert changes == {"findings": (["edge"], ["unseen"]), "audit": ("pass", "fail: min_rf")}


def test_added_removed_and_failed_models():
    other = {**BASE, "name": "new", "slug": "new-32x32"}
    failed = {"name": "net", "slug": "net-32x32", "status": "failed", "error": "boom"}
    found = diff.compare(make_run(BASE), make_run(failed, other))
    assert found.added == ("new-32x32",) and found.removed == ()
    fields = {c.field for c in found.changes}
    assert {"status", "rf_size", "stride", "findings", "audit"} <= fields
    assert diff.compare(make_run(BASE, other), make_run(BASE)).removed == ("new-32x32",)


def test_audit_status_words():
    assert diff.audit_status({"audit": []}) == "none"
    assert diff.audit_status(BASE) == "pass"
