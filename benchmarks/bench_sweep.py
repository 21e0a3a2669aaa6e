"""Benchmark: positions per second of the naive, dense batched and compressed sweeps (`make bench`).

One process. For each model: the naive way (one forward + one backward per position, as the
original library did) and the dense batched sweep are timed on a random sample of positions and
extrapolated per position (both cost the same for every position). The compressed sweep is timed
as its pilots plus every colour group; `--quick` times a random sample of groups and extrapolates
(every group costs one backward row), and shrinks the other samples, so the run takes minutes.
The compressed rows are checked against dense rows at the same positions.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rfreport.compress import PILOT_SPANS, learn_plan, sweep_groups
from rfreport.engine import Engine, Target
from rfreport.sweep import _Accumulator, dense_sweep, mask_bounds, one_hot_weights, resolve_batch_size


@dataclass(frozen=True)
class Case:
    """One benchmarked model at one input shape."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    layer: str | None = None
    quick: tuple[int, int, int] = (2, 16, 16)   # naive positions, dense positions, groups timed with --quick


def conv_stack(layers: int, channels: int = 8) -> nn.Module:
    """A fully convolutional stride-1 net of 3x3 convolutions and ReLUs."""
    mods, c = [], 3
    for _ in range(layers):
        mods += [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU()]
        c = channels
    return nn.Sequential(*mods, nn.Conv2d(channels, 1, 1))


class Block(nn.Module):
    """A ResNet basic block (two 3x3 convs, batch norm, identity or strided 1x1 shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet_style() -> nn.Module:
    """A small ResNet-style net: stem, two stages of basic blocks, total stride 4."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1))


class UNet(nn.Module):
    """A U-Net with three levels (two poolings), two 3x3 convs per stage and concatenated skips."""

    def __init__(self, width: int = 8):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                 nn.ReLU())

        self.enc1, self.enc2, self.bottom = stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, 2), stage(4 * width, 2 * width)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * width, width, 2, 2), stage(2 * width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        b = self.bottom(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        return self.head(self.dec1(torch.cat([self.up1(d2), e1], 1)))


def resnet18() -> nn.Module:
    """torchvision's resnet18 without weights."""
    import torchvision
    return torchvision.models.resnet18(weights=None)


CASES = (
    Case("fcn 5x conv3x3", lambda: conv_stack(5, 16), (1, 3, 128, 128)),
    Case("resnet-style", resnet_style, (1, 3, 128, 128)),
    Case("(a) fcn 3x conv3x3", lambda: conv_stack(3), (1, 3, 256, 256)),
    Case("(b) u-net 3 levels", UNet, (1, 3, 256, 256)),
    Case("(c) resnet18 layer4", resnet18, (1, 3, 1024, 1024), "layer4", quick=(1, 4, 4)),
)


def naive_seconds(engine: Engine, sample: np.ndarray) -> float:
    """Seconds per position of one fresh forward pass plus one one-hot backward pass per position."""
    working = engine._working_model()
    started = time.perf_counter()
    for pos in sample:
        engine._forward(working)
        mask_bounds(engine.support(one_hot_weights(pos[None, :], engine.output_spatial)).cpu().numpy())
    return (time.perf_counter() - started) / len(sample)


def dense_seconds(engine: Engine, sample: np.ndarray) -> tuple[float, dict]:
    """Seconds per position of the dense batched sweep on a sample, and its rows by position."""
    acc = _Accumulator(engine.input_spatial, set(), wrap="circular" in engine.padding_modes)
    started = time.perf_counter()
    dense_sweep(engine, sample, resolve_batch_size(engine, "auto"), acc)
    seconds = (time.perf_counter() - started) / len(sample)
    return seconds, {tuple(pos): row for pos, *row in zip(*[part.tolist() for part in acc.arrays()[:5]])}


def compressed_seconds(engine: Engine, grid: np.ndarray, groups_n: int,
                       rng: np.random.Generator) -> tuple[float, dict, int, int]:
    """Seconds per position of the compressed sweep: pilots plus every group (or a sample, extrapolated).

    Returns the seconds, the attributed rows by position, the number of groups and of failed groups.
    """
    batch = resolve_batch_size(engine, "auto")
    started = time.perf_counter()
    plan = next(filter(None, (learn_plan(engine, batch, wrap=False, span=span) for span in PILOT_SPANS)), None)
    pilots = time.perf_counter() - started
    groups = plan.groups(grid)
    sample = [groups[i] for i in sorted(rng.choice(len(groups), min(groups_n, len(groups)), replace=False))]
    started = time.perf_counter()
    rows, failed = sweep_groups(engine, plan, sample, batch, set(), None)
    per_group = (time.perf_counter() - started) / len(sample)
    attributed = {tuple(pos): row for members, bounds, _, _ in rows
                  for pos, *row in zip(members.tolist(), *[part.tolist() for part in bounds])}
    return (pilots + per_group * len(groups)) / len(grid), attributed, len(groups), len(failed)


def run_case(case: Case, naive_n: int, dense_n: int, groups_n: int, rng: np.random.Generator) -> dict:
    """Time the three ways on one model and check compressed rows against dense rows at the same positions."""
    model = case.build().eval()
    with Engine(model, case.input_shape, target=Target(layer=case.layer)) as engine:
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in engine.output_spatial], indexing="ij"), -1)
        grid = grid.reshape(-1, len(engine.output_spatial))
        compressed_s, attributed, groups, failed = compressed_seconds(engine, grid, groups_n, rng)
        members = np.array(sorted(attributed))
        dense_sample = members[rng.choice(len(members), min(dense_n, len(members)), replace=False)]
        dense_s, dense_rows = dense_seconds(engine, dense_sample)
        naive_s = naive_seconds(engine, grid[rng.choice(len(grid), min(naive_n, len(grid)), replace=False)])
    exact = all(attributed[pos] == row for pos, row in dense_rows.items())
    return {"model": case.name, "input": "x".join(map(str, case.input_shape[2:])), "positions": len(grid),
            "naive": 1 / naive_s, "dense": 1 / dense_s, "compressed": 1 / compressed_s, "groups": groups,
            "sampled": min(groups_n, groups), "failed": failed, "exact": exact, "checked": len(dense_rows)}


def print_table(rows: list[dict]) -> None:
    """Print the measurements as a Markdown table."""
    print("| model | input | positions | naive pos/s | dense pos/s | compressed pos/s | dense / naive "
          "| compressed / naive | groups (timed, failed) | rows equal to dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['positions']} | {r['naive']:.3g} | {r['dense']:.3g} "
              f"| {r['compressed']:.3g} | {r['dense'] / r['naive']:.1f}x | {r['compressed'] / r['naive']:.0f}x "
              f"| {r['groups']} ({r['sampled']}, {r['failed']}) | {'yes' if r['exact'] else 'NO'} "
              f"({r['checked']} checked) |", flush=True)


def main() -> None:
    """Run every case and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small naive and dense samples (a few minutes)")
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
    rows = []
    for case in CASES:
        if args.only and args.only not in case.name:
            continue
        rows.append(run_case(case, *(case.quick if args.quick else (32, 512, 1 << 30)), rng))
        print(rows[-1], flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
