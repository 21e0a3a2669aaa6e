"""The HTML report: a saved run folder rendered through Jinja2 templates into one index.html.

Rendering reads only the run folder (summary entries, frames, arrays) and never imports
torch. Each page is rendered in one call from a documented frozen dataclass
(:class:`ReportContext`), with autoescape on and StrictUndefined. By default the file is
self-contained (CSS inline, figures as PNG data URIs); with `assets_dir` the stylesheet and
figures are written as files beside it instead (see :class:`AssetsFolder`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import jinja2
import matplotlib.image
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rfreport import plots
from rfreport.positions import axis_names, resolve
from rfreport.runfolder import ModelRun, Run

PREVIEW_ROWS = 12
CHOSEN = ("center", "corners", "edges")


@dataclass(frozen=True)
class Image:
    """An embedded or linked figure."""

    src: str = field(metadata={"doc": "data URI or relative URL of the PNG"})
    alt: str = field(metadata={"doc": "text alternative describing the figure"})
    width: int = field(metadata={"doc": "width in CSS pixels (the PNG's natural width)"})
    height: int = field(metadata={"doc": "height in CSS pixels (the PNG's natural height)"})


@dataclass(frozen=True)
class FigureBlock:
    """One titled figure of a model section."""

    title: str = field(metadata={"doc": "heading above the figure"})
    caption: str = field(metadata={"doc": "one or two sentences saying how to read the figure"})
    image: Image = field(metadata={"doc": "the figure itself"})


@dataclass(frozen=True)
class Link:
    """A relative link to a file of the run folder."""

    label: str = field(metadata={"doc": "link text, e.g. CSV"})
    href: str = field(metadata={"doc": "path relative to the report"})


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


@dataclass(frozen=True)
class OverviewRow:
    """One model and resolution in the overview table (None where the model failed)."""

    anchor: str = field(metadata={"doc": "id of the model's section"})
    name: str = field(metadata={"doc": "model name"})
    resolution: str = field(metadata={"doc": "input spatial size, e.g. 224 × 224"})
    status: str = field(metadata={"doc": "ok or failed"})
    rf_size: list | None = field(metadata={"doc": "RF size at the centre per axis (input pixels)"})
    stride: list | None = field(metadata={"doc": "effective stride per axis (input pixels per output step)"})
    padding: list | None = field(metadata={"doc": "effective padding per axis (input pixels)"})
    center_offset: list | None = field(metadata={"doc": "RF centre minus nominal pixel per axis (input pixels)"})
    edge_fraction: float | None = field(metadata={"doc": "share of output positions whose RF is clipped"})
    unseen_pixels: int | None = field(metadata={"doc": "input pixels no output position sees"})
    holes: bool | None = field(metadata={"doc": "some RF has holes (fill below 1)"})
    global_context: bool | None = field(metadata={"doc": "every position sees the whole input"})
    erf_ratio: float | None = field(metadata={"doc": "ERF area (95% of the mass) / theoretical RF area at the "
                                                      "summary's ERF position (the centre when measured there)"})
    audit: str = field(metadata={"doc": "pass, fail or none (no rules configured)"})


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
    status: str = field(metadata={"doc": "ok or failed"})
    error: str = field(metadata={"doc": "the error of a failed model, empty otherwise"})
    findings: tuple[Finding, ...] = field(metadata={"doc": "plain-sentence findings, warnings first"})
    audit: tuple[AuditResult, ...] = field(metadata={"doc": "audit rules and their results"})
    figures: tuple[FigureBlock, ...] = field(metadata={"doc": "the model's figures in reading order"})
    tables: tuple[Table, ...] = field(metadata={"doc": "previews of the geometry, positions and ERF frames"})


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


class Assets(Protocol):
    """Where figures and the stylesheet go: embedded in the page or written beside it."""

    def image(self, name: str, fig: Figure, alt: str) -> Image:
        """Store a figure under a file-safe name and return how the page refers to it."""

    def stylesheet(self, css: str) -> tuple[str, str]:
        """Return (inline css, href): exactly one of them is non-empty."""


class Embedded:
    """Self-contained mode: figures as PNG data URIs, CSS inline."""

    def image(self, name: str, fig: Figure, alt: str) -> Image:
        """Embed the figure's PNG as a data URI."""
        png = plots.to_png(fig)
        width, height = plots.png_size(png)
        return Image(src=plots.data_uri(png), alt=alt, width=width, height=height)

    def stylesheet(self, css: str) -> tuple[str, str]:
        """Inline the stylesheet."""
        return css, ""


@dataclass(frozen=True)
class AssetsFolder:
    """Assets mode: figures and report.css written into `folder`, linked relative to the page's folder."""

    folder: Path
    page_dir: Path

    def _href(self, filename: str) -> str:
        """Return the URL of a file in the assets folder, relative to the page."""
        return Path(os.path.relpath(self.folder / filename, self.page_dir)).as_posix()

    def image(self, name: str, fig: Figure, alt: str) -> Image:
        """Write the figure as `<name>.png` and link it."""
        png = plots.to_png(fig)
        width, height = plots.png_size(png)
        (self.folder / f"{name}.png").write_bytes(png)
        return Image(src=self._href(f"{name}.png"), alt=alt, width=width, height=height)

    def stylesheet(self, css: str) -> tuple[str, str]:
        """Write report.css and link it."""
        (self.folder / "report.css").write_text(css, encoding="utf-8")
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
    return "—" if missing(value) else f"{100 * value:.1f}%".replace(".0%", "%")


def yes_no(value: bool | None) -> str:
    """Format a flag as yes/no, or a dash."""
    return "—" if missing(value) else ("yes" if value else "no")


def make_env() -> jinja2.Environment:
    """Return the Jinja2 environment: package templates, autoescape, StrictUndefined and the filters."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_source),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=True),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(axes=axes_text, number=number_text, percent=percent_text, yesno=yes_no)
    return env


def _template_source(name: str) -> str:
    """Read a template file shipped in the rfreport.templates package."""
    try:
        return resources.files("rfreport.templates").joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise jinja2.TemplateNotFound(name) from exc


def resolution(shape: Sequence[int]) -> str:
    """Return the spatial size of an (N, C, *spatial) shape, e.g. `224 × 224`."""
    return " × ".join(str(int(n)) for n in shape[2:])


def audit_status(entry: Mapping) -> str:
    """Summarise a model's audit results as pass, fail or none."""
    results = entry.get("audit") or []
    if not results:
        return "none"
    return "pass" if all(r["passed"] for r in results) else "fail"


def overview_row(model: ModelRun) -> OverviewRow:
    """Build the overview-table row of one model entry."""
    entry = model.entry
    return OverviewRow(
        anchor=anchor(model), name=model.name, resolution=resolution(entry["input_shape"]), status=model.status,
        rf_size=entry.get("rf_size"), stride=entry.get("stride"), padding=entry.get("padding"),
        center_offset=entry.get("center_offset"), edge_fraction=entry.get("edge_fraction"),
        unseen_pixels=entry.get("unseen_pixels"), holes=entry.get("holes"), global_context=entry.get("global"),
        erf_ratio=entry.get("erf_area95_ratio"), audit=audit_status(entry))


def anchor(model: ModelRun) -> str:
    """Return the HTML id of a model's section."""
    return f"model-{model.slug}"


def findings(entry: Mapping) -> tuple[Finding, ...]:
    """Return the entry's findings, warnings first, in their original order otherwise."""
    items = [Finding(code=f["code"], severity=f["severity"], message=f["message"]) for f in entry.get("findings", [])]
    return tuple(sorted(items, key=lambda f: f.severity != "warning"))


TABLES = (("levels", "Feature-pyramid levels"), ("geometry", "Geometry per axis"), ("edges", "Positions"),
          ("positions", "Positions"), ("erf", "Effective-RF metrics"))


def frame_table(run: Run, model: ModelRun, name: str, title: str, page_dir: Path) -> Table:
    """Preview a frame's first rows with links to its CSV and Parquet files."""
    frame = model.frames[name]
    links = tuple(Link(label=rel.rsplit(".", 1)[1].upper(),
                       href=Path(os.path.relpath(run.path / rel, page_dir)).as_posix())
                  for rel in model.entry.get("files", []) if Path(rel).stem == name)
    rows = tuple(tuple(number_text(v) for v in row)
                 for row in frame.head(PREVIEW_ROWS).itertuples(index=False))
    return Table(title=title, columns=tuple(frame.columns), rows=rows, total=len(frame), links=links)


def model_tables(run: Run, model: ModelRun, page_dir: Path) -> tuple[Table, ...]:
    """Preview the geometry, positions (the edges frame when present) and ERF frames of a model."""
    names = [name for name, _ in TABLES if name in model.frames]
    if "edges" in names:
        names.remove("positions")
    return tuple(frame_table(run, model, name, dict(TABLES)[name], page_dir) for name in names)


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


def _rf_maps(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """RF size per axis and fill over the output grid."""
    frame = model.frames.get("positions")
    if frame is None:
        return None
    columns = [(f"{a}_size", f"RF size {a}", "input pixels") for a in axis_names(_ndim(model))]
    fig = plots.grid_maps(frame, [*columns, ("fill", "fill (support / box)", "ratio")], _ndim(model))
    return _block(model, assets, "rf", "Receptive field over the output grid",
                  "Each cell is one output position: the size of its RF box per axis, and the share of the box "
                  "its support fills (below 1 means holes). Positions near the border usually have smaller, "
                  "clipped boxes.", fig)


def _padding_maps(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """Padding seen per axis and clipped sides per output position, from the edges frame."""
    frame = model.frames.get("edges")
    if frame is None:
        return None
    letters = axis_names(_ndim(model))
    derived = frame.assign(
        clipped=sum(frame[f"{a}_clip_{side}"].astype(int) for a in letters for side in ("lo", "hi")),
        **{f"{a}_padding": frame[f"{a}_out_lo"] + frame[f"{a}_out_hi"] for a in letters})
    columns = [(f"{a}_padding", f"padding seen on {a}", "input pixels") for a in letters]
    fig = plots.grid_maps(derived, [*columns, ("clipped", "clipped sides", "sides")], _ndim(model))
    return _block(model, assets, "padding", "Padding seen by each output position",
                  "Rows or columns of each position's unclipped RF that fall outside the input, i.e. are fed by "
                  "padding (both sides added), and how many sides of its RF the input border cuts.", fig)


def _coverage(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """The input coverage map."""
    coverage = model.arrays.get("coverage")
    if coverage is None:
        return None
    return _block(model, assets, "coverage", "Input coverage",
                  "For every input pixel, how many swept output positions see it. Pixels no output sees are red.",
                  plots.coverage_map(coverage))


def _overlay(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """RF boxes and support masks of chosen positions on a sample image."""
    frame = model.frames.get("positions")
    positions = chosen_positions(model, frame) if frame is not None else []
    if not positions:
        return None
    image, source = sample_image(model.entry)
    fig = plots.rf_overlay(image, frame, model.arrays.get("masks") or {}, positions)
    return _block(model, assets, "overlay", "Receptive fields of chosen positions",
                  f"The RF box (outline) and support (tint) of each chosen output position over {source}; "
                  "titles give the position and the box size in input pixels.", fig)


def _growth(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """Per-layer RF growth with the input size and the border layers."""
    frame = model.frames.get("layers")
    if frame is None or frame.empty:
        return None
    letters = axis_names(_ndim(model))
    spatial = model.entry["input_shape"][2:]
    fig = plots.layer_growth(frame["layer"].tolist(), {a: frame[f"{a}_rf"].to_numpy() for a in letters},
                             dict(zip(letters, spatial)), frame["border"].to_numpy(dtype=bool))
    return _block(model, assets, "layers", "RF growth per layer",
                  "Unclipped RF size at the centre of each layer's output, in forward order; dashed lines are the "
                  "input size. Shaded layers are border layers: their RF already covers the whole input, so their "
                  "depth adds no context at this resolution.", fig)


def _erf(model: ModelRun, assets: Assets) -> FigureBlock | None:
    """Effective-RF heatmaps, when the run measured them."""
    maps = model.arrays.get("erf_maps") or {}
    frame = model.frames.get("erf")
    if not maps or frame is None:
        return None
    return _block(model, assets, "erf", "Effective receptive field",
                  "Mean gradient magnitude of the output position with respect to each input pixel over random "
                  "inputs, on a log scale; the white box is the theoretical RF.", plots.erf_maps(maps, frame))


FIGURES = (_rf_maps, _padding_maps, _coverage, _overlay, _growth, _erf)


def model_section(run: Run, model: ModelRun, assets: Assets, page_dir: Path) -> ModelSection:
    """Build the section of one model; a failed model gets its error and no figures."""
    entry = model.entry
    return ModelSection(
        anchor=anchor(model), name=model.name, resolution=resolution(entry["input_shape"]),
        input_shape=list(entry["input_shape"]), output_shape=entry.get("output_shape"),
        mode=str(entry.get("mode", "")), target=str(entry.get("target", "")), status=model.status,
        error=str(entry.get("error") or ""), findings=findings(entry),
        audit=tuple(AuditResult(**{k: r[k] for k in ("rule", "limit", "value", "passed")})
                    for r in entry.get("audit") or []),
        figures=model_figures(model, assets) if model.ok else (),
        tables=model_tables(run, model, page_dir) if model.ok else ())


def run_info(meta: Mapping) -> RunInfo:
    """Build the run metadata block from summary.json's `run` object."""
    argv = meta.get("argv") or []
    return RunInfo(
        config_files=tuple(str(p) for p in meta.get("config_files", [])),
        versions=tuple((k, str(v)) for k, v in (meta.get("versions") or {}).items()),
        device=str(meta.get("device", "")), date=str(meta.get("date", "")), seed=meta.get("seed"),
        duration_s=meta.get("duration_s"), argv=" ".join(map(str, argv)) if isinstance(argv, list) else str(argv),
        cached=tuple((meta.get("cache") or {}).get("hits") or ()))


def build_context(run: Run, assets: Assets, page_dir: Path) -> ReportContext:
    """Build the whole page context of a run."""
    sections = tuple(model_section(run, model, assets, page_dir) for model in run.models)
    css, css_href = assets.stylesheet(_template_source("report.css"))
    return ReportContext(
        title=f"Receptive-field report: {Path(run.path).name}", run=run_info(run.meta),
        overview=tuple(overview_row(model) for model in run.models),
        failed=tuple(s for s in sections if s.status != "ok"), sections=sections, css=css, css_href=css_href)


def render(run: Run, out_path: str | os.PathLike | None = None, *,
           assets_dir: str | os.PathLike | None = None) -> Path:
    """Render a run as index.html (self-contained unless `assets_dir` is given) and return its path."""
    out = Path(out_path) if out_path is not None else Path(run.path) / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    assets: Assets = Embedded()
    if assets_dir is not None:
        Path(assets_dir).mkdir(parents=True, exist_ok=True)
        assets = AssetsFolder(Path(assets_dir), out.parent)
    context = build_context(run, assets, out.parent)
    html = make_env().get_template("index.html").render(ctx=context)
    out.write_text(html, encoding="utf-8")
    return out

