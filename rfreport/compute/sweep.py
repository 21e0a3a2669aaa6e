"""The sweep: the exact receptive field of every selected output position.

A sweep turns positions into supports with the engine's batched one-hot gradients and
reduces each support mask to its bounds, size and count right away, so memory stays
bounded however many positions are swept. Masks are kept only for the positions asked
for, and the per-input-pixel coverage (how many swept positions see each input pixel)
is accumulated on the way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from torch import nn

from rfreport import positions as positions_mod
from rfreport.compute import verify as verify_mod
from rfreport.compute.compress import compressed_sweep
from rfreport.compute.dense import dense_sweep
from rfreport.compute.engine import Engine, Target
from rfreport.errors import GRADIENT_HINT, SweepError
from rfreport.layouts import parse_layout
from rfreport.options import SweepMethod, values
from rfreport.results import Accumulator, SweepResult


def resolve_batch_size(engine: Engine, batch_size: int | str) -> int:
    """Return the chunk size: the engine's memory-based choice for `auto`, else a positive int."""
    if batch_size == "auto":
        return engine.auto_batch_size()
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise SweepError(f"batch_size must be a positive integer or 'auto', not {batch_size!r}")
    return value


def sweep(model: nn.Module, input_shape: Sequence[int], positions: positions_mod.PositionSpec = "all", *,
          mode: str = "structural", layer: str | None = None, output: str | int | None = None,
          batch_size: int | str = "auto", device: str = "auto", seed: int = 0, probes: int = 2,
          local: bool = False, keep_masks: positions_mod.PositionSpec | None = None,
          method: str = "auto", progress=None, layout: str = "nchw", dtype: str = "float32",
          verify: verify_mod.Checks = "auto") -> SweepResult:
    """Sweep the receptive fields of the selected output positions of a model.

    `positions` may also be a function of the output grid's shape returning a selection;
    `mode` is `structural` (exact theoretical RF) or `gradient` (naive data-dependent support);
    `layer`/`output` choose the analysed tensor; `keep_masks` names positions whose boolean
    support masks are returned (True: every swept position); `method` is `dense`, `compressed` or
    `auto` (see compress.py; SweepResult.method_note says why a compressed sweep ran densely);
    `progress`, if given, is called with the number of positions done after each chunk;
    `layout` (`nchw`, `nhwc`, `tokens`, `tokens:HxW`) says how the analysed tensor's axes are read;
    `dtype` (`float32` or `float64`) is the structural surrogate's precision (the answers are the same).
    `verify` is how many swept positions are checked on the model itself (see verify.py):
    `auto` (centre, corners and a few random ones in structural mode), `all`, a count, False, or
    explicit positions (or a function of the output grid returning them), checked where swept.
    """
    started = time.perf_counter()
    target = Target(layer=layer, output=output, layout=parse_layout(layout))
    with Engine(model, tuple(input_shape), mode=mode, target=target, device=device, seed=seed,
                probes=probes, local=local, dtype=dtype) as engine:
        spec = positions(engine.output_spatial) if callable(positions) else positions
        selected = positions_mod.resolve(spec, engine.output_spatial)
        keep = selected if keep_masks is True else (
            positions_mod.resolve(keep_masks, engine.output_spatial) if keep_masks else np.empty((0, 0)))
        refuse_nonfinite(engine, model, selected, target, seed)
        checks = verify_mod.plan(verify, selected, engine.output_spatial, mode=mode, local=local, seed=seed)
        masked = set(map(tuple, keep.tolist())) | set(map(tuple, checks.positions.tolist()))
        acc = Accumulator(engine.input_spatial, masked, wrap="circular" in engine.padding_modes)
        size = resolve_batch_size(engine, batch_size)
        note = _run_method(method, engine, selected, size, acc, progress)
        pos, lo, hi, support, wrapped, path = acc.arrays()
        result = SweepResult(
            input_shape=engine.input_shape, output_shape=engine.output_shape, mode=mode,
            device=str(engine.device), positions=pos, lo=lo, hi=hi, support=support, wrapped=wrapped,
            path=path, coverage=acc.coverage, masks=acc.masks, padding_modes=engine.padding_modes,
            size_dependent_ops=engine.size_dependent_ops, past_grid=engine.past_grid,
            target=target.describe(), local=local, seconds=time.perf_counter() - started, method_note=note)
        read, rows = engine.target, engine.rows   # an inferred token grid made explicit by the pass
    kept = set(map(tuple, keep.tolist()))
    return with_verification(result, model, read, checks, kept, rows=rows, seed=seed, started=started)


def refuse_nonfinite(engine: Engine, model: nn.Module, selected: np.ndarray, target: Target, seed: int) -> None:
    """Refuse swept positions the model computes as nan or inf: no input pixel changes them, so no RF is defined.

    The surrogate holds non-finite values constant where they arise, which keeps every other position exact;
    when it met one, a forward pass of the model itself says which output positions it reaches. A non-finite
    value the surrogate made from finite operands alone is refused: the model may not have it.
    """
    if engine.unexplained_nonfinite:
        raise SweepError(f"the structural pass of {target.describe()} made nan or inf from finite values at "
                         f"{', '.join(engine.unexplained_nonfinite)} (an overflow, or a square root or log of a value "
                         "negative only in the surrogate): the dependencies through it cannot be followed; use "
                         f"{GRADIENT_HINT}")
    if not engine.nonfinite_ops:
        return
    found = verify_mod.nonfinite_positions(model, engine.input_shape, target, seed=seed, device=engine.device)
    reached = {tuple(p) for p in found.tolist()}
    hit = [tuple(p) for p in selected.tolist() if tuple(p) in reached]
    if hit:
        raise SweepError(f"{target.describe()} is nan or inf at {len(hit)} of {len(selected)} swept positions "
                         f"(first {hit[0]}) on a random input: a non-finite value (from "
                         f"{', '.join(engine.nonfinite_ops)}) reaches them, and no input pixel changes them; "
                         "sweep other positions or analyse an earlier layer")


def with_verification(result: SweepResult, model: nn.Module, target: Target, checks: verify_mod.Plan,
                      keep: set[tuple[int, ...]], *, rows: int, seed: int, started: float) -> SweepResult:
    """Check the planned rows that the sweep's `rows` backward rows afford on the model itself and record it;
    drop the masks only the check needed."""
    verified, violations = np.zeros(len(result.positions), bool), np.zeros(len(result.positions), np.int64)
    if not len(checks.positions):
        return replace(result, verified=verified, violations=violations)
    masks = np.stack([result.masks[tuple(p)] for p in checks.positions.tolist()])
    done = verify_mod.check(model, result.input_shape, target, checks, masks, rows=rows, seed=seed,
                            device=result.device)
    index = positions_mod.index_in(result.positions, done.positions, result.output_spatial)   # its checked row
    verified = index >= 0
    violations[verified] = done.violations[index[verified]]
    return replace(result, masks={p: m for p, m in result.masks.items() if p in keep}, verified=verified,
                   violations=violations, verification=done, seconds=time.perf_counter() - started)


def _run_method(method: str, engine: Engine, selected: np.ndarray, size: int, acc: Accumulator,
                progress) -> str:
    """Dispatch to the dense or the compressed sweep; return why a compressed sweep ran densely, if it did."""
    if method not in values(SweepMethod):
        raise SweepError(f"unknown sweep method {method!r}; use auto, dense or compressed")
    if method == "dense":
        dense_sweep(engine, selected, size, acc, progress)
        return ""
    return compressed_sweep(engine, selected, size, acc, progress, auto=method == "auto")
