"""Which ops make the RF geometry depend on the input size, as the engine records them in its pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rfreport.compute.engine import Engine
from rfreport.config import ModelSpec, RunOptions
from rfreport.run import jobs as jobs_mod
from rfreport.run import pipeline


class Call(nn.Module):
    """A conv followed by one functional call on its output."""

    def __init__(self, then):
        super().__init__()
        self.conv, self.then = nn.Conv2d(1, 2, 3, padding=1), then

    def forward(self, x):
        return self.then(self.conv(x))


def shuffle(y):
    n, c, h, w = y.shape
    return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


SIZE_DEPENDENT = {
    "adaptive pool to 4": (lambda y: F.adaptive_avg_pool2d(y, 4), "adaptive_avg_pool2d"),
    "adaptive max to 3": (lambda y: F.adaptive_max_pool2d(y, (3, 3)), "adaptive_max_pool2d"),
    "interpolate to a size": (lambda y: F.interpolate(y, size=(5, 7)), "interpolate"),
    "interpolate recomputing": (lambda y: F.interpolate(y, scale_factor=2, recompute_scale_factor=True),
                                "interpolate"),
    "cat along width": (lambda y: torch.cat([y, y], -1), "cat"),
    "chunk along height": (lambda y: y.chunk(2, dim=2)[1], "chunk"),
    "slice from the end": (lambda y: y[..., -4:], "getitem"),
    "flip": (lambda y: y.flip(-1), "flip"),
    "flatten to tokens": (lambda y: y.flatten(2), "flatten"),
    "unfold into patches": (lambda y: F.unfold(y, 3), "unfold"),
    "roll": (lambda y: y.roll(1, -1), "roll"),
}
SIZE_INDEPENDENT = {
    "adaptive pool to one cell": lambda y: F.adaptive_avg_pool2d(y, 1),
    "interpolate by a factor": lambda y: F.interpolate(y, scale_factor=2, mode="bilinear"),
    "cat along channels": lambda y: torch.cat([y, y], 1),
    "strided conv and pool": lambda y: F.max_pool2d(F.conv2d(y, torch.ones(2, 2, 3, 3, dtype=y.dtype), stride=2), 2),
    "slice from the start": lambda y: y[:, :, 1:, 2:-2],
    "channel shuffle": shuffle,
    "channels-last round trip": lambda y: F.layer_norm(y.permute(0, 2, 3, 1), (2,)).permute(0, 3, 1, 2),
    "broadcast row and column": lambda y: y.mean(2, keepdim=True) * y.mean(3, keepdim=True),
    "spatial mean": lambda y: y.mean((2, 3)),
}


@pytest.mark.parametrize("case", SIZE_DEPENDENT)
def test_size_dependent_ops_are_recorded(case):
    then, name = SIZE_DEPENDENT[case]
    with _any_rank(then) as engine:
        assert name in engine.size_dependent_ops


@pytest.mark.parametrize("case", SIZE_INDEPENDENT)
def test_size_independent_ops_are_not(case):
    with _any_rank(SIZE_INDEPENDENT[case]) as engine:
        assert engine.size_dependent_ops == ()


def _any_rank(then):
    """Return an engine on a model whose output is made spatial again when the op drops its rank."""
    def spatial(y):
        out = then(y)
        return out if out.dim() == 4 else out.reshape(1, -1, 1, 1)
    return Engine(Call(spatial), (1, 1, 16, 16))


ADAPTIVE = '''
from torch import nn


def adaptive():
    return nn.Sequential(nn.Conv2d(3, 8, 9, padding=4), nn.AdaptiveAvgPool2d(4), nn.Conv2d(8, 1, 1))
'''


def test_geometry_is_never_fitted_on_a_larger_input_when_it_depends_on_the_size(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(ADAPTIVE)
    spec = ModelSpec(name="adaptive", factory=f"{path}:adaptive", input_shapes=((1, 3, 8, 8),))
    result = pipeline.run_job(jobs_mod.Job(spec, (1, 3, 8, 8), RunOptions()))
    assert result.status == "ok", result.error
    summary = result.summary.to_json()
    assert summary["size_dependent"] == ["adaptive_avg_pool2d"]
    assert not summary["affine"] and summary["arch_rf_size"] != [16, 16]
    geometry = result.frames["geometry"]
    assert (geometry["fit"] == "estimated").all()
    assert geometry["problem"].str.contains("depends on the input size").all()
    assert any(f["code"] == "size_dependent" and "8 x 8" in f["message"] for f in result.findings)
