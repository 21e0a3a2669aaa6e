"""Model loading: import a factory, call it with its kwargs, load an optional local checkpoint.

Nothing is ever downloaded: a checkpoint is a local state_dict file read with
``torch.load(weights_only=True)``. Every failure raises :class:`ModelLoadError` naming the
model and the factory.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rfreport.config import ModelSpec
from rfreport.errors import PASS_THROUGH, ModelLoadError, SweepError, one_line
from rfreport.factories import import_factory


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
        raise ModelLoadError(f"model {name!r}: cannot load checkpoint {str(path)!r} ({one_line(exc)})") from exc
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
    except PASS_THROUGH:
        raise
    except BaseException as exc:  # the user's factory may raise anything, sys.exit() included
        raise ModelLoadError(f"model {spec.name!r}: factory {spec.factory} raised {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model {spec.name!r}: factory {spec.factory} returned a {type(model).__name__}, "
                             "not a torch.nn.Module")
    if spec.checkpoint is not None:
        load_checkpoint(model, spec.checkpoint, spec.name)
    return model.eval()


SPATIAL_CLASS = re.compile(r"(?:Pool|Norm|Pad|Dropout)([123])d$")


def spatial_rank(module: nn.Module) -> int | None:
    """Return how many spatial axes a module reads (Conv2d: 2, MaxPool3d: 3), or None if it has no fixed rank."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return len(module.kernel_size)
    match = SPATIAL_CLASS.search(type(module).__name__)
    return int(match.group(1)) if match else None


@contextmanager
def rank_guard(model: nn.Module, input_shape: Sequence[int], name: str | None = None) -> Iterator[None]:
    """Fail the forward passes of the block when the model reads the input with another rank than input_shape's.

    The first module with a fixed spatial rank (a convolution, pooling, norm or padding layer) to
    receive a tensor of the input's rank must read it batched, as (N, C, *spatial): torch would
    otherwise take a 3-D input to a Conv2d as one unbatched image, its N as channels. Raises a
    SweepError naming the model (`name`) and the `input_shape` key. The hooks are removed on exit.
    """
    shape, checked = [int(n) for n in input_shape], []
    model_name = f"model {name!r}: " if name else ""

    def check(name: str, module: nn.Module, args) -> None:
        x, rank = (args[0] if args else None), spatial_rank(module)
        if checked or not isinstance(x, torch.Tensor) or x.dim() != len(shape):
            return
        checked.append(name)
        if x.dim() != rank + 2:
            axes = len(shape) - 2
            unbatched = ", so torch would take it as one unbatched sample (its N as channels)" if (
                x.dim() == rank + 1) else ""
            layer = f"{name or '(the model itself)'} ({type(module).__name__})"
            given = f"{shape} gives {axes} spatial ax{'is' if axes == 1 else 'es'}"
            raise SweepError(f"{model_name}key 'input_shape': {given}, but the model's first spatial layer {layer} "
                             f"reads {rank}{unbatched}: give [N, C, *spatial] with {rank} spatial axes")

    handles = [m.register_forward_pre_hook(functools.partial(check, name)) for name, m in model.named_modules()
               if spatial_rank(m) is not None]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
