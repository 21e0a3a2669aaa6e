"""The seed's method, the baseline of every benchmark: what a user without rfreport would run.

One position at a time: one float32 forward pass of the model as given (eval mode, its own
weights, a standard-normal input, on the GPU when there is one, like rfreport's `auto`), one
backward pass of a one-hot output gradient at that position (over every channel of the analysed
tensor), and the non-zero input gradient read as the receptive field. Parameters are frozen, so
no weight gradients are computed: that only makes the baseline faster. Only torch is imported
(and the factory's own module), never rfreport.

As a script it times whole processes for `bench_inspect.py`::

    python benchmarks/seed_method.py torchvision.models:resnet50 --layer layer4 --input-shape 1,3,224,224
    python benchmarks/seed_method.py fcn.py:fcn --input-shape 1,3,256,256 --sample 16

and prints one JSON object: the seconds of the first position (the centre, with the warm-up
of a first pass), the seconds of the sampled positions after it, the output grid and the
centre's RF box.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


def build(factory: str, kwargs: dict | None = None) -> nn.Module:
    """Import `package.module:callable` or `file.py:callable`, call it and return the model in eval mode."""
    target, _, attr = factory.rpartition(":")
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    model = getattr(module, attr)(**(kwargs or {})).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def forward(model: nn.Module, x: torch.Tensor, layer: str | None) -> torch.Tensor:
    """Run the model on x and return its output, or the named submodule's output (the pass runs to the end)."""
    if layer is None:
        return model(x)
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0]


def support(model: nn.Module, input_shape: Sequence[int], pos: Sequence[int] | None = None, layer: str | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, tuple[int, ...], list[int]]:
    """Return the seed's RF of one output position (the centre when None) as a boolean mask, the grid and the position.

    The RF is the non-zero input gradient of a one-hot output gradient at the position.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.randn(tuple(input_shape), generator=generator).to(device).requires_grad_(True)
    y = forward(model, x, layer)
    grid = tuple(y.shape[2:])
    pos = [n // 2 for n in grid] if pos is None else list(pos)
    grad = torch.zeros_like(y)
    grad[(Ellipsis, *pos)] = 1.0
    (x_grad,) = torch.autograd.grad(y, x, grad)
    return x_grad.abs().sum(dim=(0, 1)) > 0, grid, pos


def box(mask: torch.Tensor) -> list[list[int]]:
    """Return [lo, hi] per axis of a non-empty mask."""
    found = mask.nonzero()
    return [[int(found[:, a].min()), int(found[:, a].max())] for a in range(mask.dim())]


def main() -> None:
    """Time the seed's method at the centre, then on a sample of random positions, and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("factory")
    parser.add_argument("--input-shape", required=True, type=lambda t: tuple(int(n) for n in t.split(",")))
    parser.add_argument("--layer", default=None)
    parser.add_argument("--kwargs", default="{}", type=json.loads)
    parser.add_argument("--sample", type=int, default=0, help="time this many random positions after the centre")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model = build(args.factory, args.kwargs).to(args.device)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    mask, grid, center = support(model, args.input_shape, None, args.layer, generator)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.sample):
        pos = [int(torch.randint(n, (1,), generator=generator)) for n in grid]
        support(model, args.input_shape, pos, args.layer, generator)
    print(json.dumps({"first_s": first, "sample": args.sample, "sample_s": time.perf_counter() - started,
                      "output_spatial": list(grid), "center": center, "center_box": box(mask)}))

if __name__ == "__main__":
    main()
