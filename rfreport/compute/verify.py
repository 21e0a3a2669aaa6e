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
* **mixed scales**: the replacement values of a trial are random normals times a scale drawn per
  input entry from SCALES (1, 8, 1/8), and each entry's scale moves on to the next one from trial
  to trial: one trial already perturbs any region of a few entries at every magnitude (a threshold
  only large values cross, a saturation only small ones leave), and three trials give every entry
  every magnitude.
* **budget**: a trial of k positions costs 1 + k float64 passes. Under the default `verify`
  (`auto`), the sweep's own work pays for them (afford): one pass per ROWS_PER_PASS backward rows
  it ran, or FREE_FLOPS of float64 work where that buys more. The centre and the corners always get
  one trial; the random positions join when one trial of all fits; up to SAMPLES trials run while
  whole trials fit. An explicit request (`all`, a count, positions) gets SAMPLES trials everywhere.
  The decision uses counts only, never a clock: two runs check the same positions the same way.
* **reads**: parameters and buffers the pass up to the target never reads are not copied; they
  and the pass's flops come from one pass of a meta copy of the model (shapes only, no value
  computed), or of the model itself where it does not run on meta (shapes.shape_pass, which runs a
  small model itself while torch's meta kernels are not loaded).
* **dense convolution inputs**: float64 convolutions have no vectorised kernel on a CPU; given a
  channels-last input (ConvNeXt's blocks read the output of a permute) the fallback runs 3-7 times
  slower than on the same values laid out channels-first, so a spatial kernel's input is copied
  channels-first first (:class:`_DenseConvolutions`). The values computed are the same.
* **batching**: the perturbed inputs of several positions are stacked along the batch axis
  (each one a whole input of the user's batch size N; on a CPU only up to CPU_BATCH_BYTES of
  inputs, as a float64 convolution's im2col buffer grows with the stack); a model that refuses the
  larger batch or returns another batch size is run one position at a time. A violation seen in
  a stacked pass is confirmed by an unstacked pass, so a model that couples batch elements cannot
  raise a false alarm.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from rfreport.compute.engine import Target, forward_target, resolve_device
from rfreport.compute.shapes import Reads, real_pass, shape_pass
from rfreport.compute.surrogate import deep_copy, eager_forward, reused, unwrap_compiled
from rfreport.errors import SweepError
from rfreport.positions import PositionSpec, center, resolve, rows_in
from rfreport.results import Verification

RTOL = 1e-9                  # a change above this share of the output's magnitude is a dependency
SAMPLES = 3                  # random (base input, perturbation) trials per checked position, at most
RANDOM_POSITIONS = 3         # random positions checked besides the centre and the corners
SCALES = (1.0, 8.0, 0.125)   # perturbation magnitudes mixed per input entry (saturation, thresholds)
ROWS_PER_PASS = 2            # the sweep's backward rows that buy one float64 pass of a budgeted check
FREE_FLOPS = 2 * 10 ** 9     # float64 work a budgeted check may always spend (about 0.3 s of one CPU core)
CPU_BATCH_BYTES = 32 << 20    # inputs stacked in one CPU pass: float64 im2col buffers grow with the stack
MAX_STACK = 32
CONVOLUTIONS = frozenset({torch.conv1d, torch.conv2d, torch.conv3d})

def default_count(ndim: int) -> int:
    """Return how many positions `verify="auto"` checks: the centre, every corner and a few random ones."""
    return 1 + 2 ** ndim + RANDOM_POSITIONS


@dataclass(frozen=True)
class Plan:
    """The positions a sweep checks, and whether the sweep's own work bounds how many trials they get.

    A budgeted plan (`auto` or True) always checks its `required` rows (the centre and the corners)
    at least once; an explicit request (positions, a count, `all`) is checked in full.
    """

    positions: np.ndarray    # (K, d) int64 swept positions to check
    required: np.ndarray     # (K,) bool: checked however small the budget
    budgeted: bool


Chooser = Callable[[tuple[int, ...]], np.ndarray | Plan]   # output grid -> positions to check
Checks = int | bool | str | Sequence[Sequence[int]] | Chooser


def plan(verify: Checks, selected: np.ndarray, output_spatial: Sequence[int], *, mode: str, local: bool,
         seed: int) -> Plan:
    """Return the swept positions a sweep checks: a count or flag (see resolve_count) or explicit positions.

    Explicit positions (or a function of the output grid returning them, or a Plan) are checked where swept.
    """
    grid = tuple(int(n) for n in output_spatial)
    if callable(verify):
        verify = verify(grid)
    if isinstance(verify, Plan):
        here = rows_in(verify.positions, selected, grid)
        return Plan(verify.positions[here].reshape(-1, len(grid)), verify.required[here], verify.budgeted)
    if isinstance(verify, (list, tuple, np.ndarray)):
        chosen = selected[rows_in(selected, np.asarray(verify, dtype=np.int64), grid)].reshape(-1, len(grid))
        return Plan(chosen, np.ones(len(chosen), dtype=bool), budgeted=False)
    count = resolve_count(verify, mode=mode, local=local, ndim=len(grid))
    chosen = choose(selected, grid, count, seed)
    budgeted = verify == "auto" or verify is True
    leading = len(anchors(selected, grid)) if budgeted and len(selected) else len(chosen)
    return Plan(chosen, np.arange(len(chosen)) < leading, budgeted)


def among(spec: PositionSpec, verify: Checks = "auto", *, mode: str, seed: int) -> Chooser:
    """Return a `verify` argument that picks from a whole selection, so sweeps of its chunks check the same rows."""
    def pick(grid: tuple[int, ...]) -> Plan:
        return plan(verify, resolve(spec, grid), grid, mode=mode, local=False, seed=seed)
    return pick


def afford(checks: Plan, perturbed: np.ndarray, rows: int, flops: int | None,
           samples: int = SAMPLES) -> tuple[np.ndarray, int]:
    """Return which planned positions to check and how many trials each gets, within the sweep's budget.

    A trial of k positions costs 1 + k float64 forward passes of `flops` each (None: unknown): a
    base input, then one perturbed input per position (`perturbed` marks the positions with input
    outside their support; the others cost nothing). A budgeted plan may spend one pass per ROWS_PER_PASS backward
    rows the sweep ran, or FREE_FLOPS in all where that buys more: its required positions get one
    trial whatever the budget, its other positions join when one trial of all fits, and further
    trials (fresh base input and perturbations) run while whole trials fit, up to `samples`.
    Nothing here depends on time, so two runs check the same positions the same way.
    """
    keep = np.ones(len(checks.positions), dtype=bool)
    if not checks.budgeted:
        return keep, samples
    budget = max(rows // ROWS_PER_PASS, 0 if flops is None else FREE_FLOPS // max(flops, 1))
    if 1 + int(perturbed.sum()) > budget:
        keep = checks.required.copy()
    cost = 1 + int(perturbed[keep].sum())
    return keep, int(min(samples, max(1, budget // cost)))


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
    """Pick up to `count` swept positions: nearest the centre, nearest each corner, then random others.

    They come in that order (a budget that cannot afford them all drops the random ones).
    """
    if count <= 0 or len(selected) == 0:
        return np.empty((0, len(output_spatial)), dtype=np.int64)
    picked = anchors(selected, output_spatial)
    rest = np.setdiff1d(np.arange(len(selected)), picked)
    picked += np.random.default_rng(seed).permutation(rest).tolist()
    return np.asarray(selected, dtype=np.int64)[picked[:count]]


def anchors(selected: np.ndarray, output_spatial: Sequence[int]) -> list[int]:
    """Return the distinct rows of `selected` nearest the centre and nearest each corner of the output grid."""
    corners = np.array(list(np.ndindex(*(2,) * len(output_spatial)))) * (np.array(output_spatial) - 1)
    wanted = [np.array(center(output_spatial)), *corners]
    return list(dict.fromkeys(int(np.abs(selected - w).sum(axis=1).argmin()) for w in wanted))


def verify(model: nn.Module, input_shape: Sequence[int], target: Target, positions: np.ndarray,
           masks: np.ndarray, *, samples: int = SAMPLES, seed: int = 0,
           device: str | torch.device = "auto") -> Verification:
    """Check that perturbing every input entry outside each position's support leaves its output unchanged.

    `masks` holds one boolean support (*input_spatial) per row of `positions`; the target's
    layout reads the analysed tensor as (N, C, *spatial), as in the sweep. Every position gets
    `samples` trials.
    """
    positions = np.asarray(positions, dtype=np.int64).reshape(len(masks), -1)
    return check(model, input_shape, target, Plan(positions, np.ones(len(positions), bool), budgeted=False), masks,
                 rows=0, samples=samples, seed=seed, device=device)


def check(model: nn.Module, input_shape: Sequence[int], target: Target, checks: Plan, masks: np.ndarray, *,
          rows: int, samples: int = SAMPLES, seed: int = 0, device: str | torch.device = "auto") -> Verification:
    """Check the planned positions (one support mask each) as far as a sweep of `rows` backward rows affords.

    See afford: an unbudgeted plan checks every position `samples` times.
    """
    started = time.perf_counter()
    masks = np.asarray(masks, dtype=bool)
    shape = tuple(int(n) for n in input_shape)
    rest = ~masks.reshape(len(masks), math.prod(shape[2:])).all(axis=1)   # a whole-input support: nothing to perturb
    if not rest.any():
        return _result(checks.positions, np.zeros(len(masks)), np.zeros(len(masks)), samples, started)
    read = reads(model, shape, target)
    keep, trials = afford(checks, rest, rows, read.flops, samples)
    positions, masks, rest = checks.positions[keep], masks[keep], rest[keep]
    violations, deviation = np.zeros(len(positions), dtype=np.int64), np.zeros(len(positions))
    try:
        working = float64_copy(model, resolve_device(device), read)
    except Exception as exc:  # a model that cannot be copied or cast is reported unverified, not failed
        return _result(positions, violations, deviation, trials, started,
                       note=f"the model could not be copied to float64 ({type(exc).__name__})")
    runner = _Runner(working, shape, target)
    with torch.no_grad(), deterministic(), eager_forward():  # compiled and checkpointed code as plain calls
        for trial in range(trials):
            try:
                changed, relative = runner.trial(positions[rest], masks[rest], seed, trial)
            except SweepError as exc:
                return _result(positions, violations, deviation, trials, started,
                               note=f"the float64 copy of the model did not run: {exc}")
            violations[rest] += changed
            deviation[rest] = np.maximum(deviation[rest], relative)
    return _result(positions, violations, deviation, trials, started)


def nonfinite_positions(model: nn.Module, input_shape: Sequence[int], target: Target, *, seed: int = 0,
                        device: str | torch.device = "auto") -> np.ndarray:
    """Return the output positions (P, d) where the model as given is non-finite (nan or inf, in any batch
    element or channel) on a random input: one float64 forward pass."""
    shape = tuple(int(n) for n in input_shape)
    try:
        runner = _Runner(float64_copy(model, resolve_device(device), reads(model, shape, target)), shape, target)
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


def float64_copy(model: nn.Module, device: torch.device, read: Reads | None = None) -> nn.Module:
    """Return a float64, eval-mode deep copy of the model on a device (compiled modules unwrapped), leaving it as is.

    The parameters and buffers the forward pass up to the target never reads (`read`: a classifier
    after analysed features) are not copied: an empty tensor stands in for each, so a classifier
    head costs nothing here. A pass that did read one after all fails, and the check says the copy
    did not run: unverified, never wrong.
    """
    source = getattr(model, "_orig_mod", model)
    memo: dict[int, Any] = {}
    if read is not None and read.ids is not None:
        for tensor in [*source.parameters(), *source.buffers()]:
            if id(tensor) not in read.ids:
                empty = torch.empty(0, dtype=tensor.dtype)
                memo[id(tensor)] = nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) \
                    else empty
    plain = unwrap_compiled(deep_copy(source, memo))
    return plain.to(device=device, dtype=torch.float64).eval()


def reads(model: nn.Module, input_shape: tuple[int, ...], target: Target) -> Reads:
    """Return which parameters and buffers a forward pass up to the target reads, and its flops.

    One pass of a meta copy (no value computed: shapes only), or where a model does not run on meta
    (a value-dependent branch), one pass of the model as given on zeros without gradients, its flags
    and buffers restored after (see shapes.shape_pass). Unknown (copy everything) when neither runs.
    Inside `surrogates_reused`, once per model, input shape and target.
    """
    return reused(model, ("reads", tuple(input_shape), target), lambda: _reads(model, input_shape, target))


def shifted_ops(model: nn.Module, input_shape: tuple[int, ...], other_shape: tuple[int, ...],
                target: Target) -> tuple[str, ...]:
    """Return the ops that place their windows or slices differently at another input size, by name: then a
    geometry measured there does not hold here (TensorFlow's "same" padding, a centred crop, any pad or slice
    computed from the size). Empty when every op places them alike, or when a shape-only pass at either
    size does not run (nothing to compare; the size-dependent ops the surrogate flags still count).
    """
    here, there = (reads(model, tuple(shape), target).offsets for shape in (input_shape, other_shape))
    if here is None or there is None:
        return ()
    names = {a[0] for a, b in zip(here, there) if a != b}
    if len(here) != len(there) and not names:   # the same ops up to where one pass has more
        names.add(max(here, there, key=len)[min(len(here), len(there))][0])
    return tuple(sorted(names))


def _reads(model: nn.Module, input_shape: tuple[int, ...], target: Target) -> Reads:
    """Return the reads of one pass (see reads), never memoized."""
    def run(working: nn.Module, x: torch.Tensor) -> None:   # how the target is read costs nothing and reads nothing
        forward_target(working, x, target, input_shape, read_layout=False)

    found = shape_pass(model, input_shape, run) or real_pass(model, input_shape, run)
    return found[1] if found is not None else Reads(None, None)


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
            # a private copy: a model may write into its input (`x += 1`), and the trial's inputs are reused
            with _DenseConvolutions():
                y = forward_target(self.working, x.clone(), self.target, self.input_shape)
        if y.shape[0] != x.shape[0]:
            raise SweepError(f"the output batch {y.shape[0]} differs from the input batch {x.shape[0]}")
        return y if y.is_floating_point() or y.is_complex() else y.to(torch.float64)   # an argmax, a mask

    def trial(self, positions: np.ndarray, masks: np.ndarray, seed: int, trial: int) -> tuple[np.ndarray, np.ndarray]:
        """Run one trial for every position; return (changed 0/1, relative deviation) per position."""
        generator = torch.Generator().manual_seed(trial_seed(seed, trial))
        x = torch.randn(self.input_shape, generator=generator, dtype=torch.float64)
        base = self.output(x.to(self.device))
        scale = mixed_scales(self.input_shape, seed, trial)
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


class _DenseConvolutions(TorchFunctionMode):
    """Hand a CPU float64 convolution with a spatial kernel its input laid out channels-first.

    Float64 convolutions on a CPU run through im2col without a vectorised kernel, which for a
    channels-last input (a permute's output) is 3-7 times slower than for the same values
    channels-first (a 7x7 depthwise convolution of 96 channels at 56 x 56: 85 against 15 ms). A 1x1
    kernel reads the input in place either way, so its input is left as it is.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        """Run `func`, with a dense copy of a non-contiguous float64 CPU input when it is a spatial convolution."""
        kwargs = kwargs or {}
        if func in CONVOLUTIONS and len(args) > 1 and _strided(args[0]) and math.prod(args[1].shape[2:]) > 1:
            args = (args[0].contiguous(), *args[1:])
        return func(*args, **kwargs)


def _strided(x: Any) -> bool:
    """Tell whether a value is a float64 CPU tensor whose layout is not channels-first contiguous."""
    return isinstance(x, torch.Tensor) and x.dtype == torch.float64 and x.device.type == "cpu" \
        and not x.is_contiguous()


def trial_seed(seed: int, trial: int) -> int:
    """Return the seed of one trial's draws: distinct per trial, within torch's 64 bits for every seed a run takes
    (0 to 2**63 - 1)."""
    return (seed * 1009 + trial) % (1 << 64)


def mixed_scales(shape: tuple[int, ...], seed: int, trial: int) -> torch.Tensor:
    """Return each input entry's perturbation scale in a trial: SCALES mixed at random over the entries.

    Every entry's scale moves to the next of SCALES from one trial to the next, so within
    len(SCALES) trials every entry meets every scale, and one trial already perturbs any region of
    a few entries at every scale (a threshold that only large values cross, a saturation that only
    small ones leave).
    """
    kinds = torch.randint(len(SCALES), shape, generator=torch.Generator().manual_seed(trial_seed(seed, 1008)))
    return torch.tensor(SCALES, dtype=torch.float64)[(kinds + trial) % len(SCALES)]


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
