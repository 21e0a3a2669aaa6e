"""Run-time verification: reported supports checked on the model itself by forward perturbation.

The structural sweep differentiates a surrogate. This module is the net under it, and it uses
no autograd: for a sample of swept positions it runs a float64, eval-mode copy of the model as
given on a random input, replaces every input entry *outside* a position's reported support by
fresh random values, runs it again and compares that output position (every channel, every
batch element). A change there means the output depends on a pixel the report left out: the
reported receptive field is too small, and the result is marked not exact.

Choices, and why:

* **eval mode**, like the surrogate: the structural RF describes the network's inference-time
  wiring. In train mode batch-norm statistics make every output depend on every input pixel of
  the batch (by design, not a receptive field) and dropout draws a new mask per pass.
* **float64 copy**: the user's model is never touched (no flag, buffer or hook changes), and
  rounding noise is ~1e-16 of the values involved.
* **tolerance**: convolution algorithms (Winograd, FFT, tiled GEMM; a different one per batch
  size) mix the inputs of a tile numerically, so an output may move by rounding noise when
  pixels outside its RF change. That noise is a few ulps of the largest values in play, so a
  trial counts as a violation only when the position moves by more than ``RTOL`` (1e-9, about
  4.5e6 ulps) of the largest magnitude of the base or perturbed output. A real dependency moves
  it by its weight times the perturbation, O(1) relative for any weight that is not negligible.
* **batching**: the perturbed inputs of several positions are stacked along the batch axis
  (each one a whole input of the user's batch size N); a model that refuses the larger batch or
  returns another batch size is run one position at a time. A violation seen in a stacked pass
  is confirmed by an unstacked pass, so a model that couples batch elements cannot raise a
  false alarm.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from rfreport.compute.engine import Target, forward_target, preserved, resolve_device
from rfreport.compute.surrogate import eager_forward, tensors_of, unwrap_compiled
from rfreport.errors import SweepError
from rfreport.positions import PositionSpec, center, resolve
from rfreport.results import Verification

RTOL = 1e-9                  # a change above this share of the output's magnitude is a dependency
SAMPLES = 3                  # random (base input, perturbation) trials per checked position
RANDOM_POSITIONS = 3         # random positions checked besides the centre and the corners
SCALES = (1.0, 8.0, 0.125)   # perturbation magnitudes cycled over the trials (saturation, thresholds)
CPU_BATCH_BYTES = 256 << 20
MAX_STACK = 32

def default_count(ndim: int) -> int:
    """Return how many positions `verify="auto"` checks: the centre, every corner and a few random ones."""
    return 1 + 2 ** ndim + RANDOM_POSITIONS


Chooser = Callable[[tuple[int, ...]], np.ndarray]   # output grid -> positions to check
Checks = int | bool | str | Sequence[Sequence[int]] | Chooser


def plan(verify: Checks, selected: np.ndarray, output_spatial: Sequence[int], *, mode: str, local: bool,
         seed: int) -> np.ndarray:
    """Return the swept positions a sweep checks: a count or flag (see resolve_count) or explicit positions.

    Explicit positions (or a function of the output grid returning them) are checked where swept.
    """
    grid = tuple(int(n) for n in output_spatial)
    if callable(verify):
        verify = verify(grid)
    if isinstance(verify, (list, tuple, np.ndarray)):
        wanted = set(map(tuple, np.asarray(verify, dtype=np.int64).reshape(-1, len(grid)).tolist()))
        return selected[[tuple(p) in wanted for p in selected.tolist()]].reshape(-1, len(grid))
    return choose(selected, grid, resolve_count(verify, mode=mode, local=local, ndim=len(grid)), seed)


def among(spec: PositionSpec, verify: Checks = "auto", *, mode: str, seed: int) -> Chooser:
    """Return a `verify` argument that picks from a whole selection, so sweeps of its chunks check the same rows."""
    def pick(grid: tuple[int, ...]) -> np.ndarray:
        return plan(verify, resolve(spec, grid), grid, mode=mode, local=False, seed=seed)
    return pick


def resolve_count(verify: int | bool | str, *, mode: str, local: bool, ndim: int) -> int:
    """Return how many positions a sweep checks: `auto` (structural, non-local sweeps), True, False, `all` or a count.

    A local sweep holds global-context paths constant and gradient mode reports data-dependent
    supports, both smaller than the model's dependencies on purpose: `auto` checks neither.
    """
    if verify == "auto":
        return default_count(ndim) if mode == "structural" and not local else 0
    if verify == "all":
        return np.iinfo(np.int64).max
    if isinstance(verify, bool):
        return default_count(ndim) if verify else 0
    if isinstance(verify, int) and verify >= 0:
        return verify
    raise SweepError(f"verify must be auto, all, true, false or a number of positions >= 0, not {verify!r}")


def choose(selected: np.ndarray, output_spatial: Sequence[int], count: int, seed: int = 0) -> np.ndarray:
    """Pick up to `count` swept positions: nearest the centre, nearest each corner, then random others."""
    if count <= 0 or len(selected) == 0:
        return np.empty((0, len(output_spatial)), dtype=np.int64)
    if count >= len(selected):
        return np.asarray(selected, dtype=np.int64)
    corners = np.array(list(np.ndindex(*(2,) * len(output_spatial)))) * (np.array(output_spatial) - 1)
    wanted = [np.array(center(output_spatial)), *corners]
    picked = list(dict.fromkeys(int(np.abs(selected - w).sum(axis=1).argmin()) for w in wanted))
    rest = np.setdiff1d(np.arange(len(selected)), picked)
    picked += np.random.default_rng(seed).permutation(rest).tolist()
    return np.asarray(selected, dtype=np.int64)[np.sort(picked[:count])]


def verify(model: nn.Module, input_shape: Sequence[int], target: Target, positions: np.ndarray,
           masks: np.ndarray, *, samples: int = SAMPLES, seed: int = 0,
           device: str | torch.device = "auto") -> Verification:
    """Check that perturbing every input entry outside each position's support leaves its output unchanged.

    `masks` holds one boolean support (*input_spatial) per row of `positions`; the target's
    layout reads the analysed tensor as (N, C, *spatial), as in the sweep.
    """
    started = time.perf_counter()
    positions = np.asarray(positions, dtype=np.int64).reshape(len(masks), -1)
    masks = np.asarray(masks, dtype=bool)
    shape = tuple(int(n) for n in input_shape)
    violations = np.zeros(len(positions), dtype=np.int64)
    deviation = np.zeros(len(positions))
    rest = ~masks.reshape(len(masks), math.prod(shape[2:])).all(axis=1)   # a whole-input support: nothing to perturb
    if not rest.any():
        return _result(positions, violations, deviation, samples, started)
    try:
        working = float64_copy(model, resolve_device(device), shape, target)
    except Exception as exc:  # a model that cannot be copied or cast is reported unverified, not failed
        return _result(positions, np.zeros(len(positions)), np.zeros(len(positions)), samples, started,
                       note=f"the model could not be copied to float64 ({type(exc).__name__})")
    runner = _Runner(working, shape, target)
    with torch.no_grad(), deterministic(), eager_forward():  # compiled and checkpointed code as plain calls
        for trial in range(samples):
            try:
                changed, relative = runner.trial(positions[rest], masks[rest], seed, trial)
            except SweepError as exc:
                return _result(positions, np.zeros(len(positions)), np.zeros(len(positions)), samples, started,
                               note=f"the float64 copy of the model did not run: {exc}")
            violations[rest] += changed
            deviation[rest] = np.maximum(deviation[rest], relative)
    return _result(positions, violations, deviation, samples, started)


def nonfinite_positions(model: nn.Module, input_shape: Sequence[int], target: Target, *, seed: int = 0,
                        device: str | torch.device = "auto") -> np.ndarray:
    """Return the output positions (P, d) where the model as given is non-finite (nan or inf, in any batch
    element or channel) on a random input: one float64 forward pass."""
    shape = tuple(int(n) for n in input_shape)
    try:
        runner = _Runner(float64_copy(model, resolve_device(device), shape, target), shape, target)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        with torch.no_grad(), deterministic(), eager_forward():
            y = runner.output(x.to(runner.device))
    except Exception as exc:  # the model may raise anything; the caller cannot then tell the positions apart
        raise SweepError(f"{target.describe()} meets non-finite values (nan or inf) and the float64 copy of the "
                         f"model that would locate them did not run ({type(exc).__name__})") from exc
    return np.argwhere(~torch.isfinite(y).flatten(0, 1).all(0).cpu().numpy())


def _result(positions, violations, deviation, samples, started, note: str = "") -> Verification:
    """Assemble a Verification (an empty one, with its note, when nothing could be checked)."""
    if note:
        positions = positions[:0]
    return Verification(positions=positions, violations=np.asarray(violations, dtype=np.int64)[:len(positions)],
                        deviation=np.asarray(deviation, dtype=np.float64)[:len(positions)], samples=samples,
                        seconds=time.perf_counter() - started, note=note)


def float64_copy(model: nn.Module, device: torch.device, input_shape: tuple[int, ...] | None = None,
                 target: Target | None = None) -> nn.Module:
    """Return a float64, eval-mode deep copy of the model on a device (compiled modules unwrapped), leaving it as is.

    With an input shape and target, the parameters and buffers the forward pass up to the target never
    reads (a classifier after analysed features) are not copied: an empty tensor stands in for each, so a
    classifier head costs nothing here. A pass that did read one after all fails, and the check says
    the copy did not run: unverified, never wrong.
    """
    source = getattr(model, "_orig_mod", model)
    memo: dict[int, Any] = {}
    if input_shape is not None and target is not None:
        read = tensors_read(model, input_shape, target)
        for tensor in [*source.parameters(), *source.buffers()]:
            if id(tensor) not in read:
                empty = torch.empty(0, dtype=tensor.dtype)
                memo[id(tensor)] = nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) \
                    else empty
    plain = unwrap_compiled(copy.deepcopy(source, memo))
    return plain.to(device=device, dtype=torch.float64).eval()


class _Reads(TorchFunctionMode):
    """Record the ids of every tensor an op receives."""

    def __init__(self):
        super().__init__()
        self.ids: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ids.update(id(t) for t in tensors_of((args, kwargs)))
        return func(*args, **kwargs)


def tensors_read(model: nn.Module, input_shape: tuple[int, ...], target: Target) -> set[int]:
    """Return the ids of the tensors (parameters and buffers among them) a forward pass up to the target reads.

    One pass of the model as given on zeros, without gradients, its flags and buffers restored after.
    Empty when the model does not run: then nothing is left out of a copy.
    """
    x = torch.zeros(input_shape, dtype=next((p.dtype for p in model.parameters() if p.is_floating_point()),
                                            torch.float32), device=next((p.device for p in model.parameters()),
                                                                        torch.device("cpu")))
    reads = _Reads()
    try:
        with preserved(model), torch.no_grad(), eager_forward(), reads:
            model.eval()
            forward_target(model, x, target, input_shape)
    except Exception:  # the model may raise anything; copying everything is always safe
        return {id(t) for t in [*model.parameters(), *model.buffers()]}
    return reads.ids


@contextmanager
def deterministic() -> Iterator[None]:
    """Ask cuDNN for deterministic, non-benchmarked algorithms during the block (no-op on CPU)."""
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True,
                                    allow_tf32=False):
        yield


class _Runner:
    """Forward passes of the float64 copy: a base input, then perturbed inputs stacked along the batch axis."""

    def __init__(self, working: nn.Module, input_shape: tuple[int, ...], target: Target):
        self.working, self.input_shape, self.target = working, input_shape, target
        self.device = next((t.device for t in [*working.parameters(), *working.buffers()]), torch.device("cpu"))
        per_item = 16 * math.prod(input_shape) * 8
        budget = CPU_BATCH_BYTES
        if self.device.type == "cuda":
            budget = torch.cuda.mem_get_info(self.device)[0] // 8
        self.stack = int(max(1, min(MAX_STACK, budget // per_item)))

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Run the copy and return the analysed tensor as (batch, C, *spatial)."""
        # a model that draws random numbers in eval mode (noise layers) draws the same ones on every pass
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            y = forward_target(self.working, x, self.target, self.input_shape)
        if y.shape[0] != x.shape[0]:
            raise SweepError(f"the output batch {y.shape[0]} differs from the input batch {x.shape[0]}")
        return y

    def trial(self, positions: np.ndarray, masks: np.ndarray, seed: int, trial: int) -> tuple[np.ndarray, np.ndarray]:
        """Run one trial for every position; return (changed 0/1, relative deviation) per position."""
        generator = torch.Generator().manual_seed(seed * 1009 + trial)
        x = torch.randn(self.input_shape, generator=generator, dtype=torch.float64)
        base = self.output(x.to(self.device))
        scale = SCALES[trial % len(SCALES)]
        noise = [torch.randn(self.input_shape, generator=generator, dtype=torch.float64) * scale for _ in positions]
        perturbed = [torch.where(torch.as_tensor(m), x, r) for m, r in zip(masks, noise)]
        relative = self._compare(positions, perturbed, base)
        if self.stack > 1 and (relative > RTOL).any():
            self._confirm(relative, positions, perturbed, base)
        return (relative > RTOL).astype(np.int64), relative

    def _confirm(self, relative: np.ndarray, positions: np.ndarray, perturbed: list[torch.Tensor],
                 base: torch.Tensor) -> None:
        """Redo suspected violations one input per pass; stop stacking if that clears one (coupled batch)."""
        for i in np.flatnonzero(relative > RTOL):
            alone = self._compare(positions[i:i + 1], perturbed[i:i + 1], base, stack=1)[0]
            if alone <= RTOL:
                self.stack = 1
            relative[i] = alone

    def _compare(self, positions: np.ndarray, perturbed: list[torch.Tensor], base: torch.Tensor,
                 stack: int | None = None) -> np.ndarray:
        """Return each position's largest change relative to the magnitude of base and perturbed outputs."""
        relative = np.zeros(len(positions))
        for start, outputs in self._outputs(perturbed, stack or self.stack):
            for j, y in enumerate(outputs):
                index = (slice(None), slice(None), *positions[start + j].tolist())
                relative[start + j] = _relative_change(base, y, index)
        return relative

    def _outputs(self, inputs: list[torch.Tensor], stack: int) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Yield (first index, outputs) per stacked pass; fall back to one input per pass when stacking fails."""
        n = self.input_shape[0]
        for start in range(0, len(inputs), stack):
            group = inputs[start:start + stack]
            if len(group) > 1:
                try:
                    y = self.output(torch.cat(group).to(self.device))
                    yield start, list(y.split(n))
                    continue
                except SweepError:
                    self.stack = stack = 1
            yield start, [self.output(x.to(self.device)) for x in group]


def _relative_change(base: torch.Tensor, other: torch.Tensor, index: tuple) -> float:
    """Return max |other - base| at an output position over the largest finite magnitude of either output."""
    if base.shape != other.shape:
        return math.inf
    a, b = base[index], other[index]
    finite = torch.isfinite(a) & torch.isfinite(b)
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))   # NaN where both are NaN counts as unchanged
    if not bool(same[~finite].all()):
        return math.inf
    change = float((a - b)[finite].abs().max()) if finite.any() else 0.0
    if change == 0.0:
        return 0.0
    magnitude = max(float(base.nan_to_num(0, 0, 0).abs().max()), float(other.nan_to_num(0, 0, 0).abs().max()))
    return change / magnitude if magnitude > 0 else math.inf
