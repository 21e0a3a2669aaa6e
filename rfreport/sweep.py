"""The sweep: the exact receptive field of every selected output position.

A sweep turns positions into supports with the engine's batched one-hot gradients and
reduces each support mask to its bounds, size and count right away, so memory stays
bounded however many positions are swept. Masks are kept only for the positions asked
for, and the per-input-pixel coverage (how many swept positions see each input pixel)
is accumulated on the way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from rfreport import positions as positions_mod
from rfreport.engine import Engine, Target
from rfreport.errors import SweepError
from rfreport.layouts import parse_layout


@dataclass(frozen=True)
class SweepResult:
    """Exact receptive fields of the swept output positions of one model at one input shape.

    Arrays have one row per position in `positions` order; bounds are 0-based inclusive input
    indices. With circular padding a wrapped RF has unrolled bounds (lo < 0 or hi >= n, indices
    taken modulo n) and `wrapped` set. A position whose output ignores the input has support 0
    and bounds -1.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    mode: str
    device: str
    positions: np.ndarray          # (P, d) int64 output positions
    lo: np.ndarray                 # (P, d) int64 inclusive lower bounds
    hi: np.ndarray                 # (P, d) int64 inclusive upper bounds
    support: np.ndarray            # (P,) int64 count of input positions in the support
    wrapped: np.ndarray            # (P, d) bool, the support wraps around the border on that axis
    path: np.ndarray               # (P,) str, "dense" or "compressed": which sweep produced the row
    coverage: np.ndarray           # input spatial shape, int64: swept positions that see each input pixel
    masks: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)
    padding_modes: tuple[str, ...] = ()
    target: str = "model output"
    local: bool = False
    seconds: float = 0.0
    method_note: str = ""          # why a compressed sweep ran densely (empty when it did not need to)

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.input_shape) - 2

    @property
    def input_spatial(self) -> tuple[int, ...]:
        """Spatial shape of the input grid."""
        return tuple(self.input_shape[2:])

    @property
    def output_spatial(self) -> tuple[int, ...]:
        """Spatial shape of the output grid."""
        return tuple(self.output_shape[2:])

    @property
    def size(self) -> np.ndarray:
        """(P, d) extent of each bounding box, hi - lo + 1 (0 for an empty support)."""
        return np.where(self.support[:, None] > 0, self.hi - self.lo + 1, 0)


@dataclass
class _Accumulator:
    """Collects per-chunk bounds, the coverage and the kept masks of a sweep."""

    input_spatial: tuple[int, ...]
    keep: set[tuple[int, ...]]
    wrap: bool
    rows: list[tuple] = field(default_factory=list)
    masks: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        self.coverage = np.zeros(self.input_spatial, dtype=np.int64)

    def add(self, chunk: np.ndarray, support: torch.Tensor | np.ndarray, path: str) -> None:
        """Reduce a chunk of support masks (B, *input_spatial) to bounds and fold in its coverage."""
        support = support.cpu().numpy() if isinstance(support, torch.Tensor) else np.asarray(support)
        bounds = mask_bounds(support, wrap=self.wrap)
        self.add_bounds(chunk, bounds, support.sum(axis=0, dtype=np.int64), lambda i: support[i].copy(), path)

    def add_bounds(self, chunk: np.ndarray, bounds: tuple[np.ndarray, ...], coverage: np.ndarray,
                   mask_of: Callable[[int], np.ndarray], path: str) -> None:
        """Record already reduced rows (lo, hi, support, wrapped), their summed coverage and kept masks."""
        self.coverage += coverage
        self.rows.append((chunk, *bounds, np.full(len(chunk), path)))
        if self.keep:
            for i, pos in enumerate(map(tuple, chunk.tolist())):
                if pos in self.keep:
                    self.masks[pos] = mask_of(i)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """Concatenate the chunks and return them in position order."""
        parts = [np.concatenate(column) for column in zip(*self.rows)]
        order = np.lexsort(parts[0].T[::-1])
        return tuple(part[order] for part in parts)


def mask_bounds(masks: torch.Tensor | np.ndarray, *, wrap: bool = False):
    """Return (lo, hi, support, wrapped) of a batch of boolean masks (B, *spatial) as numpy arrays."""
    masks = np.asarray(masks)
    batch, ndim = masks.shape[0], masks.ndim - 1
    flat = masks.reshape(batch, -1)
    projections = [masks.any(axis=tuple(d + 1 for d in range(ndim) if d != axis)) if ndim > 1 else flat
                   for axis in range(ndim)]
    return projection_bounds(projections, flat.sum(axis=1, dtype=np.int64), wrap=wrap)


def projection_bounds(projections: Sequence[np.ndarray], support: np.ndarray, *, wrap: bool = False):
    """Return (lo, hi, support, wrapped) from per-axis projections (B, n_axis) of masks and their counts."""
    batch = len(support)
    lo = np.full((batch, len(projections)), -1, dtype=np.int64)
    hi = np.full((batch, len(projections)), -1, dtype=np.int64)
    wrapped = np.zeros((batch, len(projections)), dtype=bool)
    for axis, projection in enumerate(projections):
        n = projection.shape[1]
        hit = projection.any(axis=1)
        lo[hit, axis] = projection.argmax(axis=1)[hit]
        hi[hit, axis] = n - 1 - projection[:, ::-1].argmax(axis=1)[hit]
        if wrap:
            _unroll_wrapped(projection, lo[:, axis], hi[:, axis], wrapped[:, axis])
    return lo, hi, np.asarray(support, dtype=np.int64), wrapped


def _unroll_wrapped(projection: np.ndarray, lo: np.ndarray, hi: np.ndarray, wrapped: np.ndarray) -> None:
    """Replace a full-width box by the unrolled extent where the support wraps round the border."""
    n = projection.shape[1]
    for row in np.flatnonzero(projection[:, 0] & projection[:, -1] & ~projection.all(axis=1)):
        seen = np.flatnonzero(projection[row])
        gaps = np.diff(seen)
        widest = int(np.argmax(gaps))
        if gaps[widest] - 1 > n - 1 - (seen[-1] - seen[0]):
            lo[row], hi[row] = seen[widest + 1] - n, seen[widest]
            wrapped[row] = True


def one_hot_weights(chunk: np.ndarray, output_spatial: tuple[int, ...]) -> torch.Tensor:
    """Return (B, *output_spatial) cotangent weights with a single 1 at each chunk position."""
    weights = torch.zeros((len(chunk), *output_spatial), dtype=torch.float64)
    weights[(torch.arange(len(chunk)), *torch.as_tensor(chunk).T)] = 1.0
    return weights


def chunks(rows: np.ndarray, size: int) -> Iterable[np.ndarray]:
    """Split an array of positions into consecutive chunks of at most `size` rows."""
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def dense_sweep(engine: Engine, selected: np.ndarray, batch_size: int, acc: _Accumulator,
                progress=None) -> None:
    """Sweep positions with one one-hot cotangent per position, `batch_size` per backward pass."""
    for chunk in chunks(selected, batch_size):
        acc.add(chunk, engine.support(one_hot_weights(chunk, engine.output_spatial)), "dense")
        if progress is not None:
            progress(len(chunk))


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
          method: str = "auto", progress=None, layout: str = "nchw", dtype: str = "float32") -> SweepResult:
    """Sweep the receptive fields of the selected output positions of a model.

    `positions` may also be a function of the output grid's shape returning a selection;
    `mode` is `structural` (exact theoretical RF) or `gradient` (naive data-dependent support);
    `layer`/`output` choose the analysed tensor; `keep_masks` names positions whose boolean
    support masks are returned (True: every swept position); `method` is `dense`, `compressed` or
    `auto` (see compress.py; SweepResult.method_note says why a compressed sweep ran densely);
    `progress`, if given, is called with the number of positions done after each chunk;
    `layout` (`nchw`, `nhwc`, `tokens`, `tokens:HxW`) says how the analysed tensor's axes are read;
    `dtype` (`float32` or `float64`) is the structural surrogate's precision (the answers are the same).
    """
    started = time.perf_counter()
    target = Target(layer=layer, output=output, layout=parse_layout(layout))
    with Engine(model, tuple(input_shape), mode=mode, target=target, device=device, seed=seed,
                probes=probes, local=local, dtype=dtype) as engine:
        spec = positions(engine.output_spatial) if callable(positions) else positions
        selected = positions_mod.resolve(spec, engine.output_spatial)
        keep = selected if keep_masks is True else (
            positions_mod.resolve(keep_masks, engine.output_spatial) if keep_masks else np.empty((0, 0)))
        acc = _Accumulator(engine.input_spatial, set(map(tuple, keep.tolist())),
                           wrap="circular" in engine.padding_modes)
        size = resolve_batch_size(engine, batch_size)
        note = _run_method(method, engine, selected, size, acc, progress)
        pos, lo, hi, support, wrapped, path = acc.arrays()
        return SweepResult(
            input_shape=engine.input_shape, output_shape=engine.output_shape, mode=mode,
            device=str(engine.device), positions=pos, lo=lo, hi=hi, support=support, wrapped=wrapped,
            path=path, coverage=acc.coverage, masks=acc.masks, padding_modes=engine.padding_modes,
            target=target.describe(), local=local, seconds=time.perf_counter() - started, method_note=note)


def _run_method(method: str, engine: Engine, selected: np.ndarray, size: int, acc: _Accumulator,
                progress) -> str:
    """Dispatch to the dense or the compressed sweep; return why a compressed sweep ran densely, if it did."""
    if method not in ("auto", "dense", "compressed"):
        raise SweepError(f"unknown sweep method {method!r}; use auto, dense or compressed")
    if method == "dense":
        dense_sweep(engine, selected, size, acc, progress)
        return ""
    from rfreport.compress import compressed_sweep  # compress.py builds on this module's helpers
    return compressed_sweep(engine, selected, size, acc, progress, auto=method == "auto")
