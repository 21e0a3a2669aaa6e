"""Findings name the kind of global context in words of its own."""

from __future__ import annotations

import pytest

from rfreport.analysis.findings import CONTEXT_VERBS
from rfreport.options import ContextKind
from rfreport.results import context_kind


def test_every_kind_of_global_context_has_its_own_words():
    assert set(CONTEXT_VERBS) == set(ContextKind)
    assert len(set(CONTEXT_VERBS.values())) == len(ContextKind)


@pytest.mark.parametrize(("op", "kind"), [("adaptive_avg_pool2d", ContextKind.POOLING),
                                          ("scaled_dot_product_attention", ContextKind.ATTENTION),
                                          ("token-mixing linear", ContextKind.MIXING),
                                          ("grid_sample", ContextKind.SAMPLING),
                                          ("deform_conv2d", ContextKind.SAMPLING)])
def test_a_global_op_is_told_by_its_kind(op, kind):
    """Data-dependent sampling is not called pooling: its finding says it samples where the input says."""
    assert context_kind(op) is kind
    assert kind.held_by_local_sweep is (kind in (ContextKind.POOLING, ContextKind.SAMPLING))
