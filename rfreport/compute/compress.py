"""The compressed sweep: one backward pass per colour group of positions whose RFs cannot overlap.

The input-output Jacobian of a convolutional network is banded, so (as in Curtis, Powell and
Reid's sparse-Jacobian compression) output positions whose receptive fields are disjoint can
share one cotangent: the union support of the pass splits back among them. The RF of every
output position is predicted per axis from a few exact pilot positions swept densely (a line
of positions through the centre of each axis, fitted by a periodic affine model, plus corners,
edge midpoints, quarter points and a few random positions), positions are coloured so that the
predicted intervals (the cores) of one colour are separated by a margin on at least one axis,
and each pass is verified: every non-zero input entry must lie in the core of exactly one
position of the group (none in a margin), and every position's attributed support must agree
with its prediction. Groups that fail are swept densely, and the pilots themselves are compared
with the compressed rows; any disagreement sends the whole sweep to the dense path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rfreport import positions as positions_mod
from rfreport.compute.dense import dense_sweep, one_hot_weights
from rfreport.compute.engine import Engine
from rfreport.results import Accumulator, chunks, mask_bounds, projection_bounds

PILOT_SPANS = (8, 16)  # the pilot line reaches this far either side of the centre; a longer line learns longer periods
RANDOM_PILOTS = 8    # extra exact spot checks at random positions
MIN_GAIN = 2.0       # `auto` compresses when the passes drop at least this much


@dataclass(frozen=True)
class AxisPlan:
    """Predicted RF interval (core) of every output index along one axis, and its colouring period."""

    lo: np.ndarray         # (n_out,) int64 first input index of the core (negative when it wraps)
    hi: np.ndarray         # (n_out,) int64 last input index (hi < lo: predicted empty)
    exact_lo: np.ndarray   # (n_out,) bool, the support must start exactly at lo (side not clipped)
    exact_hi: np.ndarray   # (n_out,) bool, the support must end exactly at hi
    n: int                 # input size on this axis
    wrap: bool             # circular padding: input indices are taken modulo n
    colours: int           # p and p + k * colours (k != 0) have cores a margin apart

    def indicator(self, coords: np.ndarray) -> np.ndarray:
        """Return (len(coords), n) bool: which input indices lie in each coordinate's core."""
        lo, width = self.lo[coords], np.maximum(self.hi[coords] - self.lo[coords] + 1, 0)
        offsets = np.arange(max(int(width.max(initial=0)), 1))
        inside = offsets[None, :] < width[:, None]
        rows = np.broadcast_to(np.arange(len(coords))[:, None], inside.shape)[inside]
        result = np.zeros((len(coords), self.n), dtype=bool)
        result[rows, (lo[:, None] + offsets[None, :])[inside] % self.n] = True
        return result


@dataclass(frozen=True)
class Plan:
    """The per-axis predictions and colourings of one model at one input shape."""

    axes: tuple[AxisPlan, ...]
    pilots: dict[tuple[int, ...], tuple]   # exact (lo, hi, support, wrapped) of every pilot position

    def groups(self, selected: np.ndarray) -> list[np.ndarray]:
        """Split positions into colour groups whose predicted cores are pairwise disjoint."""
        periods = np.array([axis.colours for axis in self.axes])
        colour = np.ravel_multi_index(tuple((selected % periods).T), tuple(periods))
        order = np.argsort(colour, kind="stable")
        cuts = np.flatnonzero(np.diff(colour[order])) + 1
        return np.split(selected[order], cuts)

    def consistent(self, members: np.ndarray, projections: list[np.ndarray], bounds: tuple) -> np.ndarray:
        """Return, per member, whether its support lies in its core and meets the core's exact sides."""
        lo, hi, support, _wrapped = bounds
        ok = np.ones(len(members), dtype=bool)
        for k, axis in enumerate(self.axes):
            coords = members[:, k]
            ok &= ~(projections[k] & ~axis.indicator(coords)).any(axis=1)
            ok &= np.where(axis.exact_lo[coords], lo[:, k] == axis.lo[coords], True)
            ok &= np.where(axis.exact_hi[coords], hi[:, k] == axis.hi[coords], True)
        empty = np.any([axis.hi[members[:, k]] < axis.lo[members[:, k]] for k, axis in enumerate(self.axes)],
                       axis=0)
        return ok & ((support > 0) != empty)


def compressed_sweep(engine: Engine, selected: np.ndarray, batch_size: int, acc: Accumulator,
                     progress=None, *, auto: bool = False) -> str:
    """Sweep positions by colour groups, densely where compression cannot be trusted or does not pay.

    Returns why the sweep ran densely ("" when it compressed, or when `auto` found too few positions).
    """
    reason = untrusted(engine)
    if not reason and auto and len(selected) < 4 * _pilot_count(engine.output_spatial):
        dense_sweep(engine, selected, batch_size, acc, progress)
        return ""
    plan = None if reason else next(
        filter(None, (learn_plan(engine, batch_size, wrap=acc.wrap, span=span) for span in PILOT_SPANS)), None)
    groups = plan.groups(selected) if plan is not None else []
    if plan is None or (auto and len(groups) * MIN_GAIN > len(selected)):
        dense_sweep(engine, selected, batch_size, acc, progress)
        return reason or ("no periodic RF prediction fits the pilot positions" if plan is None
                          else "compression would not save passes here")
    rows, failed = sweep_groups(engine, plan, groups, batch_size, acc.keep, progress)
    if not _pilots_agree(plan, rows):
        dense_sweep(engine, selected, batch_size, acc, None)
        return "the compressed rows disagreed with the exact pilot positions"
    for chunk, bounds, coverage, kept in rows:
        acc.add_bounds(chunk, bounds, coverage, lambda i, c=chunk, m=kept: m[tuple(c[i].tolist())], "compressed")
    if failed:
        dense_sweep(engine, np.concatenate(failed), batch_size, acc, progress)
    return ""


def untrusted(engine: Engine) -> str:
    """Return why compression cannot be proved exact for this pass, or "" when it can.

    A group's union of supports is split back by predicted regions; a dependency of one member
    landing in another member's region would be invisible in the union. The prediction is only
    sound for passes whose every op keeps spatial positions in place (Engine.nonlocal_ops empty):
    then every RF is a translate of its neighbours' up to borders, which the pilots and the
    per-group checks pin down.
    """
    if engine.mode != "structural":
        return "gradient mode supports are data-dependent"
    if engine.nonlocal_ops:
        return f"ops that can move spatial positions ({', '.join(engine.nonlocal_ops)})"
    return ""


def sweep_groups(engine: Engine, plan: Plan, groups: list[np.ndarray], batch_size: int,
                  keep: set[tuple[int, ...]], progress) -> tuple[list[tuple], list[np.ndarray]]:
    """Run one backward pass per group, `batch_size` groups at a time; return attributed rows and failures."""
    rows, failed = [], []
    for batch in chunks(np.arange(len(groups)), batch_size):
        weights = _group_weights([groups[g] for g in batch], engine.output_spatial)
        unions = engine.support(weights).cpu().numpy()
        for g, union in zip(batch, unions):
            row = attribute(plan, groups[g], union, keep)
            if row is None:
                failed.append(groups[g])
                continue
            rows.append(row)
            if progress is not None:
                progress(len(groups[g]))
    return rows, failed


def _group_weights(groups: list[np.ndarray], output_spatial: tuple[int, ...]):
    """Return (G, *output_spatial) cotangent weights with a 1 at every position of each group."""
    weights = torch.zeros((len(groups), *output_spatial), dtype=torch.float64)
    rows = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    flat = np.concatenate(groups)
    weights[(rows, *flat.T)] = 1.0
    return weights


def attribute(plan: Plan, members: np.ndarray, union: np.ndarray, keep: set[tuple[int, ...]]):
    """Split a group's union support among its members; None when the prediction does not hold.

    Returns (members, bounds, coverage, kept masks) with bounds as from `mask_bounds`.
    """
    nonzero = np.nonzero(union)
    labels, inverses, sizes = [], [], []
    for k, axis in enumerate(plan.axes):
        coords, inverse = np.unique(members[:, k], return_inverse=True)
        label = np.full(axis.n, -1, dtype=np.int64)
        row, index = np.nonzero(axis.indicator(coords))
        label[index] = row  # the cores of one group's coordinates are disjoint on every axis
        labels.append(label[nonzero[k]])
        inverses.append(inverse.reshape(-1))
        sizes.append(len(coords))
    if any((label < 0).any() for label in labels):
        return None
    table = np.full(tuple(sizes), -1, dtype=np.int64)
    table[tuple(inverses)] = np.arange(len(members))
    owner = table[tuple(labels)]
    if (owner < 0).any():
        return None
    projections = []
    for k, axis in enumerate(plan.axes):
        projection = np.zeros((len(members), axis.n), dtype=bool)
        projection[owner, nonzero[k]] = True
        projections.append(projection)
    bounds = projection_bounds(projections, np.bincount(owner, minlength=len(members)), wrap=plan.axes[0].wrap)
    if not plan.consistent(members, projections, bounds).all():
        return None
    return members, bounds, union.astype(np.int64), _kept_masks(members, owner, nonzero, union.shape, keep)


def _kept_masks(members: np.ndarray, owner: np.ndarray, nonzero: tuple, shape: tuple, keep) -> dict:
    """Return the support masks of the members whose masks are kept."""
    kept = {}
    for i, pos in enumerate(map(tuple, members.tolist())):
        if pos in keep:
            mask = np.zeros(shape, dtype=bool)
            mask[tuple(c[owner == i] for c in nonzero)] = True
            kept[pos] = mask
    return kept


def _pilots_agree(plan: Plan, rows: list[tuple]) -> bool:
    """Return whether every compressed row at a pilot position equals the pilot's exact row."""
    for members, bounds, _coverage, _kept in rows:
        for i, pos in enumerate(map(tuple, members.tolist())):
            exact = plan.pilots.get(pos)
            if exact is not None and not all(np.array_equal(a, b[i]) for a, b in zip(exact, bounds)):
                return False
    return True


def _pilot_count(output_spatial: tuple[int, ...]) -> int:
    """Upper bound on the number of pilot positions for an output grid."""
    d = len(output_spatial)
    return d * (2 * PILOT_SPANS[0] + 1) + 3 * 2 ** d + 2 * d + RANDOM_PILOTS


def pilot_positions(output_spatial: tuple[int, ...], seed: int = 0,
                    span: int = PILOT_SPANS[0]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Return the pilot positions and, per axis, the line of positions through the centre along it."""
    centre = np.array(positions_mod.center(output_spatial))
    lines = []
    for k, n in enumerate(output_spatial):
        reach = np.arange(max(0, centre[k] - span), min(n, centre[k] + span + 1))
        line = np.repeat(centre[None, :], len(reach), axis=0)
        line[:, k] = reach
        lines.append(line)
    quarters = positions_mod.resolve([list(q) for q in _quarters(output_spatial)], output_spatial)
    rng = np.random.default_rng(seed)
    random = np.stack([rng.integers(0, n, RANDOM_PILOTS) for n in output_spatial], axis=1)
    extra = positions_mod.resolve(["corners", "edges"], output_spatial)
    return np.unique(np.concatenate([*lines, quarters, random, extra]), axis=0), lines


def _quarters(output_spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Return the positions at a quarter and three quarters along every axis."""
    axes = [sorted({n // 4, (3 * n) // 4}) for n in output_spatial]
    return [tuple(p) for p in np.array(np.meshgrid(*axes, indexing="ij")).reshape(len(axes), -1).T]


def learn_plan(engine: Engine, batch_size: int, *, wrap: bool, span: int = PILOT_SPANS[0]) -> Plan | None:
    """Sweep the pilots exactly and fit every axis; None when some axis cannot be predicted."""
    pilots, lines = pilot_positions(engine.output_spatial, engine.seed, span)
    masks = np.concatenate([engine.support(one_hot_weights(chunk, engine.output_spatial)).cpu().numpy()
                            for chunk in chunks(pilots, batch_size)])
    bounds = mask_bounds(masks, wrap=wrap)
    index = {pos: i for i, pos in enumerate(map(tuple, pilots.tolist()))}
    axes = []
    for k, line in enumerate(lines):
        rows = [index[tuple(p)] for p in line.tolist()]
        axis = fit_axis(line[:, k], bounds[0][rows, k], bounds[1][rows, k], bounds[2][rows],
                        engine.output_spatial[k], engine.input_spatial[k], wrap, _margin(masks, k))
        if axis is None:
            return None
        axes.append(axis)
    plan = Plan(tuple(axes), {pos: tuple(b[i] for b in bounds) for pos, i in index.items()})
    projections = [masks.any(axis=tuple(d + 1 for d in range(masks.ndim - 1) if d != k)) if masks.ndim > 2
                   else masks for k in range(masks.ndim - 1)]
    return plan if plan.consistent(pilots, projections, bounds).all() else None


def _margin(masks: np.ndarray, k: int) -> int:
    """Return the margin on axis k: wider than any hole seen inside a pilot's support on that axis."""
    others = tuple(d + 1 for d in range(masks.ndim - 1) if d != k)
    projection = masks.any(axis=others) if others else masks
    widest = 0
    for row in projection[projection.any(axis=1)]:
        seen = np.flatnonzero(row)
        widest = max(widest, int(np.diff(seen).max(initial=1)) - 1)
    return max(2, widest + 1)


def fit_axis(line: np.ndarray, lo: np.ndarray, hi: np.ndarray, support: np.ndarray, n_out: int, n: int,
             wrap: bool, margin: int) -> AxisPlan | None:
    """Predict every output index's core on one axis from the pilot line and colour the axis."""
    if (support == 0).any():
        return None
    if len(line) == n_out:
        pred_lo, pred_hi = lo.astype(np.int64), hi.astype(np.int64)
    else:
        pred_lo = _extrapolate(line, lo, lo > 0 if not wrap else np.ones(len(lo), dtype=bool), n_out)
        pred_hi = _extrapolate(line, hi, hi < n - 1 if not wrap else np.ones(len(hi), dtype=bool), n_out)
        if pred_lo is None or pred_hi is None:
            return None
    lo_c, hi_c, exact_lo, exact_hi = _clip(pred_lo, pred_hi, n, wrap)
    colours = _colours(lo_c, hi_c, n, wrap, margin)
    return AxisPlan(lo_c, hi_c, exact_lo, exact_hi, n, wrap, colours)


def _extrapolate(line: np.ndarray, values: np.ndarray, usable: np.ndarray, n_out: int) -> np.ndarray | None:
    """Extend the longest usable run of a bound periodically (period P, constant step per period)."""
    run = _longest_run(usable)
    if run is None:
        return None
    start, stop = run
    base, seq = line[start], values[start:stop].astype(np.int64)
    for period in range(1, len(seq) // 2 + 1):
        steps = seq[period:] - seq[:-period]
        if (steps == steps[0]).all():
            q, r = np.divmod(np.arange(n_out) - base, period)
            return seq[r] + q * steps[0]
    return None


def _longest_run(usable: np.ndarray) -> tuple[int, int] | None:
    """Return (start, stop) of the longest run of True entries with at least three entries."""
    best, start = None, None
    for i, flag in enumerate([*usable.tolist(), False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start >= 3 and (best is None or i - start > best[1] - best[0]):
                best = (start, i)
            start = None
    return best


def _clip(lo: np.ndarray, hi: np.ndarray, n: int, wrap: bool) -> tuple[np.ndarray, ...]:
    """Bring predicted intervals into the input the way the dense bounds report them."""
    width = hi - lo + 1
    if not wrap:
        return np.maximum(lo, 0), np.minimum(hi, n - 1), lo >= 0, hi <= n - 1
    full = width >= n
    start = np.mod(lo, n)
    crosses = start + width - 1 > n - 1
    lo_w = np.where(crosses, np.mod(hi, n) - width + 1, start)
    hi_w = lo_w + width - 1
    return np.where(full, 0, lo_w), np.where(full, n - 1, hi_w), ~full, ~full


def _colours(lo: np.ndarray, hi: np.ndarray, n: int, wrap: bool, margin: int) -> int:
    """Return the smallest period K such that positions K apart have cores `margin` apart."""
    n_out = len(lo)
    nonempty = hi >= lo
    for period in range(1, n_out):
        if _separated(np.arange(n_out)[nonempty] % period, lo[nonempty], hi[nonempty], n, wrap, margin):
            return period
    return n_out


def _separated(colour: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: int, wrap: bool, margin: int) -> bool:
    """Return whether intervals of the same colour are pairwise at least `margin` apart."""
    start = np.mod(lo, n) if wrap else lo
    end = start + (hi - lo)
    order = np.lexsort((start, colour))
    colour, start, end = colour[order], start[order], end[order]
    same = colour[1:] == colour[:-1]
    if (start[1:][same] - end[:-1][same] - 1 < margin).any():
        return False
    if not wrap:
        return True
    first = np.r_[True, ~same]
    last = np.r_[~same, True]
    lone = first & last
    return bool((start[first & ~lone] + n - end[last & ~lone] - 1 >= margin).all()
                and (end - start + 1 + margin <= n)[~lone].all())
