"""Benchmark: positions per second of rfreport's sweep against the seed's method (`make bench`).

One process, torch's default threads, public API only (`rfreport.compute.sweep.sweep` and the seed's
method in `seed_method.py`). For each model, every output position is swept once the way
rfreport does it (`sweep(..., "all")`, method `auto`: compressed where it pays, verified, dense
elsewhere) and compared with:

* **seed** — the baseline a user would otherwise run: float32, the model as given, one forward
  and one one-hot backward per position, the non-zero input gradient read as the RF. Timed on a
  random sample of positions after one warm-up position and extrapolated (every position costs
  the same pass);
* **per-position sweep** — rfreport's surrogate one position at a time (`sweep(model, shape,
  [pos])`, as `NumericRF.heatmap` calls it), on a smaller sample, extrapolated the same way;
* **dense** — rfreport's batched one-hot sweep on a sample: (time of the sample - time of one
  position) / (sample - 1), i.e. without the one-off surrogate build and forward pass.

The swept rows are checked against the dense rows at the sampled positions, and the seed's boxes
against the exact ones (the seed under-reports through max-pooling, dead ReLUs and float32
underflow). `--quick` shrinks the inputs and the samples so the whole run takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from seed_method import support as seed_support
from torch import nn

from rfreport.compute.sweep import sweep
from rfreport.results import SweepResult


@dataclass(frozen=True)
class Case:
    """One benchmarked model at its full and its quick input size."""

    name: str
    build: Callable[[], nn.Module]
    size: int
    quick_size: int
    layer: str | None = None


def conv_stack(layers: int, channels: int = 8, out: int | None = 1) -> nn.Module:
    """A fully convolutional stride-1 net of 3x3 convolutions and ReLUs (and a 1x1 head when `out` is given)."""
    mods, c = [], 3
    for _ in range(layers):
        mods += [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU()]
        c = channels
    return nn.Sequential(*mods, nn.Conv2d(channels, out, 1)) if out else nn.Sequential(*mods[:-1])


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
    Case("fcn 5x conv3x3", lambda: conv_stack(5, 16), 128, 64),
    Case("resnet-style (stride 4)", resnet_style, 128, 64),
    Case("(a) fcn 3x conv3x3, stride 1", lambda: conv_stack(3), 256, 128),
    Case("(b) U-Net, 3 levels", UNet, 256, 64),
    Case("(c) torchvision resnet18 to layer4", resnet18, 1024, 256, "layer4"),
    Case("(d) fcn 6x conv3x3, 16 channels", lambda: conv_stack(6, 16, out=None), 256, 128),
)
SAMPLES = {"full": (64, 8, 256), "quick": (8, 2, 32)}   # seed, per-position sweep, dense positions timed


def grid_of(result: SweepResult) -> np.ndarray:
    """Return every output position of a sweep's grid, (P, d)."""
    axes = np.meshgrid(*[np.arange(n) for n in result.output_spatial], indexing="ij")
    return np.stack(axes, -1).reshape(-1, len(axes))


def rows_of(result: SweepResult) -> dict[tuple[int, ...], tuple]:
    """Return each swept position's (lo, hi, support)."""
    return {tuple(p): (tuple(lo), tuple(hi), int(s)) for p, lo, hi, s in
            zip(result.positions.tolist(), result.lo.tolist(), result.hi.tolist(), result.support.tolist())}


def timed(function: Callable, *args, **kwargs) -> tuple[float, object]:
    """Return the wall seconds of one call and its result."""
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - started, value


def seed_rate(model: nn.Module, shape: tuple[int, ...], layer: str | None, sample: np.ndarray) -> tuple[float, dict]:
    """Return the seed's positions per second on a sample (after one warm-up pass) and its boxes."""
    model = copy.deepcopy(model).to("cuda" if torch.cuda.is_available() else "cpu")   # where `auto` sweeps
    seed_support(model, shape, None, layer)
    masks, started = {}, time.perf_counter()
    for pos in sample.tolist():
        masks[tuple(pos)], _, _ = seed_support(model, shape, pos, layer)
    seconds = time.perf_counter() - started
    return len(sample) / seconds, {pos: box(mask) for pos, mask in masks.items()}


def box(mask: torch.Tensor) -> tuple | None:
    """Return the (lo, hi) corners of a mask's bounding box, or None when it is empty."""
    found = mask.nonzero().cpu()
    if not len(found):
        return None
    return tuple(found.min(0).values.tolist()), tuple(found.max(0).values.tolist())


def run_case(case: Case, quick: bool, rng: np.random.Generator) -> dict:
    """Sweep every position of one model, time the baselines on samples and check the rows."""
    size = case.quick_size if quick else case.size
    shape = (1, 3, size, size)
    seed_n, single_n, dense_n = SAMPLES["quick" if quick else "full"]
    model = case.build().eval()
    swept_s, swept = timed(sweep, model, shape, "all", layer=case.layer)
    grid = grid_of(swept)
    pick = grid[rng.choice(len(grid), min(dense_n, len(grid)), replace=False)]
    one_s, _ = timed(sweep, model, shape, pick[:1].tolist(), layer=case.layer, method="dense")
    dense_s, dense = timed(sweep, model, shape, pick.tolist(), layer=case.layer, method="dense")
    single_s, _ = timed(lambda: [sweep(model, shape, [p], layer=case.layer) for p in pick[:single_n].tolist()])
    seed_pos_s, seed_boxes = seed_rate(model, shape, case.layer, pick[:seed_n])
    exact, dense_rows = rows_of(swept), rows_of(dense)
    return {"model": case.name, "input": f"{size}x{size}", "positions": len(grid), "seed": seed_pos_s,
            "single": min(single_n, len(pick)) / single_s,
            "dense": (len(pick) - 1) / max(dense_s - one_s, 1e-9) if len(pick) > 1 else 1 / dense_s,
            "swept": len(grid) / swept_s, "swept_s": swept_s,
            "compressed": float(np.mean(swept.path == "compressed")),
            "exact": all(exact[pos] == row for pos, row in dense_rows.items()), "checked": len(dense_rows),
            "seed_right": sum(seed_boxes[pos] == exact[pos][:2] for pos in seed_boxes), "seed_checked": len(seed_boxes)}


def print_table(rows: list[dict]) -> None:
    """Print the measurements as a Markdown table."""
    print("\n| model | input | positions | seed pos/s | per-position sweep pos/s | dense pos/s | rfreport pos/s "
          "(all positions, s) | rfreport / seed | per-position sweep / seed | compressed rows | rows equal to dense "
          "| seed boxes exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['positions']} | {r['seed']:.3g} | {r['single']:.3g} "
              f"| {r['dense']:.3g} | {r['swept']:.3g} ({r['swept_s']:.1f} s) | {r['swept'] / r['seed']:.1f}x "
              f"| {r['single'] / r['seed']:.2f}x | {r['compressed']:.0%} | {'yes' if r['exact'] else 'NO'} "
              f"({r['checked']} checked) | {r['seed_right']}/{r['seed_checked']} |", flush=True)


def main() -> None:
    """Run every case and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs and samples (minutes on a CPU)")
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    parser.add_argument("--size", type=int, default=None, help="override every case's input size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
    rows = []
    for case in CASES:
        if args.only and args.only not in case.name:
            continue
        if args.size:
            case = Case(case.name, case.build, args.size, args.size, case.layer)
        rows.append(run_case(case, args.quick, rng))
        print(rows[-1], flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
