"""Frames: a sweep's arrays as a documented pandas DataFrame (the contract between stages)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rfreport.positions import axis_names
from rfreport.schema import Column, Schema, register

if TYPE_CHECKING:  # the sweep needs torch; frames, like every stage after it, must not
    from rfreport.results import SweepResult

POSITIONS = register(Schema(
    name="positions",
    row="swept output position",
    columns=(
        Column("pos_{a}", "int64", "output index", "output position on this axis (0-based)"),
        Column("{a}_lo", "int64", "input index", "first input index of the RF box (inclusive; < 0 when wrapped, "
               "-1 when the support is empty)", group="bounds"),
        Column("{a}_hi", "int64", "input index", "last input index of the RF box (inclusive; >= n when wrapped)",
               group="bounds"),
        Column("{a}_size", "int64", "input pixels", "the in-input RF of this position on this axis: extent of "
               "its RF box, hi - lo + 1 (clipped to the input, unrolled when it wraps; 0 when empty)"),
        Column("{a}_wrap", "bool", "flag", "the RF wraps round the input border on this axis (circular padding); "
               "lo/hi are unrolled and indices are taken modulo the input size"),
        Column("support", "int64", "input positions", "input positions (union over channels) whose value can "
               "change this output position"),
        Column("fill", "float64", "ratio", "support / volume of the RF box; below 1 means holes"),
        Column("path", "string", "", "which sweep produced the row: dense or compressed"),
        Column("verified", "bool", "flag", "the row was checked on the model itself: a float64 eval copy run on random "
               "inputs with every input entry outside the support replaced by random values"),
        Column("violations", "int64", "trials", "perturbation trials (of a checked row, out of the summary's "
               "`verify_trials`) that changed this output: above 0 the reported RF is too small and the row is not "
               "exact"),
    ),
))


def positions_frame(result: SweepResult) -> pd.DataFrame:
    """Return the positions frame of a sweep, one row per swept output position."""
    ndim = result.ndim
    size = result.size
    volume = np.prod(size, axis=1)
    data: dict[str, object] = {"support": result.support,
                               "fill": np.divide(result.support, volume, out=np.zeros(len(volume)),
                                                 where=volume > 0),
                               "path": result.path, "verified": _flags(result.verified, len(volume), bool),
                               "violations": _flags(result.violations, len(volume), np.int64)}
    for i, a in enumerate(axis_names(ndim)):
        data[f"pos_{a}"] = result.positions[:, i]
        data[f"{a}_lo"], data[f"{a}_hi"] = result.lo[:, i], result.hi[:, i]
        data[f"{a}_size"], data[f"{a}_wrap"] = size[:, i], result.wrapped[:, i]
    return POSITIONS.frame(data, ndim)



def _flags(values: np.ndarray | None, rows: int, dtype) -> np.ndarray:
    """Return a per-row verification column, all zero when the sweep was not verified."""
    return np.zeros(rows, dtype=dtype) if values is None else np.asarray(values, dtype=dtype)
