"""Shape-only passes: the same answer from the model itself and from a meta copy; the model left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rfreport.compute import shapes
from rfreport.compute.shapes import shape_pass
from rfreport.compute.surrogate import surrogates_reused
from rfreport.compute.sweep import sweep


class Noisy(nn.Module):
    """Adds noise from torch's global generator: a pass of the model itself draws from it."""

    def forward(self, x):
        return x + 0 * torch.rand(x.shape, device=x.device)


def small_model(seen: list[str]) -> nn.Module:
    """A conv stack in train mode (batch norm, dropout) that records the device of every input it gets."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), Noisy(),
                          nn.Conv2d(4, 2, 3, stride=2))
    model.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0].device.type))
    return model.train()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def test_the_model_itself_and_its_meta_copy_give_the_same_shapes_reads_and_flops(monkeypatch):
    found = {}
    for loaded in (False, True):
        monkeypatch.setattr(shapes, "dynamo_loaded", lambda loaded=loaded: loaded)
        seen: list[str] = []
        model = small_model(seen)
        random_state = torch.get_rng_state()
        out, read = shape_pass(model, (1, 3, 10, 10), run)
        assert seen == (["meta"] if loaded else ["cpu"])
        assert all(m.training for m in model.modules())                    # flags as they were
        assert torch.equal(torch.get_rng_state(), random_state)            # no random number drawn for good
        names = {name for name, t in [*model.named_parameters(), *model.named_buffers()] if id(t) in read.ids}
        found[loaded] = tuple(out.shape), names, read.flops, read.grain
    convolutions = [2 * 4 * 10 * 10 * 3 * 9, 2 * 2 * 4 * 4 * 4 * 9]
    elementwise = [4 * 10 * 10] * 6    # batch norm, relu, dropout, rand, mul, add: one per output entry
    ops = convolutions + elementwise
    assert found[False] == found[True] == (
        (1, 2, 4, 4), {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                       "5.weight", "5.bias"}, sum(ops), sum(f * f for f in ops) // sum(ops))


def test_a_model_past_the_budget_is_measured_on_its_meta_copy(monkeypatch):
    monkeypatch.setattr(shapes, "dynamo_loaded", lambda: False)
    monkeypatch.setattr(shapes, "PASS_FLOPS", 1000)     # the first convolution alone costs 21,600
    seen: list[str] = []
    out, read = shape_pass(small_model(seen), (1, 3, 10, 10), run)
    assert seen == ["cpu", "meta"] and out.shape == (1, 2, 4, 4) and read.flops > 1000


@pytest.mark.parametrize("loaded", [False, True])
def test_a_pass_that_cannot_run_gives_nothing(monkeypatch, loaded):
    monkeypatch.setattr(shapes, "dynamo_loaded", lambda: loaded)
    assert shape_pass(nn.Conv2d(3, 4, 3), (1, 3, 2, 2), run) is None     # a 3x3 kernel on a 2x2 input


def test_the_sweeps_of_one_job_judge_its_layout_with_one_shape_only_pass():
    seen: list[tuple[int, ...]] = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2))
    model.register_forward_pre_hook(lambda _module, inputs: seen.append(tuple(inputs[0].shape)))
    with surrogates_reused():
        for _ in range(2):
            sweep(model, (1, 3, 10, 10), "center")
    assert seen.count((1, 3, 20, 20)) == 1     # the input doubled: once for both sweeps
    sweep(model, (1, 3, 10, 10), "center")     # outside a job's scope nothing is kept
    assert seen.count((1, 3, 20, 20)) == 2
