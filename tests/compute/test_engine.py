"""The engine's contract: output selection, clear errors, and the model left as it was found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rfreport.compute import global_context as context
from rfreport.compute.sweep import sweep
from rfreport.errors import PositionError, SweepError


class TwoHeads(nn.Module):
    """A model with named stages and a dict output, whose tail raises if it ever runs."""

    def __init__(self, tail_raises: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3)
        self.body = nn.Conv2d(2, 2, 3, stride=2)
        self.tail_raises = tail_raises

    def forward(self, x):
        stem = self.stem(x)
        body = self.body(stem)
        if self.tail_raises:
            raise RuntimeError("the tail must not run")
        return {"stem": stem, "body": body, "pair": (stem, body)}


def state_of(model: nn.Module):
    """Snapshot the flags, hooks, parameters and buffers a sweep must restore."""
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
            [t.detach().clone() for t in model.state_dict().values()])


def assert_same_state(before, after) -> None:
    assert before[:3] == after[:3]
    for a, b in zip(before[3], after[3]):
        assert torch.equal(a, b)


def test_named_layer_output_is_captured_and_the_rest_skipped():
    result = sweep(TwoHeads(tail_raises=True), (1, 1, 9, 9), "center", layer="body")
    assert result.output_spatial == (3, 3)
    assert (result.hi - result.lo + 1).tolist() == [[5, 5]]


@pytest.mark.parametrize(("key", "size"), [("stem", 3), ("body", 5)])
def test_dict_output_by_key(key, size):
    result = sweep(TwoHeads(), (1, 1, 9, 9), "center", output=key)
    assert (result.hi - result.lo + 1).tolist() == [[size, size]]


def test_layer_then_tuple_index():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TwoHeads()

        def forward(self, x):
            return self.inner(x)["pair"]

    result = sweep(Pair(), (1, 1, 9, 9), "center", output=1)
    assert (result.hi - result.lo + 1).tolist() == [[5, 5]]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"input_shape": (9, 9)}, "input shape (9, 9) must be (N, C, *spatial)"),
    ({"layer": "nope"}, "model has no submodule 'nope' (top-level children: stem, body)"),
    ({"output": "nope"}, "model output has no key 'nope' (keys: ['body', 'pair', 'stem'])"),
    ({}, "model output is a dict with keys ['body', 'pair', 'stem']; choose one with `output`"),
    ({"output": "stem", "positions": [[7, 0]]}, "position (7, 0) is outside the output grid of shape (7, 7)"),
    ({"output": "stem", "positions": "grid:0"}, "'grid:0': the grid step K in grid:K must be a positive integer"),
    ({"output": "stem", "mode": "fancy"}, "unknown mode 'fancy'"),
    ({"output": "stem", "batch_size": 0}, "batch_size must be a positive integer or 'auto', not 0"),
])
def test_bad_input_gets_one_clear_line(kwargs, message):
    args = {"input_shape": (1, 1, 9, 9), "positions": "center"} | kwargs
    with pytest.raises(SweepError) as info:
        sweep(TwoHeads(), args.pop("input_shape"), args.pop("positions"), **args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_out_of_range_position_is_a_position_error():
    with pytest.raises(PositionError):
        sweep(nn.Conv2d(1, 1, 3), (1, 1, 5, 5), [[3, 3]])


def test_a_model_that_raises_is_reported_with_its_error():
    with pytest.raises(SweepError, match=r"the model raised RuntimeError on input shape \(1, 1, 9, 9\): "
                                         r"the tail must not run"):
        sweep(TwoHeads(tail_raises=True), (1, 1, 9, 9))


def test_wrong_input_channels_are_reported():
    with pytest.raises(SweepError, match="the model raised RuntimeError on input shape"):
        sweep(nn.Conv2d(3, 1, 3), (1, 1, 9, 9))


def test_classifier_output_asks_for_a_spatial_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 3))
    with pytest.raises(SweepError, match="expects \\(N, C, 2 spatial axes\\)"):
        sweep(model, (1, 1, 6, 6))


def test_lazy_modules_must_be_initialised_first():
    with pytest.raises(SweepError, match="uninitialised lazy parameters"):
        sweep(nn.LazyConv2d(2, 3), (1, 1, 6, 6))


@pytest.mark.parametrize("mode", ["structural", "gradient"])
def test_sweep_leaves_the_model_as_it_was(mode):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Dropout())
    model.train()
    model[1].eval()
    model[0].weight.requires_grad_(False)
    model[0].register_forward_hook(lambda *a: None)
    before = state_of(model)
    sweep(model, (1, 1, 8, 8), mode=mode, layer="1")
    assert_same_state(before, state_of(model))


@pytest.mark.parametrize("mode", ["structural", "gradient"])
def test_model_is_restored_after_an_exception(mode):
    model = TwoHeads(tail_raises=True)
    model.train()
    before = state_of(model)
    with pytest.raises(SweepError):
        sweep(model, (1, 1, 9, 9), mode=mode)
    with pytest.raises(SweepError):
        sweep(model, (1, 1, 9, 9), [[99, 99]], mode=mode, layer="body")
    assert_same_state(before, state_of(model))


def test_structural_mode_replaces_functional_calls_too():
    class Functional(nn.Module):
        def forward(self, x):
            x = torch.nn.functional.max_pool2d(x, 2)
            x = x.clamp(min=5.0).relu()
            return torch.amax(x, dim=1, keepdim=True) + torch.nn.functional.adaptive_max_pool2d(x, 4)

    result = sweep(Functional(), (1, 2, 8, 8), "all")
    assert set(result.support) == {4}


def test_gradient_mode_uses_the_model_weights_as_given():
    conv = nn.Conv2d(1, 1, 3, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
    assert sweep(conv, (1, 1, 5, 5), "center", mode="gradient").support.tolist() == [1]
    assert sweep(conv, (1, 1, 5, 5), "center").support.tolist() == [9]


@pytest.mark.parametrize(("size", "rows"), [(8, None), (128, 4), (256, 1)])
def test_cpu_batches_keep_their_largest_gradient_in_reused_memory(size, rows):
    """On a CPU a batch's largest gradient stays under CPU_TENSOR_BYTES; a small pass still batches many rows."""
    from rfreport.compute.engine import CPU_TENSOR_BYTES, Engine

    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 1, 3, padding=1))
    with Engine(model, (1, 1, size, size), device="cpu") as engine:
        batch = engine.auto_batch_size()
        largest = 16 * size * size * 4   # the hidden activation, float32
        assert batch == (rows or CPU_TENSOR_BYTES // largest)
        assert batch * largest <= max(CPU_TENSOR_BYTES, largest)


class CachedBias(nn.Module):
    """A convolution plus a bias derived from a parameter and cached by an eval-mode forward, as LeViT caches its
    attention biases."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(2))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        bias = self.scale * 2 if self.training else self.cache.setdefault(str(x.device), self.scale * 2)
        return self.conv(x) + bias[None, :, None, None]


def test_a_pass_on_the_model_as_given_leaves_its_own_attributes_as_they_were():
    """A cache a forward fills, an attribute it rebinds and one it adds: all as before the pass, same objects."""
    from rfreport.compute.engine import preserved

    model = CachedBias().eval()
    cache, marker = model.cache, [1]
    model.marker = marker
    with preserved(model):
        model(torch.randn(1, 1, 5, 5, requires_grad=True))
        model.marker, model.added = [2], 3
        marker.append(4)
    assert model.cache is cache and cache == {}
    assert model.marker is marker and marker == [1]
    assert not hasattr(model, "added")


def test_a_model_that_caches_a_tracked_tensor_is_swept_after_attention_detection():
    """Attention detection runs the model as given with gradients; the surrogate, a deep copy, comes after."""
    from rfreport.compute import attention

    model = CachedBias().eval()
    attention.detect(model, (1, 1, 9, 9))
    assert model.cache == {}
    result = sweep(model, (1, 1, 9, 9), "center")
    assert result.lo.tolist() == [[3, 3]] and result.hi.tolist() == [[5, 5]]


@pytest.mark.parametrize("mode", ["structural", "gradient"])
def test_a_model_holding_tensors_of_its_own_earlier_graph_is_swept(mode):
    """weight_norm's `weight` and a filled cache, left by the user's forward pass with gradients (torch copies
    only graph leaves): every copy takes them detached, and the centre's RF is the two 3x3 layers' 5x5."""
    with pytest.warns(FutureWarning):
        normed = nn.utils.weight_norm(nn.Conv2d(1, 1, 3, padding=1))
    model = nn.Sequential(normed, CachedBias()).eval()
    model(torch.randn(1, 1, 9, 9))
    assert normed.weight.grad_fn is not None and model[1].cache["cpu"].grad_fn is not None
    result = sweep(model, (1, 1, 9, 9), "center", mode=mode, verify=True)
    assert result.lo.tolist() == [[2, 2]] and result.hi.tolist() == [[6, 6]]
    assert result.violations.tolist() == [0]


def test_a_model_that_quantizes_its_activations_is_refused_for_that_reason():
    """Quantized tensors carry no gradient: the output depends on the input, but no backward pass can say so."""
    class Quantized(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.conv(torch.quantize_per_tensor(x, 0.1, 0, torch.quint8).dequantize())

    for mode in ("structural", "gradient"):
        with pytest.raises(SweepError, match=r"quantizes its activations \(quantize_per_tensor\).*float version"):
            sweep(Quantized(), (1, 1, 8, 8), "center", mode=mode)


class WritesItsInput(nn.Module):
    """A residual 3x3 block that writes into its input and its output in place (legal in plain use)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x += 1.0
        y = self.conv(x)
        y += x
        return torch.relu_(y)


@pytest.mark.parametrize("mode", ["structural", "gradient"])
def test_a_model_that_writes_into_its_input_is_swept_verified_and_searched_for_global_ops(mode):
    torch.manual_seed(1)   # gradient mode reads the model as given: these weights leave no output position dead
    found = sweep(WritesItsInput(), (1, 3, 16, 16), "all", mode=mode)
    rows = found.positions
    assert (found.lo == np.maximum(rows - 1, 0)).all() and (found.hi == np.minimum(rows + 1, 15)).all()
    if mode == "structural":   # the float64 check feeds each pass its own copy: no false alarm
        assert found.verification.samples >= 1 and not found.violations.any()
    assert context.global_ops(WritesItsInput(), (1, 3, 16, 16)) == ()
