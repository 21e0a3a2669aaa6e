"""The seed's API, `NumericRF`, backed by the exact sweep, and its verification procedure.

The original "simple Numerical Receptive Fields" project backpropagated a one-hot output
gradient and looked for non-zero input gradients. `NumericRF` keeps its calls
(`heatmap`, `info`, `plot`) but answers them with :func:`rfreport.compute.sweep.sweep` (structural
mode by default, so dead ReLUs, max-pool routing or zero weights never shrink the answer),
works on a copy so the model is never mutated, and runs on any device. :func:`verify` is the
seed's check that an RF is right, by forward passes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from rfreport.compute.engine import Target, forward_target
from rfreport.compute.surrogate import deep_copy
from rfreport.compute.sweep import sweep
from rfreport.errors import SweepError
from rfreport.positions import axis_names
from rfreport.results import SweepResult

if TYPE_CHECKING:
    from rfreport.report import plots


class NumericRF:
    """The receptive field of one output position at a time, the way the seed project exposed it."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], *, mode: str = "structural",
                 layer: str | None = None, output: str | int | None = None, device: str = "auto", seed: int = 0):
        self.model, self.input_shape = model, tuple(int(n) for n in input_shape)
        self.mode, self.layer, self.output, self.device, self.seed = mode, layer, output, device, seed
        self.pos: tuple[int, ...] | None = None
        self._result: SweepResult | None = None

    def heatmap(self, pos: Sequence[int]) -> np.ndarray:
        """Return the boolean support mask (input spatial shape) of an output position and remember it."""
        pos = tuple(int(p) for p in pos)
        self._result = sweep(self.model, self.input_shape, [list(pos)], mode=self.mode, layer=self.layer,
                             output=self.output, device=self.device, seed=self.seed, keep_masks=[list(pos)])
        self.pos = pos
        return self._result.masks[pos]

    def _last(self) -> SweepResult:
        """Return the last heatmap's sweep, or raise when no position was asked for yet."""
        if self._result is None:
            raise SweepError("NumericRF: call heatmap(pos) before info() or plot()")
        return self._result

    def info(self) -> dict[str, dict[str, Any]]:
        """Return `{axis: {'bounds': (lo, hi), 'range': hi - lo}}` (inclusive bounds) of the last position."""
        result = self._last()
        return {axis: {"bounds": (int(result.lo[0, i]), int(result.hi[0, i])),
                       "range": int(result.hi[0, i] - result.lo[0, i])}
                for i, axis in enumerate(axis_names(result.ndim))}

    def plot(self, image: Any = None, add_text: bool = True) -> plots.Figure:
        """Draw the image (or a blank canvas) with the last position's support and RF box; no pyplot."""
        from rfreport.report import plots  # matplotlib loads only when a figure is asked for

        result = self._last()
        if result.ndim == 3:
            raise SweepError("NumericRF.plot draws 1-D and 2-D inputs; slice a 3-D input first")
        mask = _as_2d(result.masks[self.pos])
        array = None if image is None else _image_array(image, mask.shape)
        text = "\n".join(f"{axis}: bounds {v['bounds']}, range {v['range']}" for axis, v in self.info().items())
        return plots.seed_overlay(mask, _box(result), array, f"receptive field of output position {self.pos}",
                                  text if add_text else None)


def _as_2d(mask: np.ndarray) -> np.ndarray:
    """View a 1-D mask as a single-row image."""
    return mask[None, :] if mask.ndim == 1 else mask


def _box(result: SweepResult) -> tuple[tuple[int, int], tuple[int, int]]:
    """Return the (h, w) inclusive bounds of the first swept position, a 1-D RF as row 0."""
    bounds = [(int(result.lo[0, i]), int(result.hi[0, i])) for i in range(result.ndim)]
    return ((0, 0), bounds[0]) if result.ndim == 1 else (bounds[0], bounds[1])


def _image_array(image: Any, spatial: tuple[int, int]) -> np.ndarray:
    """Turn an image (tensor or array; (N, C, H, W), (C, H, W), (H, W, C) or (H, W)) into (H, W[, 3]) in [0, 1]."""
    array = (image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)).astype(float)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[1:] == spatial:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    array = array.reshape(spatial) if array.size == np.prod(spatial) else array
    if array.shape[:2] != spatial or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise SweepError(f"image of shape {tuple(np.shape(image))} does not match the input's spatial shape {spatial}")
    low, high = np.nanmin(array), np.nanmax(array)
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _bias_free_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """Return a float64 eval-mode copy of the model with every bias zeroed."""
    clone = deep_copy(model).to(device=device, dtype=torch.float64).eval()
    with torch.no_grad():
        for name, param in clone.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.zero_()
    return clone


def verify(model: nn.Module, input_shape: Sequence[int], pos: Sequence[int], *, mask: np.ndarray | None = None,
           layer: str | None = None, output: str | int | None = None, trials: int = 3, pixels: int = 64,
           seed: int = 0, device: str = "cpu", atol: float = 1e-9) -> bool:
    """Check an RF by forward passes on a bias-free float64 copy of the model.

    1. An input of ones with the RF entries zeroed gives zero at `pos` (holds for models whose
       only offsets are biases: convolutions, ReLU, pooling, no sigmoid-like offsets).
    2. Perturbing input pixels outside the RF leaves the output at `pos` unchanged: all of them
       at once (`trials` random draws), and up to `pixels` of them one at a time.
    `mask` defaults to the structural support of `pos` from :class:`NumericRF`.
    """
    shape, pos, target = tuple(int(n) for n in input_shape), tuple(int(p) for p in pos), Target(layer, output)
    if mask is None:
        mask = NumericRF(model, shape, layer=layer, output=output, device=device, seed=seed).heatmap(pos)
    inside = torch.as_tensor(np.asarray(mask, dtype=bool), device=device)
    clone = _bias_free_copy(model, torch.device(device))
    generator = torch.Generator().manual_seed(seed)

    def at_pos(x: torch.Tensor) -> torch.Tensor:
        """Return the target's values at `pos` (batch x channels) for a batch of inputs."""
        with torch.no_grad():
            return forward_target(clone, x, target)[(slice(None), slice(None), *pos)]

    blanked = torch.ones(shape, dtype=torch.float64, device=device).masked_fill(inside, 0.0)
    if at_pos(blanked).abs().max() > atol:
        return False
    return _outside_unchanged(at_pos, shape, inside, generator, trials, pixels, atol)


def _outside_unchanged(at_pos, shape: tuple[int, ...], inside: torch.Tensor, generator: torch.Generator,
                       trials: int, pixels: int, atol: float) -> bool:
    """Tell whether random changes to pixels outside the RF (jointly, then singly) leave the output alone."""
    device = inside.device
    base = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    reference = at_pos(base)
    scale = atol * max(1.0, float(reference.abs().max()))
    noise = torch.randn((trials, *shape), generator=generator, dtype=torch.float64).to(device)
    joint = base + noise.masked_fill(inside, 0.0)
    if any((at_pos(x) - reference).abs().max() > scale for x in joint):
        return False
    outside = torch.nonzero(~inside.cpu())
    chosen = outside[torch.randperm(len(outside), generator=generator)[:pixels]]
    for start in range(0, len(chosen), 64):
        batch = base.repeat(len(chosen[start:start + 64]), *([1] * (len(shape) - 1)))
        for row, where in enumerate(chosen[start:start + 64].tolist()):
            batch[(slice(row * shape[0], (row + 1) * shape[0]), slice(None), *where)] += 1.0
        changed = (at_pos(batch).reshape(-1, *reference.shape) - reference).abs().amax(dim=(1, 2))
        if changed.max() > scale:
            return False
    return True
