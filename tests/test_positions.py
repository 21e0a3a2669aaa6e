"""Position selections resolve to the documented sets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rfreport import positions
from rfreport.errors import PositionError


def test_named_selections():
    assert positions.resolve("center", (4, 5)).tolist() == [[1, 2]]
    assert positions.resolve("corners", (4, 5)).tolist() == [[0, 0], [0, 4], [3, 0], [3, 4]]
    assert positions.resolve("edges", (4, 5)).tolist() == [[0, 2], [1, 0], [1, 4], [3, 2]]
    assert positions.resolve(["center", [0, 0], "center"], (4, 5)).tolist() == [[0, 0], [1, 2]]


@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 7))
def test_grid_keeps_every_kth_and_the_last(h, w, k):
    grid = positions.resolve(f"grid:{k}", (h, w))
    for axis, n in enumerate((h, w)):
        assert set(grid[:, axis]) == set(range(0, n, k)) | {n - 1}
    assert len(grid) == len(set(range(0, h, k)) | {h - 1}) * len(set(range(0, w, k)) | {w - 1})


def test_all_is_every_position_in_order():
    grid = positions.resolve("all", (2, 3, 2))
    assert len(grid) == 12 and (np.diff(grid[:, 0]) >= 0).all()


@pytest.mark.parametrize(("spec", "message"), [
    ("middle", "unknown position selection 'middle'"),
    ("grid:x", "'grid:x': the grid step K"),
    ([[1]], "position [1] must have 2 coordinates"),
    ([[4, 0]], "position (4, 0) is outside the output grid of shape (4, 5)"),
    ([], "the position list is empty"),
])
def test_bad_selections(spec, message):
    with pytest.raises(PositionError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        positions.resolve(spec, (4, 5))


@given(st.lists(st.tuples(st.integers(-2, 6), st.integers(-2, 7)), min_size=1, max_size=30))
def test_an_array_of_positions_resolves_as_the_same_list_does(rows):
    """The array path (a sweep's selection handed on) gives what the list path gives, its error included."""
    shape, array = (5, 6), np.array(rows, dtype=np.int64)
    try:
        expected = positions.resolve([list(r) for r in rows], shape)
    except PositionError as exc:
        with pytest.raises(PositionError) as raised:
            positions.resolve(array, shape)
        assert str(raised.value) == str(exc)
    else:
        np.testing.assert_array_equal(positions.resolve(array, shape), expected)


@given(st.lists(st.tuples(st.integers(-1, 4), st.integers(-1, 5)), max_size=20),
       st.lists(st.tuples(st.integers(-1, 4), st.integers(-1, 5)), max_size=20))
def test_rows_in_is_membership_of_grid_positions(rows, others):
    """Per row: whether it is on the grid and among the others (an oracle over tuples)."""
    shape = (4, 5)
    inside = {r for r in others if 0 <= r[0] < 4 and 0 <= r[1] < 5}
    found = positions.rows_in(np.array(rows, dtype=np.int64).reshape(-1, 2),
                              np.array(others, dtype=np.int64).reshape(-1, 2), shape)
    assert found.tolist() == [tuple(r) in inside for r in rows]


@given(st.lists(st.tuples(st.integers(-1, 4), st.integers(-1, 5)), max_size=20),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), max_size=20, unique=True))
def test_index_in_finds_each_position_where_it_is(rows, others):
    """Per row: its index among distinct grid positions, -1 where absent (an oracle over a dict)."""
    where = {r: i for i, r in enumerate(others)}
    found = positions.index_in(np.array(rows, dtype=np.int64).reshape(-1, 2),
                               np.array(others, dtype=np.int64).reshape(-1, 2), (4, 5))
    assert found.tolist() == [where.get(tuple(r), -1) for r in rows]
