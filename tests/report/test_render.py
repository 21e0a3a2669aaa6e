"""The HTML report: context dataclasses, golden HTML, escaping, failed models, assets mode, no torch."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rfreport import runfolder
from rfreport.report import render as report
from tests.support import EVIL, GOLD_RUN, META, SPECS, assert_gold, example_run, outputs


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[runfolder.Run, str]:
    """Render the example run once for the module; return the run and the HTML."""
    run = example_run(tmp_path_factory.mktemp("report"))
    return run, report.render(run).read_text(encoding="utf-8")


def scrub(html: str) -> str:
    """Replace the volatile parts of a report (CSS, figure bytes, dates, versions, durations) by placeholders."""
    html = re.sub(r"<style>.*?</style>", "<style>CSS</style>", html, flags=re.S)
    html = re.sub(r"<script>.*?</script>", "<script>SCRIPT</script>", html, flags=re.S)
    html = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,SCRUBBED", html)
    html = re.sub(r"data:text/csv;base64,[A-Za-z0-9+/=]+", "data:text/csv;base64,SCRUBBED", html)
    html = re.sub(r'<time datetime="[^"]*">[^<]*</time>', '<time datetime="DATE">DATE</time>', html)
    html = re.sub(r'<span class="version">[^<]*</span>', '<span class="version">VERSION</span>', html)
    html = re.sub(r'<span class="duration">[^<]*</span>', '<span class="duration">SECONDS</span>', html)
    html = re.sub(r'(<img src="[^"]*" alt="[^"]*") width="\d+" height="\d+"', r'\1 width="W" height="H"', html)
    return html


def gold_run(rendered, tmp_path: Path) -> runfolder.Run:
    """Return a copy of the pinned run folder tests/gold/run (refreshed from the example run on update).

    The golden HTML is rendered from this saved run, not a fresh pipeline run, so it changes only
    when the report changes, not when an analysis message does.
    """
    if os.environ.get("RFREPORT_GOLD_UPDATE"):
        shutil.rmtree(GOLD_RUN, ignore_errors=True)
        shutil.copytree(rendered[0].path, GOLD_RUN, ignore=shutil.ignore_patterns("*.html"))
    return runfolder.load(shutil.copytree(GOLD_RUN, tmp_path / "run"))


def test_html_matches_gold(rendered, tmp_path):
    """The report of the pinned run, volatile parts scrubbed, is the golden file."""
    html = report.render(gold_run(rendered, tmp_path)).read_text(encoding="utf-8")
    assert_gold("index.html", scrub(html))


def _context_types(cls: type, seen: set) -> None:
    """Collect the context dataclasses reachable from a dataclass's field annotations."""
    seen.add(cls)
    for hint in typing.get_type_hints(cls).values():
        for arg in [hint, *typing.get_args(hint), *[a for t in typing.get_args(hint) for a in typing.get_args(t)]]:
            if dataclasses.is_dataclass(arg) and arg not in seen:
                _context_types(arg, seen)


def test_every_context_field_documented_and_used():
    """Each field of each page-context dataclass has documentation and appears in a template."""
    classes: set = set()
    _context_types(report.ReportContext, classes)
    assert {report.ModelSection, report.OverviewRow, report.Image, report.Table, report.Link} <= classes
    source = "".join(report.template_text(p.name) for p in resources.files("rfreport.templates").iterdir()
                     if p.name.endswith(".html"))
    for cls in classes:
        assert cls.__doc__ and dataclasses.is_dataclass(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} is undocumented"
            assert re.search(rf"\.{f.name}\b", source), f"{cls.__name__}.{f.name} is not used by any template"


def test_templates_load_from_the_package():
    """The templates resolve through importlib.resources (as in a wheel), not a source path."""
    names = {p.name for p in resources.files("rfreport.templates").iterdir()}
    assert {"base.html", "index.html", "macros.html", "report.css"} <= names


def test_names_and_errors_are_escaped(rendered):
    """A script-tag model name and HTML in an error message render as text."""
    html = rendered[1]
    assert EVIL not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;ValueError&gt; &amp; stopped" in html and "broken &lt;b&gt;&amp;&lt;/b&gt;" in html


def test_failed_model_is_listed_with_its_error(rendered):
    """The failed model has an overview row, an entry in the failed list and a section with its error."""
    run, html = rendered
    failed = next(m for m in run.models if not m.ok)
    section = html[html.index(f'id="{report.anchor(failed)}"'):]
    assert 'id="failed"' in html and "Failed:" in section[:2000]
    assert html.count(f'href="#{report.anchor(failed)}"') == 3   # overview, failed list, table of contents


def test_self_contained(rendered):
    """No external URL: every src/href is a data URI, an in-page anchor or a relative run-folder file."""
    html = scrub(rendered[1])
    assert "<style>" in html and "<link" not in html
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and not [r for r in refs if re.match(r"[a-z]+:", r) and not r.startswith(("data:image/png",
                                                                                          "data:text/csv"))]
    assert not re.search(r"https?://|//[a-z]", html.replace("http://www.w3.org", ""))


def test_overview_values_and_sections(rendered):
    """Each model has a section; overview cells show the summary values formatted per axis."""
    run, html = rendered
    for model in run.models:
        assert html.count(f'id="{report.anchor(model)}"') == 1
    dilated = run.models[0].entry
    assert f"{dilated['arch_rf_size'][0]} × {dilated['arch_rf_size'][1]}" in html
    assert report.percent_text(dilated["edge_fraction"]) in html


def test_an_estimated_architecture_rf_reads_as_a_lower_bound(rendered):
    """Where the fit is estimated on some axis, the overview says the RF is a lower bound, not a plain number."""
    run, html = rendered
    exact = run.models[0].summary
    assert report.arch_rf_note(exact) == "" and "(estimated: a lower bound)" not in html
    estimated = dataclasses.replace(exact, arch_rf_fit=("estimated", "affine"))
    assert report.arch_rf_note(estimated) == "estimated: a lower bound"


def test_frames_are_embedded_or_say_they_need_the_run_folder(rendered):
    """CSV files are embedded as data URIs with a download name; Parquet links say they need the run folder."""
    run, html = rendered
    embedded = re.findall(r'href="data:text/csv;base64,([^"]+)" download="([^"]+)"', html)
    model = run.models[0]
    csvs = {f"{model.slug}-{name}.csv": (run.path / "models" / model.slug / f"{name}.csv").read_bytes()
            for name in ("geometry", "edges", "erf")}
    decoded = {name: base64.b64decode(data) for data, name in embedded}
    assert {name: decoded[name] for name in csvs} == csvs
    links = re.findall(r'<a href="(models/[^"]+)" title="needs the run folder beside this page: [^"]+">([^<]+)</a>',
                       html)
    assert links and {label for _href, label in links} == {"PARQUET (run folder)"}
    assert all((run.path / href).is_file() for href, _label in links)


def test_header_counts_models_jobs_and_failures(tmp_path):
    """Two input shapes of one model are one model and two jobs; failed jobs and failed audits are counted."""
    spec = dataclasses.replace(SPECS[1], input_shapes=((1, 1, 24),), audit={"min_rf": 100})
    twice = dataclasses.replace(spec, input_shapes=((1, 1, 24), (1, 1, 32)))
    run = runfolder.write(tmp_path / "run", META, outputs([twice, SPECS[3]]))
    html = report.render(run).read_text(encoding="utf-8")
    counts = {name: int(value) for name, value in re.findall(r'class="count-([a-z-]+)">(\d+)<', html)}
    assert counts == {"models": 2, "jobs": 3, "failed-jobs": 1, "failed-audits": 3}


def test_toc_and_collapsible_sections(rendered):
    """A table of contents links every section; each model section is a <details>, open in a small run."""
    run, html = rendered
    toc = html[html.index('<nav class="toc"'):html.index("</nav>")]
    assert [f"#{report.anchor(m)}" for m in report.by_verdict(run.models)] == re.findall(r'href="(#model-[^"]+)"', toc)
    assert html.count("<details open>") == len(run.models)


def test_growth_plot_is_labelled_with_layer_names():
    """Tick labels name each layer and its type, not its index."""
    frame = pd.DataFrame({"layer": ["0", "1", "body.conv"], "type": ["Conv2d", "ReLU", "Conv2d"]})
    assert report.layer_labels(frame) == ["0 (Conv2d)", "1 (ReLU)", "body.conv (Conv2d)"]


def test_explorer_data_matches_the_frames(rendered):
    """The inline JSON of a 2-D model holds every swept position's bounds, in the frame's order."""
    run, html = rendered
    model = run.models[0]
    section = html[html.index(f'id="{report.anchor(model)}"'):]
    data = json.loads(re.search(r'<script type="application/json" class="rf-data">(.*?)</script>', section,
                                flags=re.S).group(1))
    frame = model.frames["edges"]
    for column in ("pos_h", "pos_w", "h_lo", "h_hi", "w_lo", "w_hi", "support"):
        assert data[column] == frame[column].tolist()
    assert data["grid"] == model.entry["output_shape"][2:] and data["input"] == model.entry["input_shape"][2:]
    flags = sum(frame[name].to_numpy(dtype=int) << bit for bit, name in enumerate(report.FLAGS))
    assert data["flags"] == flags.tolist()
    assert set(data["masks"]) == {",".join(map(str, pos)) for pos in model.arrays["masks"]}
    assert set(data["erf"]) == {",".join(map(str, pos)) for pos in model.arrays["erf_maps"]}


def test_assets_mode_writes_files(rendered, tmp_path):
    """With assets_dir the page links report.css and PNG files that exist beside it."""
    run = rendered[0]
    out = report.render(run, tmp_path / "page" / "index.html", assets_dir=tmp_path / "page" / "assets")
    html = out.read_text(encoding="utf-8")
    assert "data:image" not in html and '<link rel="stylesheet" href="assets/report.css">' in html
    images = re.findall(r'<img src="([^"]+)"', html)
    assert images and all((out.parent / src).is_file() for src in images)


def test_rendering_is_torch_free_and_deterministic(rendered):
    """A fresh interpreter loads the run and renders it without importing torch, to the very same bytes."""
    run, html = rendered
    again = run.path / "again.html"
    code = ("import sys\nfrom rfreport import runfolder\nfrom rfreport.report import render as report\n"
            f"report.render(runfolder.load({str(run.path)!r}), {str(again)!r})\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert again.read_text(encoding="utf-8") == html


def test_ten_models_stay_under_three_megabytes(tmp_path):
    """Ten 48x48 models with every figure stay under 3 MB: figures have a fixed pixel size, so a report
    grows linearly with its models, and ten times a one-model report bounds it."""
    spec = dataclasses.replace(SPECS[0], input_shapes=((1, 3, 48, 48),), erf={"samples": 2, "positions": "corners"})
    out = report.render(runfolder.write(tmp_path / "run", META, outputs([spec])))
    assert 10 * out.stat().st_size < 3_000_000


@pytest.mark.parametrize(("value", "text"), [
    (None, "—"), (float("nan"), "—"), (pd.NA, "—"), (3, "3"), (np.int64(4), "4"), (2.5, "2.5"),
    (np.float64(2.0), "2"), (1 / 3, "0.33"), ([13, 13], "13 × 13"), ([None, 1.0], "— × 1"), (np.bool_(True), "yes")])
def test_number_filter(value, text):
    """Cells and summary values are formatted compactly, with a dash for anything absent."""
    assert report.number_text(value) == text


def test_percent_filter():
    """Fractions become percentages without a needless decimal."""
    assert [report.percent_text(v) for v in (0.375, 0.9, None, float("nan"))] == ["37.5%", "90%", "—", "—"]


def test_the_per_layer_table_highlights_the_analysed_layer_and_marks_border_layers(rendered, tmp_path):
    """Each model with a layer growth has a collapsed per-layer table: the analysed row highlighted and badged,
    border layers marked, estimated rows with their reason."""
    run = gold_run(rendered, tmp_path)
    path = run.path / "models" / "dilated-16x20" / "layers.parquet"
    frame = pd.read_parquet(path)
    frame.loc[5:, "border"] = True   # as if the input were smaller: the last two layers already cover it
    frame.to_parquet(path)
    volume_path = run.path / "models" / "volume-6x8x8" / "layers.parquet"
    volume = pd.read_parquet(volume_path)
    volume.loc[2, ["rf_exact", "estimated"]] = [False, "a grid border cuts a local window on axis d"]
    volume.to_parquet(volume_path)
    html = report.render(runfolder.load(run.path)).read_text(encoding="utf-8")
    table = html[html.index('<details class="layers">'):]
    table = table[:table.index("</details>")]
    assert "7 layers · analysed: <code>3</code> · 2 border layers" in table
    rows = re.findall(r'<tr class="([^"]*)">\s*<th scope="row"><code>([^<]*)</code>(.*?)</tr>', table, flags=re.S)
    assert [(cls, name) for cls, name, _ in rows] == [("", n) for n in ("0.0", "0.1", "1.0", "1.1", "2.0")] + [
        (" border", "2.1"), ("target border", "3")]
    last = rows[-1][2]
    assert "analysed</span>" in last and "<td>13 × 13</td>" in last and "<td>border layer</td>" in last
    section = html[html.index('id="model-volume-6x8x8"'):]
    table = section[section.index('<details class="layers">'):]
    assert "estimated: a grid border cuts a local window on axis d" in table
    assert html.count('<details class="layers">') == 3   # one per completed model; none for the failed one


def test_colour_scale_ends_tell_different_values_apart():
    """A narrow range keeps the digits that separate its ends; equal ends and log scales stay compact."""
    assert report.scale_ends(0.3481, 0.3524, log=False) == ("0.348", "0.352")
    assert report.scale_ends(0.35, 0.35, log=False) == ("0.35", "0.35")
    assert report.scale_ends(218, 224, log=False) == ("218", "224")
    assert report.scale_ends(1e-4, 1.0, log=True) == ("0.0001", "1")


def edited_gold(tmp_path: Path, edit) -> runfolder.Run:
    """Copy the golden run folder, apply `edit(entry)` to its first model's summary entry, and load it."""
    run = shutil.copytree(GOLD_RUN, tmp_path / "run")
    document = json.loads((run / "summary.json").read_text())
    edit(document["models"][0])
    (run / "summary.json").write_text(json.dumps(document))
    return runfolder.load(run)


def global_without_fit(entry: dict) -> None:
    """Make an entry global context with no fitted stride, padding or offset (efficientnet_b0's case)."""
    entry.update(affine=False, nonaffine=None, stride=[None, None], padding=[None, None],
                 center_offset=[None, None], **{"global": True, "global_from": "features.1.avgpool",
                                                "global_op": "adaptive_avg_pool2d"})


def test_global_context_is_not_called_non_affine(tmp_path):
    """affine false with `nonaffine` null (global context, no fit): no banner, no "fit does not hold"."""
    html = report.render(edited_gold(tmp_path, global_without_fit)).read_text(encoding="utf-8")
    assert "Non-affine geometry" not in html and "fit does not hold" not in html
    assert "(global context: no fit)" in html and 'title="adaptive_avg_pool2d at features.1.avgpool"' in html


def test_a_non_affine_model_gets_the_banner_with_its_reason(tmp_path):
    """A geometry that is not affine says so in its section, with the summary's reason, and in the overview."""
    reason = "the RF box moves in steps of 4 every 4 positions"
    html = report.render(edited_gold(tmp_path, lambda e: e.update(affine=False, nonaffine=reason))).read_text(
        encoding="utf-8")
    assert f"<strong>Non-affine geometry:</strong> {reason}." in html
    assert "(position-dependent: resolution stride " in html and "(fit does not hold)" not in html


def test_the_rf_share_inside_the_input_is_drawn(rendered):
    """The edges frame's share of each RF inside the input gets its own map, with a scale from the frame."""
    run, html = rendered
    model = run.models[0]
    share = model.frames["edges"]["in_input_share"]
    section = html[html.index(f'id="{report.anchor(model)}"'):]
    found = re.search(r'<figcaption>share of the RF inside the input</figcaption>.*?<span class="lo">([^<]*)</span>'
                      r'.*?<span class="hi">([^<]*)</span>', section, flags=re.S)
    assert found and found.groups() == report.scale_ends(share.min(), share.max(), log=False)


def test_a_constant_map_says_so_instead_of_a_range(rendered):
    """A map of one value has no colour bar from 1 to 1: it says the value is the same at every cell."""
    html = rendered[1]
    assert not re.search(r'<span class="lo">([^<]*)</span><span class="bar[^"]*"></span><span class="hi">\1</span>',
                         html)
    assert 'the same at every cell: <span class="lo hi">' in html


def test_padding_reach_and_share_are_drawn_only_from_an_exact_geometry(tmp_path):
    """With an estimated fit (a lower bound on the RF size) the share and the padding reached are not drawn."""
    run = shutil.copytree(GOLD_RUN, tmp_path / "run")
    slug = json.loads((run / "summary.json").read_text())["models"][0]["slug"]
    path = run / "models" / slug / "geometry.parquet"
    pd.read_parquet(path).assign(fit="estimated").to_parquet(path, index=False)
    html = report.render(runfolder.load(run)).read_text(encoding="utf-8")
    section = html[html.index(f'id="model-{slug}"'):]
    section = section[:section.index("</section>")]
    assert "share of the RF inside the input" not in section and "padding reached on" not in section
    assert "Without an exact geometry the share and the padding reached are unknown" in section
    assert "clipped sides" in section
