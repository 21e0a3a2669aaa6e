"""Benchmark: whole-process wall time and peak memory of `rfreport inspect` against the seed's method.

Every number is a whole process started from the shell (interpreter start, imports, model build,
work, exit), with torch's default threads, as a user runs it (`--threads N` sets OMP_NUM_THREADS
for every process instead: on a machine shared with other work, torch's intra-op threads thrash
and a 1 ms pass can take 100 ms). Peak memory is the child's maximum
resident set size from `os.wait4`. Three comparisons:

(a/b) the seed's one-position run (`seed_method.py`: import torch and torchvision, build the model
      with random weights, one float32 forward and one one-hot backward at the centre of the
      layer's output) against `rfreport inspect MODEL --layer LAYER --input-shape ... --json`,
      which gives the exact RF, stride and padding; first `--no-cache`, then twice with a fresh
      cache folder (the second run is an incremental audit: a cache hit);
(d)   every model of a config (default configs/torchvision.toml; `--only config`): the seed's one-position run
      against `rfreport inspect` of the same model, layer, kwargs and first input shape, `--no-cache`;
(c)   every position of a stride-1 FCN (six 3x3 convolutions, 16 channels) at SIZE x SIZE:
      `rfreport inspect fcn.py:fcn --positions all --no-cache` against the seed's per-position
      loop. The loop is timed on a sample of positions inside one process and extrapolated to all
      positions (every position costs the same forward and backward):
      process time + (positions - sample) x loop time / sample.

`--quick` (what `make bench` runs) shrinks the FCN to 128 x 128 and the seed's sample; the
resnet50 comparison stays at 224 x 224.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RFREPORT = [str(Path(sys.executable).with_name("rfreport"))]   # the console script, as a user runs it
SEED = [sys.executable, str(HERE / "seed_method.py")]
FCN = '''
from torch import nn


def fcn(channels=16, layers=6):
    """A stride-1 FCN of 3x3 convolutions and ReLUs (padding 1: the output grid is the input grid)."""
    mods, c = [], 3
    for _ in range(layers):
        mods += [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU()]
        c = channels
    return nn.Sequential(*mods[:-1])
'''


@dataclass(frozen=True)
class Measured:
    """One whole process: wall seconds, peak resident memory and its standard output."""

    seconds: float
    peak_mb: float
    stdout: str


def measure(command: list[str]) -> Measured:
    """Run a command as a child process and return its wall time, peak RSS and stdout; raise if it fails."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode:
            raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{err.read()[-2000:]}")
        return Measured(seconds, usage.ru_maxrss / 1024, out.read())


def resnet_rows(model: str, layer: str, size: int, cache_dir: Path) -> list[tuple[str, Measured]]:
    """Time the seed's one-position run and rfreport inspect (no cache, cold cache, warm cache)."""
    shape = f"1,3,{size},{size}"
    factory = f"torchvision.models:{model}"
    inspect = [*RFREPORT, "inspect", factory, "--layer", layer, "--input-shape", shape, "--json", "-q"]
    return [("seed: one position", measure([*SEED, factory, "--layer", layer, "--input-shape", shape])),
            ("rfreport inspect --no-cache", measure([*inspect, "--no-cache"])),
            ("rfreport inspect, cache miss", measure([*inspect, "--cache-dir", str(cache_dir)])),
            ("rfreport inspect, cache hit", measure([*inspect, "--cache-dir", str(cache_dir)]))]


def config_rows(config: Path) -> list[tuple[str, Measured, Measured]]:
    """Time the seed's one-position run and `rfreport inspect --no-cache` of every model of a config (first shape)."""
    data = tomllib.loads(config.read_text())
    defaults = data.get("defaults", {})
    rows = []
    for entry in data.get("model", []):
        model = {**defaults, **entry}
        shapes = model["input_shape"]
        shape = ",".join(map(str, shapes[0] if isinstance(shapes[0], list) else shapes))
        options = ["--input-shape", shape, "--kwargs", json.dumps(model.get("kwargs", {}))]
        options += ["--layer", model["layer"]] if "layer" in model else []
        seed = measure([*SEED, model["factory"], *options])
        ours = measure([*RFREPORT, "inspect", model["factory"], *options, "--json", "-q", "--no-cache"])
        rows.append((f"{model['name']} {model.get('layer', '(output)')} at {shape}", seed, ours))
    return rows


def fcn_rows(folder: Path, size: int, sample: int) -> tuple[Measured, Measured, float]:
    """Time the seed's loop on a sample (extrapolated) and `inspect --positions all`; return both and the estimate."""
    (folder / "fcn.py").write_text(FCN)
    factory, shape = f"{folder / 'fcn.py'}:fcn", f"1,3,{size},{size}"
    seed = measure([*SEED, factory, "--input-shape", shape, "--sample", str(sample)])
    loop = json.loads(seed.stdout)
    estimate = seed.seconds + loop["sample_s"] / sample * (size * size - 1 - sample)
    ours = measure([*RFREPORT, "inspect", factory, "--input-shape", shape, "--positions", "all", "--json", "-q",
                    "--no-cache"])
    return seed, ours, estimate


def geometry(record: str) -> str:
    """Return `arch RF/stride/padding` of an inspect JSON record, e.g. `427/32/213` (per axis when they differ)."""
    found = json.loads(record)["geometry"]

    def axes(values) -> str:
        shown = [f"{v:g}" if isinstance(v, float) else str(v) for v in (values or ["?"])]
        return shown[0] if len(set(shown)) == 1 else "x".join(shown)

    return "/".join(axes(found[key]) for key in ("arch_rf_size", "stride", "padding"))


def main() -> None:
    """Run the comparisons and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="FCN at 128x128 and a smaller seed sample")
    parser.add_argument("--only", choices=("resnet", "fcn", "config"), help="run one comparison")
    parser.add_argument("--model", default="resnet50", help="torchvision model of comparison (a/b)")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--size", type=int, default=224, help="input size of comparison (a/b)")
    parser.add_argument("--config", type=Path, default=HERE.parent / "configs" / "torchvision.toml",
                        help="config of comparison (d)")
    parser.add_argument("--fcn-size", type=int, default=None, help="FCN input size (default 256, 128 with --quick)")
    parser.add_argument("--sample", type=int, default=None, help="seed positions timed (default 64, 16 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="set OMP_NUM_THREADS for every process (default: torch's own choice, as a user runs it)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)   # inherited by every child process
    import torch  # only for the versions line; every measurement is a separate process

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads by default), "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "resnet"):
            rows = resnet_rows(args.model, args.layer, args.size, Path(tmp) / "cache")
            seed = rows[0][1]
            print(f"\n(a/b) {args.model} {args.layer} at {args.size}x{args.size}, whole processes "
                  f"(exact RF/stride/padding: {geometry(rows[1][1].stdout)}; seed centre box "
                  f"{json.loads(seed.stdout)['center_box']})")
            print("| run | wall s | peak RSS MB | wall / seed | RSS / seed |\n|---|---|---|---|---|")
            for label, m in rows:
                print(f"| {label} | {m.seconds:.1f} | {m.peak_mb:.0f} | {m.seconds / seed.seconds:.2f}x "
                      f"| {m.peak_mb / seed.peak_mb:.2f}x |", flush=True)
        if args.only in (None, "config"):
            print(f"\n(d) every model of {args.config.name}, whole processes, `inspect --no-cache` against the seed's "
                  "one-position run")
            print("| model | seed s | inspect s | seed MB | inspect MB | wall / seed | RSS / seed |\n"
                  "|---|---|---|---|---|---|---|")
            for label, seed, ours in config_rows(args.config):
                print(f"| {label} | {seed.seconds:.1f} | {ours.seconds:.1f} | {seed.peak_mb:.0f} | {ours.peak_mb:.0f} "
                      f"| {ours.seconds / seed.seconds:.2f}x | {ours.peak_mb / seed.peak_mb:.2f}x |", flush=True)
        if args.only in (None, "fcn"):
            size = args.fcn_size or (128 if args.quick else 256)
            sample = args.sample or (16 if args.quick else 64)
            seed, ours, estimate = fcn_rows(Path(tmp), size, sample)
            print(f"\n(c) stride-1 FCN, six 3x3 convs, 16 channels, {size}x{size}: all {size * size} positions. "
                  f"The seed's loop is timed on {sample} positions after the first, in one process, and extrapolated.")
            print("| run | wall s | peak RSS MB |\n|---|---|---|")
            print(f"| seed: 1 + {sample} positions (measured) | {seed.seconds:.1f} | {seed.peak_mb:.0f} |")
            print(f"| seed: all {size * size} positions (extrapolated) | {estimate:.0f} | {seed.peak_mb:.0f} |")
            print(f"| rfreport inspect --positions all --no-cache | {ours.seconds:.1f} | {ours.peak_mb:.0f} |")
            print(f"speed-up over the seed's loop: {estimate / ours.seconds:.3g}x (goal: >= 250x at 256x256)")


if __name__ == "__main__":
    main()
