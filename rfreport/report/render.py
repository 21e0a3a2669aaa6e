"""The HTML report: a saved run folder rendered through Jinja2 templates into one index.html.

Rendering reads only the run folder (summary entries, frames, arrays) and never imports
torch. Each page is rendered in one call from a documented frozen dataclass
(:class:`ReportContext`), with autoescape on and StrictUndefined. By default the file is
self-contained (CSS inline, figures as PNG data URIs); with `assets_dir` the stylesheet and
figures are written as files beside it instead (see :class:`AssetsFolder`).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import jinja2
import markupsafe
import matplotlib.colors
import matplotlib.image
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rfreport import audit
from rfreport.analysis.layertable import LayerRow, layer_rows
from rfreport.atomic import write_file
from rfreport.diff import SPEC_LABELS, spec_text
from rfreport.options import EXACT_FITS, AuditVerdict
from rfreport.positions import axis_names, resolve
from rfreport.report import plots
from rfreport.runfolder import ModelRun, Run
from rfreport.summary import Summary
from rfreport.visible import visible

PREVIEW_ROWS = 12
CHOSEN = ("center", "corners", "edges")
EMBED_CSV = 96 * 1024      # CSV files up to this size are embedded in a self-contained page
HEATMAP_PX = 180           # longest side of a heatmap on the page, in CSS pixels
EXPLORER_ROWS = 20_000     # positions beyond this are left out of the explorer's data
MASK_TINT = (255, 127, 14, 150)
INPUT_PX = 280             # longest side of an input panel
EXPANDED_SECTIONS = 6      # runs with more jobs start with their model sections collapsed


@dataclass(frozen=True)
class Image:
    """An embedded or linked figure."""

    src: str = field(metadata={"doc": "data URI or relative URL of the PNG"})
    alt: str = field(metadata={"doc": "text alternative describing the figure"})
    width: int = field(metadata={"doc": "width in CSS pixels (the PNG's natural width, or a heatmap's display width)"})
    height: int = field(metadata={"doc": "height in CSS pixels (the PNG's natural height, or its display height)"})


@dataclass(frozen=True)
class Box:
    """A rectangle drawn over a heatmap, in its cell coordinates (columns x, rows y)."""

    label: str = field(metadata={"doc": "what the box is, e.g. the position it belongs to"})
    x: float = field(metadata={"doc": "left edge (cell units: input pixels on an input panel)"})
    y: float = field(metadata={"doc": "top edge"})
    width: float = field(metadata={"doc": "width in cells"})
    height: float = field(metadata={"doc": "height in cells"})
    colour: str = field(metadata={"doc": "CSS colour of the outline"})


@dataclass(frozen=True)
class Heatmap:
    """An array drawn straight through the colour map: one PNG pixel per cell, scaled up by the page."""

    title: str = field(metadata={"doc": "panel title, e.g. in-input RF h"})
    image: Image = field(metadata={"doc": "the PNG (natural size: one pixel per cell) and its display size"})
    unit: str = field(metadata={"doc": "unit of the colour scale"})
    lo: str = field(metadata={"doc": "value at the scale's first colour, formatted"})
    hi: str = field(metadata={"doc": "value at the scale's last colour, formatted"})
    log: bool = field(metadata={"doc": "whether the colour scale is logarithmic"})
    rows: int = field(metadata={"doc": "cells per column (the SVG overlay's height in cells)"})
    cols: int = field(metadata={"doc": "cells per row"})
    grid: str = field(metadata={"doc": "output (pointable: each cell is an output position) or input"})
    boxes: tuple[Box, ...] = field(metadata={"doc": "static boxes drawn over the heatmap (kept for print)"})
    position: str = field(metadata={"doc": "the output position an ERF heatmap belongs to, `h,w`; empty otherwise"})
    cmap: str = field(default="viridis", metadata={"doc": "colour map name (the legend's CSS class)"})


@dataclass(frozen=True)
class FigureBlock:
    """One titled figure of a model section: a matplotlib figure, or a row of heatmaps."""

    title: str = field(metadata={"doc": "heading above the figure"})
    caption: str = field(metadata={"doc": "one or two sentences saying how to read the figure"})
    image: Image | None = field(metadata={"doc": "the figure itself (None for a row of heatmaps)"})
    heatmaps: tuple[Heatmap, ...] = field(default=(), metadata={"doc": "heatmaps drawn from arrays, in a row"})
    explorer: bool = field(default=False, metadata={
        "doc": "the block holds the model's input panel: pointing at an output cell draws its RF box there"})


@dataclass(frozen=True)
class Link:
    """A link to a frame file: embedded as a data URI, or relative into the run folder."""

    label: str = field(metadata={"doc": "link text, e.g. CSV"})
    href: str = field(metadata={"doc": "data URI of the file, or its path relative to the report"})
    download: str = field(default="", metadata={"doc": "file name to save an embedded file as; empty for links"})
    note: str = field(default="", metadata={"doc": "tooltip, e.g. that the link needs the run folder beside the page"})


@dataclass(frozen=True)
class Table:
    """The first rows of a frame, with links to the full files."""

    title: str = field(metadata={"doc": "what the frame holds, e.g. Positions"})
    columns: tuple[str, ...] = field(metadata={"doc": "column names"})
    rows: tuple[tuple[str, ...], ...] = field(metadata={"doc": "formatted cell values, one tuple per row"})
    total: int = field(metadata={"doc": "number of rows of the full frame"})
    links: tuple[Link, ...] = field(metadata={"doc": "the full frame as CSV and Parquet"})


@dataclass(frozen=True)
class Finding:
    """One plain-sentence finding of the analysis."""

    code: str = field(metadata={"doc": "stable id of the finding, e.g. edge or unseen"})
    severity: str = field(metadata={"doc": "info or warning"})
    message: str = field(metadata={"doc": "the finding as a sentence"})


@dataclass(frozen=True)
class AuditResult:
    """One audit rule evaluated on a model."""

    rule: str = field(metadata={"doc": "rule name, e.g. max_edge_fraction"})
    limit: Any = field(metadata={"doc": "the configured limit"})
    value: Any = field(metadata={"doc": "the measured value"})
    passed: bool = field(metadata={"doc": "whether the rule holds"})
    note: str = field(metadata={"doc": "why the value was not judged as is (estimated geometry, global context); "
                                       "empty when nothing to say"})


@dataclass(frozen=True)
class Verdict:
    """A model's verdict at a glance: the job's error, the audit rules it fails, or a pass."""

    kind: str = field(metadata={"doc": "error (the job failed), fail (an audit rule fails), pass or none (no "
                                       "audit rules); the badge's CSS class and the ordering key, failures first"})
    text: str = field(metadata={"doc": "what the badge says: job error, fail: the failing rule names, pass, "
                                       "or no audit rules"})


@dataclass(frozen=True)
class OverviewRow:
    """One model and resolution in the overview table (None where the model failed)."""

    anchor: str = field(metadata={"doc": "id of the model's section"})
    name: str = field(metadata={"doc": "model name"})
    resolution: str = field(metadata={"doc": "input spatial size, e.g. 224 × 224"})
    status: str = field(metadata={"doc": "ok or failed"})
    verdict: Verdict = field(metadata={"doc": "the model's verdict: job error, failing audit rules, or pass"})
    arch_rf: tuple | None = field(metadata={"doc": "architecture RF per axis (input pixels): what an output "
                                                   "position sees with no border in the way"})
    arch_rf_note: str = field(metadata={"doc": "why the architecture RF is not exact: a lower bound where its fit "
                                               "is estimated on some axis; empty otherwise"})
    stride: tuple | None = field(metadata={"doc": "effective stride per axis (input pixels per output step)"})
    stride_note: str = field(metadata={"doc": "why the stride reads as it does: the fit does not hold (non-affine), "
                                              "or no fit under global context; empty otherwise"})
    global_context: bool | None = field(metadata={"doc": "a global operation (global pooling, squeeze-and-excitation, "
                                                          "spatial norm) reaches the output; None where not ruled out"})
    global_source: str = field(metadata={"doc": "the global operation and the layer it starts at, or why global "
                                                "context is not ruled out; empty when none"})
    padding: tuple | None = field(metadata={"doc": "effective padding per axis (input pixels)"})
    center_offset: tuple | None = field(metadata={"doc": "RF centre minus nominal pixel per axis (input pixels)"})
    edge_fraction: float | None = field(metadata={"doc": "share of output positions whose RF is clipped"})
    unseen_pixels: int | None = field(metadata={"doc": "input pixels no output position sees"})
    holes: bool | None = field(metadata={"doc": "some RF has holes (fill below 1)"})
    erf_ratio: float | None = field(metadata={"doc": "ERF area (95% of the mass) / theoretical RF area at the "
                                                      "summary's ERF position (the centre when measured there)"})


@dataclass(frozen=True)
class RunInfo:
    """The run's metadata from summary.json."""

    config_files: tuple[str, ...] = field(metadata={"doc": "config files the run read"})
    versions: tuple[tuple[str, str], ...] = field(metadata={"doc": "(package, version) of rfreport, torch and Python"})
    device: str = field(metadata={"doc": "device the sweeps ran on"})
    date: str = field(metadata={"doc": "when the run started (ISO 8601)"})
    seed: Any = field(metadata={"doc": "random seed"})
    duration_s: float | None = field(metadata={"doc": "wall-clock duration of the run in seconds"})
    argv: str = field(metadata={"doc": "the command line of the run"})
    cached: tuple[str, ...] = field(metadata={"doc": "models (slugs) taken from the incremental-audit cache"})


@dataclass(frozen=True)
class ModelSection:
    """Everything shown for one model and resolution."""

    anchor: str = field(metadata={"doc": "id of the section, linked from the overview"})
    name: str = field(metadata={"doc": "model name"})
    resolution: str = field(metadata={"doc": "input spatial size"})
    input_shape: list = field(metadata={"doc": "input shape (N, C, *spatial)"})
    output_shape: list | None = field(metadata={"doc": "analysed output shape (None when the model failed)"})
    mode: str = field(metadata={"doc": "structural or gradient"})
    target: str = field(metadata={"doc": "the analysed tensor, e.g. model output or layer4"})
    nonaffine: str = field(metadata={"doc": "why the fitted geometry does not hold for every position (the "
                                            "summary's `nonaffine`); empty when it holds or no fit was made"})
    status: str = field(metadata={"doc": "ok or failed"})
    verdict: Verdict = field(metadata={"doc": "the model's verdict, in its heading and its table-of-contents entry"})
    error: str = field(metadata={"doc": "the error of a failed model, empty otherwise"})
    findings: tuple[Finding, ...] = field(metadata={"doc": "plain-sentence findings, warnings first"})
    audit: tuple[AuditResult, ...] = field(metadata={"doc": "audit rules and their results"})
    figures: tuple[FigureBlock, ...] = field(metadata={"doc": "the model's figures in reading order"})
    tables: tuple[Table, ...] = field(metadata={"doc": "previews of the geometry, positions and ERF frames"})
    spec: tuple[tuple[str, str], ...] = field(default=(), metadata={
        "doc": "(label, value) of the config the model was run with: factory, kwargs, input shape, layer, ..."})
    data: Mapping | None = field(default=None, metadata={
        "doc": "the explorer's data (positions, bounds, masks) as JSON values; None when the model has no explorer"})
    open: bool = field(default=True, metadata={"doc": "whether the section starts expanded"})
    layers: tuple[LayerRow, ...] = field(default=(), metadata={
        "doc": "the per-layer table (architecture RF, stride, padding, centre offset per layer), empty without a "
               "layer growth"})


@dataclass(frozen=True)
class Counts:
    """What the header counts."""

    models: int = field(metadata={"doc": "distinct model names"})
    jobs: int = field(metadata={"doc": "model and input-shape pairs (one section each)"})
    failed_jobs: int = field(metadata={"doc": "jobs that did not complete"})
    failed_audits: int = field(metadata={"doc": "jobs with at least one failing audit rule (failed jobs included)"})


@dataclass(frozen=True)
class ReportContext:
    """The context of index.html."""

    title: str = field(metadata={"doc": "page title"})
    run: RunInfo = field(metadata={"doc": "run metadata"})
    overview: tuple[OverviewRow, ...] = field(metadata={"doc": "one row per model and resolution"})
    failed: tuple[ModelSection, ...] = field(metadata={"doc": "the sections of failed models, listed with their error"})
    sections: tuple[ModelSection, ...] = field(metadata={"doc": "one section per model and resolution"})
    css: str = field(metadata={"doc": "the stylesheet, inlined when the report is self-contained, else empty"})
    css_href: str = field(metadata={"doc": "relative URL of the stylesheet in assets mode, else empty"})
    counts: Counts = field(metadata={"doc": "models, jobs, failed jobs and failed audits, for the header"})
    script: str = field(metadata={"doc": "the page's inline script (explorer, collapsible sections); no CDN"})


class Assets(Protocol):
    """Where figures and the stylesheet go: embedded in the page or written beside it."""

    embeds: bool   # whether frame files are embedded as data URIs (self-contained) or linked

    def image(self, name: str, fig: Figure, alt: str) -> Image:
        """Store a figure under a file-safe name and return how the page refers to it."""

    def png(self, name: str, png: bytes, alt: str, size: tuple[int, int]) -> Image:
        """Store PNG bytes shown at `size` (CSS width, height) and return how the page refers to it."""

    def stylesheet(self, css: str) -> tuple[str, str]:
        """Return (inline css, href): exactly one of them is non-empty."""


class Embedded:
    """Self-contained mode: figures as PNG data URIs, CSS inline, frames as CSV data URIs."""

    embeds = True

    def image(self, name: str, fig: Figure, alt: str) -> Image:
        """Embed the figure's PNG as a data URI."""
        png = plots.to_png(fig)
        return self.png(name, png, alt, plots.png_size(png))

    def png(self, name: str, png: bytes, alt: str, size: tuple[int, int]) -> Image:
        """Embed PNG bytes as a data URI."""
        return Image(src=plots.data_uri(png), alt=alt, width=size[0], height=size[1])

    def stylesheet(self, css: str) -> tuple[str, str]:
        """Inline the stylesheet."""
        return css, ""


@dataclass(frozen=True)
class AssetsFolder:
    """Assets mode: figures and report.css written into `folder`, linked relative to the page's folder."""

    folder: Path
    page_dir: Path
    embeds = False

    def _href(self, filename: str) -> str:
        """Return the URL of a file in the assets folder, relative to the page."""
        return Path(os.path.relpath(self.folder / filename, self.page_dir)).as_posix()

    def image(self, name: str, fig: Figure, alt: str) -> Image:
        """Write the figure as `<name>.png` and link it."""
        png = plots.to_png(fig)
        return self.png(name, png, alt, plots.png_size(png))

    def png(self, name: str, png: bytes, alt: str, size: tuple[int, int]) -> Image:
        """Write PNG bytes as `<name>.png` and link it."""
        write_file(self.folder / f"{name}.png", png)
        return Image(src=self._href(f"{name}.png"), alt=alt, width=size[0], height=size[1])

    def stylesheet(self, css: str) -> tuple[str, str]:
        """Write report.css and link it."""
        write_file(self.folder / "report.css", css)
        return "", self._href("report.css")


def missing(value: Any) -> bool:
    """Return whether a scalar is absent: None, NaN or pandas' NA."""
    return value is None or (np.ndim(value) == 0 and not isinstance(value, str) and bool(pd.isna(value)))


def axes_text(values: Sequence | None) -> str:
    """Format a per-axis list as `11 × 11` (numbers rounded to 2 decimals), or a dash."""
    if values is None:
        return "—"
    return " × ".join(number_text(v) for v in values)


def number_text(value: Any) -> str:
    """Format a cell compactly: lists per axis, integers as such, floats to at most 2 decimals, a dash if absent."""
    if isinstance(value, (list, tuple)):
        return axes_text(value)
    if missing(value):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return yes_no(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    return str(value)


def percent_text(value: float | None) -> str:
    """Format a fraction as a percentage, or a dash."""
    return "—" if value is None or missing(value) else f"{100 * value:.1f}%".replace(".0%", "%")


def yes_no(value: bool | np.bool_ | None) -> str:
    """Format a flag as yes/no, or a dash."""
    return "—" if missing(value) else ("yes" if value else "no")


def make_env() -> jinja2.Environment:
    """Return the Jinja2 environment: package templates, autoescape, StrictUndefined and the filters."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_source),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=True),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        finalize=shown)
    env.filters.update(axes=axes_text, number=number_text, percent=percent_text, yesno=yes_no)
    return env


def shown(value: Any) -> Any:
    """Show bidi and control characters of a printed value as `\\u202e` escapes (markup left as it is)."""
    return visible(value) if isinstance(value, str) and not isinstance(value, markupsafe.Markup) else value


def _template_source(name: str) -> str:
    """Read a template file shipped in the rfreport.templates package (the top-level templates/ folder)."""
    try:
        return resources.files("rfreport.templates").joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise jinja2.TemplateNotFound(name) from exc


def template_text(name: str) -> str:
    """Return the text of a shipped template file, e.g. report.css."""
    return _template_source(name)


def resolution(shape: Sequence[int]) -> str:
    """Return the spatial size of an (N, C, *spatial) shape, e.g. `224 × 224`."""
    return " × ".join(str(int(n)) for n in shape[2:])


def arch_rf(summary: Summary) -> tuple | None:
    """Return the architecture RF per axis: the one place the report reads that summary key."""
    return summary.arch_rf_size


VERDICT_ORDER = ("error", "fail", "pass", "none")   # failures first
SUMMARY_FIGURES = ("arch_rf", "stride", "padding", "center_offset", "edge_fraction", "unseen_pixels", "holes",
                   "global_context", "erf_ratio")   # the OverviewRow fields read from the Summary


def verdict(model: ModelRun) -> Verdict:
    """Return a model's verdict: its job error, the audit rules it fails, pass, or none without rules."""
    if not model.ok:
        return Verdict(kind="error", text="job error")
    rows = model.entry.get("audit")
    result = audit.verdict(rows)
    if result is AuditVerdict.FAIL:
        return Verdict(kind="fail", text="fail: " + ", ".join(audit.failed_rules(rows)))
    return Verdict(kind=str(result), text="pass" if result is AuditVerdict.PASS else "no audit rules")


def by_verdict(models: Sequence[ModelRun]) -> list[ModelRun]:
    """Order models failures first (job errors, then failing audits), in run order within each verdict."""
    return sorted(models, key=lambda model: VERDICT_ORDER.index(verdict(model).kind))


def arch_rf_note(summary: Summary) -> str:
    """Say when the architecture RF is only a lower bound: its fit is estimated on some axis."""
    return "estimated: a lower bound" if "estimated" in (summary.arch_rf_fit or ()) else ""


def stride_note(summary: Summary) -> str:
    """Say why a stride reads as it does: position-dependent (with the stride the resolution implies and the
    range of RF sizes over positions), or no fit under global context."""
    if summary.nonaffine:
        sizes = " × ".join(f"{lo}–{hi}" for lo, hi in zip(summary.position_rf_min or (), summary.position_rf_max or ()))
        return (f"position-dependent: resolution stride {axes_text(summary.resolution_stride)}"
                + (f", RF sizes {sizes}" if sizes else ""))
    if summary.global_context and any(missing(value) for value in summary.stride):
        return "global context: no fit"
    return ""


NOT_RULED_OUT = ("not ruled out: every RF has the same box, no global operation was recognised and the "
                 "architecture RF is a lower bound")


def global_source(summary: Summary) -> str:
    """Name the global operation and the layer it starts at, e.g. `adaptive_avg_pool2d at layer4.avgpool`; say why
    global context is unknown where it is."""
    if summary.global_context is None:
        return NOT_RULED_OUT
    if not summary.global_context:
        return ""
    where = f" at {summary.global_from}" if summary.global_from else ""
    return f"{summary.global_op or 'global operation'}{where}"


def overview_row(model: ModelRun) -> OverviewRow:
    """Build the overview-table row of one model entry (its summary's figures are None where it failed)."""
    s = model.summary
    figures: dict[str, Any] = {**dict.fromkeys(SUMMARY_FIGURES), "arch_rf_note": "", "stride_note": "",
                               "global_source": ""}
    if s is not None:
        figures = {"arch_rf": arch_rf(s), "arch_rf_note": arch_rf_note(s), "stride": s.stride,
                   "stride_note": stride_note(s), "padding": s.padding,
                   "center_offset": s.center_offset, "edge_fraction": s.edge_fraction,
                   "unseen_pixels": s.unseen_pixels, "holes": s.holes, "global_context": s.global_context,
                   "global_source": global_source(s), "erf_ratio": s.erf.area95_ratio if s.erf else None}
    return OverviewRow(anchor=anchor(model), name=model.name, resolution=resolution(model.entry["input_shape"]),
                       status=model.status, verdict=verdict(model), **figures)


def anchor(model: ModelRun) -> str:
    """Return the HTML id of a model's section."""
    return f"model-{model.slug}"


def findings(entry: Mapping) -> tuple[Finding, ...]:
    """Return the entry's findings, warnings first, in their original order otherwise."""
    items = [Finding(code=f["code"], severity=f["severity"], message=f["message"]) for f in entry.get("findings", [])]
    return tuple(sorted(items, key=lambda f: f.severity != "warning"))


TABLES = (("levels", "Feature-pyramid levels"), ("geometry", "Geometry per axis"), ("edges", "Positions"),
          ("positions", "Positions"), ("erf", "Effective-RF metrics"))


def frame_table(run: Run, model: ModelRun, name: str, title: str, page_dir: Path, embeds: bool = False) -> Table:
    """Preview a frame's first rows with links to its CSV (embedded when self-contained and small) and Parquet files."""
    frame = model.frames[name]
    links = tuple(frame_link(model, rel, page_dir, embeds)
                  for rel in model.entry.get("files", []) if Path(rel).stem == name)
    rows = tuple(tuple(number_text(v) for v in row)
                 for row in frame.head(PREVIEW_ROWS).itertuples(index=False))
    return Table(title=title, columns=tuple(frame.columns), rows=rows, total=len(frame), links=links)


def frame_link(model: ModelRun, rel: str, page_dir: Path, embeds: bool) -> Link:
    """Link a frame file: a CSV data URI in a self-contained page (up to EMBED_CSV bytes), else into the run.

    Only files the entry lists, checked when the run folder was read (`models/<slug>/<name>`), inside it.
    """
    path, kind = model.file(rel), rel.rsplit(".", 1)[1]
    if embeds and kind == "csv" and path.stat().st_size <= EMBED_CSV:
        uri = "data:text/csv;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return Link(label="CSV", href=uri, download=f"{Path(rel).parent.name}-{path.name}",
                    note="embedded in this page")
    href = Path(os.path.relpath(path, page_dir)).as_posix()
    return Link(label=f"{kind.upper()} (run folder)" if embeds else kind.upper(), href=href,
                note=f"needs the run folder beside this page: {rel}" if embeds else rel)


def model_tables(run: Run, model: ModelRun, page_dir: Path, embeds: bool = False) -> tuple[Table, ...]:
    """Preview the geometry, positions (the edges frame when present) and ERF frames of a model."""
    names = [name for name, _ in TABLES if name in model.frames]
    if "edges" in names:
        names.remove("positions")
    return tuple(frame_table(run, model, name, dict(TABLES)[name], page_dir, embeds) for name in names)


def chosen_positions(model: ModelRun, frame: pd.DataFrame) -> list[tuple[int, ...]]:
    """Return the positions to overlay: those with saved masks, else centre, corners and edges that were swept."""
    masks = model.arrays.get("masks") or {}
    if masks:
        return sorted(masks)
    letters = axis_names(len(model.entry["output_shape"]) - 2)
    swept = set(map(tuple, frame[[f"pos_{a}" for a in letters]].to_numpy().tolist()))
    wanted = map(tuple, resolve(list(CHOSEN), model.entry["output_shape"][2:]).tolist())
    return [pos for pos in wanted if pos in swept]


def sample_image(entry: Mapping) -> tuple[np.ndarray, str]:
    """Return the config's image (grey, resampled to the input size) when given and readable, else a synthetic one."""
    spatial = tuple(entry["input_shape"][2:])
    path = entry.get("image")
    if not path or len(spatial) != 2:
        return plots.synthetic_image(spatial), "a synthetic sample image"
    try:
        pixels = np.asarray(matplotlib.image.imread(path), dtype=float)
    except (OSError, ValueError, SyntaxError) as exc:
        return plots.synthetic_image(spatial), f"a synthetic sample image (the image {path} is unreadable: {exc})"
    grey = pixels[..., :3].mean(axis=-1) if pixels.ndim == 3 else pixels
    rows = np.linspace(0, grey.shape[0] - 1, spatial[0]).round().astype(int)
    cols = np.linspace(0, grey.shape[1] - 1, spatial[1]).round().astype(int)
    grey = grey[np.ix_(rows, cols)]
    return (grey - grey.min()) / max(float(np.ptp(grey)), 1e-12), f"the image {Path(path).name}"


def model_figures(model: ModelRun, assets: Assets) -> tuple[FigureBlock, ...]:
    """Build the figures of one model that its frames and arrays allow, in reading order."""
    blocks = [builder(model, assets) for builder in FIGURES]
    return tuple(block for block in blocks if block is not None)


def _block(model: ModelRun, assets: Assets, kind: str, title: str, caption: str, fig: Figure) -> FigureBlock:
    """Store a figure and wrap it with its title and caption."""
    return FigureBlock(title=title, caption=caption, image=assets.image(f"{model.slug}-{kind}", fig, f"{title}: "
                                                                        f"{model.name}"))


def _ndim(model: ModelRun) -> int:
    """Return the number of spatial axes of a model's input."""
    return len(model.entry["input_shape"]) - 2


def explorable(model: ModelRun) -> bool:
    """Return whether a model gets the pointable output grid: 2-D, with a positions frame and coverage."""
    return _ndim(model) == 2 and "positions" in model.frames and model.arrays.get("coverage") is not None


def scale_ends(lo: float, hi: float, log: bool) -> tuple[str, str]:
    """Format a colour scale's two ends: compact (two significant digits on a log scale), with as many digits
    as it takes to tell two different ends apart (0.348 and 0.352, not 0.35 twice)."""
    texts = (f"{lo:.2g}", f"{hi:.2g}") if log else (number_text(float(lo)), number_text(float(hi)))
    digits = 3
    while lo != hi and texts[0] == texts[1] and digits <= 17:
        texts, digits = (f"{lo:.{digits}g}", f"{hi:.{digits}g}"), digits + 1
    return texts


def heatmap(model: ModelRun, assets: Assets, kind: str, title: str, values: np.ndarray, unit: str, *,
            grid: str, log: bool = False, cmap=plots.CMAP, boxes: tuple[Box, ...] = (), position: str = "",
            longest: int = HEATMAP_PX, span: tuple[float, float] | None = None) -> Heatmap:
    """Draw a 2-D array straight through the colour map and size it so its longest side is `longest` CSS pixels."""
    drawn = plots.tile(values, log=log, cmap=cmap, span=span)
    rows, cols = drawn.shape
    scale = longest / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    image = assets.png(f"{model.slug}-{kind}", drawn.png, f"{title}: {model.name}", size)
    lo, hi = scale_ends(drawn.lo, drawn.hi, log)
    return Heatmap(title=title, image=image, unit=unit, lo=lo, hi=hi, log=log, rows=rows, cols=cols, grid=grid,
                   boxes=boxes, position=position, cmap=cmap.name)


def grid_heatmaps(model: ModelRun, assets: Assets, kind: str, frame: pd.DataFrame,
                  columns: Sequence[tuple[str, str, str]]) -> tuple[Heatmap, ...]:
    """Draw columns of a positions-like frame over the swept output grid (the central depth slice in 3-D)."""
    pointable = "output" if explorable(model) else "slice" if _ndim(model) == 3 else "static"
    maps = []
    for column, title, unit in columns:
        values, _coords, note = plots.grid_values(frame, column, _ndim(model))
        maps.append(heatmap(model, assets, f"{kind}-{column}", title + note, values, unit, grid=pointable))
    return tuple(maps)


def grid_note(model: ModelRun, frame: pd.DataFrame) -> str:
    """Say how the swept positions sit on the output grid (all of it, or every k-th position)."""
    spatial = model.entry["output_shape"][2:]
    swept = [len(np.unique(frame[f"pos_{a}"])) for a in axis_names(_ndim(model))]
    if swept == list(spatial):
        return "Every output position was swept."
    return (f"Only the swept positions are drawn ({' × '.join(map(str, swept))} of "
            f"{' × '.join(map(str, spatial))}), side by side.")


def _rf_maps(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """In-input RF per axis and fill over the output grid; in 2-D with the input panel the explorer draws on."""
    frame = model.frames.get("positions")
    if frame is None:
        return None
    columns = [(f"{a}_size", f"in-input RF {a}", "input pixels") for a in axis_names(_ndim(model))]
    columns.append(("fill", "fill (support / box)", "ratio"))
    title, caption = ("Receptive field over the output grid",
                      "Each cell is one output position: the size of its RF box per axis, and the share of the box "
                      "its support fills (below 1 means holes). Positions near the border usually have smaller, "
                      "clipped boxes.")
    if _ndim(model) == 1:
        return _block(model, assets, "rf", title, caption, plots.grid_maps(frame, columns, 1))
    maps = grid_heatmaps(model, assets, "rf", frame, columns)
    if not explorable(model):
        return FigureBlock(title=title, caption=f"{caption} {grid_note(model, frame)}", image=None, heatmaps=maps)
    return FigureBlock(
        title=title, image=None, heatmaps=(*maps, input_panel(model, assets, frame)), explorer=True,
        caption=f"{caption} {grid_note(model, frame)} Point at a cell (hover or click it, or focus a map and use "
                "the arrow keys and Enter): the input panel draws that position's exact RF box, and its support "
                "where it was kept (centre, corners, edges); the numbers appear below. The outlined boxes are the "
                "chosen positions, for print.")


def input_panel(model: ModelRun, assets: Assets, frame: pd.DataFrame) -> Heatmap:
    """The input panel of a 2-D model: its coverage (or the config's image) with the chosen positions' boxes."""
    boxes = tuple(Box(label=plots.position_text(pos), x=float(lo[1]), y=float(lo[0]), width=hi[1] - lo[1] + 1,
                      height=hi[0] - lo[0] + 1, colour=matplotlib.colors.to_hex(colour))
                  for pos, colour in zip(chosen_positions(model, frame), plots.BOX_COLOURS)
                  for lo, hi in [plots.box_bounds(frame, pos)] if all(h >= low for low, h in zip(lo, hi)))
    if model.entry.get("image"):
        image, source = sample_image(model.entry)
        return heatmap(model, assets, "input", f"Input: {source}", image, "grey level", grid="input",
                       cmap=matplotlib.colormaps["gray"], boxes=boxes, longest=INPUT_PX)
    coverage = np.asarray(model.arrays["coverage"])
    return heatmap(model, assets, "input", "Input coverage (unseen pixels in red)",
                   np.ma.masked_equal(coverage, 0), "output positions that see the pixel", grid="input",
                   cmap=plots.CMAP.with_extremes(bad=plots.UNSEEN), boxes=boxes, longest=INPUT_PX)


def _padding_maps(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """Share of each RF inside the input, padding reached per axis and clipped sides, from the edges frame."""
    frame = model.frames.get("edges")
    if frame is None:
        return None
    letters = axis_names(_ndim(model))
    derived = frame.assign(
        clipped=sum(frame[f"{a}_clip_{side}"].astype(int) for a in letters for side in ("lo", "hi")),
        **{f"{a}_padding": frame[f"{a}_out_lo"] + frame[f"{a}_out_hi"] for a in letters})
    columns = [("in_input_share", "share of the RF inside the input", "ratio")]
    columns += [(f"{a}_padding", f"padding reached on {a}", "input pixels") for a in letters]
    columns.append(("clipped", "clipped sides", "sides"))
    exact = "geometry" in model.frames and bool(model.frames["geometry"]["fit"].isin(EXACT_FITS).all())
    shown = [column for column in columns if column[0] == "clipped" or (exact and known(derived, column[0]))]
    title = "How much of each RF lies inside the input"
    caption = ("The share of each position's unclipped RF box (the exact geometry) that lies inside the input, the "
               "rows or columns of it that reach past the input into padding (both sides added), and how many "
               "sides of its RF the input border cuts.")
    if len(shown) < len(columns):
        caption += " Without an exact geometry the share and the padding reached are unknown and not drawn."
    if _ndim(model) == 1:
        return _block(model, assets, "padding", title, caption, plots.grid_maps(derived, shown, 1))
    return FigureBlock(title=title, caption=caption, image=None,
                       heatmaps=grid_heatmaps(model, assets, "padding", derived, shown))


def known(frame: pd.DataFrame, column: str) -> bool:
    """Return whether a frame has a column with at least one value (older run folders may lack it)."""
    return column in frame and bool(frame[column].notna().any())


def _coverage(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """The input coverage map (in 2-D it is the explorer's input panel unless the config gives an image)."""
    coverage = model.arrays.get("coverage")
    if coverage is None or (explorable(model) and not model.entry.get("image")):
        return None
    title, caption = ("Input coverage",
                      "For every input pixel, how many swept output positions see it. Pixels no output sees are red.")
    if _ndim(model) == 1:
        return _block(model, assets, "coverage", title, caption, plots.coverage_map(coverage))
    shown, note = plots.plane(np.asarray(coverage))
    return FigureBlock(title=title, caption=caption, image=None, heatmaps=(heatmap(
        model, assets, "coverage", f"Input coverage{note}", np.ma.masked_equal(shown, 0),
        "output positions that see the pixel", grid="static", cmap=plots.CMAP.with_extremes(bad=plots.UNSEEN),
        longest=INPUT_PX),))


def _overlay(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """RF boxes and support masks of chosen positions on a sample image (1-D and 3-D; 2-D has the explorer)."""
    frame = model.frames.get("positions")
    positions = chosen_positions(model, frame) if frame is not None else []
    if not positions or explorable(model):
        return None
    image, source = sample_image(model.entry)
    fig = plots.rf_overlay(image, frame, model.arrays.get("masks") or {}, positions)
    return _block(model, assets, "overlay", "Receptive fields of chosen positions",
                  f"The RF box (outline) and support (tint) of each chosen output position over {source}; "
                  "titles give the position and the box size in input pixels.", fig)


def layer_labels(frame: pd.DataFrame) -> list[str]:
    """Return the growth plot's tick labels: each layer's qualified name with its type, e.g. `layer1.0 (BasicBlock)`."""
    return [f"{name} ({kind})" if kind else str(name)
            for name, kind in zip(frame["layer"].astype(str), frame.get("type", pd.Series([""] * len(frame))))]


def _growth(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """Per-layer RF growth with the input size and the border layers."""
    frame = model.frames.get("layers")
    if frame is None or frame.empty:
        return None
    letters = axis_names(_ndim(model))
    spatial = model.entry["input_shape"][2:]
    fig = plots.layer_growth(layer_labels(frame), {a: frame[f"{a}_rf"].to_numpy() for a in letters},
                             dict(zip(letters, spatial)), frame["border"].to_numpy(dtype=bool))
    return _block(model, assets, "layers", "RF growth per layer",
                  "Architecture RF (unclipped) at the centre of each layer's output, in forward order; dashed lines "
                  "are the input size. Shaded layers are border layers: their RF already covers the whole input, so "
                  "their depth adds no context at this resolution.", fig)


def _erf(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """Effective-RF heatmaps with the theoretical RF box, when the run measured them."""
    maps = model.arrays.get("erf_maps") or {}
    frame = model.frames.get("erf")
    if not maps or frame is None:
        return None
    title = "Effective receptive field"
    caption = ("Mean gradient magnitude of the output position with respect to each input pixel over random "
               "inputs, on a log scale; the white box is the theoretical RF.")
    if _ndim(model) == 1:
        return _block(model, assets, "erf", title, caption, plots.erf_maps(maps, frame))
    panels = []
    for pos in sorted(maps)[:plots.MAX_PANELS]:
        values = np.asarray(maps[pos], dtype=float)
        depth = int(np.unravel_index(np.argmax(values), values.shape)[0]) if values.ndim == 3 else None
        shown, note = plots.plane(values, depth)
        lo, hi = plots.box_bounds(frame, pos, "rf_")
        box = Box(label=f"theoretical RF of {plots.position_text(pos)}", x=float(lo[-1]), y=float(lo[-2]),
                  width=hi[-1] - lo[-1] + 1, height=hi[-2] - lo[-2] + 1, colour="#ffffff")
        panels.append(heatmap(model, assets, f"erf-{runfolder_key(pos)}", f"ERF of {plots.position_text(pos)}{note}",
                              shown, "mean |dy/dx|", grid="input", log=True, boxes=(box,),
                              position=",".join(map(str, pos))))
    extra = " When you point at one of these positions above, the input panel shows its ERF." if explorable(
        model) else ""
    return FigureBlock(title=title, caption=caption + extra, image=None, heatmaps=tuple(panels))


def runfolder_key(pos: Sequence[int]) -> str:
    """Return a file-safe key of a position, e.g. `h3_w4`."""
    return "_".join(f"{a}{int(p)}" for a, p in zip(axis_names(len(pos)), pos))


FIGURES = (_rf_maps, _padding_maps, _coverage, _overlay, _growth, _erf)
FLAGS = ("edge", "h_clip_lo", "h_clip_hi", "w_clip_lo", "w_clip_hi", "h_wrap", "w_wrap")


def explorer_data(model: ModelRun, assets: Assets) -> dict | None:
    """Return what the page's script needs to draw any output position's RF on the input panel, as JSON values.

    Columnar and compact: `cell` is the flat index on the drawn (swept) grid; `flags` packs FLAGS
    as bits; masks are tinted PNGs of the input size; `erf` holds the ERF metrics by position.
    """
    if not explorable(model):
        return None
    frame = model.frames.get("edges", model.frames["positions"]).head(EXPLORER_ROWS)
    coords = [np.unique(model.frames["positions"][f"pos_{a}"]) for a in ("h", "w")]
    cell = np.searchsorted(coords[0], frame["pos_h"]) * len(coords[1]) + np.searchsorted(coords[1], frame["pos_w"])
    flags = sum((frame[name].to_numpy(dtype=bool).astype(int) << bit) for bit, name in enumerate(FLAGS)
                if name in frame)
    columns = {name: frame[name].astype(int).tolist() for name in ("pos_h", "pos_w", "h_lo", "h_hi", "w_lo", "w_hi",
                                                                   "support")}
    return {"input": list(model.entry["input_shape"][2:]), "grid": [len(coords[0]), len(coords[1])],
            "coords": [c.astype(int).tolist() for c in coords], "flagNames": list(FLAGS),
            "cell": cell.astype(int).tolist(), **columns, "fill": frame["fill"].round(4).tolist(),
            "flags": np.broadcast_to(flags, len(frame)).astype(int).tolist(),
            "masks": mask_images(model, assets), "erf": erf_records(model)}


def mask_images(model: ModelRun, assets: Assets) -> dict[str, str]:
    """Return the kept support masks as tinted, otherwise transparent PNGs, keyed `h,w`."""
    images = {}
    for pos, mask in sorted((model.arrays.get("masks") or {}).items()):
        rgba = np.zeros((*np.shape(mask), 4), dtype=np.uint8)
        rgba[np.asarray(mask, dtype=bool)] = MASK_TINT
        key = ",".join(map(str, pos))
        images[key] = assets.png(f"{model.slug}-mask-{runfolder_key(pos)}", plots.encode_png(rgba),
                                 f"support of {key}", (rgba.shape[1], rgba.shape[0])).src
    return images


def erf_records(model: ModelRun) -> dict[str, dict]:
    """Return the ERF metrics the explorer shows, keyed `h,w`, for positions whose ERF was measured."""
    frame = model.frames.get("erf")
    if frame is None or not (model.arrays.get("erf_maps") or {}):
        return {}
    records = {}
    for row in frame.itertuples(index=False):
        key = f"{int(row.pos_h)},{int(row.pos_w)}"
        records[key] = {"area95_ratio": round(float(row.area95_ratio), 4), "peak": [int(row.peak_h), int(row.peak_w)],
                        "offset": [round(float(row.offset_h), 2), round(float(row.offset_w), 2)]}
    return records


def spec_rows(entry: Mapping) -> tuple[tuple[str, str], ...]:
    """Return the recorded config of a model as (label, value) rows; empty for runs that did not record it."""
    spec = entry.get("spec") or {}
    return tuple((SPEC_LABELS.get(key, key), spec_text(value)) for key, value in spec.items())


def model_section(run: Run, model: ModelRun, assets: Assets, page_dir: Path, expanded: bool = True) -> ModelSection:
    """Build the section of one model; a failed model gets its error and no figures."""
    entry = model.entry
    return ModelSection(
        anchor=anchor(model), name=model.name, resolution=resolution(entry["input_shape"]),
        input_shape=list(entry["input_shape"]), output_shape=entry.get("output_shape"),
        mode=str(entry.get("mode", "")), target=str(entry.get("target", "")),
        nonaffine=(model.summary.nonaffine or "") if model.summary else "",
        status=model.status, verdict=verdict(model),
        error=str(entry.get("error") or ""), findings=findings(entry),
        audit=tuple(AuditResult(r["rule"], r["limit"], r["value"], r["passed"], r.get("note") or "")
                    for r in entry.get("audit") or []),
        figures=model_figures(model, assets) if model.ok else (),
        tables=model_tables(run, model, page_dir, assets.embeds) if model.ok else (),
        spec=spec_rows(entry), data=explorer_data(model, assets) if model.ok else None,
        open=expanded or not model.ok, layers=layer_rows(model.frames["layers"]) if "layers" in model.frames else ())


def run_info(meta: Mapping) -> RunInfo:
    """Build the run metadata block from summary.json's `run` object."""
    argv = meta.get("argv") or []
    return RunInfo(
        config_files=tuple(str(p) for p in meta.get("config_files", [])),
        versions=tuple((k, str(v)) for k, v in (meta.get("versions") or {}).items()),
        device=str(meta.get("device", "")), date=str(meta.get("date", "")), seed=meta.get("seed"),
        duration_s=meta.get("duration_s"), argv=" ".join(map(str, argv)) if isinstance(argv, list) else str(argv),
        cached=tuple((meta.get("cache") or {}).get("hits") or ()))


def counts(run: Run) -> Counts:
    """Count distinct models, jobs, failed jobs and jobs whose audit failed."""
    return Counts(models=len({model.name for model in run.models}), jobs=len(run.models),
                  failed_jobs=sum(not model.ok for model in run.models),
                  failed_audits=sum(audit.verdict(model.entry.get("audit")) is AuditVerdict.FAIL
                                    for model in run.models))


def build_context(run: Run, assets: Assets, page_dir: Path) -> ReportContext:
    """Build the whole page context of a run; sections start collapsed past EXPANDED_SECTIONS jobs."""
    expanded = len(run.models) <= EXPANDED_SECTIONS
    models = by_verdict(run.models)
    sections = tuple(model_section(run, model, assets, page_dir, expanded) for model in models)
    css, css_href = assets.stylesheet(_template_source("report.css"))
    return ReportContext(
        title=f"Receptive-field report: {Path(run.path).name}", run=run_info(run.meta),
        overview=tuple(overview_row(model) for model in models),
        failed=tuple(s for s in sections if s.status != "ok"), sections=sections, css=css, css_href=css_href,
        counts=counts(run), script=_template_source("report.js"))


def render(run: Run, out_path: str | os.PathLike | None = None, *,
           assets_dir: str | os.PathLike | None = None) -> Path:
    """Render a run as index.html (self-contained unless `assets_dir` is given) and return its path.

    Every file is written beside its target and renamed over it: a failed render leaves the previous
    page as it was (OutputError names the file that could not be written).
    """
    out = Path(out_path) if out_path is not None else Path(run.path) / "index.html"
    assets: Assets = Embedded() if assets_dir is None else AssetsFolder(Path(assets_dir), out.parent)
    context = build_context(run, assets, out.parent)
    return write_file(out, make_env().get_template("index.html").render(ctx=context))

