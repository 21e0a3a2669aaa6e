"""The per-layer table: the layers frame read as the rows a backbone reviewer reads layer by layer.

One :class:`LayerRow` per row of the layers frame (`rfreport.compute.layers.layer_growth`): the
layer's output shape, its effective stride, its architecture RF (the RF of its centre position with
no border in the way, from the exact per-layer geometry), effective padding and centre offset, whether
those values are exact (else the reason they are estimated), whether the centre's RF already covers
the input (a border layer) or every RF does (global), and whether the row is the analysed tensor.
`rfreport inspect --layers` prints the rows and lists them in `--json`; the report shows them per
model. Pure pandas, no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import pandas as pd

from rfreport.positions import axis_names


@dataclass(frozen=True)
class LayerRow:
    """One layer of the per-layer table (values per spatial axis; None where a value is unknown)."""

    layer: str = field(metadata={"doc": "qualified module name"})
    type: str = field(metadata={"doc": "module class name"})
    output_shape: tuple[int, ...] = field(metadata={"doc": "the layer's output: channels, then the grid per axis"})
    stride: tuple[float | None, ...] = field(metadata={
        "doc": "effective stride per axis (input pixels per output step; None on a one-cell axis or a non-affine "
               "layer)"})
    arch_rf_size: tuple[int, ...] = field(metadata={
        "doc": "architecture RF per axis: the centre position's RF with no border in the way (input pixels)"})
    padding: tuple[float | None, ...] = field(metadata={
        "doc": "effective padding P per axis: the RF of output position p starts at -P + p * stride"})
    center_offset: tuple[float | None, ...] = field(metadata={
        "doc": "RF centre minus the nominal pixel per axis, (r - s)/2 - P (None where the stride is unknown)"})
    exact: bool = field(metadata={"doc": "the stride, architecture RF and padding are exact"})
    estimated: str | None = field(metadata={"doc": "why the values are only estimated; None when exact"})
    border: bool = field(metadata={
        "doc": "border layer: the centre position's RF already covers the whole input at this input size"})
    global_: bool = field(metadata={"doc": "both the centre and the first corner position see the whole input"})
    target: bool = field(metadata={"doc": "the analysed tensor is this layer's output"})

    def to_json(self) -> dict:
        """Return the row as the JSON record of `inspect --json` (its `global_` field under the key `global`)."""
        return {key.rstrip("_"): list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}


def _known(value: float) -> float | None:
    """Return a float value, or None where it is NaN."""
    return None if math.isnan(value) else float(value)


def _center_offset(rf: int, stride: float | None, padding: float | None) -> float | None:
    """Return the RF centre minus the nominal pixel, (r - s)/2 - P, or None where the stride or padding is unknown."""
    return None if stride is None or padding is None else (rf - stride) / 2 - padding


UNRECORDED = "the reason is not recorded in this run folder (rerun the model to see it)"


def layer_rows(frame: pd.DataFrame) -> tuple[LayerRow, ...]:
    """Return the per-layer table of a layers frame, in forward order.

    A frame saved without the `estimated` and `target` columns gives estimated rows that say their reason
    was not recorded, and no analysed row.
    """
    letters = axis_names(sum(column.startswith("out_") for column in frame.columns))
    frame = frame.assign(**{column: value for column, value in (("estimated", ""), ("target", False))
                            if column not in frame.columns})
    rows = []
    for record in frame.to_dict("records"):
        stride = tuple(_known(record[f"{a}_stride"]) for a in letters)
        padding = tuple(_known(record[f"{a}_padding"]) for a in letters)
        rf = tuple(int(record[f"{a}_rf"]) for a in letters)
        rows.append(LayerRow(
            layer=str(record["layer"]), type=str(record["type"]),
            output_shape=(int(record["channels"]), *(int(record[f"out_{a}"]) for a in letters)),
            stride=stride, arch_rf_size=rf, padding=padding,
            center_offset=tuple(_center_offset(*axis) for axis in zip(rf, stride, padding, strict=True)),
            exact=bool(record["rf_exact"]),
            estimated=None if record["rf_exact"] else str(record["estimated"]) or UNRECORDED,
            border=bool(record["border"]), global_=bool(record["global"]), target=bool(record["target"])))
    return tuple(rows)
