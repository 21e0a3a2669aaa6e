"""Run configs: TOML files that list the models to audit, validated in full before any model is built.

A config has an optional `[run]` table (executor, workers, device, batch size, seed), an optional
`[defaults]` table applied to every model of that file, and one `[[model]]` table per model.
Every problem raises :class:`ConfigError` with one line naming the file, the model and the key.
Relative paths (file factories, checkpoints, images, ERF image folders) are resolved against the
config file's folder, so a :class:`ModelSpec` is self-contained and can travel to another process.
docs/config.md documents the format.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from rfreport import positions as positions_mod
from rfreport.errors import ConfigError, ModelLoadError, PositionError, SweepError
from rfreport.factories import import_factory
from rfreport.layouts import parse_layout
from rfreport.options import Distribution, ExecutorKind, Mode, values
from rfreport.slugs import slugify

PositionSpec = str | tuple[str | tuple[int, ...], ...]
ABBREVIATIONS = {"rf": "receptive_field", "erf": "effective_receptive_field"}   # words of key names, spelt out
TOP_KEYS = ("run", "defaults", "model")
SEED_MAX = 2**63 - 1      # torch's generators take 64 bits (with the engine's small offsets), numpy's no negative
DEVICE = re.compile(r"auto|cpu|mps|(?:cuda|xpu)(?::\d+)?")
E = TypeVar("E", bound=StrEnum)


@dataclass(frozen=True)
class AuditRule:
    """One audit rule: its config name, the kind of limit it takes and what it checks."""

    name: str
    kind: str   # "size": int or per-axis list; "stride": number > 0 or per-axis list; "fraction": 0..1;
    #             "pixels": number >= 0; "flag": bool; "layer": a name
    help: str


AUDIT_RULES: dict[str, AuditRule] = {rule.name: rule for rule in (
    AuditRule("min_rf", "size", "the architecture RF (what an output sees with no border in the way) is at least "
              "this (per axis)"),
    AuditRule("max_rf", "size", "the architecture RF is at most this (per axis)"),
    AuditRule("min_rf_in_input", "size", "the in-input RF (the centre position's RF clipped to this input) is at "
              "least this (per axis)"),
    AuditRule("max_rf_in_input", "size", "the in-input RF is at most this (per axis)"),
    AuditRule("min_stride", "stride", "the effective stride is at least this (input pixels, per axis)"),
    AuditRule("max_stride", "stride", "the effective stride is at most this (input pixels, per axis)"),
    AuditRule("max_edge_fraction", "fraction", "at most this fraction of the swept positions see padding"),
    AuditRule("no_unseen", "flag", "when true, every input pixel is seen by some output position"),
    AuditRule("no_global", "flag", "when true, no global operation (global pooling, squeeze-and-excitation, "
              "spatial normalisation) lies on the path to the analysed output"),
    AuditRule("global_not_before", "layer", "global context (pooling over a whole feature map, attention over "
              "every token, token mixing) starts in this layer or later: its output depends on no global operation "
              "outside it"),
    AuditRule("no_full_coverage", "flag", "when true, no swept output position has an RF covering the whole input"),
    AuditRule("max_covering_fraction", "fraction", "at most this fraction of the swept positions have an RF "
              "covering the whole input"),
    AuditRule("max_center_offset", "pixels", "the centre RF's centre is at most this far from its ideal "
              "centre (input pixels, per axis)"),
    AuditRule("min_fill", "fraction", "every swept RF fills at least this fraction of its box (no gridding holes)"),
    AuditRule("anchors_fit", "flag", "when true, every anchor fits inside the RF of its level on every axis"),
    AuditRule("min_anchor_share", "fraction", "every anchor is at least this fraction of the RF of its level on "
              "every axis"),
)}
# levels sweep a few positions; where global context starts is a property of the model's layers, not of a level
LEVEL_AUDIT_RULES = tuple(name for name in AUDIT_RULES if name not in ("no_unseen", "global_not_before"))


@dataclass(frozen=True)
class Level:
    """One analysed level of a model (a feature-pyramid output or a layer): its target, anchors and audit."""

    name: str
    layer: str | None = None                       # submodule whose output is read (None: the model's layer)
    output: str | int | None = None                # key or index of a tuple/dict output
    layout: str | None = None                      # how the level's tensor is read (None: the model's layout)
    anchors: tuple[tuple[int, ...], ...] = ()      # anchor sizes in input pixels, one entry per axis (or one for all)
    audit: dict[str, Any] = field(default_factory=dict)    # rule name -> limit, checked on this level



@dataclass(frozen=True)
class ModelSpec:
    """One model to audit, validated: how to build it and what to sweep, at one or more input shapes."""

    name: str
    factory: str                                   # `package.module:callable` or `/abs/path/file.py:callable`
    input_shapes: tuple[tuple[int, ...], ...]      # each (N, C, *spatial), 1 to 3 spatial axes, same rank
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None                 # a local state_dict file
    layer: str | None = None                       # submodule whose output is analysed
    output: str | int | None = None                # key or index of a tuple/dict output
    positions: PositionSpec = "all"
    mode: Mode = Mode.STRUCTURAL
    audit: dict[str, Any] = field(default_factory=dict)    # rule name -> limit (see AUDIT_RULES)
    erf: dict[str, Any] | None = None              # {samples, positions, distribution, images} or None
    image: Path | None = None                      # a user image shown under the report's overlays
    layers: tuple[str, ...] | None = None          # layers for per-layer growth (None: the pipeline's default)
    layout: str = "nchw"                           # how the analysed tensor's axes are read (rfreport.layouts)
    levels: tuple[Level, ...] = ()                 # extra targets analysed in the same job (feature pyramids)
    config_file: Path | None = None
    verify: int | bool | str = "auto"              # positions checked on the model itself (rfreport.compute.verify)
    job_timeout: float | None = None               # seconds each job of this model may run (None: the run's limit)


@dataclass(frozen=True)
class RunOptions:
    """How a run executes: the `[run]` table of the configs, overridden by CLI flags."""

    executor: ExecutorKind = ExecutorKind.LOCAL   # in-process or on a Ray cluster
    address: str | None = None       # Ray cluster address (None: start or join a local one)
    device: str = "auto"
    batch_size: int | str = "auto"
    seed: int = 0
    cache: bool = True               # reuse and store results in the incremental-audit cache (rfreport.run.cache)
    cache_dir: str | None = None     # the cache folder (None: $RFREPORT_CACHE_DIR or ~/.cache/rfreport)
    job_timeout: float | None = None  # seconds each job may run before it fails (None: no limit; rfreport.run.limits)
    workers: int | str = "auto"      # worker processes of the local executor, or "auto" (rfreport.run.workers)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs: the config files read, their models in order, and the run options."""

    files: tuple[Path, ...]
    models: tuple[ModelSpec, ...]
    options: RunOptions = RunOptions()
    option_files: dict[str, Path] = field(default_factory=dict)   # the file whose `[run]` set each option

    def option_error(self, key: str, problem: str, flag: str | None = None) -> ConfigError:
        """Return a one-line error about a run option, naming the flag that set it, else its file and key."""
        if flag is not None or key not in self.option_files:
            return ConfigError(f"{flag or key}: {problem}")
        return _Where(self.option_files[key], "[run]").error(key, problem)


@dataclass(frozen=True)
class _Where:
    """Where a value comes from, to name the file, the section and the key in error messages."""

    file: Path
    section: str   # "model 'x'", "model #3", "[defaults]", "[run]", "top level"

    def error(self, key: str | None, problem: str) -> ConfigError:
        """Return a one-line ConfigError for a key of this section."""
        at = f"{self.file}: {self.section}" + (f": key {key!r}" if key else "")
        return ConfigError(f"{at}: {problem}")


def _type_name(value: Any) -> str:
    """Name a TOML value's type the way the TOML spec does."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    return names.get(type(value), type(value).__name__)


def _expect(value: Any, types: tuple[type, ...], label: str, where: _Where, key: str | None) -> Any:
    """Return the value if it has one of the types (booleans are not integers), else raise."""
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return value
    raise where.error(key, f"must be {label}, not {_type_name(value)} {value!r}")


def _unknown(keys: Sequence[str], allowed: Sequence[str], where: _Where, what: str) -> None:
    """Raise on the first key not in `allowed`, suggesting the closest allowed key."""
    for key in keys:
        if key not in allowed:
            close = _closest(key, allowed)
            hint = f" (did you mean {close!r}?)" if close else f" (allowed: {', '.join(allowed)})"
            raise where.error(key, f"unknown {what}{hint}")


def _closest(key: str, allowed: Sequence[str]) -> str | None:
    """Return the allowed name most like `key`, as written or with abbreviations spelt out (`min_receptive_field`
    is `min_rf`), or None when none is close (difflib's ratio below 0.6)."""
    def likeness(name: str) -> float:
        return max(difflib.SequenceMatcher(None, key, name).ratio(),
                   difflib.SequenceMatcher(None, _spelt_out(key), _spelt_out(name)).ratio())
    best = max(allowed, key=likeness, default=None)
    return best if best is not None and likeness(best) >= 0.6 else None


def _spelt_out(key: str) -> str:
    """Return a key with the abbreviations of rfreport's names written out, e.g. `min_rf` -> `min_receptive_field`."""
    return re.sub(r"[a-z]+", lambda word: ABBREVIATIONS.get(word[0], word[0]), key)


def _string(value: Any, where: _Where, key: str) -> str:
    """Validate a non-empty string."""
    text = _expect(value, (str,), "a string", where, key)
    if not text.strip():
        raise where.error(key, "must not be empty")
    return text


def _choice(value: Any, choices: Sequence[str], where: _Where, key: str) -> str:
    """Validate a string among fixed choices."""
    text = _string(value, where, key)
    if text not in choices:
        raise where.error(key, f"must be one of {', '.join(choices)}, not {text!r}")
    return text


def _table(value: Any, where: _Where, key: str | None) -> dict[str, Any]:
    """Validate a TOML table (its values are checked by the caller)."""
    return dict(_expect(value, (dict,), "a table", where, key))


def _path(value: Any, where: _Where, key: str, *, folder: bool = False) -> Path:
    """Validate a path to an existing file (or folder), relative to the config file."""
    path = (where.file.parent / _string(value, where, key)).resolve()
    exists = path.is_dir() if folder else path.is_file()
    if not exists:
        raise where.error(key, f"{'folder' if folder else 'file'} {str(value)!r} does not exist ({path})")
    return path


def _factory(value: Any, where: _Where, key: str) -> str:
    """Validate `package.module:callable` or `path/to/file.py:callable` and check it imports."""

    text = _string(value, where, key)
    target, _, attr = text.rpartition(":")
    if not target or not attr:
        raise where.error(key, f"{text!r} must be 'package.module:callable' or 'path/to/file.py:callable'")
    if target.endswith(".py"):
        text = f"{(where.file.parent / target).resolve()}:{attr}"
    try:
        import_factory(text)
    except ModelLoadError as exc:
        raise where.error(key, str(exc)) from exc
    return text


def _shape(value: Any, where: _Where, key: str) -> tuple[int, ...]:
    """Validate one input shape (N, C, *spatial) with 1 to 3 positive spatial sizes."""
    items = _expect(value, (list,), "a list of integers", where, key)
    shape = tuple(_expect(n, (int,), "a list of integers", where, key) for n in items)
    if len(shape) not in (3, 4, 5) or any(n < 1 for n in shape):
        raise where.error(key, f"shape {list(shape)} must be [N, C, *spatial] with 1 to 3 positive spatial "
                               "sizes, e.g. [1, 3, 224, 224]")
    return shape


def _shapes(value: Any, where: _Where, key: str) -> tuple[tuple[int, ...], ...]:
    """Validate one shape or a list of shapes of one spatial rank, without repeats."""
    items = _expect(value, (list,), "a shape like [1, 3, 224, 224] or a list of shapes", where, key)
    if not items:
        raise where.error(key, "must not be empty")
    shapes = tuple(_shape(s, where, key) for s in items) if isinstance(items[0], list) else (
        _shape(items, where, key),)
    if len({len(s) for s in shapes}) > 1:
        raise where.error(key, "all shapes of a model must have the same number of spatial axes")
    repeated = [list(s) for i, s in enumerate(shapes) if s in shapes[:i]]
    if repeated:
        raise where.error(key, f"shape {repeated[0]} is listed twice")
    return shapes


def _positions(value: Any, where: _Where, key: str) -> PositionSpec:
    """Validate a position selection: a name, `grid:K`, or a list of names and coordinate lists."""
    items = [value] if isinstance(value, str) else _expect(
        value, (list,), "a string (all, center, corners, edges, grid:K) or a list", where, key)
    if not items:
        raise where.error(key, "must not be empty")
    checked: list[str | tuple[int, ...]] = []
    for item in items:
        if isinstance(item, str):
            try:
                positions_mod.resolve(item, (1,))
            except PositionError as exc:
                raise where.error(key, str(exc)) from exc
            checked.append(item)
        else:
            coords = _expect(item, (list,), "a name or a list of coordinates", where, key)
            point = tuple(_expect(c, (int,), "a list of integer coordinates", where, key) for c in coords)
            if any(c < 0 for c in point):
                raise where.error(key, f"position {coords} has a negative coordinate")
            checked.append(point)
    return value if isinstance(value, str) else tuple(checked)


def _output(value: Any, where: _Where, key: str) -> str | int:
    """Validate an output key (string) or index (integer)."""
    return _expect(value, (str, int), "a string key or an integer index", where, key)


def _layout(value: Any, where: _Where, key: str) -> str:
    """Validate an output layout: nchw, nhwc, tokens or tokens:HxW."""
    try:
        return str(parse_layout(_string(value, where, key)))
    except SweepError as exc:
        raise where.error(key, str(exc)) from None


def _option(kind: type[E], value: Any, where: _Where, key: str) -> E:
    """Validate a string of a closed vocabulary (rfreport.options) and return its member."""
    return kind(_choice(value, values(kind), where, key))


def _mode(value: Any, where: _Where, key: str) -> Mode:
    """Validate a sweep mode."""
    return _option(Mode, value, where, key)


def _distribution(value: Any, where: _Where, key: str) -> Distribution:
    """Validate an ERF input distribution."""
    return _option(Distribution, value, where, key)


def _layers(value: Any, where: _Where, key: str) -> tuple[str, ...]:
    """Validate a list of layer names."""
    items = _expect(value, (list,), "a list of layer names", where, key)
    return tuple(_string(item, where, key) for item in items)


def _audit_limit(rule: AuditRule, value: Any, where: _Where, prefix: str = "audit") -> Any:
    """Validate one audit rule's limit according to its kind."""
    key = f"{prefix}.{rule.name}"
    if rule.kind == "flag":
        return _expect(value, (bool,), "true or false", where, key)
    if rule.kind == "layer":
        if not _expect(value, (str,), "a layer name (a qualified submodule name, e.g. \"blocks.6\")", where, key):
            raise where.error(key, "must name a layer, not an empty string")
        return value
    if rule.kind == "size":
        sizes = value if isinstance(value, list) else [value]
        sizes = [_expect(v, (int,), "a positive integer or a list of them (one per axis)", where, key)
                 for v in sizes]
        if not sizes or any(v < 1 for v in sizes):
            raise where.error(key, f"must be a positive integer or a list of them, not {value!r}")
        return value
    if rule.kind == "stride":
        numbers = [_finite(v, where, key) for v in (value if isinstance(value, list) else [value])]
        if not numbers or any(v <= 0 for v in numbers):
            raise where.error(key, f"must be a positive number or a list of them, not {value!r}")
        return value
    number = _finite(value, where, key)
    if number < 0 or (rule.kind == "fraction" and number > 1):
        raise where.error(key, f"must be {'between 0 and 1' if rule.kind == 'fraction' else '>= 0'}, not {value!r}")
    return number


def _finite(value: Any, where: _Where, key: str) -> float:
    """Validate a finite number (TOML's nan and inf are floats: a NaN limit would fail every comparison)."""
    number = float(_expect(value, (int, float), "a number", where, key))
    if not math.isfinite(number):
        raise where.error(key, f"must be a finite number, not {value!r}")
    return number


def _seconds(value: Any, where: _Where, key: str) -> float:
    """Validate a duration in seconds: a finite number > 0."""
    number = _finite(value, where, key)
    if number <= 0:
        raise where.error(key, f"must be a number of seconds > 0, not {value!r}")
    return number


def _seed(value: Any, where: _Where, key: str) -> int:
    """Validate a seed: an integer torch and numpy both take (0 to SEED_MAX)."""
    number = _expect(value, (int,), "an integer", where, key)
    if not 0 <= number <= SEED_MAX:
        raise where.error(key, f"must be between 0 and {SEED_MAX} (2**63 - 1), not {number}")
    return number


def _device(value: Any, where: _Where, key: str) -> str:
    """Validate a device name's spelling (auto, cpu, cuda, cuda:1, mps, ...); whether it is there is checked
    before the run starts (rfreport.compute.engine.resolve_device)."""
    text = _string(value, where, key)
    if not DEVICE.fullmatch(text):
        raise where.error(key, f"unknown device {text!r} (auto, cpu, cuda, cuda:N, mps, xpu or xpu:N)")
    return text


def _audit(value: Any, where: _Where, key: str, rules: Sequence[str] = tuple(AUDIT_RULES)) -> dict[str, Any]:
    """Validate an `[audit]` table of rule -> limit."""
    table = _table(value, where, key)
    misplaced = next((name for name in table if name in AUDIT_RULES and name not in rules), None)
    if misplaced:   # a rule of whole models (no_unseen, global_not_before) in a level's table
        raise where.error(f"{key}.{misplaced}", "is a rule of the whole model, not of a level: put it in the "
                                                "model's [model.audit] table")
    _unknown([f"{key}.{name}" for name in table], [f"{key}.{name}" for name in rules], where, "audit rule")
    return {name: _audit_limit(AUDIT_RULES[name], limit, where, key) for name, limit in table.items()}


def _erf(value: Any, where: _Where, key: str) -> dict[str, Any] | None:
    """Validate an ERF request: true/false or a table of samples, positions, distribution, images."""
    if isinstance(value, bool):
        return {} if value else None
    table = _table(value, where, key)
    _unknown([f"erf.{k}" for k in table], [f"erf.{k}" for k in ERF_KEYS], where, "ERF option")
    return {k: ERF_KEYS[k](v, where, f"erf.{k}") for k, v in table.items()}


def _positive_int(value: Any, where: _Where, key: str) -> int:
    """Validate an integer >= 1."""
    number = _expect(value, (int,), "a positive integer", where, key)
    if number < 1:
        raise where.error(key, f"must be a positive integer, not {number}")
    return number


def _positive_or_auto(value: Any, where: _Where, key: str) -> int | str:
    """Validate a count chosen by hand or by rfreport: a positive integer or 'auto' (batch size, workers)."""
    return _choice(value, ("auto",), where, key) if isinstance(value, str) else _positive_int(value, where, key)


def _verify(value: Any, where: _Where, key: str) -> int | bool | str:
    """Validate the run-time verification setting: auto, all, true, false or a number of positions."""
    if isinstance(value, str):
        return _choice(value, ("auto", "all"), where, key)
    value = _expect(value, (bool, int), "auto, all, true, false or a number of positions", where, key)
    if not isinstance(value, bool) and value < 0:
        raise where.error(key, f"must be a number of positions >= 0, not {value}")
    return value


def _anchors(value: Any, where: _Where, key: str) -> tuple[tuple[int, ...], ...]:
    """Validate anchor sizes: positive integers (square) or per-axis lists of them."""
    items = _expect(value, (list,), "a list of anchor sizes (integers or per-axis lists)", where, key)
    anchors = []
    for item in items:
        sizes = item if isinstance(item, list) else [item]
        sizes = [_expect(v, (int,), "a positive integer or a per-axis list of them", where, key) for v in sizes]
        if not sizes or any(v < 1 for v in sizes):
            raise where.error(key, f"anchor {item!r} must be a positive integer or a per-axis list of them")
        anchors.append(tuple(sizes))
    return tuple(anchors)


LEVEL_KEYS = ("name", "layer", "output", "layout", "anchors", "audit")


def _level(item: Any, where: _Where, key: str) -> Level:
    """Validate one level: an output key/index, or a table of name, layer, output, anchors and audit."""
    if not isinstance(item, dict):
        chosen = _output(item, where, key)
        return Level(name=str(chosen), output=chosen)
    _unknown([f"{key}.{k}" for k in item], [f"{key}.{k}" for k in LEVEL_KEYS], where, "level key")
    layer = _string(item["layer"], where, f"{key}.layer") if "layer" in item else None
    output = _output(item["output"], where, f"{key}.output") if "output" in item else None
    if layer is None and output is None:
        raise where.error(key, "a level needs a layer, an output or both")
    default = f"{layer}[{output!r}]" if layer and output is not None else layer or str(output)
    layout = _layout(item["layout"], where, f"{key}.layout") if "layout" in item else None
    return Level(name=_string(item.get("name", default), where, f"{key}.name"), layer=layer, output=output,
                 layout=layout,
                 anchors=_anchors(item.get("anchors", []), where, f"{key}.anchors"),
                 audit=_audit(item.get("audit", {}), where, f"{key}.audit", LEVEL_AUDIT_RULES))


def _levels(value: Any, where: _Where, key: str) -> tuple[Level, ...]:
    """Validate a non-empty list of levels with distinct names."""
    items = _expect(value, (list,), "a list of output keys/indices or level tables", where, key)
    if not items:
        raise where.error(key, "must not be empty")
    levels = tuple(_level(item, where, f"{key}[{i}]") for i, item in enumerate(items))
    names = [level.name for level in levels]
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:
        raise where.error(key, f"level name {twice[0]!r} is used twice")
    return levels


Checker = Callable[[Any, _Where, str], Any]
ERF_KEYS: dict[str, Checker] = {
    "samples": _positive_int,
    "positions": _positions,
    "distribution": _distribution,
    "images": lambda v, w, k: _path(v, w, k, folder=True),
}
MODEL_KEYS: dict[str, Checker] = {
    "name": _string,
    "factory": _factory,
    "kwargs": _table,
    "checkpoint": _path,
    "input_shape": _shapes,
    "layer": _string,
    "output": _output,
    "positions": _positions,
    "mode": _mode,
    "audit": _audit,
    "erf": _erf,
    "image": _path,
    "layers": _layers,
    "layout": _layout,
    "verify": _verify,
    "levels": _levels,
    "job_timeout": _seconds,
}
RUN_KEYS: dict[str, Checker] = {
    "executor": lambda v, w, k: _option(ExecutorKind, v, w, k),
    "address": _string,
    "device": _device,
    "batch_size": _positive_or_auto,
    "seed": _seed,
    "job_timeout": _seconds,
    "workers": _positive_or_auto,
}
MERGED_TABLES = ("kwargs", "audit", "erf")   # a model's table updates the defaults' table key by key
REQUIRED = ("name", "factory", "input_shape")


def _check_table(table: dict[str, Any], checkers: dict[str, Checker], where: _Where) -> dict[str, Any]:
    """Reject unknown keys, then validate and normalise every value."""
    _unknown(list(table), list(checkers), where, "key")
    return {key: checkers[key](value, where, key) for key, value in table.items()}


def _merge(defaults: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """Apply the defaults under a model's own values; kwargs, audit and erf tables merge key by key."""
    merged = {**defaults, **model}
    for key in MERGED_TABLES:
        if isinstance(defaults.get(key), dict) and isinstance(model.get(key), dict):
            merged[key] = {**defaults[key], **model[key]}
    return merged


def _check_merged(values: dict[str, Any], where: _Where) -> None:
    """Check what spans keys: positions and per-axis limits against the spatial rank, the ERF's sources."""
    erf = values.get("erf") or {}
    if erf.get("distribution") == "images" and "images" not in erf:
        raise where.error("erf.distribution", "'images' needs an images folder (erf.images)")
    if erf.get("distribution") == "uniform" and "images" in erf:
        raise where.error("erf.images", "an images folder conflicts with distribution 'uniform'")
    rank = len(values["input_shape"][0]) - 2
    selections = [("positions", values.get("positions"))]
    selections.append(("erf.positions", erf.get("positions")))
    for key, spec in selections:
        for item in spec if isinstance(spec, tuple) else ():
            if not isinstance(item, str) and len(item) != rank:
                raise where.error(key, f"position {list(item)} must have {rank} coordinates (one per spatial axis)")
    limits = [(f"audit.{name}", limit) for name, limit in values.get("audit", {}).items()]
    for i, level in enumerate(values.get("levels", ())):
        limits += [(f"levels[{i}].audit.{name}", limit) for name, limit in level.audit.items()]
        limits += [(f"levels[{i}].anchors", list(anchor)) for anchor in level.anchors if len(anchor) > 1]
    for key, limit in limits:
        if isinstance(limit, list) and len(limit) != rank:
            raise where.error(key, f"{limit} must have {rank} entries (one per spatial axis)")


def _model_spec(raw: Any, index: int, defaults: dict[str, Any], file: Path) -> ModelSpec:
    """Validate one `[[model]]` table, apply the defaults and build its ModelSpec."""
    name = raw.get("name") if isinstance(raw, dict) else None
    where = _Where(file, f"model {name!r}" if isinstance(name, str) else f"model #{index + 1}")
    values = _merge(defaults, _check_table(_table(raw, where, None), MODEL_KEYS, where))
    for key in REQUIRED:
        if key not in values:
            raise where.error(key, "is required (in the model or in [defaults])")
    _check_merged(values, where)
    # a level naming only an output reads it from the model's own layer
    levels = tuple(replace(lv, layer=values.get("layer")) if lv.layer is None else lv
                   for lv in values.get("levels", ()))
    if levels and "layer" not in values and "output" not in values:   # the model's own target: its last level
        values |= {"layer": levels[-1].layer, "output": levels[-1].output}
        values |= {"layout": levels[-1].layout} if levels[-1].layout else {}
    return ModelSpec(
        name=values["name"], factory=values["factory"], input_shapes=values["input_shape"],
        kwargs=values.get("kwargs", {}), checkpoint=values.get("checkpoint"), layer=values.get("layer"),
        output=values.get("output"), positions=values.get("positions", "all"),
        mode=values.get("mode", "structural"), audit=values.get("audit", {}), erf=values.get("erf"),
        image=values.get("image"), layers=values.get("layers"), layout=values.get("layout", "nchw"),
        levels=levels, config_file=file, verify=values.get("verify", "auto"), job_timeout=values.get("job_timeout"))


def _read(path: Path) -> dict[str, Any]:
    """Read and parse one TOML file."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:   # TOML is UTF-8 (a Latin-1 file, a binary file)
        raise ConfigError(f"{path}: not valid TOML (not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start})") from exc


def load_file(path: Path) -> tuple[tuple[ModelSpec, ...], dict[str, Any]]:
    """Validate one config file; return its models and its `[run]` values."""
    data = _read(path)
    top = _Where(path, "top level")
    _unknown(list(data), TOP_KEYS, top, "table")
    run = _check_table(_table(data.get("run", {}), top, "run"), RUN_KEYS, _Where(path, "[run]"))
    defaults_where = _Where(path, "[defaults]")
    raw_defaults = _table(data.get("defaults", {}), top, "defaults")
    if "name" in raw_defaults:
        raise defaults_where.error("name", "a name cannot have a default; give each model its own")
    defaults = _check_table(raw_defaults, MODEL_KEYS, defaults_where)
    models = _expect(data.get("model", []), (list,), "an array of [[model]] tables", top, "model")
    return tuple(_model_spec(raw, i, defaults, path) for i, raw in enumerate(models)), run


def load(paths: Sequence[Path | str]) -> RunConfig:
    """Read and validate config files, in order; a later file's `[run]` values override an earlier one's."""
    if not paths:
        raise ConfigError("no config file given")
    files = tuple(Path(p) for p in paths)
    models: list[ModelSpec] = []
    run: dict[str, Any] = {}
    option_files: dict[str, Path] = {}
    for path in files:
        specs, options = load_file(path)
        models.extend(specs)
        run.update(options)
        option_files.update(dict.fromkeys(options, path))
    _check_unique(models)
    _check_slugs(models)
    if not models:
        raise ConfigError(f"{', '.join(map(str, files))}: no [[model]] tables; nothing to run")
    return RunConfig(files=files, models=tuple(models), options=replace(RunOptions(), **run),
                     option_files=option_files)


def _check_unique(models: Sequence[ModelSpec]) -> None:
    """Raise on the first model name used twice, naming both places."""
    seen: dict[str, ModelSpec] = {}
    for spec in models:
        if spec.name in seen:
            raise ConfigError(f"{spec.config_file}: model {spec.name!r}: key 'name': duplicate model name "
                              f"(first defined in {seen[spec.name].config_file})")
        seen[spec.name] = spec


def _check_slugs(models: Sequence[ModelSpec]) -> None:
    """Raise on two jobs (model, input shape) that would share a run-folder name, e.g. `a b` and `a_b` at 8x8.

    The slug names a job's folder, its report section and its diff row, so it must be unique.
    """
    seen: dict[str, tuple[ModelSpec, tuple[int, ...]]] = {}
    for spec in models:
        for shape in spec.input_shapes:
            slug = slugify(spec.name, shape)
            if slug in seen:
                other, other_shape = seen[slug]
                key, clash, fix = ("input_shape", f"its input shapes {list(other_shape)} and {list(shape)} share",
                                   "put one in a model of its own name") if other is spec else (
                    "name", f"model {other.name!r} (in {other.config_file}) shares", "rename one")
                raise ConfigError(f"{spec.config_file}: model {spec.name!r}: key '{key}': {clash} the run folder "
                                  f"name {slug!r}; {fix} so each job has its own folder")
            seen[slug] = (spec, tuple(shape))
