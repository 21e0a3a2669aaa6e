"""What a sweep returns, as numpy arrays: the contract between the compute and analysis stages.

Torch-free on purpose: the analysis, the frames and the run folder read sweep results without
importing torch. The compute stage fills an :class:`Accumulator` chunk by chunk and freezes it
into a :class:`SweepResult`; verification results of chunk sweeps join here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rfreport.options import ContextKind


@dataclass(frozen=True)
class Verification:
    """Forward-perturbation check of reported supports on a float64 eval copy of the model (no autograd)."""

    positions: np.ndarray     # (K, d) int64 checked output positions
    violations: np.ndarray    # (K,) int64 trials in which perturbing outside the support changed the output
    deviation: np.ndarray     # (K,) float64 largest change at the position, relative to the output's magnitude
    samples: int              # trials per checked position
    seconds: float
    note: str = ""            # why nothing could be checked (e.g. the model does not run in float64), else ""

    @property
    def checked(self) -> int:
        """Number of positions checked."""
        return len(self.positions)

    @property
    def failed(self) -> int:
        """Number of checked positions with at least one violating trial."""
        return int((self.violations > 0).sum())

    @property
    def max_deviation(self) -> float:
        """Largest relative change seen at any checked position (below RTOL is rounding noise)."""
        return float(self.deviation.max()) if len(self.deviation) else 0.0


def join(parts: Sequence[Verification | None]) -> Verification | None:
    """Join the verifications of chunk sweeps of one job (rows concatenated, seconds summed, fewest trials)."""
    done = [p for p in parts if p is not None]
    if not done:
        return None
    notes = dict.fromkeys(p.note for p in done if p.note)
    return Verification(positions=np.concatenate([p.positions for p in done]),
                        violations=np.concatenate([p.violations for p in done]),
                        deviation=np.concatenate([p.deviation for p in done]),
                        samples=min((p.samples for p in done if p.checked), default=done[0].samples),
                        seconds=sum(p.seconds for p in done), note="; ".join(notes))


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
    size_dependent_ops: tuple[str, ...] = ()   # ops that make the geometry depend on the input size
    past_grid: tuple[int, ...] = ()   # axes where a kernel reads taps past its grid at the centre: RFs look narrower
    target: str = "model output"
    local: bool = False
    seconds: float = 0.0
    method_note: str = ""          # why a compressed sweep ran densely (empty when it did not need to)
    verified: np.ndarray | None = None     # (P,) bool: the row was checked on the model by forward perturbation
    violations: np.ndarray | None = None   # (P,) int64: perturbation trials that changed a checked row's output
    verification: Verification | None = None

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
class Accumulator:
    """Collects per-chunk bounds, the coverage and the kept masks of a sweep."""

    input_spatial: tuple[int, ...]
    keep: set[tuple[int, ...]]
    wrap: bool
    rows: list[tuple] = field(default_factory=list)
    masks: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        self.coverage = np.zeros(self.input_spatial, dtype=np.int64)

    def add(self, chunk: np.ndarray, support: np.ndarray, path: str) -> None:
        """Reduce a chunk of support masks (B, *input_spatial) to bounds and fold in its coverage."""
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


def mask_bounds(masks: np.ndarray, *, wrap: bool = False):
    """Return (lo, hi, support, wrapped) of a batch of boolean masks (B, *spatial) as numpy arrays."""
    masks = np.asarray(masks)
    batch, ndim = masks.shape[0], masks.ndim - 1
    flat = masks.reshape(batch, -1)
    projections = [np.asarray(masks.any(axis=tuple(d + 1 for d in range(ndim) if d != axis))) if ndim > 1 else flat
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


def chunks(rows: np.ndarray, size: int) -> Iterable[np.ndarray]:
    """Split an array of positions into consecutive chunks of at most `size` rows."""
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


@dataclass(frozen=True)
class GlobalOp:
    """An operation that gives every output position the whole input (global context), and the layer it runs in."""

    layer: str       # qualified module name ("" when it runs in the model's own forward)
    op: str          # torch function, e.g. adaptive_avg_pool2d, mean, group_norm, or a MIXING_OPS name

    @property
    def kind(self) -> ContextKind:
        """Return how the operation reaches the whole input."""
        return context_kind(self.op)


MIXING_OPS = {"scaled_dot_product_attention": ContextKind.ATTENTION, "multi_head_attention": ContextKind.ATTENTION,
              "softmax-attention": ContextKind.ATTENTION, "token-mixing linear": ContextKind.MIXING,
              **dict.fromkeys(("grid_sample", "deform_conv2d", "roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool"),
                              ContextKind.SAMPLING)}


def context_kind(op: str) -> ContextKind:
    """Return the kind of global context a global operation (`GlobalOp.op`, summary `global_op`) gives."""
    return MIXING_OPS.get(op, ContextKind.POOLING)
