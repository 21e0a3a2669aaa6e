"""Figures for the report: pure functions from frames and arrays to matplotlib Figures.

No pyplot and no torch: each function builds a fresh :class:`matplotlib.figure.Figure`, and
:func:`to_png` turns it into PNG bytes without metadata, so the same data always gives the
same bytes. Every heatmap uses the one colour map `CMAP` with the origin at the top left like
an image; 1-D models get line plots and 3-D models their central depth slice.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator
from mpl_toolkits.axes_grid1 import make_axes_locatable

from rfreport.positions import axis_names, center

CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="#e4e4e4")
UNSEEN = "#d62728"
BORDER = "#fde0c5"
DPI = 100
PALETTE = 96   # colours of a figure's PNG
BOX_COLOURS = tuple(matplotlib.color_sequences["tab10"])
MAX_PANELS = 9
MAX_TICK_LABELS = 40
MARGIN = (0.8, 0.8, 0.55, 0.55)  # left, right, bottom, top in inches
GAP = (1.3, 1.05)  # inches between panels: colour bar and next y label; x label and next title
IMAGE_AXES = 2.45  # inches per 2-D panel (colour bar included): three fit the report's 1160-pixel column
LINE_AXES = 4.3  # inches per 1-D panel: two side by side fit
LINE_HEIGHT = 2.2
COLOUR_BAR = 0.2  # inches the colour bar and its pad take from a panel
WIDE = 0.45  # data aspect (height / width) below which panels are stacked one per row


@dataclass(frozen=True)
class Tile:
    """A heatmap rendered straight from an array: one PNG pixel per cell, and the range its colours span."""

    png: bytes
    shape: tuple[int, int]   # (rows, columns) of cells
    lo: float                # value of the colour scale's first colour
    hi: float                # value of its last colour
    log: bool                # whether the scale is logarithmic


def encode_png(rgba: np.ndarray) -> bytes:
    """Encode an (H, W, 4) uint8 array as PNG bytes with no metadata chunks (equal arrays give equal bytes)."""
    from PIL import Image as PILImage  # matplotlib's own dependency

    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(rgba, dtype=np.uint8), "RGBA").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def tile(values: np.ndarray, *, log: bool = False, cmap=CMAP, span: tuple[float, float] | None = None) -> Tile:
    """Map a 2-D array (NaN or masked cells take the colour map's `bad` colour) through a colour map to a Tile.

    Linear scales span the finite values (a constant array gets one colour); log scales span
    the peak and 1e-4 of it, smaller values clipped to the floor; `span` fixes a linear scale's
    ends instead (to compare two maps).
    """
    array: np.ma.MaskedArray = np.ma.masked_invalid(np.ma.asarray(values, dtype=float))
    finite = array.compressed()
    if log:
        hi = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        lo = hi * 1e-4
        scaled = (np.log10(np.ma.maximum(array, lo)) - np.log10(lo)) / (np.log10(hi) - np.log10(lo))
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        lo, hi = span if span is not None else (lo, hi)
        scaled = (array - lo) / (hi - lo) if hi > lo else array * 0 + 0.5
    rgba = cmap(scaled, bytes=True)
    return Tile(png=encode_png(rgba), shape=(array.shape[0], array.shape[1]), lo=lo, hi=hi, log=log)


def colour_bar(cmap=CMAP) -> bytes:
    """Return a 256 x 1 PNG of a colour map, stretched by the page into a colour-scale legend."""
    return encode_png(cmap(np.linspace(0.0, 1.0, 256)[None, :], bytes=True))


def grid_values(frame: pd.DataFrame, column: str, ndim: int) -> tuple[np.ndarray, list[np.ndarray], str]:
    """Return a column laid out over the swept output grid (NaN where not swept), its coordinates, a slice note."""
    values, coords, _letters, note = _grid(frame, column, ndim)
    return values, coords, note


def plane(array: np.ndarray, depth: int | None = None) -> tuple[np.ndarray, str]:
    """Return 1-D/2-D data as is, or one depth slice of 3-D data (the centre by default), with a note."""
    return _plane(array, depth)


def to_png(fig: Figure) -> bytes:
    """Render a figure to a paletted PNG with no metadata, so equal figures give equal bytes.

    Line plots and labels need few colours: PALETTE colours without dithering keep them sharp at
    a third of the bytes of a true-colour PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image as PILImage  # matplotlib's own dependency

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = PILImage.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    paletted = rgb.quantize(colors=PALETTE, method=PILImage.Quantize.MEDIANCUT, dither=PILImage.Dither.NONE)
    buffer = io.BytesIO()
    paletted.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """Return a `data:` URI embedding PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_size(png: bytes) -> tuple[int, int]:
    """Return the (width, height) in pixels of PNG bytes, read from the IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _figure(panels: int, ndim: int, *, aspect: float | None = None, axes_width: float | None = None,
            per_row: int = 3) -> tuple[Figure, list]:
    """Create a figure with `panels` axes on a grid fixed in inches; `aspect` (data height / width) sets row height.

    Very wide 2-D data gets one wide panel per row, so it stays tall enough to read.
    """
    wide = aspect is not None and aspect < WIDE
    cols = min(panels, 1 if wide else per_row if ndim > 1 else 2)
    rows = -(-panels // cols)
    ax_w = axes_width or (LINE_AXES if ndim == 1 else 2 * IMAGE_AXES + GAP[0] if wide else IMAGE_AXES)
    ax_h = LINE_HEIGHT if aspect is None else min(max((ax_w - COLOUR_BAR) * aspect, 1.0), 3.0)
    left, right, bottom, top = MARGIN
    width = left + right + cols * ax_w + (cols - 1) * GAP[0]
    height = bottom + top + rows * ax_h + (rows - 1) * GAP[1]
    fig = Figure(figsize=(width, height), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={
        "left": left / width, "right": 1 - right / width, "bottom": bottom / height, "top": 1 - top / height,
        "wspace": GAP[0] / ax_w, "hspace": GAP[1] / ax_h}).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return fig, axes[:panels]


def _aspect(shape: Sequence[int]) -> float:
    """Return height / width of a 2-D grid shape."""
    return shape[0] / max(shape[1], 1)


def _plane(array: np.ndarray, depth: int | None = None) -> tuple[np.ndarray, str]:
    """Return 1-D/2-D data as is, or one depth slice of 3-D data (the centre by default), with a note."""
    if array.ndim < 3:
        return array, ""
    depth = center(array.shape)[0] if depth is None else depth
    return array[depth], f" (slice d = {depth})"


def _image_axes(ax) -> None:
    """Label input-pixel axes with integer ticks."""
    ax.set_ylabel("input h (pixels)")
    ax.set_xlabel("input w (pixels)")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))


def position_text(pos: Sequence[int]) -> str:
    """Format an output position as `(3, 4)`, or `(3)` on a 1-D grid."""
    return "(" + ", ".join(str(int(p)) for p in pos) + ")"


def synthetic_image(shape: Sequence[int]) -> np.ndarray:
    """Return a deterministic grey sample image in [0, 1] of the given spatial shape (rings and a grid)."""
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(a ** 2 for a in axes))
    rings = 0.5 + 0.3 * np.cos(12.0 * radius)
    grid = sum((np.arange(n) % 16 == 0).reshape([-1 if i == j else 1 for j in range(len(shape))])
               for i, n in enumerate(shape))
    return np.clip(rings + 0.2 * (grid > 0), 0.0, 1.0)


def _grid(frame: pd.DataFrame, column: str, ndim: int) -> tuple[np.ndarray, list[np.ndarray], tuple[str, ...], str]:
    """Lay one column of a positions-like frame out over the swept output positions.

    Returns the values (NaN where a position was not swept), the swept coordinates of each
    shown axis, the shown axis letters, and a note naming the depth slice for 3-D grids.
    """
    letters, note = axis_names(ndim), ""
    if ndim == 3:
        depths = np.unique(frame["pos_d"])
        depth = depths[(len(depths) - 1) // 2]
        frame, letters, note = frame[frame["pos_d"] == depth], letters[1:], f" (slice d = {depth})"
    coords = [np.unique(frame[f"pos_{a}"]) for a in letters]
    values = np.full([len(c) for c in coords], np.nan)
    index = tuple(np.searchsorted(c, frame[f"pos_{a}"]) for c, a in zip(coords, letters))
    values[index] = frame[column].to_numpy(dtype=float)
    return values, coords, letters, note


def _coordinate_ticks(axis, coords: np.ndarray) -> None:
    """Label an axis drawn over compressed indices with the real coordinates."""
    axis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    axis.set_major_formatter(FuncFormatter(
        lambda x, _pos: str(coords[round(x)]) if 0 <= round(x) < len(coords) else ""))


def _integral(values: np.ndarray) -> bool:
    """Return whether every finite value is a whole number (counts, sizes, flags)."""
    finite = np.asarray(values, dtype=float)[np.isfinite(np.asarray(values, dtype=float))]
    return bool(np.all(finite == np.round(finite)))


def _heatmap(fig: Figure, ax, values: np.ndarray, label: str, *, norm=None, cmap=CMAP):
    """Draw a 2-D array with the report's colour map, origin top-left, and a labelled colour bar."""
    image = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest", origin="upper", aspect="equal")
    bar = fig.colorbar(image, cax=make_axes_locatable(ax).append_axes("right", size=0.12, pad=0.08), label=label)
    if norm is None:
        bar.locator = MaxNLocator(nbins=5, integer=_integral(np.ma.compressed(np.ma.asarray(values))))
        bar.update_ticks()
    return image


def grid_maps(frame: pd.DataFrame, columns: Sequence[tuple[str, str, str]], ndim: int) -> Figure:
    """Plot columns of a positions-like frame over the output grid, one panel per (column, title, unit)."""
    grids = [_grid(frame, column, ndim) for column, _title, _unit in columns]
    fig, axes = _figure(len(columns), ndim, aspect=_aspect(grids[0][0].shape) if ndim > 1 else None)
    for ax, (_column, title, unit), (values, coords, letters, note) in zip(axes, columns, grids):
        ax.set_title(title + note, fontsize=10)
        if ndim == 1:
            ax.plot(coords[0], values, marker=".", color=CMAP(0.35))
            ax.set_xlabel("output position l (index)")
            ax.set_ylabel(unit)
            ax.yaxis.set_major_locator(MaxNLocator(integer=_integral(values)))
            continue
        _heatmap(fig, ax, values, unit)
        ax.set_ylabel(f"output {letters[0]} (index)")
        ax.set_xlabel(f"output {letters[1]} (index)")
        _coordinate_ticks(ax.yaxis, coords[0])
        _coordinate_ticks(ax.xaxis, coords[1])
    return fig


def coverage_map(coverage: np.ndarray) -> Figure:
    """Plot how many swept output positions see each input pixel, unseen pixels in red."""
    plane, note = _plane(np.asarray(coverage))
    unseen = int((plane == 0).sum())
    two_d = plane.ndim == 2
    fig, (ax,) = _figure(1, plane.ndim, aspect=_aspect(plane.shape) if two_d else None,
                         axes_width=2 * IMAGE_AXES if two_d else None)
    seen = f"{unseen} unseen pixels shown in red" if unseen else "every input pixel is seen"
    ax.set_title(f"Input coverage{note}: {seen}", fontsize=10)
    if plane.ndim == 1:
        ax.plot(np.arange(len(plane)), plane, color=CMAP(0.35))
        ax.plot(np.flatnonzero(plane == 0), np.zeros(unseen), "|", color=UNSEEN, markersize=12)
        ax.set_xlabel("input position l (samples)")
        ax.set_ylabel("output positions that see it")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        return fig
    _heatmap(fig, ax, np.ma.masked_equal(plane, 0), "output positions that see the pixel",
             cmap=CMAP.with_extremes(bad=UNSEEN))
    _image_axes(ax)
    return fig


def _row(frame: pd.DataFrame, pos: tuple[int, ...]) -> pd.Series:
    """Return the frame row of one output position."""
    letters = axis_names(len(pos))
    match = np.logical_and.reduce([frame[f"pos_{a}"].to_numpy() == p for a, p in zip(letters, pos)])
    return frame[match].iloc[0]


def _box_label(pos: tuple[int, ...], row: pd.Series) -> str:
    """Return the overlay text of one position: its coordinates, box size and wrap flag."""
    letters = axis_names(len(pos))
    size = " × ".join(str(int(row[f"{a}_size"])) for a in letters)
    wrapped = " (wraps)" if any(bool(row[f"{a}_wrap"]) for a in letters) else ""
    return f"{position_text(pos)}: {size}{wrapped}"


def _bounds(row: pd.Series, letters: tuple[str, ...], prefix: str = "") -> tuple[list[int], list[int]]:
    """Return the inclusive (lo, hi) input bounds of a frame row, per axis, from `<prefix><a>_lo/hi` columns."""
    return ([int(row[f"{prefix}{a}_lo"]) for a in letters], [int(row[f"{prefix}{a}_hi"]) for a in letters])


def box_bounds(frame: pd.DataFrame, pos: Sequence[int], prefix: str = "") -> tuple[list[int], list[int]]:
    """Return the inclusive (lo, hi) input bounds of one output position of a frame, per axis."""
    pos = tuple(int(p) for p in pos)
    return _bounds(_row(frame, pos), axis_names(len(pos)), prefix)


def _draw_box(ax, lo: Sequence[int], hi: Sequence[int], colour) -> None:
    """Draw an inclusive RF box on image axes (its last two axes are h and w)."""
    (h_lo, w_lo), (h_hi, w_hi) = lo[-2:], hi[-2:]
    ax.add_patch(Rectangle((w_lo - 0.5, h_lo - 0.5), w_hi - w_lo + 1, h_hi - h_lo + 1, fill=False,
                           edgecolor=colour, linewidth=1.6))


def _support_depth(row: pd.Series, mask: np.ndarray | None) -> int:
    """Return the depth slice to show for a 3-D RF: the one holding most of its support, else the box centre."""
    if mask is not None and mask.any():
        return int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
    return int((row["d_lo"] + row["d_hi"]) // 2)


def rf_overlay(image: np.ndarray, frame: pd.DataFrame, masks: Mapping[tuple[int, ...], np.ndarray],
               positions: Sequence[tuple[int, ...]]) -> Figure:
    """Overlay the RF box and support mask of each chosen position on a sample image, one panel each.

    3-D models show, per position, the depth slice that holds most of its support.
    """
    positions = list(positions)[:MAX_PANELS]
    image = np.asarray(image, dtype=float)
    letters = axis_names(len(positions[0]))
    if image.ndim == 1:
        return _overlay_1d(image, frame, masks, positions)
    fig, axes = _figure(len(positions), 2, aspect=_aspect(image.shape[-2:]))
    for ax, pos, colour in zip(axes, positions, BOX_COLOURS):
        row, mask = _row(frame, pos), masks.get(pos)
        depth = _support_depth(row, mask) if image.ndim == 3 else None
        plane, note = _plane(image, depth)
        ax.imshow(plane, cmap="gray", vmin=0, vmax=1, interpolation="nearest", origin="upper")
        if mask is not None:
            shown, _ = _plane(np.asarray(mask, dtype=bool), depth)
            tint = np.zeros((*shown.shape, 4))
            tint[shown] = (*colour, 0.5)
            ax.imshow(tint, interpolation="nearest", origin="upper")
        _draw_box(ax, *_bounds(row, letters), colour)
        ax.set_xlim(-0.5, plane.shape[1] - 0.5)
        ax.set_ylim(plane.shape[0] - 0.5, -0.5)
        ax.set_title(_box_label(pos, row) + note, fontsize=9)
        _image_axes(ax)
    return fig


def _overlay_1d(signal: np.ndarray, frame: pd.DataFrame, masks: Mapping[tuple[int, ...], np.ndarray],
                positions: list[tuple[int, ...]]) -> Figure:
    """Draw a 1-D sample signal with each position's RF span and support as coloured bars."""
    fig, (ax,) = _figure(1, 1)
    ax.plot(np.arange(len(signal)), signal, color="0.5", linewidth=1)
    for level, (pos, colour) in enumerate(zip(positions, BOX_COLOURS)):
        row, y = _row(frame, pos), -0.15 * (level + 1)
        ax.plot([row["l_lo"] - 0.5, row["l_hi"] + 0.5], [y, y], color=colour, linewidth=1, label=_box_label(pos, row))
        if pos in masks:
            seen = np.flatnonzero(masks[pos])
            ax.plot(seen, np.full(len(seen), y), "s", color=colour, markersize=3)
    ax.set_xlim(-0.5, len(signal) - 0.5)
    ax.set_xlabel("input position l (samples)")
    ax.set_ylabel("sample value")
    ax.set_title("RF span (line) and support (squares) of chosen positions", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def layer_growth(names: Sequence[str], sizes: Mapping[str, Sequence[float]], input_size: Mapping[str, int],
                 border: Sequence[bool]) -> Figure:
    """Plot the centre's architecture RF per axis after each layer, the input size dashed, border layers shaded."""
    fig = Figure(figsize=(max(7.5, min(11.5, 0.18 * len(names) + 4)), 4.2), dpi=DPI, layout="tight")
    ax = fig.subplots()
    x = np.arange(len(names))
    for i in np.flatnonzero(np.asarray(border, dtype=bool)):
        ax.axvspan(i - 0.5, i + 0.5, color=BORDER, linewidth=0)
    for k, (letter, values) in enumerate(sizes.items()):
        colour = CMAP(0.15 + 0.6 * k / max(1, len(sizes) - 1))
        ax.plot(x, values, marker="os^"[k], markersize=7 - 2 * k, color=colour, label=f"architecture RF {letter}")
        ax.axhline(input_size[letter], color=colour, linestyle="--", linewidth=1, label=f"input size {letter}")
    handles, _labels = ax.get_legend_handles_labels()
    if any(border):
        handles.append(Patch(color=BORDER, label="border layer: RF covers the input"))
    step = max(1, -(-len(names) // MAX_TICK_LABELS))
    ax.set_xticks(x[::step], [names[i] for i in x[::step]], rotation=90, fontsize=7)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("architecture RF at the centre (input pixels)")
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def erf_maps(maps: Mapping[tuple[int, ...], np.ndarray], erf: pd.DataFrame) -> Figure:
    """Plot effective-RF maps on a log scale with the theoretical RF box of each position (erf frame) drawn."""
    positions = sorted(maps)[:MAX_PANELS]
    letters = axis_names(len(positions[0]))
    shape = np.shape(maps[positions[0]])
    fig, axes = _figure(len(positions), len(letters), aspect=_aspect(shape[-2:]) if len(shape) > 1 else None)
    for ax, pos in zip(axes, positions):
        lo, hi = _bounds(_row(erf, pos), letters, "rf_")
        values = np.asarray(maps[pos], dtype=float)
        depth = int(np.unravel_index(np.argmax(values), values.shape)[0]) if values.ndim == 3 else None
        plane, note = _plane(values, depth)
        ax.set_title(f"ERF of {position_text(pos)}{note}", fontsize=9)
        peak = float(plane.max()) if plane.size and plane.max() > 0 else 1.0
        floor = np.maximum(plane, peak * 1e-4)
        if plane.ndim == 1:
            ax.semilogy(np.arange(len(plane)), floor, color=CMAP(0.35))
            ax.axvspan(lo[0] - 0.5, hi[0] + 0.5, color="0.85", label="theoretical RF")
            ax.set_xlabel("input position l (samples)")
            ax.set_ylabel("mean |dy/dx| (log scale)")
            ax.legend(fontsize=8)
            continue
        _heatmap(fig, ax, floor, "mean |dy/dx| (log scale)", norm=LogNorm(vmin=peak * 1e-4, vmax=peak))
        _draw_box(ax, lo, hi, "white")
        _image_axes(ax)
    return fig


def seed_overlay(mask: np.ndarray, box: tuple[tuple[int, int], tuple[int, int]], image: np.ndarray | None,
                 title: str, text: str | None = None) -> Figure:
    """Draw `NumericRF.plot`'s figure: the image (or a blank canvas), the support mask, the RF box, the bounds."""
    figure = Figure(figsize=(6, 6 * max(mask.shape[0] / mask.shape[1], 0.25)))
    ax = figure.add_subplot()
    if image is not None:
        ax.imshow(image, cmap="gray")
    overlay = np.zeros((*mask.shape, 4))
    overlay[mask] = (1.0, 0.3, 0.0, 0.45)
    ax.imshow(overlay, interpolation="nearest")
    (h_lo, h_hi), (w_lo, w_hi) = box
    ax.add_patch(Rectangle((w_lo - 0.5, h_lo - 0.5), w_hi - w_lo + 1, h_hi - h_lo + 1,
                           fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlim(-0.5, mask.shape[1] - 0.5)
    ax.set_ylim(mask.shape[0] - 0.5, -0.5)
    ax.set_title(title)
    if text:
        ax.text(0.01, 0.99, text, transform=ax.transAxes, va="top", ha="left", fontsize=9,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    return figure
