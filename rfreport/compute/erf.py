"""The effective receptive field (ERF): how much each input pixel actually moves an output position.

Luo, Li, Urtasun & Zemel (NeurIPS 2016) measure it as the mean over random inputs of |dy/dx|:
the theoretical RF says which pixels *can* change an output, the ERF how strongly they do.
Here the ERF map of an output position is the mean over samples of |d(sum_c y_c)/dx| summed
over input channels, computed on the model as given (real weights and nonlinearities, eval
mode) by the engine in gradient mode.

The engine spreads each cotangent over every batch element and returns |grad| summed over the
batch. In eval mode the samples of a batch do not interact, so the gradient of the batch sum
with respect to sample n is that sample's own gradient and the batch sum of |grad| is the sum
over samples of each sample's |grad|; dividing by the sample count gives the mean. The model
is put in eval mode (and restored afterwards) to guarantee this: batch-norm statistics and
dropout would otherwise couple the samples. Samples go through the model in chunks and
positions through the backward pass in chunks, both sized from the engine's memory budget.

Metrics per position, rank-generic (a square is a segment in 1-D, a cube in 3-D): the side of
the smallest square centred on the peak, and the radius of the smallest disc, holding a share of
the gradient mass; the area of the smallest pixel set holding 95% of the mass over the
theoretical RF support; the centre of mass and its offset from the theoretical RF box centre;
a moment-based axis-aligned Gaussian (sigma per axis = the map's standard deviation) and the
R^2 of that Gaussian, with least-squares amplitude, against the map over the whole input grid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from rfreport import positions as positions_mod
from rfreport import summary as summary_mod
from rfreport.compute.dense import one_hot_weights
from rfreport.compute.engine import Engine, Target, check_input_shape, preserved
from rfreport.compute.sweep import resolve_batch_size, sweep
from rfreport.errors import SweepError
from rfreport.layouts import parse_layout
from rfreport.options import Distribution, values
from rfreport.positions import axis_names
from rfreport.results import SweepResult, chunks
from rfreport.schema import Column, Schema, register

LEVELS = (20, 50, 90, 99)
AREA_LEVEL = 95
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
RESIZE_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
MASS_TOLERANCE = 1e-9
TINY_SIGMA = 1e-12


class ErfError(SweepError):
    """The ERF could not be computed: a bad distribution or sample count, an unreadable image folder."""


ERF = register(Schema(
    name="erf",
    row="output position whose effective receptive field was measured",
    columns=(
        Column("pos_{a}", "int64", "output index", "output position on this axis (0-based)"),
        Column("mass", "float64", "gradient", "total ERF mass: mean over samples of abs(dy/dx) summed over the input "
               "grid and channels (0 when the output ignores the input for every sample)"),
        Column("peak_{a}", "int64", "input index", "input pixel with the largest gradient (among ties, the one "
               "nearest the centre of mass); -1 when the mass is 0"),
        *(Column(f"side{q}", "int64", "input pixels", f"side of the smallest square (segment in 1-D, cube in 3-D) "
                 f"centred on the peak holding {q}% of the mass (clipped to the grid, so it may exceed the grid when "
                 "the peak is off-centre); 0 when the mass is 0") for q in LEVELS),
        *(Column(f"radius{q}", "float64", "input pixels", f"radius of the smallest disc (ball in 3-D) centred on "
                 f"the peak holding {q}% of the mass") for q in LEVELS),
        Column(f"area{AREA_LEVEL}", "int64", "input positions", f"fewest input positions holding {AREA_LEVEL}% "
               "of the mass (largest gradients first)"),
        Column("rf_support", "int64", "input positions", "support of the theoretical RF of this position"),
        Column(f"area{AREA_LEVEL}_ratio", "float64", "ratio", f"area{AREA_LEVEL} / rf_support: the share of the "
               "theoretical RF the ERF fills"),
        Column("rf_{a}_lo", "int64", "input index", "first input index of the theoretical RF box (inclusive)",
               group="rf_bounds"),
        Column("rf_{a}_hi", "int64", "input index", "last input index of the theoretical RF box (inclusive)",
               group="rf_bounds"),
        Column("com_{a}", "float64", "input index", "centre of mass of the ERF map"),
        Column("offset_{a}", "float64", "input pixels", "com minus the centre of the theoretical RF box (the "
               "unrolled box when the RF wraps round the border)"),
        Column("sigma_{a}", "float64", "input pixels", "standard deviation of the ERF map on this axis (sigma of "
               "the moment-fitted axis-aligned Gaussian)"),
        Column("gauss_r2", "float64", "ratio", "R^2 of the moment-fitted Gaussian (least-squares amplitude) "
               "against the ERF map over the input grid; 1 is a perfect fit"),
    ),
))


@dataclass(frozen=True)
class ErfResult:
    """Effective receptive fields of selected output positions of one model at one input shape."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    positions: np.ndarray                      # (P, d) int64 output positions, sorted
    metrics: pd.DataFrame                      # schema "erf", one row per position in `positions` order
    maps: dict[tuple[int, ...], np.ndarray]    # position -> float64 map over the input grid
    samples: int
    distribution: str
    device: str
    target: str
    seed: int
    seconds: float

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.input_shape) - 2

    def headline_row(self) -> int:
        """Return the row of the output centre, or of the measured position nearest to it."""
        centre = np.array(positions_mod.center(self.output_shape[2:]))
        return int(np.argmin(((self.positions - centre) ** 2).sum(axis=1)))

    def summary(self) -> summary_mod.Erf:
        """Return the headline numbers of the centre position's ERF against its theoretical RF."""
        row = self.metrics.iloc[self.headline_row()]
        axes = axis_names(self.ndim)
        sizes = [int(row[f"rf_{a}_hi"] - row[f"rf_{a}_lo"] + 1) for a in axes]
        return summary_mod.build(summary_mod.Erf, {
            "erf_samples": self.samples, "erf_distribution": self.distribution, "erf_positions": len(self.positions),
            "erf_position": [int(row[f"pos_{a}"]) for a in axes],
            "erf_side90": int(row["side90"]), "erf_radius90": _json_float(row["radius90"]),
            "erf_rf_size": sizes, "erf_side90_ratio": _json_float(row["side90"] / max(sizes)),
            f"erf_area{AREA_LEVEL}_ratio": _json_float(row[f"area{AREA_LEVEL}_ratio"]),
            "erf_sigma": [_json_float(row[f"sigma_{a}"]) for a in axes],
            "erf_offset": [_json_float(row[f"offset_{a}"]) for a in axes],
            "erf_gauss_r2": _json_float(row["gauss_r2"]),
        })

    def arrays(self) -> dict[str, np.ndarray]:
        """Return the maps keyed like masks.npz (`h3_w4` for position (3, 4)), ready for np.savez."""
        axes = axis_names(self.ndim)
        return {"_".join(f"{a}{i}" for a, i in zip(axes, pos)): erf_map for pos, erf_map in self.maps.items()}


def _json_float(value: float) -> float | None:
    """Return a float for JSON, None for NaN."""
    value = float(value)
    return None if math.isnan(value) else value


def effective_rf(model: nn.Module, input_shape: Sequence[int], positions: positions_mod.PositionSpec = "center", *,
                 samples: int = 32, distribution: str = "normal", images: str | Path | None = None,
                 layer: str | None = None, output: str | int | None = None, device: str = "auto", seed: int = 0,
                 batch_size: int | str = "auto", theoretical: SweepResult | None = None,
                 layout: str = "nchw") -> ErfResult:
    """Measure the effective receptive field of the selected output positions of a model.

    `input_shape` is (N, C, *spatial); N is ignored, `samples` inputs are drawn from `distribution`
    (`normal`: standard normal, `uniform`: uniform on [-1, 1), `images`: files of the `images`
    folder, see :func:`draw_samples`). `theoretical` is a sweep of (at least) the same positions
    whose RF boxes the metrics compare against; without it a structural sweep is run.
    `batch_size` is the number of positions per backward pass (`auto` fits the memory budget).
    """
    started = time.perf_counter()
    shape = check_input_shape(input_shape)
    kind = _distribution(distribution, images)
    x = draw_samples(shape, samples, distribution=kind, images=images, seed=seed)
    target = Target(layer=layer, output=output, layout=parse_layout(layout))
    with preserved(model):
        model.eval()
        with Engine(model, (1, *shape[1:]), mode="gradient", target=target, device=device, inputs=x[:1]) as probe:
            selected = positions_mod.resolve(positions, probe.output_spatial)
            per_pass, per_forward = _chunk_sizes(probe, batch_size, len(x))
            output_shape, used, read = probe.output_shape, probe.device, probe.target
        sums = _gradient_sums(model, x, selected, read, used, per_pass, per_forward)
    theory = theoretical or sweep(model, shape, selected.tolist(), mode="structural", layer=layer, output=output,
                                  batch_size=batch_size, device=device, seed=seed, layout=layout)
    maps = {tuple(pos): total / len(x) for pos, total in zip(selected.tolist(), sums)}
    return ErfResult(input_shape=shape, output_shape=output_shape, positions=selected,
                     metrics=erf_frame(selected, maps, theory), maps=maps, samples=len(x), distribution=kind,
                     device=str(used), target=target.describe(), seed=seed, seconds=time.perf_counter() - started)


def _chunk_sizes(probe: Engine, batch_size: int | str, samples: int) -> tuple[int, int]:
    """Return (positions per backward pass, samples per forward pass) within the probe's memory budget."""
    capacity = probe.auto_batch_size()  # (position, sample) pairs one backward pass may hold
    if batch_size == "auto":
        per_forward = min(samples, capacity)
        return max(1, capacity // per_forward), per_forward
    per_pass = resolve_batch_size(probe, batch_size)
    return per_pass, max(1, min(samples, capacity // per_pass))


def _gradient_sums(model: nn.Module, x: torch.Tensor, selected: np.ndarray, target: Target, device: torch.device,
                   per_pass: int, per_forward: int) -> np.ndarray:
    """Return, per position, the sum over samples of |dy/dx| summed over channels, as float64."""
    sums = torch.zeros((len(selected), *x.shape[2:]), dtype=torch.float64)
    for start in range(0, len(x), per_forward):
        batch = x[start:start + per_forward]
        with Engine(model, tuple(batch.shape), mode="gradient", target=target, device=device,
                    inputs=batch) as engine:
            for rows in chunks(np.arange(len(selected)), per_pass):
                weights = one_hot_weights(selected[rows], engine.output_spatial)
                sums[rows] += engine.input_grads(weights).double().cpu()
    return sums.numpy()


def _distribution(distribution: str, images: str | Path | None) -> str:
    """Return the sample source: `images` when a folder is given, else the named distribution."""
    if distribution not in values(Distribution):
        raise ErfError(f"unknown ERF distribution {distribution!r}; use one of {', '.join(values(Distribution))}")
    if images is not None and distribution == "uniform":
        raise ErfError(f"ERF images folder {str(images)!r} conflicts with distribution 'uniform'")
    if images is None and distribution == "images":
        raise ErfError("ERF distribution 'images' needs an images folder")
    return "images" if images is not None else distribution


def draw_samples(input_shape: Sequence[int], samples: int, *, distribution: str = "normal",
                 images: str | Path | None = None, seed: int = 0) -> torch.Tensor:
    """Return the (S, C, *spatial) float64 inputs an ERF averages over, reproducibly from `seed`.

    With an images folder, S = min(samples, number of files) files chosen by `seed`, each resized
    to cover the input grid, centre-cropped and standardised per channel.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ErfError(f"ERF samples must be a positive integer, not {samples!r}")
    kind = _distribution(distribution, images)
    shape = (samples, *input_shape[1:])
    if kind == "images":
        return load_images(Path(images), tuple(input_shape[1:]), samples, seed)
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    return torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1


def load_images(folder: Path, sample_shape: tuple[int, ...], samples: int, seed: int) -> torch.Tensor:
    """Return up to `samples` images of a folder, chosen by `seed`, fitted to (C, *spatial)."""
    if not folder.is_dir():
        raise ErfError(f"ERF images folder {str(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ErfError(f"ERF images folder {str(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    picked = np.sort(np.random.default_rng(seed).choice(len(files), size=min(samples, len(files)), replace=False))
    channels, spatial = sample_shape[0], sample_shape[1:]
    return torch.stack([fit_image(read_image(files[i], channels, len(spatial)), spatial) for i in picked])


def read_image(path: Path, channels: int, ndim: int) -> torch.Tensor:
    """Read a PNG/JPEG (2-D only) or NPY file as a float64 (C, *spatial) tensor."""
    try:
        if path.suffix.lower() == ".npy":
            array = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
        else:
            array = _read_picture(path, channels, ndim)
    except (OSError, ValueError, TypeError) as exc:
        raise ErfError(f"cannot read ERF image {str(path)!r}: {exc}") from exc
    return torch.from_numpy(_channels_first(array, channels, ndim, path))


def _read_picture(path: Path, channels: int, ndim: int) -> np.ndarray:
    """Decode a PNG/JPEG with Pillow into an (H, W) or (H, W, C) float64 array."""
    from PIL import Image

    if ndim != 2 or channels not in PIL_MODES:
        raise ErfError(f"ERF image {str(path)!r}: PNG/JPEG files need a 2-D input with 1, 3 or 4 channels, not "
                       f"{ndim}-D with {channels}; use NPY files")
    with Image.open(path) as picture:
        return np.asarray(picture.convert(PIL_MODES[channels]), dtype=np.float64)


def _channels_first(array: np.ndarray, channels: int, ndim: int, path: Path) -> np.ndarray:
    """Arrange an array as (C, *spatial): channels first or last, or one channel repeated."""
    if array.ndim == ndim:
        return np.repeat(array[None], channels, axis=0)
    if array.ndim == ndim + 1 and array.shape[0] == channels:
        return array
    if array.ndim == ndim + 1 and array.shape[-1] == channels:
        return np.ascontiguousarray(np.moveaxis(array, -1, 0))
    raise ErfError(f"ERF image {str(path)!r} has shape {array.shape}, which is not {ndim} spatial axes with "
                   f"{channels} channels first or last")


def fit_image(image: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Resize a (C, *src) image to cover `spatial`, centre-crop it, and standardise each channel."""
    src = image.shape[1:]
    scale = max(t / s for t, s in zip(spatial, src))
    size = [max(t, math.ceil(s * scale - 1e-9)) for t, s in zip(spatial, src)]
    resized = F.interpolate(image[None], size=size, mode=RESIZE_MODES[len(spatial)], align_corners=False)[0]
    crop = tuple(slice((n - t) // 2, (n - t) // 2 + t) for n, t in zip(size, spatial))
    cropped = resized[(slice(None), *crop)]
    axes = tuple(range(1, cropped.dim()))
    centred = cropped - cropped.mean(dim=axes, keepdim=True)
    std = centred.pow(2).mean(dim=axes, keepdim=True).sqrt()
    return torch.where(std > 0, centred / torch.where(std > 0, std, 1.0), centred)


def erf_frame(selected: np.ndarray, maps: dict[tuple[int, ...], np.ndarray], theory: SweepResult) -> pd.DataFrame:
    """Return the erf frame: the metrics of each map against its position's theoretical RF."""
    rows = _theory_rows(theory, selected, next(iter(maps.values())).shape)
    ndim = selected.shape[1]
    records = [{**_position_columns(pos), **map_metrics(maps[tuple(pos)], theory.lo[i], theory.hi[i],
                                                          int(theory.support[i]))}
               for pos, i in zip(selected.tolist(), rows)]
    return ERF.frame({name: [record[name] for record in records] for name in ERF.names(ndim)}, ndim)


def _theory_rows(theory: SweepResult, selected: np.ndarray, spatial: tuple[int, ...]) -> list[int]:
    """Return the row of each selected position in a theoretical sweep, checking both describe one grid."""
    if tuple(theory.input_spatial) != tuple(spatial):
        raise ErfError(f"the theoretical sweep has input grid {theory.input_spatial}, the ERF {spatial}")
    index = {pos: i for i, pos in enumerate(map(tuple, theory.positions.tolist()))}
    missing = [pos for pos in map(tuple, selected.tolist()) if pos not in index]
    if missing:
        raise ErfError(f"the theoretical sweep lacks ERF positions {missing[:3]} ({len(missing)} in all)")
    return [index[pos] for pos in map(tuple, selected.tolist())]


def _position_columns(pos: Sequence[int]) -> dict[str, int]:
    """Return the pos_{a} columns of one position."""
    return {f"pos_{a}": int(i) for a, i in zip(axis_names(len(pos)), pos)}


def map_metrics(erf_map: np.ndarray, lo: Sequence[int], hi: Sequence[int], support: int) -> dict[str, float]:
    """Return the erf-frame metrics of one ERF map given its theoretical RF box and support."""
    axes = axis_names(erf_map.ndim)
    mass = float(erf_map.sum())
    theory = {"rf_support": support, **{f"rf_{a}_lo": int(v) for a, v in zip(axes, lo)},
              **{f"rf_{a}_hi": int(v) for a, v in zip(axes, hi)}}
    if mass <= 0:
        return {**theory, **_empty_metrics(axes)}
    coords = np.indices(erf_map.shape, dtype=np.float64)
    com = (coords * erf_map).reshape(erf_map.ndim, -1).sum(axis=1) / mass
    sigma = np.sqrt((_offsets(coords, com) ** 2 * erf_map).reshape(erf_map.ndim, -1).sum(axis=1) / mass)
    peak = _peak(erf_map, coords, com)
    area = _area(erf_map)
    box_centre = (np.asarray(lo) + np.asarray(hi)) / 2
    return {
        **theory, "mass": mass, **{f"peak_{a}": int(v) for a, v in zip(axes, peak)},
        **dict(zip((f"side{q}" for q in LEVELS), square_sides(erf_map, coords, peak))),
        **dict(zip((f"radius{q}" for q in LEVELS), disc_radii(erf_map, coords, peak))),
        f"area{AREA_LEVEL}": area, f"area{AREA_LEVEL}_ratio": area / support if support else math.nan,
        **{f"com_{a}": float(v) for a, v in zip(axes, com)},
        **{f"offset_{a}": float(v) for a, v in zip(axes, com - box_centre)},
        **{f"sigma_{a}": float(v) for a, v in zip(axes, sigma)},
        "gauss_r2": gaussian_r2(erf_map, coords, com, sigma),
    }


def _empty_metrics(axes: tuple[str, ...]) -> dict[str, float]:
    """Return the metrics of a map with no mass: zero sides, -1 peak, NaN elsewhere."""
    per_axis = {f"{name}_{a}": math.nan for name in ("com", "offset", "sigma") for a in axes}
    return {"mass": 0.0, **{f"peak_{a}": -1 for a in axes}, **{f"side{q}": 0 for q in LEVELS},
            **{f"radius{q}": math.nan for q in LEVELS}, f"area{AREA_LEVEL}": 0,
            f"area{AREA_LEVEL}_ratio": math.nan, **per_axis, "gauss_r2": math.nan}


def _peak(erf_map: np.ndarray, coords: np.ndarray, com: np.ndarray) -> np.ndarray:
    """Return the index of the maximum; among (near-)ties, the one nearest the centre of mass."""
    ties = erf_map >= erf_map.max() * (1 - MASS_TOLERANCE)
    distance = (_offsets(coords, com) ** 2).sum(axis=0)
    return np.array(np.unravel_index(np.argmin(np.where(ties, distance, np.inf)), erf_map.shape))


def _reach(cumulative: np.ndarray, share: float) -> int:
    """Return the first index where a cumulative mass reaches `share` of its total."""
    return int(np.searchsorted(cumulative, share * cumulative[-1] * (1 - MASS_TOLERANCE)))


def _offsets(coords: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Return the per-axis offsets of every pixel from a point, (ndim, *shape)."""
    return coords - point.reshape(-1, *[1] * (coords.ndim - 1))


def square_sides(erf_map: np.ndarray, coords: np.ndarray, peak: np.ndarray) -> list[int]:
    """Return, per level, the side of the smallest square centred on the peak holding that mass share."""
    rings = np.abs(_offsets(coords, peak)).max(axis=0).astype(np.int64)
    cumulative = np.cumsum(np.bincount(rings.ravel(), weights=erf_map.ravel()))
    return [2 * _reach(cumulative, q / 100) + 1 for q in LEVELS]


def disc_radii(erf_map: np.ndarray, coords: np.ndarray, peak: np.ndarray) -> list[float]:
    """Return, per level, the radius of the smallest disc centred on the peak holding that mass share."""
    distance = np.sqrt((_offsets(coords, peak) ** 2).sum(axis=0)).ravel()
    order = np.argsort(distance, kind="stable")
    cumulative = np.cumsum(erf_map.ravel()[order])
    return [float(distance[order][_reach(cumulative, q / 100)]) for q in LEVELS]


def _area(erf_map: np.ndarray) -> int:
    """Return the fewest pixels (largest values first) holding AREA_LEVEL% of the mass."""
    cumulative = np.cumsum(np.sort(erf_map.ravel())[::-1])
    return _reach(cumulative, AREA_LEVEL / 100) + 1


def gaussian_r2(erf_map: np.ndarray, coords: np.ndarray, com: np.ndarray, sigma: np.ndarray) -> float:
    """Return R^2 of the axis-aligned Gaussian (mean com, std sigma, least-squares amplitude) against the map."""
    scaled = _offsets(coords, com) / np.maximum(sigma, TINY_SIGMA).reshape(-1, *[1] * erf_map.ndim)
    gauss = np.exp(-0.5 * (scaled ** 2).sum(axis=0))
    amplitude = (gauss * erf_map).sum() / (gauss ** 2).sum()
    total = ((erf_map - erf_map.mean()) ** 2).sum()
    residual = ((erf_map - amplitude * gauss) ** 2).sum()
    return float(1 - residual / total) if total > 0 else math.nan
