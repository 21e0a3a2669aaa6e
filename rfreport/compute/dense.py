"""The dense sweep: one one-hot output cotangent per position, batched through the engine's backward pass.

The compressed sweep falls back to it, layer growth and the ERF build their cotangents with it.
"""

from __future__ import annotations

import numpy as np
import torch

from rfreport.compute.engine import Engine
from rfreport.results import Accumulator, chunks


def one_hot_weights(chunk: np.ndarray, output_spatial: tuple[int, ...]) -> torch.Tensor:
    """Return (B, *output_spatial) cotangent weights with a single 1 at each chunk position."""
    weights = torch.zeros((len(chunk), *output_spatial), dtype=torch.float64)
    weights[(torch.arange(len(chunk)), *torch.as_tensor(chunk).T)] = 1.0
    return weights


def dense_sweep(engine: Engine, selected: np.ndarray, batch_size: int, acc: Accumulator,
                progress=None) -> None:
    """Sweep positions with one one-hot cotangent per position, `batch_size` per backward pass."""
    for chunk in chunks(selected, batch_size):
        acc.add(chunk, engine.support(one_hot_weights(chunk, engine.output_spatial)).cpu().numpy(), "dense")
        if progress is not None:
            progress(len(chunk))
