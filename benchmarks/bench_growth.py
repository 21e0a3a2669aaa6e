"""Benchmark: work that grows — a 3-D U-Net with every position swept, a segmentation head on a sampled grid.

Whole processes (wall time, peak RSS), each against the seed's method in the same run (one float32
forward and one one-hot backward per position, timed on a sample of positions in one process and
extrapolated to every position the rfreport run sweeps), at an input size and at twice it, so the
output shows how the cost grows when the input doubles:

(a) a 3-D U-Net (two levels, 3x3x3 convolutions, max-pooling, nearest upsampling, skip
    concatenation; 8 channels) at SIZE^3 with `--positions all`;
(b) a 2-D segmentation head (rfreport.examples:unet, full-resolution output) at SIZE^2 on `grid:8`.

Peak memory is bounded by the batch sizing, whatever the number of positions: on a CPU a batch has at
most `engine.CPU_TENSOR_BYTES` (4 MiB) / (largest activation of one row) rows, within the estimate
against `engine.CPU_BATCH_BYTES`; a backward pass holds a few times its largest gradient per row on
top of the forward activations (3-D convolutions: their column buffers, about 8 MB a row for the
U-Net at 16^3; docs/benchmarks.md). On a GPU, the estimate against half the free memory.
`make bench-growth` runs the default sizes
(a: 32 and 64, b: 512 and 1024).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench_inspect import RFREPORT, SEED, measure

UNET3D = '''
import torch
from torch import nn


class UNet3d(nn.Module):
    """A two-level 3-D U-Net: conv, pool, conv, upsample, concatenate, conv (output at full resolution)."""

    def __init__(self, width=8):
        super().__init__()
        self.down = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.MaxPool3d(2), nn.Conv3d(width, width, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.out = nn.Conv3d(2 * width, 2, 3, padding=1)

    def forward(self, x):
        skip = self.down(x)
        return self.out(torch.cat([skip, self.up(self.mid(skip))], dim=1))


def unet3d(width=8):
    return UNet3d(width)
'''


def compare(factory: str, shape: str, positions: str, swept: int, sample: int, kwargs: str = "{}") -> str:
    """Time the seed's loop on a sample (extrapolated to `swept` positions) and rfreport inspect; one table row."""
    seed = measure([*SEED, factory, "--input-shape", shape, "--sample", str(sample), "--kwargs", kwargs])
    loop = json.loads(seed.stdout)
    estimate = seed.seconds + loop["sample_s"] / sample * (swept - 1 - sample)
    ours = measure([*RFREPORT, "inspect", factory, "--input-shape", shape, "--positions", positions, "--json",
                    "-q", "--no-cache", "--kwargs", kwargs])
    return (f"| {shape} {positions} | {swept} | {estimate:.0f} (extrapolated) | {ours.seconds:.1f} | "
            f"{estimate / ours.seconds:.3g}x | {ours.peak_mb:.0f} |")


def main() -> None:
    """Run both workloads at two sizes and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", type=int, nargs="+", default=[32, 64], help="3-D U-Net input sizes")
    parser.add_argument("--image", type=int, nargs="+", default=[512, 1024], help="segmentation head input sizes")
    parser.add_argument("--sample", type=int, default=8, help="seed positions timed per size")
    args = parser.parse_args()
    print(f"load {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs; seed = one forward + one-hot backward per position")
    header = ("| input, positions | swept | seed s | rfreport s | speed-up | rfreport peak RSS MB |\n"
              "|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "unet3d.py").write_text(UNET3D)
        factory = f"{Path(tmp) / 'unet3d.py'}:unet3d"
        print("\n(a) 3-D U-Net, every position\n" + header)
        for size in args.volume:
            print(compare(factory, f"1,1,{size},{size},{size}", "all", size ** 3, args.sample), flush=True)
    print("\n(b) segmentation head (rfreport.examples:unet), grid:8\n" + header)
    for size in args.image:
        swept = (len(range(0, size, 8)) + int((size - 1) % 8 != 0)) ** 2   # grid:8 keeps the last row and column
        print(compare("rfreport.examples:unet", f"1,3,{size},{size}", "grid:8", swept, args.sample), flush=True)


if __name__ == "__main__":
    main()
