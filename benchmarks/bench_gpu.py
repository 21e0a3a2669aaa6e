"""The GPU check in one call (`make bench-gpu`): CUDA tests, CUDA == CPU answers, benchmarks on the device.

Meant for a machine with a CUDA device, in under 5 minutes:
1. the suite's CUDA tests (`pytest -m cuda`-style selection by name: every test with `cuda` in its id);
2. the shipped configs (configs/examples.toml, configs/torchvision.toml) run once with `--device cpu`
   and once with `--device cuda`, no cache: every frame file (CSV) must be byte-identical and
   `rfreport diff` must find no change;
3. `benchmarks/bench_inspect.py --quick` (the seed's method also runs on the device);
4. `benchmarks/bench_sweep.py --quick`.
Each step prints its wall time; the script exits non-zero on the first failure.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RFREPORT = str(Path(PY).with_name("rfreport"))
CONFIGS = ["configs/examples.toml", "configs/torchvision.toml"]


def step(title: str, command: list[str]) -> None:
    """Run one step from the repository root; stop the script when it fails."""
    print(f"\n== {title}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, cwd=ROOT).returncode
    print(f"== {title}: exit {code}, {time.perf_counter() - started:.1f} s", flush=True)
    if code:
        raise SystemExit(code)


def frames_differ(cpu: Path, cuda: Path) -> list[str]:
    """Return the frame files (CSV) of two run folders that are missing or differ byte for byte."""
    names = sorted({p.relative_to(folder) for folder in (cpu, cuda) for p in folder.rglob("*.csv")})
    return [str(name) for name in names
            if not (cpu / name).exists() or not (cuda / name).exists()
            or (cpu / name).read_bytes() != (cuda / name).read_bytes()]


def main() -> None:
    """Run every step in order."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench-gpu: no CUDA device is visible to torch")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    step("CUDA tests", [PY, "-m", "pytest", "-q", "-k", "cuda", "tests"])
    with tempfile.TemporaryDirectory() as tmp:
        cpu, cuda = Path(tmp) / "cpu", Path(tmp) / "cuda"
        step("shipped configs on the CPU", [RFREPORT, "run", *CONFIGS, "--out", str(cpu), "--device", "cpu",
                                            "--no-cache", "-q"])
        step("shipped configs on CUDA", [RFREPORT, "run", *CONFIGS, "--out", str(cuda), "--device", "cuda",
                                         "--no-cache", "-q"])
        differ = frames_differ(cpu, cuda)
        print(f"frames differing between CPU and CUDA: {differ or 'none'}", flush=True)
        if differ:
            raise SystemExit(1)
        step("CUDA == CPU summaries", [RFREPORT, "diff", str(cpu), str(cuda), "--fail-on-change", "-q"])
    step("inspect benchmark on the device", [PY, "benchmarks/bench_inspect.py", "--quick"])
    step("sweep benchmark on the device", [PY, "benchmarks/bench_sweep.py", "--quick"])


if __name__ == "__main__":
    main()
