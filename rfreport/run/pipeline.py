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
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from rfreport import __version__, audit, runfolder
from rfreport import positions as positions_mod
from rfreport.analysis import frames, levels
from rfreport.analysis.analyze import Analysis
from rfreport.analysis.layertable import layer_rows
from rfreport.compute import models, verify
from rfreport.compute.engine import resolve_device
from rfreport.compute.surrogate import surrogates_reused
from rfreport.compute.sweep import sweep
from rfreport.config import Level, RunConfig
from rfreport.errors import RfReportError, SweepError, one_line
from rfreport.options import EXACT_FITS, Status
from rfreport.results import SweepResult
from rfreport.run import cache, limits, plan, progress, threads
from rfreport.run.jobs import Advance, Executor, Job, JobResult, make_jobs
from rfreport.summary import Pyramid, Summary, build

logger = logging.getLogger("rfreport")
T = TypeVar("T")
LEVEL_CHECKS = 1               # positions of a level's sweep checked on the model: the one nearest its centre


def run_job(job: Job, advance: Advance | None = None, main: SweepResult | None = None, *,
            spent: float = 0.0) -> JobResult:
    """Run one job; anything it raises becomes a failed result with a one-line error, never a raise.

    `main` is the job's main sweep when it was computed elsewhere (merged from chunks); `spent` the
    seconds the job already took elsewhere (building, planning and that main sweep, on a Ray worker),
    counted in its `seconds` so that every executor accounts for the same stages.
    """
    return attempt(job, lambda started: _complete(job, advance, main, started), spent)


def attempt(job: Job, work: Callable[[float], T], spent: float = 0.0) -> T | JobResult:
    """Run a job's work within its time limit and return its value, or the job's failed result if it raised.

    `work` gets the job's start time (`perf_counter`, `spent` seconds ago). Whatever the model's own
    code raises fails the job, `SystemExit` and `GeneratorExit` included (they are no Exception) and
    the job's timeout: a job must never take the run down, nor end it with no verdicts.
    KeyboardInterrupt stays an interrupt.
    """
    started = time.perf_counter() - spent
    logger.debug("%s: started", job.slug)
    try:
        with limits.time_limit(job.spec.name, job.time_limit):
            return work(started)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # import errors, OOM, bugs in user models, sys.exit(), endless loops
        logger.debug("%s: traceback", job.slug, exc_info=True)
        return failed_result(job, exc, time.perf_counter() - started)


def level_job(job: Job, level: Level) -> Job:
    """Return the job that analyses one level: its own target, the centre (plus the fit's positions), no ERF."""
    spec = replace(job.spec, layer=level.layer, output=level.output, layout=level.layout or job.spec.layout,
                   positions="center", erf=None, levels=(), audit={})
    return replace(job, spec=spec)


def level_records(model: nn.Module, job: Job, measured: plan.Measurements, analysed: Analysis) -> list[dict]:
    """Measure and analyse every level of a job with its own target (the job's own target is reused)."""
    records = []
    for level in job.spec.levels:
        sub = level_job(job, level)
        try:
            with plan.timed(job, f"level {level.name}"):
                same = (sub.spec.layer, sub.spec.output, sub.spec.layout) == (job.spec.layer, job.spec.output,
                                                                              job.spec.layout)
                # one sweep of the centre and the fit's positions as the first pass: no geometry sweep after it;
                # the centre is checked on the model (LEVEL_CHECKS), and the level's record says so
                first = None if same else sweep(model, sub.input_shape, plan.geometry_positions,
                                                verify=LEVEL_CHECKS if job.spec.verify else 0,
                                                **plan.sweep_options(sub))
                found = measured if same else plan.measure(model, sub, main=first, growth=False, known=(
                    measured.growth if sub.spec.layout == job.spec.layout else None))
                found_analysed = analysed if same else found.analyse()
        except RfReportError as exc:
            raise SweepError(f"level {level.name!r}: {one_line(exc)}") from exc
        records.append(levels.record(level, found_analysed, found.main.output_shape, found.main.target))
    return records


def _complete(job: Job, advance: Advance | None, main: SweepResult | None, started: float) -> JobResult:
    """Build the model and return the job's cached result, or run every stage, assemble and cache its result."""
    model = models.build(job.spec)
    with plan.timed(job, "cache lookup"):
        slot = cache.slot(model, job)
        cached = slot.load(lambda hit: cached_result(job, hit, started))
    if cached is not None:
        return cached
    with prepared(model, job):
        measurements = plan.measure(model, job, advance, main, find_attention=True)
        main, result, measured = measurements.main, measurements.analyse(), measurements.erf
        records = level_records(model, job, measurements, result)
    pyramid = build(Pyramid, {"levels": records, **levels.aggregate(records)}) if records else None
    named_frames = {"positions": frames.positions_frame(main), "edges": result.positions,
                    "geometry": result.geometry, "layers": result.layers,
                    "levels": levels.frame(records, main.ndim) if records else None,
                    "erf": measured.metrics if measured else None}
    arrays = {"coverage": result.coverage, "masks": main.masks, "erf_maps": measured.maps if measured else None}
    result = JobResult(
        name=job.spec.name, slug=job.slug, input_shape=tuple(job.input_shape), output_shape=tuple(main.output_shape),
        status=Status.OK, error=None, mode=main.mode, target=main.target, seconds=time.perf_counter() - started,
        summary=replace(result.summary, erf=measured.summary() if measured else None, pyramid=pyramid),
        findings=tuple(asdict(f) for f in result.findings) + tuple(levels.findings(records)),
        frames={k: v for k, v in named_frames.items() if v is not None},
        arrays={k: v for k, v in arrays.items() if v is not None and (not isinstance(v, dict) or v)})
    slot.save_result(result)
    return result


@contextmanager
def prepared(model: nn.Module, job: Job) -> Iterator[None]:
    """Run a job's passes on one surrogate of its model (see surrogates_reused), on one thread where its ops
    are small (see threads.sized_to)."""
    with surrogates_reused(), threads.sized_to(lambda: verify.reads(model, job.input_shape, plan.target_of(job)).grain):
        yield


def cached_result(job: Job, hit: cache.Hit, started: float) -> JobResult:
    """Return a job's result from its cache entry; raise on stored values a JobResult or Summary cannot hold."""
    values = hit.values | {"status": Status(hit.values["status"]), "summary": Summary.from_json(hit.values["summary"])}
    if values["status"] != Status.OK:
        raise ValueError(f"a cached result of status {values['status']}")
    return JobResult(name=job.spec.name, slug=job.slug, seconds=time.perf_counter() - started, cached=True,
                     frames=hit.frames, arrays=hit.arrays, **values)


def inspect(job: Job, advance: Advance | None = None, layers: bool = False) -> dict:
    """Return the JSON record of `rfreport inspect --json` for one job: cached, or swept (with the per-layer table
    when `layers`, else without layer growth)."""
    model = models.build(job.spec)
    slot = cache.slot(model, job, "inspect-layers" if layers else "inspect")
    if (record := slot.load(lambda hit: hit.values | {"cached": True})) is not None:
        return record
    with prepared(model, job):
        record = inspect_record(model, job, advance, layers)
    slot.save(record)
    return record | {"cached": False}


def inspect_record(model: nn.Module, job: Job, advance: Advance | None = None, layers: bool = False) -> dict:
    """Sweep one job's model (with layer growth when `layers`) and return its inspect record."""
    measured = plan.measure(model, job, advance, growth=layers, find_attention=True)
    analysed = measured.analyse()
    summary, main = analysed.summary, measured.main
    rows = position_records(analysed.positions, main)
    geometry = {"arch_rf_size": list(summary.arch_rf_size) if summary.arch_rf_size is not None else None,
                "in_input_rf_size": list(summary.in_input_rf_size), "stride": list(summary.stride),
                "padding": list(summary.padding), "center_offset": list(summary.center_offset),
                "affine": summary.affine, "global": summary.global_context,
                "global_from": summary.global_from, "global_op": summary.global_op,
                **geometry_status(analysed.geometry, summary)}
    if summary.nonaffine:
        geometry |= {"resolution_stride": list(summary.resolution_stride),
                     "rf_size_range": [list(pair) for pair in zip(summary.position_rf_min or (),
                                                                  summary.position_rf_max or ())]}
    record = {"model": job.spec.name, "input_shape": list(job.input_shape),
              "output_shape": list(main.output_shape), "mode": job.spec.mode, "positions": rows,
              "geometry": geometry, "verified": summary.verified, "violations": summary.violations,
              "exact": summary.exact if job.spec.mode == "structural" else None}
    if measured.growth is not None:
        record["layers"] = [row.to_json() for row in layer_rows(measured.growth)]
    if job.spec.levels:
        record["levels"] = level_records(model, job, measured, analysed)
    if summary.attention is not None:
        record["attention"] = summary.attention
    if measured.erf is not None:
        record["erf"] = json.loads(measured.erf.metrics.to_json(orient="records"))
    return record


def position_records(frame: pd.DataFrame, main: SweepResult) -> list[dict]:
    """Return one `inspect --json` record per swept position (column by column: an FCN has 65,536 of them)."""
    letters = positions_mod.axis_names(main.ndim)

    def axes(template: str) -> list[list[int]]:
        return frame[[template.format(a) for a in letters]].to_numpy(dtype=np.int64).tolist()

    checked = {tuple(pos): (bool(flag), int(count)) for pos, flag, count
               in zip(main.positions.tolist(), main.verified, main.violations)}
    wraps = frame[[f"{a}_wrap" for a in letters]].to_numpy(dtype=bool).tolist()
    records = []
    for pos, lo, hi, wrap, size, support, fill, edge in zip(
            axes("pos_{}"), axes("{}_lo"), axes("{}_hi"), wraps, axes("{}_size"), frame["support"].tolist(),
            frame["fill"].tolist(), frame["edge"].tolist()):
        verified, violations = checked[tuple(pos)]
        records.append({"pos": pos, "lo": lo, "hi": hi, "wrap": wrap, "size": size, "support": int(support),
                        "fill": float(fill), "edge": bool(edge), "verified": verified, "violations": violations})
    return records


def geometry_status(geo: pd.DataFrame, summary: Summary) -> dict:
    """Return how exact an inspect geometry is: the fit kind per axis (of the architecture RF), the ops that make
    it depend on the input size, and why it is estimated (axis: reason; None when every axis is exact)."""
    inexact = geo.loc[~geo["fit"].isin(EXACT_FITS)]
    reasons = "; ".join(f"{axis}: {problem}" for axis, problem in zip(inexact["axis"], inexact["problem"]))
    size_dependent = list(summary.size_dependent) if summary.size_dependent else None
    return {"arch_rf_fit": geo["fit"].tolist(), "size_dependent": size_dependent, "estimated": reasons or None}


def failed_result(job: Job, exc: BaseException, seconds: float) -> JobResult:
    """Return the result of a job that raised."""
    target = plan.target_of(job).describe()
    return JobResult(name=job.spec.name, slug=job.slug, input_shape=tuple(job.input_shape), output_shape=None,
                     status=Status.FAILED, error=one_line(exc), mode=job.spec.mode, target=target, seconds=seconds)


def entry(job: Job, result: JobResult) -> dict:
    """Return the summary.json entry of a job: its result's values, summary, findings and audit."""
    values = {"name": result.name, "slug": result.slug, "input_shape": list(result.input_shape),
              "output_shape": list(result.output_shape) if result.output_shape else None,
              "status": result.status, "error": result.error, "mode": result.mode, "target": result.target,
              "seconds": round(result.seconds, 3), "image": str(job.spec.image) if job.spec.image else None,
              "spec": spec_record(job), **(result.summary.to_json() if result.summary else {}),
              "findings": list(result.findings),
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
            logger.info("%s: ok in %.1f s", result.slug, result.seconds, extra=progress.JOB_STATUS)
        else:
            logger.error("%s: failed: %s", result.slug, result.error, extra=progress.JOB_STATUS)
        yield runfolder.ModelOutput(entry(job, result), result.frames, result.arrays)


def run_meta(config: RunConfig, argv: Sequence[str]) -> dict:
    """Return the `run` object of summary.json as the run starts (an unavailable device fails here, early)."""
    return {"config_files": [str(p) for p in config.files],
            "versions": {"rfreport": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "device": str(resolve_device(config.options.device)),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "seed": config.options.seed, "executor": config.options.executor, "argv": list(argv)}


class RunLog(logging.FileHandler):
    """The handler of a run's log.txt: a failed write (a full disk) is kept to be raised once, never printed."""

    error: OSError | None = None

    def handleError(self, record: logging.LogRecord) -> None:
        """Keep the first OSError of a write; let logging report anything else."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
        elif self.error is None:
            self.error = exc


@contextmanager
def log_to(path: Path) -> Iterator[None]:
    """Copy every rfreport log record (tracebacks of failed jobs included) into a file during the block.

    A write that failed (a full disk) is raised as its OSError when the block ends.
    """
    handler = RunLog(path, encoding="utf-8")
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
    if handler.error is not None:
        raise handler.error


def run(config: RunConfig, out_dir: str | Path, executor: Executor, *, assets_dir: str | Path | None = None,
        argv: Sequence[str] = ()) -> runfolder.Run:
    """Run every job of a config through the executor and write the run folder with its report atomically.

    A relative `assets_dir` is a folder inside the run folder for the report's figures and stylesheet.
    """
    from rfreport.report import render as report
    if assets_dir is not None:
        runfolder.assets_folder(Path(out_dir), assets_dir)   # refuse `..` or an absolute path before any job runs
    started, meta, jobs = time.perf_counter(), run_meta(config, argv), make_jobs(config)
    with runfolder.staged(Path(out_dir)) as staging, log_to(staging / runfolder.LOG):
        logger.info("run of %d job(s) from %s: %s", len(jobs), ", ".join(map(str, config.files)), " ".join(argv))
        entries = [runfolder.write_model(staging, output) for output in outputs(jobs, executor)]
        meta["duration_s"] = round(time.perf_counter() - started, 3)
        meta["cache"] = cache.describe(config.options, entries)
        runfolder.write_summary(staging, meta, entries)
        assets = runfolder.assets_folder(staging, assets_dir) if assets_dir is not None else None
        progress.announce("rendering the report of %d job(s)", len(entries))
        with progress.stage("rendering the report", slow_s=0.0):
            report.render(runfolder.load(staging), staging / "index.html", assets_dir=assets)
    with runfolder.interrupt_deferred(f"the run was written to {out_dir}"):
        return runfolder.load(out_dir)
