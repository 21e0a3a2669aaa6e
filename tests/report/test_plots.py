"""Figures: pure Figure builders, deterministic PNG bytes without metadata, 1-D/2-D/3-D inputs."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from rfreport.analysis.frames import POSITIONS
from rfreport.positions import axis_names, resolve
from rfreport.report import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def box_frame(shape: tuple[int, ...], size: int = 3, stride: int = 2) -> pd.DataFrame:
    """Return a positions frame of a k=size, stride, no-padding conv on an output grid of this shape."""
    pos = resolve("all", shape)
    data: dict = {"support": np.full(len(pos), size ** len(shape)), "fill": np.ones(len(pos)),
                  "path": ["dense"] * len(pos), "verified": np.zeros(len(pos), bool),
                  "violations": np.zeros(len(pos), np.int64)}
    for i, a in enumerate(axis_names(len(shape))):
        data[f"pos_{a}"] = pos[:, i]
        data[f"{a}_lo"], data[f"{a}_hi"] = pos[:, i] * stride, pos[:, i] * stride + size - 1
        data[f"{a}_size"], data[f"{a}_wrap"] = np.full(len(pos), size), np.zeros(len(pos), bool)
    return POSITIONS.frame(data, len(shape))


def input_shape(shape: tuple[int, ...], size: int = 3, stride: int = 2) -> tuple[int, ...]:
    """Return the input grid of `box_frame` for an output grid shape."""
    return tuple((n - 1) * stride + size for n in shape)


def chunks(png: bytes) -> list[bytes]:
    """Return the chunk types of a PNG file."""
    types, at = [], len(PNG_SIGNATURE)
    while at < len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        types.append(png[at + 4:at + 8])
        at += 12 + length
    return types


def figures(ndim: int) -> list[Figure]:
    """Build every kind of figure for a model of a spatial rank."""
    out = (5, 6, 4)[:ndim] if ndim < 3 else (3, 4, 5)
    frame, spatial = box_frame(out), input_shape(out)
    coverage = np.ones(spatial, dtype=np.int64)
    coverage[(0,) * ndim] = 0
    masks = {tuple(p): np.ones(spatial, bool) for p in resolve("corners", out).tolist()}
    erf = frame.rename(columns={f"{a}_{side}": f"rf_{a}_{side}" for a in axis_names(ndim) for side in ("lo", "hi")})
    maps = {pos: np.random.default_rng(0).random(spatial) for pos in masks}
    letters = axis_names(ndim)
    return [plots.grid_maps(frame, [(f"{a}_size", f"RF size {a}", "input pixels") for a in letters], ndim),
            plots.coverage_map(coverage),
            plots.rf_overlay(plots.synthetic_image(spatial), frame, masks, sorted(masks)),
            plots.layer_growth(["conv1", "conv2"], {a: [3, 7] for a in letters}, dict(zip(letters, spatial)),
                               [False, True]),
            plots.erf_maps(maps, erf)]


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_every_figure_renders_deterministically(ndim):
    """Each figure is a Figure, and building it twice gives identical PNG bytes with no text metadata."""
    first, second = figures(ndim), figures(ndim)
    for a, b in zip(first, second):
        assert isinstance(a, Figure)
        png = plots.to_png(a)
        assert png.startswith(PNG_SIGNATURE) and png == plots.to_png(b)
        assert not {b"tEXt", b"iTXt", b"zTXt", b"tIME"} & set(chunks(png))
        width, height = a.get_size_inches() * plots.DPI
        assert np.allclose(plots.png_size(png), (width, height), atol=1)


def test_data_uri_round_trips():
    """The data URI carries the PNG bytes in base64."""
    png = plots.to_png(plots.coverage_map(np.ones((4, 4), dtype=np.int64)))
    uri = plots.data_uri(png)
    assert uri.startswith("data:image/png;base64,") and base64.b64decode(uri.split(",", 1)[1]) == png


def test_grid_values_follow_the_frame():
    """The heatmap data is the frame column laid out on the output grid with origin top-left."""
    frame = box_frame((2, 3)).assign(fill=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    fig = plots.grid_maps(frame, [("fill", "fill", "ratio")], 2)
    image = fig.axes[0].images[0]
    np.testing.assert_array_equal(image.get_array(), [[0.0, 0.1, 0.2], [0.3, 0.4, 0.5]])
    assert image.origin == "upper" and fig.axes[0].get_xlabel() == "output w (index)"


def test_3d_grid_shows_the_central_depth_slice():
    """A 3-D grid map shows the middle swept depth and names it."""
    frame = box_frame((3, 2, 2))
    fig = plots.grid_maps(frame.assign(fill=frame["pos_d"].astype(float)), [("fill", "fill", "ratio")], 3)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), np.ones((2, 2)))
    assert "slice d = 1" in fig.axes[0].get_title()


def test_unseen_pixels_are_masked_in_the_coverage_map():
    """Input pixels nobody sees are masked (drawn in the highlight colour) and counted in the title."""
    coverage = np.array([[0, 1], [2, 0]])
    ax = plots.coverage_map(coverage).axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array().mask, coverage == 0)
    assert "2 unseen pixels" in ax.get_title()


def test_overlay_draws_each_box_at_its_bounds():
    """Each chosen position's box outline spans its inclusive bounds in pixel-centre coordinates."""
    frame = box_frame((2, 2))
    fig = plots.rf_overlay(plots.synthetic_image((5, 5)), frame, {}, [(1, 0)])
    (box,) = fig.axes[0].patches
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (-0.5, 1.5, 3, 3)
    assert fig.axes[0].get_title().startswith("(1, 0): 3 × 3")


def test_synthetic_image_is_in_range_with_contrast():
    """The default sample image has the input's shape, lies in [0, 1] and is not flat, for every rank."""
    for shape in [(17,), (9, 12), (3, 5, 4)]:
        image = plots.synthetic_image(shape)
        assert image.shape == shape and image.min() >= 0 and image.max() <= 1 and np.ptp(image) > 0.5


def test_plots_need_neither_pyplot_nor_torch():
    """Building and rendering a figure in a fresh interpreter imports neither pyplot nor torch."""
    code = ("import sys, numpy as np\nfrom rfreport.report import plots\n"
            "plots.to_png(plots.coverage_map(np.ones((4, 4), dtype=np.int64)))\n"
            "assert not {'torch', 'matplotlib.pyplot'} & set(sys.modules), 'pyplot or torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_tile_maps_values_through_the_colour_map_without_metadata():
    """A tile has one PNG pixel per cell, the colour map's colours at its ends, NaN in the bad colour, no metadata."""
    from PIL import Image

    values = np.array([[0.0, 1.0, 2.0], [np.nan, 4.0, 4.0]])
    tile = plots.tile(values)
    assert (tile.shape, tile.lo, tile.hi, tile.log) == ((2, 3), 0.0, 4.0, False)
    assert tile.png.startswith(PNG_SIGNATURE) and tile.png == plots.tile(values.copy()).png
    assert not {b"tEXt", b"iTXt", b"zTXt", b"tIME"} & set(chunks(tile.png))
    pixels = np.asarray(Image.open(io.BytesIO(tile.png)).convert("RGBA"))
    np.testing.assert_array_equal(pixels[0, 0], plots.CMAP(0.0, bytes=True))
    np.testing.assert_array_equal(pixels[1, 1], plots.CMAP(1.0, bytes=True))
    np.testing.assert_array_equal(pixels[1, 0], plots.CMAP(np.nan, bytes=True))
    fixed = plots.tile(values, span=(0.0, 8.0))
    assert (fixed.lo, fixed.hi) == (0.0, 8.0)
    log = plots.tile(np.array([[1e-9, 1.0]]), log=True)
    assert (log.lo, log.hi) == (1e-4, 1.0)
