"""Incremental audits: a job's results cached on disk under a key of everything that can change them.

The structural RF depends on the architecture and the input shape, never on the weights, so a
scheduled audit of an unchanged model need not sweep again. The key of a job
(:func:`job_key`) is a SHA-256 over

* the **op trace** of one forward pass of the model (:class:`OpRecorder`): every torch function
  called, in order, with its arguments' shapes and dtypes, its plain arguments (kernel sizes,
  strides, paddings, dilations, slices, modes, ...) and *which* earlier tensor each argument is,
  so a different residual connection changes it as much as a different kernel, and the class and
  source of every custom ``autograd.Function`` on the way (its backward is code too). The pass
  runs on the ``meta`` device (no memory, no arithmetic) and falls back to one CPU pass when the
  model needs values (a data-dependent branch, a tensor created on the CPU inside ``forward``);
  a model neither can trace, or whose ops the recorder cannot see (TorchScript), is not cached;
* every submodule's name, class and settings (``extra_repr``) and every parameter's shape;
* the values of the model's buffers other than normalisation statistics (index tables, masks),
  which the surrogate keeps; in gradient mode, and whenever the ERF is measured, every weight too;
* the source files of the model's own module classes and of its factory file, the versions of
  their packages, of torch, numpy and pandas, rfreport's version and a hash of rfreport's source;
* the job: every field of its model spec but the name, audit rules and overlay image (which the
  pipeline applies after the cache), the input shape, the run's seed and device type. The batch
  size, the executor, its workers and the cache settings change no answer and are left out.

Only completed jobs are stored. Entries live under :func:`default_dir` (``$RFREPORT_CACHE_DIR``,
else ``$XDG_CACHE_HOME/rfreport``, else ``~/.cache/rfreport``), one folder per key in the run
folder's own format (Parquet + CSV frames, ``.npy``/``.npz`` arrays), written atomically, with a
SHA-256 of every file in ``result.json`` and of ``result.json`` in ``result.sha256``. An entry
whose checksums or values do not hold up is removed and recomputed; a cache that cannot be read or
written is skipped; both with a warning naming the model, never a failed job or a wrong answer.
The checksums detect corruption, not a writer with access to the folder (docs/cache.md).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect as pyinspect
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

from rfreport import __version__, runfolder
from rfreport.compute.engine import resolve_device
from rfreport.compute.surrogate import eager_forward
from rfreport.errors import one_line

if TYPE_CHECKING:
    from rfreport.config import RunOptions
    from rfreport.run.jobs import Job

logger = logging.getLogger("rfreport")
T = TypeVar("T")
ENV = "RFREPORT_CACHE_DIR"
FORMAT = 2
RESULT = "result.json"
CHECKSUM = "result.sha256"     # the SHA-256 of result.json, which holds the SHA-256 of every other file
TUPLE = "__tuple__"
# labels, things applied after the cache (audit rules but global_not_before), and limits that change no answer
UNKEYED_SPEC_FIELDS = ("name", "input_shapes", "audit", "image", "config_file", "job_timeout")
UNKEYED_OPTIONS = ("batch_size", "executor", "address", "device", "cache", "cache_dir", "job_timeout",
                   "workers")
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")   # neutralised in the surrogate
UNSTORED = ("name", "slug", "seconds", "frames", "arrays", "cached")   # a JobResult's labels, timing and files


def default_dir() -> Path:
    """Return the cache folder: $RFREPORT_CACHE_DIR, else $XDG_CACHE_HOME/rfreport, else ~/.cache/rfreport."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rfreport"


def folder(options: RunOptions) -> Path | None:
    """Return the cache folder a run uses, or None when the cache is off."""
    if not options.cache:
        return None
    return Path(options.cache_dir).expanduser() if options.cache_dir else default_dir()


def describe(options: RunOptions, entries: list[dict]) -> dict:
    """Return the `cache` object of summary.json's `run`: the folder (None when off) and the slugs it served."""
    root = folder(options)
    return {"dir": str(root) if root else None, "hits": [e["slug"] for e in entries if e.get("cached")]}


# --------------------------------------------------------------------------------------
# The key


class _Stop(Exception):
    """Raised from a forward hook once the target layer has run: later ops cannot change its RF."""


class OpRecorder(TorchFunctionMode):
    """Record every torch function called under it, hashing a canonical description of each call.

    Tensors are named by identity: the input `x`, parameters and buffers by their names, results
    `t0, t1, ...` in order of creation, other tensors (constants held by the model) `c0, ...`
    with a hash of their values. A description therefore fixes the data flow, not only the shapes.
    """

    def __init__(self, names: Mapping[int, str], keep: list[torch.Tensor]):
        super().__init__()
        self.names = dict(names)
        self.keep = keep            # holds every named tensor so that no id is reused during the pass
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = resolve_name(func) or f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', func)}"
        described = f"{name}{self.describe(args)}{self.describe(kwargs)}"
        result = func(*args, **kwargs)
        self.calls.append(f"{described}->{self.describe(result, created=True)}")
        return result

    def describe(self, value: Any, created: bool = False) -> str:
        """Return a canonical text for an argument or a result (results name the new tensors)."""
        if isinstance(value, torch.Tensor):
            return self._tensor(value, created)
        if isinstance(value, (list, tuple)):
            inner = ",".join(self.describe(v, created) for v in value)
            return f"{type(value).__name__}({inner})"
        if isinstance(value, dict):
            return "{" + ",".join(f"{k!r}:{self.describe(v, created)}" for k, v in value.items()) + "}"
        return plain(value)

    def _tensor(self, tensor: torch.Tensor, created: bool) -> str:
        """Name a tensor (a new one on first sight) and describe its shape, dtype and gradient function."""
        label = self.names.get(id(tensor))
        if label is None:
            label = f"t{len(self.keep)}" if created else f"c{len(self.keep)}:{values_digest(tensor)}"
            self.names[id(tensor)] = label
            self.keep.append(tensor)
        return f"{label}{list(tensor.shape)}{str(tensor.dtype).removeprefix('torch.')}{gradient_function(tensor)}"


def gradient_function(tensor: torch.Tensor) -> str:
    """Describe the node that backpropagates through a tensor: a custom autograd.Function's backward is code too.

    A Function's outputs are the tensors its forward returned, relabelled by `apply`, so the
    node is read where the tensor is used; a custom one adds its class and source file's hash.
    """
    node = tensor.grad_fn
    if node is None:
        return ""
    custom = getattr(node, "_forward_cls", None)
    if custom is None:
        return f"<{type(node).__name__}>"
    return f"<{custom.__module__}.{custom.__qualname__}@{_file_digest(_source_file(custom) or '')}>"


def plain(value: Any) -> str:
    """Describe a non-tensor argument: its repr, or its type where the repr holds a memory address."""
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None), type(Ellipsis))):
        return repr(value)
    if isinstance(value, slice):
        return f"slice({plain(value.start)},{plain(value.stop)},{plain(value.step)})"
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    text = repr(value)
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    return kind if " at 0x" in text else f"{kind}:{text}"


def values_digest(tensor: torch.Tensor) -> str:
    """Return a short hash of a tensor's dtype, shape and bytes (`meta` for tensors without values)."""
    if tensor.is_meta:
        return "meta"
    digest = hashlib.blake2b(f"{tensor.dtype}{list(tensor.shape)}".encode(), digest_size=16)
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def op_trace(model: nn.Module, input_shape: tuple[int, ...], layer: str | None = None, *,
             device: str = "meta", seed: int = 0) -> list[str]:
    """Record the calls of one forward pass of `model` on an input of `input_shape`, up to `layer` if given.

    On `meta` the parameters and buffers are swapped for value-free copies for the pass only; on
    `cpu` the model runs as it is on a positive random input. Raises whatever the model raises.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    if device == "meta":
        swapped = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
        x = torch.empty(input_shape, dtype=dtype, device="meta")
    else:
        swapped = tensors
        x = torch.rand(input_shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) + 0.5
    x.requires_grad_(True)
    keep = [x, *swapped.values()]
    recorder = OpRecorder({id(x): "x", **{id(t): f"p:{name}" for name, t in swapped.items()}}, keep)
    # as the engine runs it: compiled functions eagerly, checkpointed blocks as plain calls
    with _stopping_at(model, layer), torch.enable_grad(), eager_forward(), recorder, suppress(_Stop):
        torch.func.functional_call(model, swapped, (x,))
    return recorder.calls


@contextmanager
def _stopping_at(model: nn.Module, layer: str | None) -> Iterator[None]:
    """Stop the forward pass once the named layer has run (no hook without a layer)."""
    handle = None
    if layer:
        def stop(*_args):
            raise _Stop
        handle = model.get_submodule(layer).register_forward_hook(stop)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def trace_digest(model: nn.Module, job: Job) -> str | None:
    """Return the hash of the job's op trace, on `meta` if the model runs there, else on the CPU; None if neither."""
    for device in ("meta", "cpu"):
        try:
            with _structural_flags(model, job.spec.mode):
                calls = op_trace(model, job.input_shape, job.spec.layer, device=device, seed=job.options.seed)
        except Exception as exc:  # the user's model may raise anything; the sweep will report it properly
            logger.debug("%s: no op trace on %s (%s: %s)", job.slug, device, type(exc).__name__, exc)
            continue
        if not calls:   # a scripted or compiled forward hides its ops from the recorder
            return None
        return _digest([device, len(calls), *calls])
    return None


@contextmanager
def _structural_flags(model: nn.Module, mode: str) -> Iterator[None]:
    """Trace in eval mode in structural mode, as the surrogate runs; restore the flags after."""
    flags = {m: m.training for m in model.modules()}
    if mode == "structural":
        model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def state_digest(model: nn.Module, *, weights: bool) -> str:
    """Hash the buffers that shape the answer (every state tensor and train flag when `weights`)."""
    digest = hashlib.blake2b(digest_size=16)
    named = model.state_dict(keep_vars=True).items() if weights else model.named_buffers()
    for name, tensor in named:
        if weights or not name.endswith(STATISTICS):
            digest.update(f"{name}:{values_digest(tensor)};".encode())
    if weights:
        digest.update(str([m.training for m in model.modules()]).encode())
    return digest.hexdigest()


def structure_digest(model: nn.Module) -> str:
    """Hash every submodule's name, class and settings (`extra_repr`) and every parameter's and buffer's shape."""
    parts = [f"{name}:{type(m).__module__}.{type(m).__qualname__}({m.extra_repr()})" for name, m in
             model.named_modules()]
    parts += [f"{name}{list(t.shape)}{t.dtype}" for name, t in model.state_dict(keep_vars=True).items()]
    return _digest(parts)


def code_digest(model: nn.Module, factory: str) -> str:
    """Hash the source files of the model's non-torch module classes and of a file factory, with package versions."""
    files, packages = set(), set()
    for kind in {type(m) for m in model.modules()}:
        top = kind.__module__.split(".")[0]
        if top != "torch":
            packages.add(top)
            files.add(_source_file(kind))
    target = factory.rpartition(":")[0]
    files.add(target if target.endswith(".py") else _source_file(sys.modules.get(target)))
    parts = [f"{top}={_version(top)}" for top in sorted(packages)]
    parts += [f"{path}:{_file_digest(path)}" for path in sorted(p for p in files if p)]
    return _digest(parts)


def _source_file(obj: Any) -> str | None:
    """Return the source file of a class or module, or None (built in, made at run time)."""
    try:
        return pyinspect.getsourcefile(obj) if obj is not None else None
    except TypeError:
        return None


def _version(package: str) -> str:
    """Return an installed package's version, or `unknown`."""
    try:
        return importlib.metadata.version(package)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return str(getattr(sys.modules.get(package), "__version__", "unknown"))


def _file_digest(path: str) -> str:
    """Hash a file's bytes (`missing` when it cannot be read)."""
    try:
        return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    except OSError:
        return "missing"


@lru_cache(maxsize=1)
def source_digest() -> str:
    """Hash rfreport's own Python source, so that any code change invalidates every entry."""
    root = Path(__file__).parents[1]   # the rfreport package, every stage's room
    return _digest([f"{p.relative_to(root)}:{_file_digest(str(p))}" for p in sorted(root.rglob("*.py"))])


def job_fields(job: Job) -> dict:
    """Return the job's answer-changing settings: its spec fields, input shape, seed and device type."""
    spec = {f.name: getattr(job.spec, f.name) for f in fields(job.spec) if f.name not in UNKEYED_SPEC_FIELDS}
    # the one audit rule measured before the cache: the first global op outside its layer (run.plan.global_before)
    spec["global_not_before"] = job.spec.audit.get("global_not_before")
    options = {f.name: getattr(job.options, f.name) for f in fields(job.options) if f.name not in UNKEYED_OPTIONS}
    return {"spec": spec, "input_shape": list(job.input_shape), "options": options,
            "device_type": resolve_device(job.options.device).type}


def job_key(model: nn.Module, job: Job, kind: str) -> str | None:
    """Return the cache key of a job's `kind` of result ("job" or "inspect"), or None when it cannot be traced."""
    trace = trace_digest(model, job)
    if trace is None:
        return None
    weighted = job.spec.mode != "structural" or job.spec.erf is not None
    parts = {"format": FORMAT, "kind": kind, "rfreport": [__version__, source_digest()],
             "versions": [torch.__version__, np.__version__, pd.__version__, sys.version_info[:2]],
             "job": job_fields(job), "trace": trace, "structure": structure_digest(model),
             "state": state_digest(model, weights=weighted),
             "code": code_digest(model, job.spec.factory), "erf_images": _images_digest(job.spec.erf)}
    return _digest([json.dumps(parts, sort_keys=True, default=plain)])


def _images_digest(erf: Mapping | None) -> str | None:
    """Hash the files of the ERF's images folder (their content decides the ERF)."""
    images = (erf or {}).get("images")
    if not images:
        return None
    found = sorted(p for p in Path(images).rglob("*") if p.is_file())
    return _digest([f"{p.relative_to(images)}:{_file_digest(str(p))}" for p in found])


def _digest(parts: list) -> str:
    """Return the SHA-256 of parts joined by newlines."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# The store


@dataclass(frozen=True)
class Hit:
    """A cached result: the stored values (JobResult fields or an inspect record), frames and arrays."""

    values: dict
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)



class DamagedEntry(ValueError):
    """A cache entry whose checksum, files or values do not hold up: removed, and the job recomputed."""


@dataclass(frozen=True)
class Slot:
    """Where one job's result is cached: its folder, or nowhere (cache off or model untraceable)."""

    path: Path | None
    slug: str = ""

    def load(self, read: Callable[[Hit], T]) -> T | None:
        """Return `read` of the cached result, or None on a miss.

        An entry whose checksum or files do not match, or whose values `read` refuses, is removed
        and counts as a miss; a cache that cannot be read is skipped; both with a warning, never a
        failed job and never a wrong answer.
        """
        if self.path is None:
            return None
        try:
            if not (self.path / RESULT).is_file():
                return None
            found = read(self._verified())
        except OSError as exc:   # an unreadable folder (permissions, I/O): leave it, run uncached
            logger.warning("%s: cannot read the cache entry %s (%s); computing it again", self.slug, self.path,
                           exc.strerror or exc)
            return None
        except Exception as exc:  # a damaged or edited entry (any reader or value error) must never be an answer
            logger.warning("%s: discarding damaged cache entry %s (%s); computing it again", self.slug, self.path,
                           one_line(exc))
            shutil.rmtree(self.path, ignore_errors=True)
            return None
        logger.info("%s: from the cache (%s)", self.slug, self.path.name[:12])
        return found

    def _verified(self) -> Hit:
        """Read the entry once its checksum and every file's digest match what was written."""
        assert self.path is not None
        document = (self.path / RESULT).read_bytes()
        if (self.path / CHECKSUM).read_text(encoding="ascii").strip() != hashlib.sha256(document).hexdigest():
            raise DamagedEntry(f"{RESULT} does not match its checksum")
        stored = json.loads(document)
        if stored.get("format") != FORMAT or stored.get("key") != self.path.name:
            raise DamagedEntry(f"entry {stored.get('key')!r} of format {stored.get('format')!r}")
        if file_digests(self.path) != stored["digests"]:
            raise DamagedEntry("its files do not match their digests")
        saved = runfolder.ModelRun(self.path, stored["entry"])
        return Hit(untagged(stored["values"]), saved.frames, saved.arrays)

    def save(self, values: Mapping[str, Any], frames: Mapping[str, pd.DataFrame] | None = None,
             arrays: Mapping[str, Any] | None = None) -> None:
        """Store a result atomically; an unwritable cache only logs a warning."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.path.parent))
            try:
                self._write(staging, values, frames or {}, arrays or {})
                os.replace(staging, self.path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)   # left over only when another process won the race
        except (OSError, TypeError, ValueError) as exc:   # a full disk, a race, a value JSON cannot hold
            with suppress(OSError):
                if (self.path / RESULT).is_file():   # another process stored the same key first
                    return
            logger.warning("%s: cannot write the cache entry %s (%s)", self.slug, self.path, exc)

    def save_result(self, result: Any) -> None:
        """Store a completed JobResult's values, frames and arrays (failed results are never stored)."""
        if result.status == "ok":
            values = {f.name: getattr(result, f.name) for f in fields(result) if f.name not in UNSTORED}
            self.save(values | {"summary": result.summary.to_json()}, result.frames, result.arrays)

    def _write(self, staging: Path, values: Mapping, frames: Mapping, arrays: Mapping) -> None:
        """Write the frames and arrays in the run folder's format, then result.json with their digests, then its
        checksum last."""
        assert self.path is not None
        output = runfolder.ModelOutput({"slug": "result"}, frames, arrays)
        entry = runfolder.write_model(staging, output)
        document = json.dumps({"format": FORMAT, "key": self.path.name, "entry": entry,
                               "digests": file_digests(staging), "values": tagged(dict(values))}).encode()
        (staging / RESULT).write_bytes(document + b"\n")
        (staging / CHECKSUM).write_text(hashlib.sha256(document + b"\n").hexdigest() + "\n", encoding="ascii")


def file_digests(entry: Path) -> dict[str, str]:
    """Return the SHA-256 of every file of an entry's frames and arrays, by path relative to the entry."""
    return {str(p.relative_to(entry)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(entry.rglob("*")) if p.is_file() and p.name not in (RESULT, CHECKSUM)}


def tagged(value: Any) -> Any:
    """Return a value as JSON data that :func:`untagged` turns back into it: tuples, numpy values and NaN kept.

    Tuples become {"__tuple__": [...]}, so every field of a JobResult, however later code adds to it,
    comes back with the types it was stored with; numpy scalars become Python numbers, paths strings.
    """
    if isinstance(value, tuple):
        return {TUPLE: [tagged(v) for v in value]}
    if isinstance(value, list):
        return [tagged(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: tagged(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return tagged(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a {type(value).__name__} cannot be stored in the result cache")


def untagged(value: Any) -> Any:
    """Undo :func:`tagged`."""
    if isinstance(value, list):
        return [untagged(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {TUPLE}:
            return tuple(untagged(v) for v in value[TUPLE])
        return {k: untagged(v) for k, v in value.items()}
    return value


def slot(model: nn.Module, job: Job, kind: str = "job") -> Slot:
    """Return the cache slot of a job's result; an inert one when the cache is off or the model cannot be traced."""
    root = folder(job.options)
    if root is None:
        return Slot(None, job.slug)
    key = job_key(model, job, kind)
    if key is None:
        logger.info("%s: not cached (the forward pass could not be traced)", job.slug)
        return Slot(None, job.slug)
    return Slot(root / f"v{FORMAT}" / key[:2] / key, job.slug)

