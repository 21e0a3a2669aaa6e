"""Output-position selections: `all`, `grid:K`, `center`, `corners`, `edges` or explicit lists.

Pure numpy: a selection resolves to an (P, d) int64 array of output positions, sorted and
unique, so every stage (sweep, ERF, report) agrees on what "center" or "grid:4" means.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from rfreport.errors import PositionError

PositionSpec = str | Sequence[str | Sequence[int]] | np.ndarray   # an array: (P, d) integer positions
NAMED = ("all", "center", "corners", "edges")
AXES = {1: ("l",), 2: ("h", "w"), 3: ("d", "h", "w")}


def axis_names(ndim: int) -> tuple[str, ...]:
    """Return the axis letters used in column names for a spatial rank of 1, 2 or 3."""
    if ndim not in AXES:
        raise PositionError(f"spatial rank {ndim} is not supported (1, 2 or 3 spatial axes)")
    return AXES[ndim]


def center(shape: Sequence[int]) -> tuple[int, ...]:
    """Return the centre position of a grid: (n - 1) // 2 on each axis."""
    return tuple((n - 1) // 2 for n in shape)


def grid_axis(n: int, step: int) -> np.ndarray:
    """Return every `step`-th index of an axis of length n, always including the last one."""
    return np.unique(np.append(np.arange(0, n, step), n - 1))


def _named(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Resolve one named selection on a grid of the given shape."""
    if name == "all":
        return _product([np.arange(n) for n in shape])
    if name == "center":
        return np.array([center(shape)], dtype=np.int64)
    if name == "corners":
        return _product([np.unique([0, n - 1]) for n in shape])
    if name == "edges":
        mid = center(shape)
        rows = [tuple(end if a == axis else mid[a] for a in range(len(shape)))
                for axis, n in enumerate(shape) for end in (0, n - 1)]
        return np.array(rows, dtype=np.int64)
    if name.startswith("grid:"):
        step = _grid_step(name)
        return _product([grid_axis(n, step) for n in shape])
    raise PositionError(f"unknown position selection {name!r}; use all, center, corners, edges, "
                        "grid:K or a list of coordinates")


def _grid_step(name: str) -> int:
    """Parse the K of `grid:K`, a positive integer."""
    try:
        step = int(name.split(":", 1)[1])
    except ValueError:
        step = 0
    if step < 1:
        raise PositionError(f"{name!r}: the grid step K in grid:K must be a positive integer")
    return step


def _product(axes: list[np.ndarray]) -> np.ndarray:
    """Return the Cartesian product of per-axis index arrays as an (P, d) array."""
    return np.array(list(itertools.product(*axes)), dtype=np.int64).reshape(-1, len(axes))


def _explicit(coords: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """Validate one explicit coordinate against the grid and return it as a (1, d) array."""
    if isinstance(coords, (str, bytes)) or len(coords) != len(shape):
        raise PositionError(f"position {coords!r} must have {len(shape)} coordinates "
                            f"for an output grid of shape {shape}")
    pos = np.array([int(c) for c in coords], dtype=np.int64)
    if np.any(pos < 0) or np.any(pos >= np.array(shape)):
        raise PositionError(f"position {tuple(pos.tolist())} is outside the output grid of shape {shape}")
    return pos[None, :]


def _inside(rows: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Tell whether an array is a non-empty (P, d) integer array of positions inside a grid of rank d."""
    return rows.dtype.kind in "iu" and rows.ndim == 2 and len(rows) > 0 and rows.shape[1] == len(shape) \
        and bool(((rows >= 0) & (rows < np.array(shape))).all())


def resolve(spec: PositionSpec, shape: Sequence[int]) -> np.ndarray:
    """Resolve a selection (a name, or a list of names and coordinates) to sorted unique positions."""
    shape = tuple(int(n) for n in shape)
    if any(n < 1 for n in shape):
        raise PositionError(f"the output grid {shape} is empty")
    if isinstance(spec, np.ndarray) and _inside(spec, shape):
        return np.unique(spec.astype(np.int64, copy=False), axis=0)   # a swept selection handed on: no check per row
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise PositionError("the position list is empty")
    parts = [_named(item, shape) if isinstance(item, str) else _explicit(item, shape) for item in items]
    return np.unique(np.concatenate(parts), axis=0)


def rows_in(rows: np.ndarray, others: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Return, per position of `rows` (P, d), whether it is also one of `others` (Q, d) on a grid of `shape`
    (positions outside the grid match nothing)."""
    return index_in(rows, others, shape) >= 0


def index_in(rows: np.ndarray, others: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Return, per position of `rows` (P, d), the index of the same position in `others` (Q, d), -1 where it is
    not there (or outside the grid of `shape`); sorted flat indices, no table the size of the grid."""
    mine, theirs = _flat(rows, shape), _flat(others, shape)
    if not len(theirs):
        return np.full(len(mine), -1, dtype=np.int64)
    order = np.argsort(theirs, kind="stable")
    at = order[np.minimum(np.searchsorted(theirs, mine, sorter=order), len(theirs) - 1)]
    return np.where((mine >= 0) & (theirs[at] == mine), at, -1)


def _flat(positions: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Return the flat index of each position (P, d) on a grid of `shape`, -1 for one outside it."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1, len(shape))
    inside = ((positions >= 0) & (positions < np.array(shape))).all(axis=1)
    flat = np.full(len(positions), -1, dtype=np.int64)
    flat[inside] = np.ravel_multi_index(tuple(positions[inside].T), tuple(shape))
    return flat
