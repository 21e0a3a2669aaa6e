"""Run diffs on hand-made runs."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rfreport import diff, runfolder
from rfreport.analysis.levels import aggregate
from rfreport.config import ModelSpec
from rfreport.report import diffpage
from rfreport.report import render as report
from rfreport.runfolder import ModelRun, Run
from tests.support import GOLD_RUN, META, assert_gold, edited_runs, invoke, outputs

BASE = {"name": "net", "slug": "net-32x32", "status": "ok", "output_shape": [1, 8, 8, 8], "arch_rf_size": [11, 11],
        "arch_rf_fit": ["affine", "affine"], "in_input_rf_size": [11, 11], "stride": [4, 4], "padding": [4, 4],
        "center_offset": [0.0, 0.0], "affine": True, "edge_fraction": 0.5, "unseen_pixels": 0, "global": False,
        "wrapped": False, "min_fill": 1.0,
        "findings": [{"code": "edge", "severity": "warning", "message": "50% see padding"}],
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
    after = {**BASE, "arch_rf_size": [15, 15], "stride": [8, 4], "edge_fraction": 0.25}
    found = diff.compare(make_run(BASE), make_run(after))
    assert found.changes == (
        diff.Change("net-32x32", "arch_rf_size", [11, 11], [15, 15]),
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
    assert found.changes == ()   # a failed model is shown as failed, not as every value gone
    assert [m.state for m in found.models] == ["failed", "added"] and found.changed
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
    assert diff.value_text("arch_rf_size", [11, 13]) == "11 × 13"
    assert diff.value_text("edge_fraction", 0.25) == "25%"
    assert diff.delta_text("edge_fraction", 0.5, 0.25) == "-25 pp"
    assert diff.delta_text("arch_rf_size", [11, 11], [15, 13]) == "+4 × +2"
    assert diff.label("in_input_rf_size") == "in-input RF at the centre"
    after = {**BASE, "findings": [{"code": "unseen", "severity": "warning", "message": "x"},
                                  {"code": "holes", "severity": "info", "message": "y"}]}
    rows = diff.text_rows(diff.compare(make_run(BASE), make_run(after)))
    assert not any(" x " in cell for row in rows for cell in row)


def test_json_document():
    after = {**BASE, "arch_rf_size": [15, 15]}
    document = diff.to_json(diff.compare(make_run(BASE), make_run(after, {**BASE, "slug": "b-1", "name": "b"})))
    assert document["counts"] == {"failed": 0, "fixed": 0, "added": 1, "removed": 0, "changed": 1, "unchanged": 0}
    first = document["models"][0]
    assert first["state"] == "changed" and first["changes"] == [
        {"field": "arch_rf_size", "label": "architecture RF", "a": [11, 11], "b": [15, 15],
         "delta": "+4 × +4"}]
    assert json.loads(json.dumps(document)) == document


def test_markdown_stays_comment_sized():
    """Forty changed models give a table and at most MARKDOWN_MODELS detailed sections."""
    before = [{**BASE, "slug": f"m{i}", "name": f"m{i}"} for i in range(40)]
    after = [{**entry, "arch_rf_size": [15, 15], "edge_fraction": 0.75} for entry in before]
    text = diff.to_markdown(diff.compare(make_run(*before), make_run(*after)), "diff.html")
    assert text.count("\n**m") == diff.MARKDOWN_MODELS and "… and 28 more changed models." in text
    assert "| m0 | changed | 11 × 11 → **15 × 15** | 4 × 4 | 4 × 4 | no | 11 × 11 | pass |" in text
    assert len(text.splitlines()) < 120 and "`diff.html`" in text
    assert diff.to_markdown(diff.compare(make_run(BASE), make_run(BASE))).endswith("No model changed.\n")


def test_audit_status_words():
    assert diff.audit_status({"audit": []}) == "none"
    assert diff.audit_status(BASE) == "pass"


# --- the CLI and the HTML page, on the pinned golden run and an edited copy of it ------------------------------

def test_cli_table_has_labels_and_states(tmp_path):
    a, b = edited_runs(tmp_path)
    done = invoke("diff", a, b)
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["model", "what"]
    assert any("config: keyword arguments" in line and "width=4" in line and "width=8" in line for line in lines)
    assert any(line.startswith("volume-6x8x8") and "failed: RuntimeError: out of memory" in line for line in lines)
    assert any(line.startswith("newcomer-32x32") and line.rstrip().endswith("failed") for line in lines)
    assert any("script_alert_1_script-24" in line and "removed" in line for line in lines)
    assert any("audit: max_edge_fraction" in line and "now passing" in line for line in lines)
    assert not any(" x " in line for line in lines)
    failing = invoke("diff", a, b, "--fail-on-change")
    assert failing.exit_code == 1 and "4 model(s) changed" in failing.stderr


def test_cli_json_and_markdown(tmp_path):
    a, b = edited_runs(tmp_path)
    done = invoke("diff", a, b, "--json", "-")
    assert done.exit_code == 0, done.output
    document = json.loads(done.stdout)
    assert [(m["slug"], m["state"]) for m in document["models"]] == [
        ("dilated-16x20", "changed"), ("script_alert_1_script-24", "removed"), ("volume-6x8x8", "failed"),
        ("broken_b_b-32x32", "failed"), ("newcomer-32x32", "failed")]
    assert document["models"][0]["spec"]["changed"] == ["kwargs"]
    markdown = invoke("diff", a, b, "--markdown", tmp_path / "diff.md", "--html", tmp_path / "diff.html")
    assert markdown.exit_code == 0 and "model" in markdown.stdout
    text = (tmp_path / "diff.md").read_text()
    assert "| dilated-16x20 | changed | 13 × 13 → **15 × 15** | 1 × 1 | 6 × 6 | no | 13 × 13 → **15 × 15** |" in text
    assert "- config keyword arguments: `width=4` → `width=8`" in text and "`diff.html`" in text
    both = invoke("diff", a, b, "--json", "-", "--markdown", "-")
    assert both.exit_code == 2


def test_cli_refuses_a_missing_run(tmp_path):
    done = invoke("diff", tmp_path / "nope", GOLD_RUN, "--html", tmp_path / "d.html")
    assert done.exit_code == 2 and "no run folder there" in done.output and "Traceback" not in done.output
    assert not (tmp_path / "d.html").exists()


def structure(html: str) -> str:
    """Return the page's outline: headings, captions, table rows and list items as text, one per line."""
    class Outline(HTMLParser):
        def __init__(self):
            super().__init__()
            self.lines: list[str] = []
            self.stack: list[str] = []
            self.text: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag in ("td", "th") and self.stack:
                self.text.append(" | ")
            if tag in TEXT_TAGS:
                self.stack.append(tag)
                self.text = []
            if tag == "img":
                self.lines.append(f"  img {dict(attrs)['alt']}")

        def handle_endtag(self, tag):
            if self.stack and tag == self.stack[-1]:
                self.stack.pop()
                line = " ".join("".join(self.text).split())
                self.lines.append(f"{tag}: {line}")

        def handle_data(self, data):
            if self.stack:
                self.text.append(data)

    parser = Outline()
    parser.feed(html)
    return "\n".join(parser.lines) + "\n"


TEXT_TAGS = ("h1", "h2", "h3", "caption", "tr", "li", "figcaption", "p")


@pytest.fixture(scope="module")
def diff_page(tmp_path_factory) -> Path:
    """Render the diff page of the edited golden runs once."""
    tmp = tmp_path_factory.mktemp("diffpage")
    a, b = edited_runs(tmp)
    done = invoke("diff", a, b, "--html", tmp / "diff.html")
    assert done.exit_code == 0, done.output
    return tmp / "diff.html"


def test_diff_page_structure_matches_gold(diff_page):
    """The page's outline (headings, table rows, findings, map captions) is the golden file; paths scrubbed."""
    html = diff_page.read_text(encoding="utf-8").replace(str(diff_page.parent), "TMP")
    assert_gold("diff.txt", structure(html))


def test_diff_page_is_self_contained_and_escaped(diff_page):
    html = diff_page.read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs)
    assert "3 &lt;b&gt;pixels&lt;/b&gt; are unseen" in html and "<b>pixels" not in html
    assert html.count('class="heatmap grid-static"') == 6   # RF size h, w and clipped sides, before and after


def test_diff_page_context_is_documented_and_used():
    source = "".join(report.template_text(name) for name in ("diff.html", "macros.html", "base.html"))
    for cls in diffpage.context_types().values():
        assert cls.__doc__
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} is undocumented"
            assert re.search(rf"\.{f.name}\b", source), f"{cls.__name__}.{f.name} is not used by the diff page"


def test_pipeline_records_the_spec_of_every_job():
    """Each summary.json entry, failed or not, holds what was asked: factory, kwargs, shape, layer, output, mode."""
    from rfreport.config import ModelSpec, RunOptions
    from rfreport.run import jobs as jobs_mod
    from rfreport.run import pipeline

    spec = ModelSpec(name="net", factory="m.py:f", input_shapes=((1, 3, 8, 8), (1, 3, 16, 16)), kwargs={"k": 3},
                     layer="body", positions=("center", (1, 2)), audit={"min_rf": 3})
    job = jobs_mod.Job(spec, (1, 3, 16, 16), RunOptions())
    entry = pipeline.entry(job, pipeline.failed_result(job, RuntimeError("boom"), 0.0))
    assert entry["spec"] == {"factory": "m.py:f", "kwargs": {"k": 3}, "input_shape": [1, 3, 16, 16],
                             "layer": "body", "output": None, "mode": "structural", "positions": ["center", [1, 2]],
                             "checkpoint": None, "audit": {"min_rf": 3}}
    assert json.loads(json.dumps(entry["spec"])) == entry["spec"]


# --- feature-pyramid levels ---------------------------------------------------------------------------------------

C3 = {"level": "C3", "target": "output[1]", "output_shape": [1, 8, 8, 8], "stride": [4.0, 4.0],
      "arch_rf_size": [11, 11],
      "arch_rf_fit": ["affine", "affine"], "padding": [4.0, 4.0], "center_offset": [0.0, 0.0], "fit": "affine",
      "in_input_rf_size": [11, 11],
      "edge_fraction": 0.5, "global": False, "local_rf_size": None, "min_fill": 1.0, "affine": True, "verified": 1,
      "violations": 0, "anchors": [[8, 8]], "anchor_basis": "rf", "anchor_rf": [11, 11], "anchors_fit": True,
      "anchor_min_share": 8 / 11}
C4 = {**C3, "level": "C4", "target": "output[2]", "output_shape": [1, 16, 4, 4], "stride": [8.0, 8.0],
      "arch_rf_size": [27, 27], "padding": [12.0, 12.0], "in_input_rf_size": [27, 27], "edge_fraction": 1.0,
      "anchors": [],
      "anchor_basis": None, "anchor_rf": None, "anchors_fit": None, "anchor_min_share": None}


def pyramid_runs() -> tuple[dict, dict]:
    """Return entries before and after: C3 grows (the fit kind alone changes nothing else), C4 goes, P6 comes."""
    before = {**BASE, "levels": [C3, C4]}
    grown = {**C3, "arch_rf_size": [15, 15], "padding": [6.0, 6.0], "anchors": [[8, 8], [32, 16]], "fit": "composed"}
    p6 = {**C4, "level": "P6", "stride": [16.0, 16.0], "arch_rf_size": [43, 43], "global": True}
    return before, {**BASE, "levels": [grown, p6]}


def test_levels_are_compared_by_name_field_by_field():
    before, after = pyramid_runs()
    (model,) = diff.compare(make_run(before), make_run(after)).models
    assert model.state == "changed" and model.changes == ()
    assert [(lv.level, lv.change) for lv in model.levels] == [("C3", "changed"), ("C4", "removed"), ("P6", "added")]
    assert model.levels[0].changes == (diff.Change("net-32x32", "arch_rf_size", [11, 11], [15, 15]),
                                       diff.Change("net-32x32", "padding", [4.0, 4.0], [6.0, 6.0]),
                                       diff.Change("net-32x32", "anchors", [[8, 8]], [[8, 8], [32, 16]]))
    assert diff.compare(make_run(before), make_run({**before, "levels": [C3, {**C4, "fit": "enlarged"}]})
                        ).models[0].state == "unchanged"
    assert diff.level_rows(model) == [
        ["net-32x32", "level C3: architecture RF", "11 × 11", "15 × 15", "+4 × +4"],
        ["net-32x32", "level C3: padding", "4 × 4", "6 × 6", "+2 × +2"],
        ["net-32x32", "level C3: anchors", "8 × 8", "8 × 8, 32 × 16", ""],
        ["net-32x32", "level C4", "present", "", "removed"],
        ["net-32x32", "level P6", "", "present", "added"]]


def pyramid_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Copy the golden run twice and give its first model the pyramid entries before and after."""
    before, after = pyramid_runs()
    folders = []
    for name, levels in (("a", before["levels"]), ("b", after["levels"])):
        root = shutil.copytree(GOLD_RUN, tmp_path / name)
        document = json.loads((root / "summary.json").read_text())
        document["models"][0] |= {"levels": levels, **aggregate(levels)}
        (root / "summary.json").write_text(json.dumps(document))
        folders.append(root)
    return folders[0], folders[1]


def test_cli_diff_shows_levels_in_text_json_markdown_and_html(tmp_path):
    a, b = pyramid_folders(tmp_path)
    slug = json.loads((a / "summary.json").read_text())["models"][0]["slug"]
    text = invoke("diff", a, b)
    assert text.exit_code == 0, text.output
    lines = [" ".join(line.split()) for line in text.stdout.splitlines()]
    assert f"{slug} level C3: padding 4 × 4 6 × 6 +2 × +2" in lines
    assert f"{slug} level C4 present removed" in lines and f"{slug} level P6 present added" in lines
    document = json.loads(invoke("diff", a, b, "--json", "-").stdout)
    levels = document["models"][0]["levels"]
    assert [(lv["level"], lv["change"]) for lv in levels] == [("C3", "changed"), ("C4", "removed"), ("P6", "added")]
    assert [c["field"] for c in levels[0]["changes"]] == ["arch_rf_size", "padding", "anchors"]
    assert levels[2]["b"]["global"]
    assert document["models"][0]["state"] == "changed"
    done = invoke("diff", a, b, "--markdown", tmp_path / "diff.md", "--html", tmp_path / "diff.html")
    assert done.exit_code == 0, done.output
    markdown = (tmp_path / "diff.md").read_text()
    assert "- level C3 architecture RF: 11 × 11 → 15 × 15 (+4 × +4)" in markdown
    assert "- level C4 removed (stride 8 × 8, architecture RF 27 × 27)" in markdown
    assert "- level P6 added (stride 16 × 16, architecture RF 43 × 43)" in markdown
    page = structure((tmp_path / "diff.html").read_text(encoding="utf-8"))
    assert "caption: Feature-pyramid levels" in page
    assert "tr: | C3: padding | 4 × 4 | 6 × 6 | +2 × +2" in page
    assert "tr: | C4 | stride 8 × 8, architecture RF 27 × 27 | — | removed" in page


# --- the headline: architecture RF, stride, padding, global context -----------------------------------------------

def test_the_headline_is_compared_first_and_global_context_shows_an_unbounded_rf():
    after = {**BASE, "global": True, "arch_rf_size": None, "edge_fraction": 0.75}
    (model,) = diff.compare(make_run(BASE), make_run(after)).models
    assert [c.field for c in model.changes] == ["arch_rf_size", "global", "edge_fraction"]
    assert [c.field for c in model.headline] == ["arch_rf_size", "global"]
    assert diff.text_rows(diff.compare(make_run(BASE), make_run(after)))[0] == [
        "net-32x32", "architecture RF", "11 × 11", "unbounded", ""]


def test_a_finding_code_is_listed_once_with_its_messages_joined():
    """Two `estimated` findings (one per axis) are one change; the code and its messages go together."""
    after = {**BASE, "findings": [*BASE["findings"], {"code": "estimated", "severity": "info", "message": "h: a."},
                                  {"code": "estimated", "severity": "warning", "message": "w: b."}]}
    found = diff.compare(make_run(BASE), make_run(after))
    assert found.models[0].findings_added == (diff.FindingChange("estimated", "warning", "h: a. w: b."),)
    assert [row[1] for row in diff.text_rows(found)] == ["finding: estimated"]


@pytest.fixture(scope="module")
def resnet_small_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Run rfreport.examples:resnet_small (layer `stages`, 32 x 32) with 2 and with 3 blocks per stage."""
    tmp = tmp_path_factory.mktemp("resnet_small")
    found = []
    for blocks in (2, 3):
        spec = ModelSpec(name="resnet_small", factory="rfreport.examples:resnet_small", input_shapes=((1, 3, 32, 32),),
                         kwargs={"blocks": blocks, "width": 4}, layer="stages", positions="center",
                         layers=("stages",), verify=False)
        found.append(runfolder.write(tmp / f"blocks{blocks}", META, outputs([spec])).path)
    return found[0], found[1]


def test_a_deeper_resnet_is_changed_in_every_format_though_its_in_input_rf_is_not(resnet_small_runs, tmp_path):
    """Blocks 2 -> 3 at 32 x 32: the in-input RF stays the whole 32 x 32 input, the architecture RF grows 53 -> 81.

    The config is made the same in both runs (as after an edit of the factory's code), so only the headline
    says that the model changed."""
    a, b = resnet_small_runs
    document = json.loads((b / "summary.json").read_text())
    document["models"][0]["spec"] = json.loads((a / "summary.json").read_text())["models"][0]["spec"]
    (b / "summary.json").write_text(json.dumps(document))
    text = invoke("diff", a, b)
    assert text.exit_code == 0, text.output
    lines = [" ".join(line.split()) for line in text.stdout.splitlines()]
    assert "resnet_small-32x32 architecture RF 53 × 53 81 × 81 +28 × +28" in lines
    assert not any("in-input" in line for line in lines)
    (model,) = json.loads(invoke("diff", a, b, "--json", "-").stdout)["models"]
    assert model["state"] == "changed" and model["spec"]["changed"] == []
    assert model["headline"] == ["arch_rf_size", "padding"] and model["changes"][0]["b"] == [81, 81]
    done = invoke("diff", a, b, "--markdown", tmp_path / "diff.md", "--html", tmp_path / "diff.html")
    assert done.exit_code == 0, done.output
    assert ("| resnet\\_small-32x32 | changed | 53 × 53 → **81 × 81** | 4 × 4 | 26 × 26 → **40 × 40** | no | 32 × 32 |"
            in (tmp_path / "diff.md").read_text())
    page = structure((tmp_path / "diff.html").read_text(encoding="utf-8"))
    assert ("tr: | resnet_small-32x32 | changed | ok | 53 × 53 → 81 × 81 (+28 × +28) | 4 × 4 | 26 × 26 → 40 × 40 "
            "(+14 × +14) | no | 32 × 32 |") in page
    failing = invoke("diff", a, b, "--fail-on-change")
    assert failing.exit_code == 1 and "1 model(s) changed" in failing.stderr


def test_a_global_context_not_ruled_out_reads_unknown_and_a_failed_job_reads_nothing():
    assert diff.view({"status": "ok", "global": None}, "global") == "unknown"
    assert diff.view({"status": "ok", "global": False}, "global") is False
    assert diff.view({"status": "failed"}, "global") is None
    assert diff.value_text("global", diff.view({"global": None}, "global")) == "unknown"
