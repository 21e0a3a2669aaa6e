"""Model loading: import a factory, call it with its kwargs, load an optional local checkpoint.

Nothing is ever downloaded: a checkpoint is a local state_dict file read with
``torch.load(weights_only=True)``. Every failure raises :class:`ModelLoadError` naming the
model and the factory.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from rfreport.config import ModelSpec
from rfreport.errors import ModelLoadError


def _first_line(exc: BaseException) -> str:
    """Return `Type: first line of the message` for an exception."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _import_file(path: Path) -> ModuleType:
    """Import a Python file as a module once per process, under a name derived from its path."""
    name = "_rfreport_factory_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise ModelLoadError(f"factory file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file may raise anything while it is imported
        del sys.modules[name]
        raise ModelLoadError(f"cannot import {str(path)!r} ({_first_line(exc)})") from exc
    return module


def _import_module(name: str) -> ModuleType:
    """Import a module by dotted name."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # a module may fail on import with anything, not only ImportError
        raise ModelLoadError(f"cannot import module {name!r} ({_first_line(exc)})") from exc


def import_factory(factory: str) -> Callable[..., Any]:
    """Import the callable named by `package.module:callable` or `path/to/file.py:callable`, without calling it."""
    target, _, attr = factory.rpartition(":")
    if not target or not attr:
        raise ModelLoadError(f"factory {factory!r} must be 'package.module:callable' or 'path/to/file.py:callable'")
    obj: Any = _import_file(Path(target).resolve()) if target.endswith(".py") else _import_module(target)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"{target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"{factory} is a {type(obj).__name__}, not a callable")
    return obj


def _state_dict(loaded: Any) -> dict[str, torch.Tensor] | None:
    """Return the state_dict in a loaded checkpoint: the object itself or its 'state_dict'/'model' entry."""
    if not isinstance(loaded, dict):
        return None
    if all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return loaded
    for key in ("state_dict", "model"):
        if isinstance(loaded.get(key), dict):
            return _state_dict(loaded[key])
    return None


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Describe how a state_dict differs from the model's (missing, unexpected, wrong shapes), or None."""
    own = model.state_dict()
    found = (("missing key(s)", [k for k in own if k not in state]),
             ("unexpected key(s)", [k for k in state if k not in own]),
             ("shape mismatch(es)", [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                                     if k in state and state[k].shape != v.shape]))
    problems = [f"{len(items)} {label} ({_listing(items)})" for label, items in found if items]
    return "; ".join(problems) or None


def _listing(items: list[str], limit: int = 3) -> str:
    """Join the first few items, with an ellipsis when there are more."""
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def load_checkpoint(model: nn.Module, path: Path, name: str) -> None:
    """Load a local state_dict file into the model (weights only, strict)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for unreadable or unsafe files
        raise ModelLoadError(f"model {name!r}: cannot load checkpoint {str(path)!r} ({_first_line(exc)})") from exc
    state = _state_dict(loaded)
    if state is None:
        raise ModelLoadError(f"model {name!r}: checkpoint {str(path)!r} holds a {type(loaded).__name__}, "
                             "not a state_dict of tensors")
    problem = _mismatch(model, state)
    if problem:
        raise ModelLoadError(f"model {name!r}: checkpoint {str(path)!r} does not match the model: {problem}")
    model.load_state_dict(state)


def build(spec: ModelSpec) -> nn.Module:
    """Build a spec's model: import and call its factory, load its checkpoint, switch to eval mode."""
    try:
        factory = import_factory(spec.factory)
    except ModelLoadError as exc:
        raise ModelLoadError(f"model {spec.name!r}: {exc}") from exc
    try:
        # weights=None models start from random weights: seed them so every process (a Ray worker, a
        # position chunk, a rerun) builds the same model and gradient-mode sweeps and ERFs agree
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = factory(**spec.kwargs)
    except Exception as exc:  # the user's factory may raise anything
        raise ModelLoadError(f"model {spec.name!r}: factory {spec.factory} raised {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model {spec.name!r}: factory {spec.factory} returned a {type(model).__name__}, "
                             "not a torch.nn.Module")
    if spec.checkpoint is not None:
        load_checkpoint(model, spec.checkpoint, spec.name)
    return model.eval()
