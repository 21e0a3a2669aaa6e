"""rfreport's own thread choice against every fixed thread count, alone and beside busy torch neighbours.

A shared machine (a CI runner, a review box) runs other work beside an audit. This benchmark starts
that work itself: 0, 1 and 2 neighbour processes, each a torch 256x256 matmul loop at the same
priority with torch's default threads. In each condition it times one whole `rfreport inspect`
process with rfreport's default (threads chosen from the idle CPUs, passive OpenMP waits) and with
`OMP_NUM_THREADS` fixed to 1 .. the CPU count, and prints the default's time over the best fixed
setting's (goal: at most 1.3). Run it on an otherwise idle machine: `make bench-threads`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

NEIGHBOUR = ("import torch\n"
             "a = torch.randn(256, 256)\n"
             "while True:\n"
             "    a = torch.tanh(a @ a)\n")
COMMAND = ["inspect", "rfreport.examples:resnet_small", "--kwargs", '{"width":8,"blocks":2}', "--layer", "stages",
           "--input-shape", "1,3,64,64", "--positions", "all", "--no-cache", "-q", "--json"]
RFREPORT = str(Path(sys.executable).with_name("rfreport"))


def timed(env: dict[str, str]) -> float:
    """Return the wall time of one inspect process under `env`."""
    started = time.perf_counter()
    subprocess.run([RFREPORT, *COMMAND], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def settings(cpus: int) -> list[tuple[str, dict[str, str]]]:
    """Return the environments compared: rfreport's default, then every fixed thread count."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return [("rfreport default", base)] + [(f"OMP_NUM_THREADS={n}", base | {"OMP_NUM_THREADS": str(n)})
                                           for n in range(1, cpus + 1)]


def condition(neighbours: int, repeats: int) -> dict[str, float]:
    """Time every setting beside `neighbours` busy torch processes: the best of `repeats` rounds, each round
    running every setting once, so that a passing disturbance reaches every setting alike."""
    workers = [subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) for _ in range(neighbours)]
    try:
        time.sleep(5.0 if workers else 0.0)   # let the neighbours load torch and start spinning
        best: dict[str, float] = {}
        for _ in range(repeats):
            for name, env in settings(os.cpu_count() or 1):
                best[name] = min(best.get(name, float("inf")), timed(env))
        return best
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def main() -> None:
    """Print each condition's times and the default's ratio to the best fixed setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (the best is kept)")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}, CPUs: {os.cpu_count()}")
    print(f"command: rfreport {' '.join(COMMAND)}")
    for neighbours in (0, 1, 2):
        times = condition(neighbours, args.repeats)
        best = min(v for k, v in times.items() if k != "rfreport default")
        cells = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items())
        print(f"{neighbours} neighbour(s): {cells}; default / best = {times['rfreport default'] / best:.2f}")


if __name__ == "__main__":
    main()
