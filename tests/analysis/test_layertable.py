"""The per-layer table read from a layers frame: centre offsets, unknown values, JSON records, older frames."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rfreport.analysis.layertable import UNRECORDED, layer_rows


def frame(**changes) -> pd.DataFrame:
    """Return a two-row 2-D layers frame: an exact strided conv and a global pooling with no stride."""
    data = {"order": [0, 1], "layer": ["conv", "pool"], "type": ["Conv2d", "AdaptiveAvgPool2d"], "channels": [8, 8],
            "out_h": [4, 1], "out_w": [5, 1], "h_size": [7, 16], "w_size": [7, 16], "h_rf": [7, 19], "w_rf": [7, 19],
            "h_stride": [4.0, np.nan], "w_stride": [4.0, np.nan], "h_padding": [3.0, 3.0], "w_padding": [2.0, 3.0],
            "rf_exact": [True, False], "border": [False, True], "global": [False, True],
            "estimated": ["", "reads through global pooling"], "target": [True, False]}
    return pd.DataFrame(data | changes)


def test_rows_carry_the_geometry_and_the_centre_offset():
    conv, pool = layer_rows(frame())
    assert (conv.output_shape, conv.stride, conv.arch_rf_size, conv.padding) == ((8, 4, 5), (4.0, 4.0), (7, 7),
                                                                                  (3.0, 2.0))
    assert conv.center_offset == (-1.5, -0.5)   # (7 - 4)/2 - 3 and (7 - 4)/2 - 2
    assert (conv.exact, conv.estimated, conv.target) == (True, None, True)
    assert pool.stride == (None, None) and pool.center_offset == (None, None)
    assert (pool.exact, pool.estimated, pool.border, pool.global_) == (False, "reads through global pooling", True,
                                                                       True)


def test_json_records_use_lists_and_the_key_global():
    record = layer_rows(frame())[1].to_json()
    assert record["global"] is True and "global_" not in record
    assert record["stride"] == [None, None] and record["output_shape"] == [8, 1, 1]


def test_a_frame_without_the_reason_and_target_columns_says_the_reason_is_unrecorded():
    conv, pool = layer_rows(frame().drop(columns=["estimated", "target"]))
    assert conv.estimated is None and pool.estimated == UNRECORDED
    assert not conv.target and not pool.target
