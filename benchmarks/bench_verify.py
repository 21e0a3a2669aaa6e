"""Benchmark: the share of a sweep spent on run-time verification (`make bench-verify`).

One process. Each case is swept as the pipeline's main sweep does (every output position, default
method) with the default verification (centre, corners and three random positions, as many trials
as the sweep's work affords, at most three: forward passes of a float64 eval copy, no autograd);
the table gives the sweep's time, the verification's time and its share of the whole, and the
largest relative change seen at a checked position (rounding noise; a violation needs more than
verify.RTOL).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from bench_sweep import UNet, conv_stack, resnet18  # run as a script: benchmarks/ is on sys.path

from rfreport.compute.sweep import sweep
from rfreport.compute.verify import RTOL

CASES = (
    ("fcn 5x conv3x3", lambda: conv_stack(5, 16), (1, 3, 32, 32), None),
    ("u-net 3 levels", UNet, (1, 3, 32, 32), None),
    ("resnet18 layer4", resnet18, (1, 3, 224, 224), "layer4"),
)


def main() -> None:
    """Sweep every case with verification on and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}", flush=True)
    print("| model | input | positions | sweep s | verification s | share | checked | trials | violations "
          "| max change |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, build, shape, layer in CASES:
        if args.only and args.only not in name:
            continue
        started = time.perf_counter()
        result = sweep(build(), shape, "all", layer=layer)
        total, done = time.perf_counter() - started, result.verification
        print(f"| {name} | {'x'.join(map(str, shape[2:]))} | {len(result.positions)} | {total - done.seconds:.2f} "
              f"| {done.seconds:.2f} | {done.seconds / total:.0%} | {done.checked} | {done.samples} "
              f"| {int(result.violations.sum())} "
              f"| {done.max_deviation:.2g} (limit {RTOL:g}) |", flush=True)


if __name__ == "__main__":
    main()
