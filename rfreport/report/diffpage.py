"""The diff page: one self-contained HTML file comparing two runs, for a design review.

Built from a :class:`rfreport.diff.RunDiff` and the two saved runs (for the RF-size and edge
maps, drawn side by side on a shared colour scale). Rendered through the report's Jinja2
environment (diff.html extends base.html), autoescape on, StrictUndefined, never torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rfreport import diff
from rfreport.atomic import write_file
from rfreport.positions import axis_names
from rfreport.report import plots
from rfreport.report import render as report
from rfreport.runfolder import ModelRun, Run

OVERVIEW = ("status", "arch_rf_size", "stride", "padding", "global", "in_input_rf_size", "edge_fraction",
            "unseen_pixels", "audit")


@dataclass(frozen=True)
class Cell:
    """One value of the overview before and after."""

    before: str = field(metadata={"doc": "run A's value, formatted"})
    after: str = field(metadata={"doc": "run B's value, formatted"})
    delta: str = field(metadata={"doc": "after minus before, formatted; empty when not numeric or unchanged"})
    changed: bool = field(metadata={"doc": "whether the value differs (highlighted)"})


@dataclass(frozen=True)
class Row:
    """One model in the overview table."""

    anchor: str = field(metadata={"doc": "id of the model's section"})
    slug: str = field(metadata={"doc": "model name and input size"})
    state: str = field(metadata={"doc": "failed, fixed, added, removed, changed or unchanged"})
    cells: tuple[Cell, ...] = field(metadata={"doc": "one cell per overview column"})


@dataclass(frozen=True)
class Pair:
    """A labelled value before and after, e.g. a config key or a summary field."""

    label: str = field(metadata={"doc": "human name of the key or field"})
    before: str = field(metadata={"doc": "run A's value, formatted"})
    after: str = field(metadata={"doc": "run B's value, formatted"})
    note: str = field(metadata={"doc": "the delta of a field, or the change of an audit verdict"})
    changed: bool = field(metadata={"doc": "whether it differs"})


@dataclass(frozen=True)
class MapPair:
    """The same map of a model in both runs, on one colour scale."""

    title: str = field(metadata={"doc": "what the maps show"})
    before: report.Heatmap = field(metadata={"doc": "run A's map"})
    after: report.Heatmap = field(metadata={"doc": "run B's map"})


@dataclass(frozen=True)
class Section:
    """Everything shown for one model that changed."""

    anchor: str = field(metadata={"doc": "id of the section"})
    slug: str = field(metadata={"doc": "model name and input size"})
    state: str = field(metadata={"doc": "failed, fixed, added, removed, changed or unchanged"})
    errors: tuple[tuple[str, str], ...] = field(metadata={"doc": "(run, error) of a run in which the model failed"})
    spec: tuple[Pair, ...] = field(metadata={"doc": "the config before and after (factory, kwargs, shape, layer, ...)"})
    changes: tuple[Pair, ...] = field(metadata={"doc": "summary fields that differ, with their deltas"})
    findings_added: tuple[diff.FindingChange, ...] = field(metadata={"doc": "findings only in run B"})
    findings_removed: tuple[diff.FindingChange, ...] = field(metadata={"doc": "findings only in run A"})
    audit: tuple[Pair, ...] = field(metadata={"doc": "audit verdicts per rule before and after"})
    levels: tuple[Pair, ...] = field(metadata={"doc": "feature-pyramid levels added or removed (one row each) and "
                                               "changed (one row per changed field), labelled `level: field`"})
    maps: tuple[MapPair, ...] = field(metadata={"doc": "RF-size and edge maps side by side (2-D and 3-D models)"})


@dataclass(frozen=True)
class DiffContext:
    """The context of diff.html."""

    title: str = field(metadata={"doc": "page title"})
    run_a: str = field(metadata={"doc": "path of run A (before)"})
    run_b: str = field(metadata={"doc": "path of run B (after)"})
    summary: str = field(metadata={"doc": "one line counting the models per state"})
    columns: tuple[str, ...] = field(metadata={"doc": "overview column labels"})
    rows: tuple[Row, ...] = field(metadata={"doc": "one overview row per model, changed ones first"})
    sections: tuple[Section, ...] = field(metadata={"doc": "one section per model that is not unchanged"})
    css: str = field(metadata={"doc": "the inlined stylesheet"})
    css_href: str = field(metadata={"doc": "always empty: the diff page is self-contained"})


def anchor(slug: str) -> str:
    """Return the HTML id of a model's diff section."""
    return f"diff-{slug}"


def overview_cell(model: diff.ModelDiff, key: str) -> Cell:
    """Return one overview cell: before, after, delta, and whether it changed."""
    old, new = (model.before or {}), (model.after or {})
    if key == "audit":
        before = diff.audit_status(old) if model.before is not None else "—"
        after = diff.audit_status(new) if model.after is not None else "—"
        return Cell(before, after, "", before != after)
    if key == "status":
        return Cell(model.status("a"), model.status("b"), "", model.status("a") != model.status("b"))
    b, a = diff.view(old, key), diff.view(new, key)
    return Cell(diff.value_text(key, b), diff.value_text(key, a), diff.delta_text(key, b, a) if not diff.same(b, a)
                else "", not diff.same(b, a))


def overview_row(model: diff.ModelDiff) -> Row:
    """Return one model's overview row."""
    return Row(anchor=anchor(model.slug), slug=model.slug, state=model.state,
               cells=tuple(overview_cell(model, key) for key in OVERVIEW))


def section(model: diff.ModelDiff, before: Run, after: Run) -> Section:
    """Return the section of one model that changed."""
    sides = (("before", model.before), ("after", model.after))
    errors = tuple((run, str(entry.get("error") or "no error recorded")) for run, entry in sides
                   if entry is not None and entry.get("status") != "ok")
    spec = tuple(Pair(r.label, diff.spec_text(r.before), diff.spec_text(r.after), "", r.changed) for r in model.spec)
    changes = tuple(Pair(c.label, diff.value_text(c.field, c.before), diff.value_text(c.field, c.after), c.delta, True)
                    for c in model.changes if c.field not in ("status", "audit"))
    audit = tuple(Pair(v.rule, diff.verdict_text(v.before), diff.verdict_text(v.after), v.change,
                       v.change != "unchanged") for v in model.audit)
    return Section(anchor=anchor(model.slug), slug=model.slug, state=model.state, errors=errors, spec=spec,
                   changes=changes, findings_added=model.findings_added, findings_removed=model.findings_removed,
                   audit=audit, levels=level_pairs(model), maps=map_pairs(model, before, after))


def level_pairs(model: diff.ModelDiff) -> tuple[Pair, ...]:
    """Return the rows of a model's pyramid-level table: per changed field, or per added or removed level."""
    pairs = []
    for level in model.levels:
        if level.change == "changed":
            pairs += [Pair(f"{level.level}: {c.label}", diff.value_text(c.field, c.before),
                           diff.value_text(c.field, c.after), c.delta, True) for c in level.changes]
        else:
            pairs.append(Pair(level.level, diff.level_text(level, "a"), diff.level_text(level, "b"), level.change,
                              True))
    return tuple(pairs)


def _model(run: Run, slug: str) -> ModelRun | None:
    """Return a run's completed model with this slug, or None."""
    found = [m for m in run.models if m.slug == slug and m.ok]
    return found[0] if found else None


def map_pairs(model: diff.ModelDiff, before: Run, after: Run) -> tuple[MapPair, ...]:
    """Draw the in-input RF per axis and clipped sides of a model in both runs on shared scales (2-D and 3-D only)."""
    old, new = _model(before, model.slug), _model(after, model.slug)
    if old is None or new is None or "positions" not in old.frames or "positions" not in new.frames:
        return ()
    ndim = len(old.entry["input_shape"]) - 2
    if ndim < 2 or ndim != len(new.entry["input_shape"]) - 2:
        return ()
    columns = [("positions", f"{a}_size", f"in-input RF {a}", "input pixels") for a in axis_names(ndim)]
    if "edges" in old.frames and "edges" in new.frames:
        columns.append(("edges", "clipped", "clipped sides (edge effects)", "sides"))
    return tuple(pair for pair in (_pair(old, new, ndim, *c) for c in columns) if pair is not None)


def _values(model: ModelRun, frame_name: str, column: str, ndim: int) -> np.ndarray:
    """Lay one column (or the clipped-sides count) of a model's frame out on its swept output grid."""
    frame = model.frames[frame_name]
    if column == "clipped":
        letters = axis_names(ndim)
        frame = frame.assign(clipped=sum(frame[f"{a}_clip_{s}"].astype(int) for a in letters for s in ("lo", "hi")))
    return plots.grid_values(frame, column, ndim)[0]


def _pair(old: ModelRun, new: ModelRun, ndim: int, frame: str, column: str, title: str, unit: str) -> MapPair | None:
    """Draw one map in both runs on the scale spanning both."""
    a, b = _values(old, frame, column, ndim), _values(new, frame, column, ndim)
    both = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    if not both.size:
        return None
    span = (float(both.min()), float(both.max()))
    assets = report.Embedded()
    draw = [report.heatmap(m, assets, f"diff-{column}", f"{title}, {label}", values, unit, grid="static", span=span)
            for m, values, label in ((old, a, "before"), (new, b, "after"))]
    return MapPair(title=title, before=draw[0], after=draw[1])


def build_context(found: diff.RunDiff, before: Run, after: Run) -> DiffContext:
    """Build the diff page context; models that did not change get a row but no section."""
    models = diff.ordered(found.models)
    return DiffContext(
        title=f"Receptive-field diff: {Path(found.run_a).name} → {Path(found.run_b).name}",
        run_a=found.run_a, run_b=found.run_b, summary=diff.counts_line(found),
        columns=tuple(diff.label(key) for key in OVERVIEW), rows=tuple(overview_row(m) for m in models),
        sections=tuple(section(m, before, after) for m in models if m.state != "unchanged"),
        css=report.template_text("report.css"), css_href="")


def render(found: diff.RunDiff, before: Run, after: Run, out_path: str | os.PathLike) -> Path:
    """Render the diff page of two runs into one self-contained HTML file and return its path.

    Written beside the target and renamed over it: on failure the previous file stays (OutputError).
    """
    html = report.make_env().get_template("diff.html").render(ctx=build_context(found, before, after))
    return write_file(out_path, html)


def context_types() -> Mapping[str, Any]:
    """Return the page's context dataclasses by name (for the test that every field is documented and used)."""
    return {cls.__name__: cls for cls in (DiffContext, Row, Cell, Section, Pair, MapPair)}
