"""The `rfreport` command line: thin click commands over the pipeline, run folders, audits and diffs.

RfReportError is turned into a one-line `Error: ...` here and nowhere else: exit code 2 for
usage, config and run-folder errors and for outputs that cannot be written (no permission, a
full disk, another run writing the same folder), 1 for everything that failed while running,
130 for Ctrl-C (a run folder being written is discarded, the old one left as it was). Each command
imports what it needs when it runs: torch only in the commands that compute (so `report`,
`check RUN_DIR` and `diff` never import it), pandas with the run folder, matplotlib and Jinja2
only where a report is rendered (never for `inspect`); tests/test_imports.py checks it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from rfreport import __version__
from rfreport import audit as audit_mod
from rfreport.atomic import write_file
from rfreport.config import SEED_MAX
from rfreport.errors import ConfigError, OutputError, RfReportError, RunFolderError, SweepError, Terminated
from rfreport.layouts import parse_layout
from rfreport.options import Mode, values
from rfreport.run.progress import is_job_status, is_progress, stage
from rfreport.summary import per_axis
from rfreport.visible import visible

USAGE_ERRORS = (ConfigError, RunFolderError, OutputError)
INTERRUPTED = 130   # the shell's exit status for SIGINT
TERMINATED = 143    # and for SIGTERM
EXACT_DIGITS = 12   # significant digits of exact per-layer values (halves and thirds of pixels print in full)


class ConsoleFormatter(logging.Formatter):
    """Prefix log records with their level; progress lines stay bare."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record for stderr."""
        text = super().format(record)
        return text if is_progress(record) else f"{record.levelname} {text}"


CONSOLE = logging.StreamHandler()
CONSOLE.setFormatter(ConsoleFormatter("%(message)s"))


class CommandError(click.ClickException):
    """A one-line error with its own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def converts_errors(command: Callable) -> Callable:
    """Turn RfReportError raised by a command into a one-line message and exit code 2 or 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as exc:   # one raised after a write says so (runfolder.interrupt_deferred)
            done = exc.args[0] if exc.args else "nothing was written"
            if isinstance(exc, Terminated):
                raise CommandError(f"terminated; {done}", TERMINATED) from exc
            raise CommandError(f"interrupted; {done}", INTERRUPTED) from exc
        except RfReportError as exc:
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            raise CommandError(lines[0], 2 if isinstance(exc, USAGE_ERRORS) else 1) from exc
    return wrapper


class ConsoleFilter(logging.Filter):
    """Pass records at or above the chosen level, and progress lines unless -q; a job's outcome only with -q (else
    the progress display's status line of the job says it, once)."""

    def __init__(self):
        super().__init__()
        self.level, self.progress = logging.WARNING, True

    def filter(self, record: logging.LogRecord) -> bool:
        """Tell whether the console shows a record."""
        if self.progress and is_job_status(record):
            return False
        return record.levelno >= self.level or (self.progress and is_progress(record))


CONSOLE_FILTER = ConsoleFilter()
CONSOLE.addFilter(CONSOLE_FILTER)


def configure_logging(verbose: int, quiet: bool) -> None:
    """Send rfreport's log to stderr: warnings and progress lines by default, info with -v, debug with -vv,
    errors only with -q."""
    CONSOLE.setStream(sys.stderr)  # click's test runner swaps sys.stderr per invocation
    CONSOLE_FILTER.level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    CONSOLE_FILTER.progress = not quiet
    logger = logging.getLogger("rfreport")
    if CONSOLE not in logger.handlers:
        logger.addHandler(CONSOLE)
    logger.setLevel(min(CONSOLE_FILTER.level, logging.INFO if not quiet else logging.ERROR))
    logger.propagate = False


def verbosity(command: Callable) -> Callable:
    """Add -v/--verbose and -q/--quiet."""
    command = click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")(command)
    return click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")(command)


def sweep_flags(configured: bool) -> Callable[[Callable], Callable]:
    """Return a decorator adding the shared options of the commands that sweep: device, batch size, seed, ERF, cache
    and verbosity (`configured`: the command reads configs, whose options are the defaults)."""
    return functools.partial(_add_sweep_flags, device_default="the config's, else auto" if configured else "auto")


def _add_sweep_flags(command: Callable, device_default: str) -> Callable:
    """Add the shared sweep options to a command."""
    flags = [
        click.option("--device", default=None, help=f"auto, cpu, cuda, cuda:1, ... (default: {device_default})."),
        click.option("--batch-size", default=None, help="Positions per backward pass: a positive integer or auto."),
        click.option("--seed", type=click.IntRange(0, SEED_MAX), default=None,
                     help="Seed of the random probe inputs (default: 0)."),
        click.option("--erf-samples", type=click.IntRange(min=1), default=None,
                     help="Measure the effective RF with this many random inputs (enables ERF)."),
        click.option("--erf-positions", multiple=True, metavar="SPEC",
                     help="Positions for the ERF: center, corners, edges, grid:K or H,W (repeatable; enables ERF)."),
        click.option("--no-cache", is_flag=True, help="Neither reuse nor store results in the incremental cache."),
        click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                     help="Cache folder (default: $RFREPORT_CACHE_DIR, else ~/.cache/rfreport)."),
    ]
    for flag in reversed(flags):
        command = flag(command)
    return verbosity(command)


def parse_position(text: str) -> str | tuple[int, ...]:
    """Parse one position argument: a selection name (center, grid:4, ...) or comma-separated coordinates."""
    if not text.replace(",", "").replace(" ", "").lstrip("-").isdigit():
        return text
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} is not a list of integer coordinates like 4,8") from exc


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse an input shape like 1,3,224,224: N, C and one to three spatial sizes, all positive."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} must be comma-separated integers like 1,3,224,224") from exc
    if len(shape) not in (3, 4, 5) or min(shape) < 1:
        raise click.BadParameter(f"{text!r} must be N,C and 1 to 3 spatial sizes, all positive, like 1,3,224,224")
    return shape


def parse_count(text: str | None, flag: str) -> int | str | None:
    """Parse a flag taking a positive integer or auto (--batch-size, --workers)."""
    if text is None or text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise click.BadParameter(f"{text!r} must be a positive integer or auto", param_hint=flag)
    return int(text)


def erf_overrides(samples: int | None, chosen: Sequence[str]) -> dict[str, Any]:
    """Return the ERF settings the flags ask for (empty when neither flag is given)."""
    settings: dict[str, Any] = {}
    if samples is not None:
        settings["samples"] = samples
    if chosen:
        settings["positions"] = [parse_position(text) for text in chosen]
    return settings


def job_flags(command: Callable) -> Callable:
    """Add --job-timeout and --workers (run and check: the commands that run jobs)."""
    command = click.option("--workers", default=None, metavar="N|auto",
                           help="Run jobs side by side in N worker processes (1: one after another in this "
                                "process; auto: one per idle CPU, at most one per job; default: the config's "
                                "workers, else auto). Local executor only.")(command)
    return click.option("--job-timeout", type=click.FloatRange(0, min_open=True), default=None, metavar="SECONDS",
                        help="Fail a job that runs longer than this, naming its model and stage "
                             "(default: the config's job_timeout, else none).")(command)


def load_config(paths: Sequence[str], *, device: str | None, batch_size: str | None, seed: int | None,
                erf_samples: int | None, erf_positions: Sequence[str], no_cache: bool = False,
                cache_dir: str | None = None, executor: str | None = None, address: str | None = None,
                job_timeout: float | None = None, workers: str | None = None):
    """Load configs, apply the command-line overrides of the run options and ERF settings, check the device."""
    from rfreport import config as config_mod

    loaded = config_mod.load(paths)
    given = {"device": device, "batch_size": parse_count(batch_size, "--batch-size"), "seed": seed,
             "executor": executor, "address": address, "cache": False if no_cache else None, "cache_dir": cache_dir,
             "job_timeout": job_timeout, "workers": parse_count(workers, "--workers")}
    options = replace(loaded.options, **{k: v for k, v in given.items() if v is not None})
    erf = erf_overrides(erf_samples, erf_positions)
    specs = tuple(replace(spec, erf={**(spec.erf or {}), **erf}) if erf else spec for spec in loaded.models)
    config = replace(loaded, models=specs, options=options)
    if (problem := device_problem(options.device)) is not None:   # before any job: exit 2 naming the flag or key
        raise config.option_error("device", problem, "--device" if device is not None else None)
    return config


def device_problem(device: str) -> str | None:
    """Return why a device cannot be used here (unknown, or not on this machine), or None when it can."""
    from rfreport.compute.engine import resolve_device

    try:
        resolve_device(device)
    except SweepError as exc:
        return str(exc)
    return None


class ClickProgress:
    """Progress on stderr: a line per job as it starts (with `starts`) and ends, on a terminal a bar per sweep.

    Jobs run in worker processes overlap: each end line carries the `[i/n]` label of its own job.
    """

    def __init__(self, bars: bool = True, starts: bool = True):
        self.bars, self.starts = bars, starts
        self.bar = None
        self.label = ""
        self.labels: dict[str, str] = {}   # by job slug: the label of each job started

    def start(self, job, index: int, count: int) -> None:
        """Name the job about to run: a model that hangs is named before it does."""
        self.label = self.labels[job.slug] = f"[{index + 1}/{count}] {job.slug}"
        if self.starts:
            click.echo(f"{self.label}: running", err=True)

    def advance(self, done: int, total: int) -> None:
        """Open the job's bar on its first chunk, move it to `done` positions and close it when complete."""
        if not self.bars:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_pos=True)
        self.bar.update(done - self.bar.pos)
        if done >= total:  # the later stages of the job print lines of their own
            self.close()

    def close(self) -> None:
        """Close the open bar, if any."""
        if self.bar is not None:
            self.bar.render_finish()
            self.bar = None

    def finish(self, result=None) -> None:
        """Close the job's bar and print its status, when there is a result."""
        self.close()
        if result is None:
            return
        status = "ok" if result.status == "ok" else f"FAILED: {result.error}"
        cached = ", from the cache" if result.cached else ""
        click.echo(f"{self.labels.get(result.slug, self.label)}: {status} ({result.seconds:.1f} s{cached})", err=True)


def make_progress(quiet: bool, starts: bool = True):
    """Return progress on stderr (with bars on a terminal, lines only when piped), or nothing with -q.

    `starts` adds a line as each job starts (`run` and `check`; `inspect` runs the one model it names).
    """
    from rfreport.run.jobs import Silent

    return Silent() if quiet else ClickProgress(bars=sys.stdout.isatty() and sys.stderr.isatty(), starts=starts)


def job_progress(options, quiet: bool):
    """Return the progress of a run's jobs: a line as each starts in-process (Ray reports jobs as they end)."""
    return make_progress(quiet, starts=options.executor == "local")


def make_executor(options, progress):
    """Return the executor a run's options ask for; Ray is imported only when chosen."""
    from rfreport.run.executors import LocalExecutor

    if options.executor == "local":
        return LocalExecutor(progress, options.workers)
    try:
        from rfreport.run.ray_executor import RayExecutor
    except ImportError as exc:
        raise CommandError(f"--executor ray needs Ray: pip install 'rfreport[ray]' ({exc})", 2) from exc
    return RayExecutor(address=options.address, progress=progress)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rfreport")
def cli() -> None:
    """Exact receptive fields of every output position of a convolutional network, as an HTML report."""


@cli.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to (re)write.")
@click.option("--assets-dir", default=None,
              help="Write figures and CSS into this folder of the run (a relative path inside it), not inline.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None, help="Where jobs run (default: local).")
@click.option("--address", default=None, help="Ray cluster address (with --executor ray).")
@job_flags
@sweep_flags(configured=True)
@converts_errors
def run(configs, out_dir, assets_dir, executor, address, job_timeout, workers, device, batch_size, seed, erf_samples,
        erf_positions, no_cache, cache_dir, verbose, quiet) -> None:
    """Sweep and analyse every model of the CONFIG files into a run folder with its report."""
    from rfreport import runfolder
    from rfreport.run import server
    from rfreport.run.allocator import freeze_loaded

    configure_logging(verbose, quiet)
    if executor != "ray":
        server.start_early(workers)   # its imports beside this process's own (rfreport.run.server)
    from rfreport.run import pipeline

    config = load_config(configs, device=device, batch_size=batch_size, seed=seed, erf_samples=erf_samples,
                         erf_positions=erf_positions, no_cache=no_cache, cache_dir=cache_dir, executor=executor,
                         address=address, job_timeout=job_timeout, workers=workers)
    freeze_loaded()   # torch, the stages and the configs' factories are loaded
    chosen = make_executor(config.options, job_progress(config.options, quiet))
    saved = pipeline.run(config, out_dir, chosen, assets_dir=assets_dir, argv=sys.argv)
    with runfolder.interrupt_deferred(f"the run was written to {saved.path}"):
        click.echo(str(saved.path / "index.html"))
        print_summary([model.entry for model in saved.models], quiet)
    failed = [model.slug for model in saved.models if not model.ok]
    if failed:
        raise CommandError(f"{len(failed)} of {len(saved.models)} model(s) failed ({', '.join(failed)}); "
                           f"see {saved.path / runfolder.LOG}", 1)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--assets-dir", default=None,
              help="Write figures and CSS into this folder of the run (a relative path inside it), not inline.")
@verbosity
@converts_errors
def report(run_dir, assets_dir, verbose, quiet) -> None:
    """Re-render RUN_DIR/index.html from the saved frames (no torch work)."""
    from rfreport import runfolder
    from rfreport.report import render as report_mod

    configure_logging(verbose, quiet)
    saved = runfolder.load(run_dir)
    assets = runfolder.assets_folder(saved.path, assets_dir) if assets_dir is not None else None
    with runfolder.locked(saved.path), stage("rendering the report"):
        page = report_mod.render(saved, saved.path / "index.html", assets_dir=assets)
    click.echo(str(page))


@cli.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the verdicts as JUnit XML: a testsuite per model, a testcase per rule.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as one JSON object instead of a table.")
@job_flags
@sweep_flags(configured=True)
@converts_errors
def check(sources, junit_path, as_json, job_timeout, workers, device, batch_size, seed, erf_samples, erf_positions,
          no_cache, cache_dir, verbose, quiet) -> None:
    """Evaluate the audit rules of CONFIG files (sweeping them) or of a saved RUN_DIR.

    Exit 0 when every rule passes, 1 when one fails or a job failed, 2 when there is nothing to
    check (no model, or no audit rules) or on a usage error.
    """
    configure_logging(verbose, quiet)
    entries = audited_entries(sources, quiet, device=device, batch_size=batch_size, seed=seed,
                              erf_samples=erf_samples, erf_positions=erf_positions, no_cache=no_cache,
                              cache_dir=cache_dir, job_timeout=job_timeout, workers=workers)
    if not audit_mod.checked(entries):
        raise CommandError(f"{', '.join(sources)}: nothing to check: no model has audit rules "
                           "(add a [model.audit] table)", 2)
    if junit_path is not None:
        write_file(junit_path, audit_mod.junit_xml(entries))
    if as_json:
        click.echo(json.dumps(audit_mod.verdicts_json(entries), indent=2, allow_nan=False))
    else:
        rows = [[e["slug"], r["rule"], text(r["limit"]), text(r["value"]), "pass" if r["passed"] else "FAIL",
                 r.get("note") or ""] for e in entries for r in e.get("audit") or []]
        click.echo(table(["model", "rule", "limit", "value", "result", "note"], rows))
    print_summary(entries, quiet)
    failing = [e["slug"] for e in entries if not audit_mod.passed(e.get("audit") or [])]
    if failing:
        raise CommandError(f"audit failed for {', '.join(failing)}", 1)


def verdict_text(entry: Mapping[str, Any]) -> str:
    """Return a model's verdict in a few words: job failed, FAIL and the failing rules, pass, or ok (no rules)."""
    if entry.get("status") != "ok":
        return "job failed"
    results = entry.get("audit") or []
    if not audit_mod.passed(results):
        return f"FAIL: {', '.join(audit_mod.failed_rules(results))}"
    return "pass" if results else "ok"


def arch_rf_text(entry: Mapping[str, Any]) -> str:
    """Return a model's architecture RF per axis (unbounded under global context), or `-` for a failed job."""
    if entry.get("status") != "ok":
        return "-"
    return geometry_text("arch_rf_size", entry.get("arch_rf_size"), entry.get("arch_rf_fit") or ())


def global_text(entry: Mapping[str, Any]) -> str:
    """Return whether global context reaches a model's output: yes (from its first global layer), no, or unknown."""
    found = entry.get("global")
    if found is None:
        return "unknown" if entry.get("status") == "ok" else "-"
    return ("yes" + (f" ({entry['global_from']})" if entry.get("global_from") else "")) if found else "no"


def print_summary(entries: Sequence[Mapping[str, Any]], quiet: bool) -> None:
    """Print the closing summary table of `run` and `check` on stderr (stdout stays what scripts read); not with -q."""
    if quiet or not entries:
        return
    rows = [[e["slug"], text(e["input_shape"][2:]), verdict_text(e), arch_rf_text(e), text(e.get("stride")),
             global_text(e)] for e in entries]
    click.echo(table(["model", "input", "verdict", "architecture RF", "stride", "global"], rows), err=True)


def audited_entries(sources: Sequence[str], quiet: bool, **flags) -> list[dict]:
    """Return the audited entries of one saved run folder, or of the configs swept in memory.

    Raise (exit 2) before any sweep when there is nothing to check: no models, or no audit rules.
    """
    from rfreport import runfolder

    # a run folder a killed run left aside: load says where it is (it is no config file)
    folders = [s for s in sources if Path(s).is_dir() or runfolder.interrupted(Path(os.path.abspath(s)))]
    if folders:
        if len(sources) != 1:
            raise click.UsageError("give either one RUN_DIR or one or more CONFIG files, not both")
        saved = runfolder.load(folders[0])
        if not saved.models:
            raise CommandError(f"{folders[0]}: nothing to check: the run folder has no models", 2)
        return [model.entry for model in saved.models]
    from rfreport.run import server

    server.start_early(flags.get("workers"))   # its imports beside this process's own (rfreport.run.server)
    from rfreport.run import jobs as jobs_mod
    from rfreport.run import pipeline
    from rfreport.run.allocator import freeze_loaded

    config = load_config(sources, **flags)
    freeze_loaded()   # torch, the stages and the configs' factories are loaded
    if not any(audit_mod.active(spec.audit) or any(audit_mod.active(level.audit) for level in spec.levels)
               for spec in config.models):
        raise CommandError(f"{', '.join(sources)}: nothing to check: no model has audit rules "
                           "(add a [model.audit] table)", 2)
    jobs = jobs_mod.make_jobs(config)
    executor = make_executor(config.options, job_progress(config.options, quiet))
    return [output.entry for output in pipeline.outputs(jobs, executor)]


@cli.command("diff")
@click.argument("run_a", type=click.Path())
@click.argument("run_b", type=click.Path())
@click.option("--fail-on-change", is_flag=True, help="Exit 1 when anything changed.")
@click.option("--html", "html_path", default=None, type=click.Path(dir_okay=False),
              help="Write a self-contained review page (before/after, maps side by side) to this file.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the diff as JSON to this file (- for stdout, instead of the table).")
@click.option("--markdown", "markdown_path", default=None, type=click.Path(dir_okay=False, allow_dash=True),
              help="Write a PR-comment-sized markdown summary to this file (- for stdout, instead of the table).")
@verbosity
@converts_errors
def diff_command(run_a, run_b, fail_on_change, html_path, json_path, markdown_path, verbose, quiet) -> None:
    """Show per model what changed between RUN_A and RUN_B: config, RF geometry, edges, findings, audit verdicts."""
    from rfreport import diff, runfolder

    configure_logging(verbose, quiet)
    if json_path == "-" and markdown_path == "-":
        raise click.UsageError("only one of --json and --markdown can write to stdout")
    before, after = runfolder.load(run_a), runfolder.load(run_b)
    found = diff.compare(before, after)
    if html_path is not None:
        from rfreport.report import diffpage

        diffpage.render(found, before, after, html_path)
    outputs = {json_path: json.dumps(diff.to_json(found), indent=2, default=str) + "\n",
               markdown_path: diff.to_markdown(found, Path(html_path).name if html_path else None)}
    for path, content in outputs.items():
        if path == "-":
            click.echo(content, nl=False)
        elif path is not None:
            write_file(path, content)
    if "-" not in outputs:
        rows = diff.text_rows(found)
        click.echo(table(["model", "what", run_a, run_b, "change"], rows) if rows else "no changes")
    if fail_on_change and found.changed:
        changed = [m.slug for m in found.models if m.differs]
        raise CommandError(f"{len(changed)} model(s) changed between {run_a} and {run_b}: {', '.join(changed)}", 1)


@cli.command()
@click.argument("factory")
@click.option("--input-shape", required=True, callback=lambda _c, _p, v: parse_shape(v),
              help="Input shape N,C,*spatial, e.g. 1,3,224,224.")
@click.option("--kwargs", "kwargs_json", default="{}", help="Factory keyword arguments as a JSON object.")
@click.option("--layer", default=None, help="Analyse this submodule's output.")
@click.option("--output", default=None,
              help="Analyse this key (or integer index) of a tuple/dict output (of --layer's output when given).")
@click.option("--level", "level_keys", multiple=True, metavar="KEY",
              help="Also analyse this output key or index as a pyramid level (repeatable; see `levels`).")
@click.option("--pos", multiple=True, metavar="H,W", help="An output position to sweep (repeatable).")
@click.option("--positions", default=None, help="all, center, corners, edges or grid:K (default: center).")
@click.option("--mode", type=click.Choice(values(Mode)), default="structural",
              help="Exact structural RF or naive gradient.")
@click.option("--layout", default="nchw", show_default=True,
              help="How the analysed tensor's axes are read: nchw, nhwc, tokens or tokens:HxW.")
@click.option("--layers", "with_layers", is_flag=True,
              help="Also measure and print the per-layer table (architecture RF, stride, padding per layer).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@sweep_flags(configured=False)
@converts_errors
def inspect(factory, input_shape, kwargs_json, layer, output, level_keys, pos, positions, mode, layout, with_layers,
            as_json, device, batch_size, seed, erf_samples, erf_positions, no_cache, cache_dir, verbose,
            quiet) -> None:
    """Sweep one model built by FACTORY (package.module:callable or file.py:callable) and show its RFs."""
    from rfreport.config import Level, ModelSpec, RunOptions
    from rfreport.run import jobs as jobs_mod
    from rfreport.run import pipeline
    from rfreport.run.allocator import freeze_loaded
    from rfreport.run.threads import apply_choice

    configure_logging(verbose, quiet)
    chosen = [*([positions] if positions else []), *(parse_position(p) for p in pos)] or "center"
    levels = tuple(Level(name=key, layer=layer, output=parse_output(key)) for key in level_keys)
    output = parse_output(output) if output is not None or not levels else levels[-1].output
    spec = ModelSpec(name=factory, factory=factory, input_shapes=(input_shape,), kwargs=parse_kwargs(kwargs_json),
                     layer=layer, output=output, positions=chosen, mode=mode, layout=parse_layout_option(layout),
                     erf=erf_overrides(erf_samples, erf_positions) or None, levels=levels)
    given = {"device": device, "batch_size": parse_count(batch_size, "--batch-size"), "seed": seed,
             "cache": False if no_cache else None, "cache_dir": cache_dir}
    if device is not None and (problem := device_problem(device)) is not None:
        raise click.BadParameter(problem, param_hint="--device")
    job = jobs_mod.Job(spec, input_shape, RunOptions(**{k: v for k, v in given.items() if v is not None}))
    progress = make_progress(quiet, starts=False)
    progress.start(job, 0, 1)
    apply_choice()
    freeze_loaded()
    try:
        record = pipeline.inspect(job, progress.advance, layers=with_layers)
    except RfReportError as exc:
        if factory not in str(exc):   # the one line names the model at fault, as a run's job errors do
            exc.args = (f"model {factory!r}: {exc}",)
        raise
    progress.finish()
    click.echo(json.dumps(record) if as_json else inspect_text(record))


def parse_kwargs(text: str) -> dict[str, Any]:
    """Parse --kwargs, a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})", param_hint="--kwargs") from exc
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object like '{\"num_classes\": 10}'", param_hint="--kwargs")
    return value


def parse_layout_option(text: str) -> str:
    """Parse --layout into its canonical spelling."""
    try:
        return str(parse_layout(text))
    except SweepError as exc:
        raise click.BadParameter(str(exc), param_hint="--layout") from None


def parse_output(text: str | None) -> str | int | None:
    """Parse --output: an integer index or a string key."""
    return int(text) if text is not None and text.lstrip("-").isdigit() else text


# inspect geometry keys a nonaffine axis has none of
POSITION_DEPENDENT = ("arch_rf_size", "stride", "padding", "center_offset")


def exact_text(record: dict) -> str:
    """Say whether the reported RFs are exact: verified in structural mode, not claimed in gradient mode."""
    if record["exact"] is None:
        return ("exact: not claimed (gradient mode: the support of the model as given on one probe input, which "
                "misses what zero gradients hide; --mode structural gives the RF)")
    if record["exact"]:
        return f"exact: yes ({record['verified']} position(s) verified on the model)"
    return (f"exact: NO ({record['violations']} of {record['verified']} verified position(s) changed when input "
            "outside the reported RF was perturbed)")


def inspect_text(record: dict) -> str:
    """Render an inspect record as a readable table with the geometry below it."""
    rows = [[text(p["pos"]), text(p["lo"]), text(p["hi"]), text(p["size"]), p["support"], f"{p['fill']:.3f}",
             "yes" if p["edge"] else ""] for p in record["positions"]]
    geometry = record["geometry"]
    lines = [f"{visible(record['model'])}: input {text(record['input_shape'])} -> "
             f"output {text(record['output_shape'])} "
             f"({record['mode']}{', from the cache' if record.get('cached') else ''})", "",
             table(["pos", "lo", "hi", "size", "support", "fill", "edge"], rows), ""]
    lines += [f"{key}: {geometry_text(key, value, geometry['arch_rf_fit'])}" for key, value in geometry.items()]
    if "verified" in record:
        lines.append(exact_text(record))
    if record.get("levels"):
        rows = [[lv["level"], text(lv["output_shape"]), text(lv["stride"]),
                 geometry_text("arch_rf_size", lv["arch_rf_size"]), text(lv["in_input_rf_size"]),
                 text(lv["padding"]), text(lv["center_offset"]), f"{lv['edge_fraction']:.2f}",
                 {True: "yes", None: "unknown"}.get(lv["global"], "")] for lv in record["levels"]]
        lines += ["", table(["level", "output", "stride", "arch rf", "in-input rf", "padding", "offset", "edge",
                             "global"], rows)]
    if "layers" in record:
        lines += ["", *layers_text(record["layers"])]
    if record.get("erf"):
        lines += ["", "effective RF (mean |gradient| over random inputs; docs/columns.md, frame erf):",
                  table(["pos", "peak", "side 50%", "side 90%", "area 95% / RF", "centre offset", "sigma"],
                        [erf_row(row) for row in record["erf"]])]
    return "\n".join(lines)


def erf_row(row: dict) -> list:
    """Return one ERF metrics record as a row of inspect's ERF table (per-axis values joined by ' x ')."""
    letters = [key[len("pos_"):] for key in row if key.startswith("pos_")]

    def axes(prefix: str, digits: str = "") -> str:
        return " x ".join(format(row[f"{prefix}{a}"], digits) for a in letters)

    return [axes("pos_"), axes("peak_"), row["side50"], row["side90"], f"{row['area95_ratio']:.2f}",
            axes("offset_", ".1f"), axes("sigma_", ".1f")]


def layers_text(rows: Sequence[dict]) -> list[str]:
    """Render the per-layer table of an inspect record: one line per layer, the reasons for estimates below it.

    `>` marks the analysed layer; `covers` says whether the centre's RF covers the input (border) or every RF
    does (global). Values are printed in full: they are exact unless the `exact` column names a reason.
    """
    reasons = list(dict.fromkeys(row["estimated"] for row in rows if row["estimated"]))
    body = [[">" if row["target"] else "", row["layer"], row["type"], text(row["output_shape"]),
             text(row["stride"], EXACT_DIGITS), text(row["arch_rf_size"]), text(row["padding"], EXACT_DIGITS),
             text(row["center_offset"], EXACT_DIGITS),
             f"estimated ({reasons.index(row['estimated']) + 1})" if row["estimated"] else "yes",
             "global" if row["global"] else "border" if row["border"] else ""] for row in rows]
    lines = ["per-layer table (> the analysed layer):",
             table(["", "layer", "type", "output", "stride", "arch rf", "padding", "offset", "exact", "covers"], body)]
    return lines + [f"({number}) {reason}" for number, reason in enumerate(reasons, 1)]


def geometry_text(key: str, value: Any, fits: Sequence[str] = ()) -> str:
    """Format an inspect geometry value: per-axis lists as `a x b` (a nonaffine axis's fitted values read
    `position-dependent`, an estimated axis's architecture RF `>=a`, a lower bound), the RF size range `lo-hi`
    per axis, other lists as `a, b`."""
    if key == "arch_rf_size" and value is None:
        return "unbounded (global context)"
    if key == "rf_size_range":
        return " x ".join(f"{lo}-{hi}" if lo is not None else "-" for lo, hi in value)
    if key in POSITION_DEPENDENT and isinstance(value, list) and fits:
        return " x ".join("position-dependent" if fit == "nonaffine" else
                          f">={text(v)}" if fit == "estimated" and key == "arch_rf_size" else text(v)
                          for v, fit in zip(value, fits))
    if isinstance(value, list) and not per_axis(key):
        return ", ".join(map(text, value)) or "-"
    return text(value)


def text(value: Any, digits: int = 4) -> str:
    """Format a JSON value for a table cell: lists as `a x b`, floats with `digits` significant digits."""
    if isinstance(value, (list, tuple)):
        return " x ".join(text(v, digits) for v in value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "-" if value is None else str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return a plain-text table with left-aligned columns."""
    cells = [list(map(str, headers)), *([visible(str(c)) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def terminate(_signum: int, _frame) -> None:
    """Stop the command on SIGTERM as on Ctrl-C: workers stopped, staging folders and locks removed."""
    raise Terminated


def main() -> None:
    """Run the rfreport command line (OpenMP threads wait passively: set before torch loads; large buffers
    reused from the heap; what is loaded kept out of the garbage collector's walks: see run/allocator.py)."""
    from rfreport.run.allocator import freeze_loaded, manage_collector, reuse_freed_memory
    from rfreport.run.threads import prefer_passive_waits

    prefer_passive_waits()
    reuse_freed_memory()
    manage_collector()
    signal.signal(signal.SIGTERM, terminate)
    try:
        cli(prog_name="rfreport")
    finally:
        freeze_loaded()   # the interpreter's teardown then skips walking everything loaded
