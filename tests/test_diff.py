"""Run diffs on hand-made runs."""

from __future__ import annotations

import json
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


def test_failed_model_is_failed_not_added():
    """A model that failed in B is shown as failed, whether or not A had it; one failed in A and ok in B is fixed."""
    failed = {"name": "net", "slug": "net-32x32", "status": "failed", "error": "boom",
              "audit": [{"rule": "status", "limit": "ok", "value": "failed", "passed": False}]}
    only_b = diff.compare(make_run(), make_run(failed))
    (model,) = only_b.models
    assert (model.state, model.presence, model.status("a"), model.status("b")) == ("failed", "added", "absent",
                                                                                   "failed")
    assert diff.text_rows(only_b)[0] == ["net-32x32", "status", "absent", "failed: boom", "failed"]
    assert diff.compare(make_run(BASE), make_run(failed)).models[0].state == "failed"
    assert diff.compare(make_run(failed), make_run(BASE)).models[0].state == "fixed"


def test_spec_rows_show_what_was_asked():
    """The config recorded under `spec` is compared key by key; runs without it show nothing."""
    spec = {"factory": "m:f", "kwargs": {"width": 8}, "input_shape": [1, 3, 32, 32], "layer": None,
            "output": None, "mode": "structural"}
    before, after = {**BASE, "spec": spec}, {**BASE, "spec": {**spec, "kwargs": {"width": 16}, "layer": "body"}}
    (model,) = diff.compare(make_run(before), make_run(after)).models
    changed = {row.key: (diff.spec_text(row.before), diff.spec_text(row.after)) for row in model.spec if row.changed}
    assert changed == {"kwargs": ("width=8", "width=16"), "layer": ("—", "body")}
    assert model.state == "changed" and model.spec_changed
    assert diff.compare(make_run(BASE), make_run(BASE)).models[0].spec == ()


def test_findings_added_and_removed_with_messages():
    after = {**BASE, "findings": [{"code": "unseen", "severity": "warning", "message": "3 pixels unseen"}]}
    (model,) = diff.compare(make_run(BASE), make_run(after)).models
    assert model.findings_added == (diff.FindingChange("unseen", "warning", "3 pixels unseen"),)
    assert model.findings_removed == (diff.FindingChange("edge", "warning", "50% see padding"),)


def test_audit_verdicts_per_rule():
    after = {**BASE, "audit": [{"rule": "min_rf", "limit": 10, "value": [9, 9], "passed": False},
                               {"rule": "no_unseen", "limit": True, "value": 0, "passed": True}]}
    (model,) = diff.compare(make_run(BASE), make_run(after)).models
    assert [(v.rule, v.change) for v in model.audit] == [("min_rf", "now failing"), ("no_unseen", "added")]
    assert diff.verdict_text(model.audit[0].after) == "FAIL (value 9 × 9, limit 10)"


def test_values_have_labels_and_never_join_codes_with_the_axis_separator():
    """Finding codes are joined with commas; per-axis values with ×; fractions are percentages with pp deltas."""
    assert diff.value_text("findings", ["edge", "unseen"]) == "edge, unseen"
    assert diff.value_text("rf_size", [11, 13]) == "11 × 13"
    assert diff.value_text("edge_fraction", 0.25) == "25%"
    assert diff.delta_text("edge_fraction", 0.5, 0.25) == "-25 pp"
    assert diff.delta_text("rf_size", [11, 11], [15, 13]) == "+4 × +2"
    assert diff.label("center_rf_size") == "RF size at the centre"
    after = {**BASE, "findings": [{"code": "unseen", "severity": "warning", "message": "x"},
                                  {"code": "holes", "severity": "info", "message": "y"}]}
    rows = diff.text_rows(diff.compare(make_run(BASE), make_run(after)))
    assert not any(" x " in cell for row in rows for cell in row)


def test_json_document():
    after = {**BASE, "rf_size": [15, 15]}
    document = diff.to_json(diff.compare(make_run(BASE), make_run(after, {**BASE, "slug": "b-1", "name": "b"})))
    assert document["counts"] == {"failed": 0, "fixed": 0, "added": 1, "removed": 0, "changed": 1, "unchanged": 0}
    first = document["models"][0]
    assert first["state"] == "changed" and first["changes"] == [
        {"field": "rf_size", "label": "RF size (clear of the border)", "a": [11, 11], "b": [15, 15],
         "delta": "+4 × +4"}]
    assert json.loads(json.dumps(document)) == document


def test_markdown_stays_comment_sized():
    """Forty changed models give a table and at most MARKDOWN_MODELS detailed sections."""
    before = [{**BASE, "slug": f"m{i}", "name": f"m{i}"} for i in range(40)]
    after = [{**entry, "rf_size": [15, 15], "edge_fraction": 0.75} for entry in before]
    text = diff.to_markdown(diff.compare(make_run(*before), make_run(*after)), "diff.html")
    assert text.count("\n**m") == diff.MARKDOWN_MODELS and "… and 28 more changed models." in text
    assert "| m0 | changed | 11 × 11 | 50% → **75%** | pass |" in text
    assert len(text.splitlines()) < 120 and "`diff.html`" in text
    assert diff.to_markdown(diff.compare(make_run(BASE), make_run(BASE))).endswith("No model changed.\n")


def test_audit_status_words():
    assert diff.audit_status({"audit": []}) == "none"
    assert diff.audit_status(BASE) == "pass"
