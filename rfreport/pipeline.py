"""The pipeline: one job per (model, input shape), run through an executor, assembled into a run folder.

A job builds its model, sweeps the requested positions (plus the few the geometry fit needs),
runs the local sweep when every swept position sees the whole input, the per-layer growth and
the ERF when asked, then analyses it all. Its :class:`JobResult` holds only numpy arrays,
DataFrames and plain values, so it pickles across processes. :func:`run` hands the jobs to an
executor and writes the results into an atomically replaced run folder with its report.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from rfreport import (
    __version__,
    analysis,
    attention,
    audit,
    cache,
    context,
    erf,
    frames,
    layers,
    levels,
    models,
    progress,
    runfolder,
)
from rfreport import positions as positions_mod
from rfreport import verify as verify_mod
from rfreport.config import Level, ModelSpec, RunConfig, RunOptions
from rfreport.engine import Engine, Target, resolve_device
from rfreport.errors import RfReportError, SweepError
from rfreport.layouts import parse_layout
from rfreport.sweep import SweepResult, sweep

if TYPE_CHECKING:
    from rfreport.executors import Executor

logger = logging.getLogger("rfreport")
KEEP_MASKS = ("center", "corners", "edges")
ENLARGE_DOUBLINGS = 3          # at most 8x the input size per axis for the geometry fit
ENLARGE_PIXELS = 1024 * 1024   # and never beyond this many input positions
LEVEL_CHECKS = 1               # positions of a level's sweep checked on the model: the one nearest its centre
Advance = Callable[[int, int], None]   # (positions done, positions total) after each sweep chunk


@dataclass(frozen=True)
class Job:
    """One unit of work: a model spec at one of its input shapes, with the run's options."""

    spec: ModelSpec
    input_shape: tuple[int, ...]
    options: RunOptions

    @property
    def slug(self) -> str:
        """Return the run-folder name of this job, e.g. `resnet50-224x224`."""
        return runfolder.slugify(self.spec.name, self.input_shape)


@dataclass(frozen=True)
class JobResult:
    """What a job produced: picklable and torch-free (plain values, DataFrames, numpy arrays)."""

    name: str
    slug: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...] | None
    status: str                                                     # "ok" or "failed"
    error: str | None                                               # one line when failed
    mode: str
    target: str
    seconds: float
    summary: dict = field(default_factory=dict)                     # analysis summary keys
    findings: tuple[dict, ...] = ()                                 # {code, severity, message}
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)   # saved under their schema names
    arrays: dict[str, Any] = field(default_factory=dict)            # coverage; masks, erf_maps by position
    cached: bool = False                                            # taken from the incremental-audit cache


def make_jobs(config: RunConfig) -> list[Job]:
    """Return one job per model and input shape, in config order."""
    return [Job(spec, shape, config.options) for spec in config.models for shape in spec.input_shapes]


def sweep_options(job: Job) -> dict[str, Any]:
    """Return the sweep keyword arguments every sweep of a job shares."""
    spec, options = job.spec, job.options
    return {"mode": spec.mode, "layer": spec.layer, "output": spec.output, "device": options.device,
            "seed": options.seed, "batch_size": options.batch_size, "layout": spec.layout}


def keep_masks(spec: ModelSpec) -> list:
    """Return the positions whose support masks are kept (when swept): centre, corners, edges, explicit ones."""
    explicit = [] if isinstance(spec.positions, str) else [p for p in spec.positions if not isinstance(p, str)]
    return [*KEEP_MASKS, *explicit]


def plan(model: nn.Module, job: Job) -> np.ndarray:
    """Resolve the job's positions on its output grid (one forward pass, which checks the input's rank)."""
    spec, options = job.spec, job.options
    target = Target(spec.layer, spec.output, parse_layout(spec.layout))
    with models.rank_guard(model, job.input_shape, spec.name), Engine(
            model, job.input_shape, mode=spec.mode, target=target, device=options.device, seed=options.seed) as engine:
        return positions_mod.resolve(spec.positions, engine.output_spatial)


def main_sweep(model: nn.Module, job: Job, selected: np.ndarray | None,
               advance: Advance | None = None) -> SweepResult:
    """Sweep the selected positions of a job (its own selection when None), keeping the masks of the chosen ones."""
    done, total = 0, 0 if selected is None else len(selected)

    def chosen(output_spatial: tuple[int, ...]) -> list:
        nonlocal total
        picked = positions_mod.resolve(job.spec.positions, output_spatial)
        total = len(picked)
        return picked.tolist()

    def progress(count: int) -> None:
        nonlocal done
        done += count
        advance(done, total)

    checks = verify_mod.among(job.spec.positions, job.spec.verify, mode=job.spec.mode, seed=job.options.seed)
    with models.rank_guard(model, job.input_shape, job.spec.name):
        return sweep(model, job.input_shape, chosen if selected is None else selected.tolist(),
                     keep_masks=keep_masks(job.spec), progress=progress if advance else None, verify=checks,
                     **sweep_options(job))


def covers(result: SweepResult, spec: positions_mod.PositionSpec) -> bool:
    """Return whether a sweep already holds every position of a selection."""
    wanted = positions_mod.resolve(spec, result.output_spatial)
    swept = set(map(tuple, result.positions.tolist()))
    return all(tuple(pos) in swept for pos in wanted.tolist())


def geometry_sweep(model: nn.Module, job: Job, main: SweepResult, *,
                   corners_only: bool = False) -> SweepResult | None:
    """Sweep the positions the geometry fit needs, unless the main sweep has them all or they cannot help.

    With `corners_only` (the geometry is already composed exactly) only the corners are swept, to
    tell a global RF.
    When the corners were swept and every RF already spans the whole input, no position at this size
    can show a box clear of the border: the fit then comes from the composed or enlarged geometry (or
    the local sweep). When the centre's RF spans the whole input, only the corners are swept (to
    tell a global RF): no other position can be clear of the border either.
    """
    extra = analysis.geometry_positions(main.output_spatial)
    spans = covers(main, "corners") and analysis.is_global(analysis.Boxes.of(main), main.input_spatial)
    if spans or covers(main, extra):
        return None
    if corners_only or centre_spans(main):
        extra = "corners"
        if covers(main, extra):
            return None
    return sweep(model, job.input_shape, extra, verify=False, **sweep_options(job))


def context_bound(local: SweepResult | None) -> bool:
    """Tell whether every RF is global through global context (the local sweep's RFs are smaller than the
    input): then no larger input has an RF clear of the border either."""
    return local is not None and not analysis.is_global(analysis.Boxes.of(local), local.input_spatial)


def centre_spans(result: SweepResult) -> bool:
    """Tell whether the sweep holds the centre position and its RF spans the whole input on every axis."""
    mid = positions_mod.center(result.output_spatial)
    rows = np.flatnonzero((result.positions == np.array(mid)).all(axis=1) & (result.support > 0))
    n = np.array(result.input_spatial)
    return bool(len(rows) and ((result.lo[rows[0]] <= 0) & (result.hi[rows[0]] >= n - 1)).all())


def enlarged_sweep(model: nn.Module, job: Job, main: SweepResult, geometry: SweepResult | None,
                   growth: pd.DataFrame | None = None) -> SweepResult | None:
    """Fit the geometry on doubled inputs when every RF is clipped at the job's input (so it is always filled).

    Starts at the first doubling larger than every RF the layer growth measured, stops at the first
    size where two full-size RFs lie clear of the border, after ENLARGE_DOUBLINGS, past
    ENLARGE_PIXELS, or when the model refuses the size; returns None when none helped.
    """
    if main.size_dependent_ops or not analysis.needs_larger_input(main, geometry):
        return None
    for doubling in range(first_doubling(job.input_shape[2:], growth), ENLARGE_DOUBLINGS + 1):
        bigger = (*job.input_shape[:2], *(n << doubling for n in job.input_shape[2:]))
        if math.prod(bigger[2:]) > ENLARGE_PIXELS:
            return None
        try:
            # one probe: only the box bounds of three positions are read, and the input is 4-64x larger
            larger = sweep(model, bigger, analysis.enlarged_positions, probes=1, verify=False,
                           **sweep_options(job))
        except SweepError:
            return None
        if not analysis.needs_larger_input(larger):
            return larger
    return None


def composed_geometry(model: nn.Module, job: Job, main: SweepResult,
                      geometry: SweepResult | None) -> layers.TargetGeometry | None:
    """Compose the target's geometry from per-layer windows when every RF is clipped at this size.

    Only for a named NCHW layer (its output is captured as it is) and a pass without size-dependent ops
    (whose windows a few probe rows cannot vouch for); None otherwise or when the model refuses.
    """
    spec = job.spec
    if (spec.layer is None or spec.output is not None or spec.layout != "nchw" or main.size_dependent_ops
            or not analysis.needs_larger_input(main, geometry)):
        return None
    try:
        return layers.target_geometry(model, job.input_shape, spec.layer, mode=spec.mode,
                                      device=job.options.device, seed=job.options.seed)
    except SweepError:
        return None


def grown_geometry(model: nn.Module, job: Job, main: SweepResult, geometry: SweepResult | None,
                   growth: pd.DataFrame | None) -> list[tuple] | None:
    """Return the target's exact (size, stride, padding) per axis from its layer-growth row when every RF is clipped.

    For an NCHW target (a layer, or an output that is a named module's very output: a `features_only`
    level) in a pass without size-dependent ops, like `composed_geometry`; it spares the enlarged sweep.
    """
    if (growth is None or growth.empty or job.spec.layout != "nchw" or main.size_dependent_ops
            or not analysis.needs_larger_input(main, geometry)):
        return None
    names = layers.output_layers(model, job.input_shape, Target(job.spec.layer, job.spec.output))
    return layers.exact_geometry(growth, names)


def exact_axes(found: layers.TargetGeometry | None) -> list[tuple] | None:
    """Return (size, stride, padding) per axis of an exact composed geometry, else None."""
    return list(zip(found.rf, found.stride, found.padding)) if found is not None and found.exact else None


def first_doubling(spatial: Sequence[int], growth: pd.DataFrame | None) -> int:
    """Return how many doublings make the input larger than every RF in the layer growth (at least one)."""
    if growth is None or growth.empty:
        return 1
    widest = [int(growth[f"{a}_rf"].max()) + 2 for a in positions_mod.axis_names(len(spatial))]
    return max(1, *(math.ceil(math.log2(max(w / n, 1.0))) for w, n in zip(widest, spatial)))


def local_sweep(model: nn.Module, job: Job, main: SweepResult, geometry: SweepResult | None,
                global_ops: Sequence[analysis.GlobalOp] = ()) -> SweepResult | None:
    """Sweep the geometry positions with global-context paths held constant, when every RF is the whole input
    or a global operation was found."""
    if not global_ops and not analysis.is_global(analysis.Boxes.of(main, geometry), main.input_spatial):
        return None
    return sweep(model, job.input_shape, analysis.geometry_positions(main.output_spatial), local=True,
                 **sweep_options(job))


def global_context(model: nn.Module, job: Job, main: SweepResult) -> tuple[analysis.GlobalOp, ...]:
    """Find the global operations the analysed output depends on (one forward and backward pass).

    A global operation on the path gives every output position the same RF box (all that its input
    feature map sees), so they are looked for only when every swept position has one box.
    """
    if not analysis.one_box(analysis.Boxes.of(main)):
        return ()
    return context.global_ops(model, job.input_shape, target=Target(job.spec.layer, job.spec.output),
                              device=job.options.device, seed=job.options.seed)


def layer_frame(model: nn.Module, job: Job, global_context: bool = False) -> pd.DataFrame:
    """Return the per-layer RF growth of a job's model: the architecture's, so always structural."""
    return layers.layer_growth(model, job.input_shape, layers=job.spec.layers, mode="structural",
                               device=job.options.device, seed=job.options.seed, layout=job.spec.layout,
                               global_context=global_context)


def effective(model: nn.Module, job: Job, main: SweepResult) -> erf.ErfResult | None:
    """Measure the effective RF when the spec asks for it, reusing the main sweep's RF boxes."""
    if job.spec.erf is None:
        return None
    settings = dict(job.spec.erf)
    chosen = settings.pop("positions", "center")
    options = sweep_options(job)
    del options["mode"]
    return erf.effective_rf(model, job.input_shape, chosen, theoretical=main if covers(main, chosen) else None,
                            **settings, **options)


def run_job(job: Job, advance: Advance | None = None, main: SweepResult | None = None) -> JobResult:
    """Run one job; any exception becomes a failed result with a one-line error, never a raise.

    `main` is the job's main sweep when it was computed elsewhere (merged from chunks).
    """
    started = time.perf_counter()
    logger.debug("%s: started", job.slug)
    try:
        return _complete(job, advance, main, started)
    except Exception as exc:  # a job must never take the run down: import errors, OOM, bugs in user models
        logger.debug("%s: traceback", job.slug, exc_info=True)
        return failed_result(job, exc, time.perf_counter() - started)


@dataclass(frozen=True)
class Computed:
    """Everything computed for one job: the main and geometry sweeps, the analysis and the ERF."""

    main: SweepResult
    geometry: SweepResult | None
    analysed: analysis.Analysis
    erf_result: erf.ErfResult | None


def attention_record(model: nn.Module, job: Job) -> dict | None:
    """Find the model's attention modules and sweep how far RFs reach around them; None without attention."""
    with timed(job, "attention"):
        try:
            calls = attention.detect(model, job.input_shape)
        except RfReportError:
            logger.debug("%s: no attention findings", job.slug, exc_info=True)
            return None
        if not calls:
            return None

        def rf_of(layer: str, layout: str) -> tuple[list[int], bool] | None:
            try:
                found = sweep(model, job.input_shape, "center", **(sweep_options(job) | {
                    "layer": layer, "output": None, "layout": layout}))
            except RfReportError:
                logger.debug("%s: no RF for attention block %s", job.slug, layer, exc_info=True)
                return None
            return found.size[0].tolist(), analysis.is_global(analysis.Boxes.of(found), found.input_spatial)

        return attention.reach(calls, rf_of, job.input_shape[2:], str(parse_layout(job.spec.layout)))


def compute(model: nn.Module, job: Job, advance: Advance | None = None, main: SweepResult | None = None, *,
            growth: bool = True, attention_found: dict | None = None, known: pd.DataFrame | None = None) -> Computed:
    """Run the compute stages of a job on a built model; `growth` adds the per-layer RF growth, `attention_found`
    is the job's attention record (attention_record) for the findings, `known` a layer growth already measured
    (a level's model's) whose exact rows spare enlarged sweeps."""
    with timed(job, "main sweep"):
        main = main or main_sweep(model, job, None, advance)
    with timed(job, "global context"):
        found_ops = global_context(model, job, main)
    with timed(job, "local sweep and composed geometry"):
        # swept corners that see everything: the local sweep first, it tells global context (no fit helps)
        spans = covers(main, "corners") and analysis.is_global(analysis.Boxes.of(main), main.input_spatial)
        local = local_sweep(model, job, main, None, found_ops) if spans or found_ops else None
        found = None if context_bound(local) else composed_geometry(model, job, main, None)
        composed = exact_axes(found)
        pooled = found is not None and found.pooled  # global pooling on the way: no larger input helps
    with timed(job, "layer growth"):
        growth_frame = layer_frame(model, job, context_bound(local) or pooled) if growth else None
    with timed(job, "geometry and local sweeps"):
        geometry = geometry_sweep(model, job, main, corners_only=composed is not None)
        local = local or local_sweep(model, job, main, geometry, found_ops)
        grown = None if composed or pooled or context_bound(local) else grown_geometry(
            model, job, main, geometry, growth_frame if growth_frame is not None else known)
        enlarged = None if composed or grown or pooled or context_bound(local) else enlarged_sweep(
            model, job, main, geometry, growth_frame)
    result = analysis.analyze(main, geometry=geometry, local=local, layers=growth_frame, enlarged=enlarged,
                              composed=composed or grown, global_ops=found_ops,
                              attention=attention.with_context(attention_found, found_ops))
    with timed(job, "effective RF"):
        measured = effective(model, job, main)
    return Computed(main, geometry, result, measured)


@contextmanager
def timed(job: Job, stage: str) -> Iterator[None]:
    """Log how long a stage of a job took: in log.txt, and on the console when it was slow."""
    with progress.stage(f"{job.slug}: {stage}"):
        yield


def level_job(job: Job, level: Level) -> Job:
    """Return the job that analyses one level: its own target, the centre (plus the fit's positions), no ERF."""
    spec = replace(job.spec, layer=level.layer, output=level.output, layout=level.layout or job.spec.layout,
                   positions="center", erf=None, levels=(), audit={})
    return replace(job, spec=spec)


def level_records(model: nn.Module, job: Job, done: Computed) -> list[dict]:
    """Analyse every level of a job as a sweep with its own target (the job's own target is reused)."""
    records = []
    for level in job.spec.levels:
        sub = level_job(job, level)
        try:
            with timed(job, f"level {level.name}"):
                same = (sub.spec.layer, sub.spec.output, sub.spec.layout) == (job.spec.layer, job.spec.output,
                                                                              job.spec.layout)
                # one sweep of the centre and the fit's positions, so compute() needs no planning or geometry sweep;
                # the centre is checked on the model (LEVEL_CHECKS), and the level's record says so
                first = None if same else sweep(model, sub.input_shape, analysis.geometry_positions,
                                                verify=LEVEL_CHECKS if job.spec.verify else 0, **sweep_options(sub))
                computed = done if same else compute(model, sub, main=first, growth=False, known=(
                    done.analysed.layers if sub.spec.layout == job.spec.layout else None))
        except RfReportError as exc:
            raise SweepError(f"level {level.name!r}: {one_line(exc)}") from exc
        records.append(levels.record(level, computed.analysed, computed.main.output_shape, computed.main.target))
    return records


def _complete(job: Job, advance: Advance | None, main: SweepResult | None, started: float) -> JobResult:
    """Build the model and return the job's cached result, or run every stage, assemble and cache its result."""
    model = models.build(job.spec)
    slot = cache.slot(model, job)
    if (hit := slot.load()) is not None:
        return JobResult(name=job.spec.name, slug=job.slug, seconds=time.perf_counter() - started, cached=True,
                         frames=hit.frames, arrays=hit.arrays, **hit.values)
    done = compute(model, job, advance, main, attention_found=attention_record(model, job))
    main, result, measured = done.main, done.analysed, done.erf_result
    records = level_records(model, job, done)
    pyramid = {"levels": records, **levels.aggregate(records)} if records else {}
    named_frames = {"positions": frames.positions_frame(main), "edges": result.positions,
                    "geometry": result.geometry, "layers": result.layers,
                    "levels": levels.frame(records, main.ndim) if records else None,
                    "erf": measured.metrics if measured else None}
    arrays = {"coverage": result.coverage, "masks": main.masks, "erf_maps": measured.maps if measured else None}
    result = JobResult(
        name=job.spec.name, slug=job.slug, input_shape=tuple(job.input_shape), output_shape=tuple(main.output_shape),
        status="ok", error=None, mode=main.mode, target=main.target, seconds=time.perf_counter() - started,
        summary=dict(result.summary) | (measured.summary() if measured else {}) | pyramid,
        findings=tuple(asdict(f) for f in result.findings) + tuple(levels.findings(records)),
        frames={k: v for k, v in named_frames.items() if v is not None},
        arrays={k: v for k, v in arrays.items() if v is not None and (not isinstance(v, dict) or v)})
    slot.save_result(result)
    return result


def inspect(job: Job, advance: Advance | None = None) -> dict:
    """Return the JSON record of `rfreport inspect --json` for one job: cached, or swept without layer growth."""
    model = models.build(job.spec)
    slot = cache.slot(model, job, "inspect")
    if (hit := slot.load()) is not None:
        return hit.values | {"cached": True}
    record = inspect_record(model, job, advance)
    slot.save(record)
    return record | {"cached": False}


def inspect_record(model: nn.Module, job: Job, advance: Advance | None = None) -> dict:
    """Sweep one job's model without layer growth and return its inspect record."""
    found = attention_record(model, job)
    done = compute(model, job, advance, growth=False, attention_found=found)
    summary, frame = done.analysed.summary, done.analysed.positions
    letters = positions_mod.axis_names(done.main.ndim)

    def axes(template: str, row: Any) -> list[int]:
        return [int(getattr(row, template.format(a))) for a in letters]

    checked = {tuple(pos): (bool(flag), int(count)) for pos, flag, count
               in zip(done.main.positions.tolist(), done.main.verified, done.main.violations)}

    def record_of(row: Any) -> dict:
        verified, violations = checked[tuple(axes("pos_{}", row))]
        return {"pos": axes("pos_{}", row), "lo": axes("{}_lo", row), "hi": axes("{}_hi", row),
                "size": axes("{}_size", row), "support": int(row.support), "fill": float(row.fill),
                "edge": bool(row.edge), "verified": verified, "violations": violations}

    rows = [record_of(row) for row in frame.itertuples(index=False)]
    geometry = {"size": summary["rf_size"], "stride": summary["stride"], "padding": summary["padding"],
                "center_offset": summary["center_offset"], "affine": summary["affine"], "global": summary["global"],
                **geometry_status(done.analysed.geometry, summary)}
    record = {"model": job.spec.name, "input_shape": list(job.input_shape),
              "output_shape": list(done.main.output_shape), "mode": job.spec.mode, "positions": rows,
              "geometry": geometry, "verified": summary["verified"], "violations": summary["violations"],
              "exact": not summary["violations"]}
    if job.spec.levels:
        record["levels"] = level_records(model, job, done)
    if summary["attention"] is not None:
        record["attention"] = summary["attention"]
    if done.erf_result is not None:
        record["erf"] = json.loads(done.erf_result.metrics.to_json(orient="records"))
    return record


def geometry_status(geo: pd.DataFrame, summary: dict) -> dict:
    """Return how exact an inspect geometry is: the fit kind per axis, the ops that make it depend on the input
    size, and why it is estimated (axis: reason; None when every axis is exact)."""
    inexact = geo.loc[~geo["fit"].isin(analysis.EXACT_FITS)]
    reasons = "; ".join(f"{axis}: {problem}" for axis, problem in zip(inexact["axis"], inexact["problem"]))
    return {"fit": geo["fit"].tolist(), "size_dependent": summary["size_dependent"], "estimated": reasons or None}


def one_line(exc: BaseException) -> str:
    """Return an exception as one line: our own messages as they are, others prefixed with their type."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(exc, RfReportError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def failed_result(job: Job, exc: BaseException, seconds: float) -> JobResult:
    """Return the result of a job that raised."""
    target = Target(job.spec.layer, job.spec.output, parse_layout(job.spec.layout)).describe()
    return JobResult(name=job.spec.name, slug=job.slug, input_shape=tuple(job.input_shape), output_shape=None,
                     status="failed", error=one_line(exc), mode=job.spec.mode, target=target, seconds=seconds)


def entry(job: Job, result: JobResult) -> dict:
    """Return the summary.json entry of a job: its result's values, summary, findings and audit."""
    values = {"name": result.name, "slug": result.slug, "input_shape": list(result.input_shape),
              "output_shape": list(result.output_shape) if result.output_shape else None,
              "status": result.status, "error": result.error, "mode": result.mode, "target": result.target,
              "seconds": round(result.seconds, 3), "image": str(job.spec.image) if job.spec.image else None,
              "spec": spec_record(job), **result.summary, "findings": list(result.findings),
              "cached": result.cached}
    checks = audit.evaluate(job.spec.audit, values)
    if result.status == "ok":
        checks += levels.audit_rows(job.spec.levels, values.get("levels") or [])
    return {**values, "audit": checks}


def spec_record(job: Job) -> dict:
    """Return what a job was asked to compute, as JSON values: how the model is built and what is analysed.

    Stored under `spec` in each summary.json entry, so `rfreport diff` can show what changed.
    """
    spec = job.spec
    return {"factory": spec.factory, "kwargs": dict(spec.kwargs), "input_shape": list(job.input_shape),
            "layer": spec.layer, "output": spec.output, "mode": spec.mode,
            "positions": spec.positions if isinstance(spec.positions, str) else [
                p if isinstance(p, str) else list(p) for p in spec.positions],
            "checkpoint": str(spec.checkpoint) if spec.checkpoint else None, "audit": dict(spec.audit)}


def outputs(jobs: Sequence[Job], executor: Executor) -> Iterator[runfolder.ModelOutput]:
    """Run the jobs through the executor and yield what the run folder stores for each."""
    for job, result in zip(jobs, executor.map(jobs), strict=True):
        if result.status == "ok":
            logger.info("%s: ok in %.1f s", result.slug, result.seconds)
        else:
            logger.error("%s: failed: %s", result.slug, result.error)
        yield runfolder.ModelOutput(entry(job, result), result.frames, result.arrays)


def run_meta(config: RunConfig, argv: Sequence[str]) -> dict:
    """Return the `run` object of summary.json as the run starts (an unavailable device fails here, early)."""
    return {"config_files": [str(p) for p in config.files],
            "versions": {"rfreport": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "device": str(resolve_device(config.options.device)),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "seed": config.options.seed, "executor": config.options.executor, "argv": list(argv)}


@contextmanager
def log_to(path: Path) -> Iterator[None]:
    """Copy every rfreport log record (tracebacks of failed jobs included) into a file during the block."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def run(config: RunConfig, out_dir: str | Path, executor: Executor, *, assets_dir: str | Path | None = None,
        argv: Sequence[str] = ()) -> runfolder.Run:
    """Run every job of a config through the executor and write the run folder with its report atomically.

    A relative `assets_dir` is a folder inside the run folder for the report's figures and stylesheet.
    """
    from rfreport import report  # matplotlib and Jinja2 load only when a report is written, not for inspect
    started, meta, jobs = time.perf_counter(), run_meta(config, argv), make_jobs(config)
    with runfolder.staged(Path(out_dir)) as staging, log_to(staging / runfolder.LOG):
        logger.info("run of %d job(s) from %s: %s", len(jobs), ", ".join(map(str, config.files)), " ".join(argv))
        entries = [runfolder.write_model(staging, output) for output in outputs(jobs, executor)]
        meta["duration_s"] = round(time.perf_counter() - started, 3)
        meta["cache"] = cache.describe(config.options, entries)
        runfolder.write_summary(staging, meta, entries)
        assets = staging / assets_dir if assets_dir is not None else None
        progress.announce("rendering the report of %d job(s)", len(entries))
        with progress.stage("rendering the report", slow_s=0.0):
            report.render(runfolder.load(staging), staging / "index.html", assets_dir=assets)
    return runfolder.load(out_dir)
