"""The Ray executor on a local 2-CPU Ray instance: the same run folder as in-process, failures isolated.

The tiny models below are built on the workers from this file's path (`file.py:callable`
factories), so the workers need neither this folder on their path nor an uploaded working dir.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from torch import nn

from rfreport import cli, config, runfolder
from rfreport.run import jobs as jobs_mod
from rfreport.run import pipeline
from rfreport.run.executors import LocalExecutor, Silent

ray = pytest.importorskip("ray")
from rfreport.run.ray_executor import CHUNK_POSITIONS, RayExecutor, task_resources  # noqa: E402 (only once Ray is known to import)

pytestmark = pytest.mark.ray
HERE = Path(__file__).resolve()
CHUNK = 30   # tiny-10x10 (64 positions) and tiny-9x7 (35) are swept in chunks, the others whole
PER_RUN = {"seconds", "cached", "spec"}  # what two runs of the same jobs may differ in (spec: the attempts folder)


def tiny(stride: int = 1, dilation: int = 1) -> nn.Module:
    """Two small convolutions: 'same' padding first, then a valid (optionally dilated) 3x3."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, stride=stride, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, dilation=dilation))


def exploding(attempts: str) -> nn.Module:
    """A factory that raises in every process, leaving one file per attempt in the `attempts` folder."""
    (Path(attempts) / f"{os.getpid()}-{time.monotonic_ns()}").touch()
    raise ValueError("boom")


def crashing() -> nn.Module:
    """A factory that kills its process, as an OOM kill or a lost node would."""
    os._exit(3)


def flaky(marker: str) -> nn.Module:
    """A factory that kills its process the first time only (it leaves a marker file behind)."""
    if not Path(marker).exists():
        Path(marker).touch()
        os._exit(3)
    return tiny()


BUILD_S, FORWARD_S = 0.5, 0.02   # the slow model's building and each of its forward passes on values


class Slow(nn.Module):
    """A convolution whose every forward pass on values takes FORWARD_S (the shape-only passes on meta are free)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        if x.device.type != "meta":
            time.sleep(FORWARD_S)
        return self.conv(x)


def slow() -> nn.Module:
    """A factory that takes BUILD_S to build a Slow model."""
    time.sleep(BUILD_S)
    return Slow()


def looping() -> nn.Module:
    """A factory that never returns."""
    while True:
        pass


def model_table(name: str, factory: str, shapes: list, **extra: str) -> str:
    """Return one [[model]] table of a test config."""
    lines = [f'name = "{name}"', f'factory = "{factory}"', f"input_shape = {shapes}",
             *(f"{key} = {value}" for key, value in extra.items())]
    return "[[model]]\n" + "\n".join(lines) + "\n"


def write_config(folder: Path, *tables: str, run: str = "") -> Path:
    """Write a config of model tables (and an optional [run] table) and return its path."""
    path = folder / "config.toml"
    path.write_text(run + "\n" + "\n".join(tables), encoding="utf-8")
    return path


MODELS = (
    model_table("tiny", f"{HERE}:tiny", [[1, 1, 10, 10], [1, 1, 9, 7]], erf="{samples = 2}"),
    model_table("strided", f"{HERE}:tiny", [1, 1, 12, 12], kwargs="{stride = 2, dilation = 2}"),
    model_table("se", "rfreport.examples:se_net", [1, 3, 8, 8], kwargs="{width = 4, depth = 2}"),
)
RETRIES = 1


class Recorder:
    """A Progress that records what it is told."""

    def __init__(self):
        self.events: list[tuple] = []

    def start(self, job, index: int, count: int) -> None:
        """Record the start of a job."""
        self.events.append(("start", job.slug, index, count))

    def advance(self, done: int, total: int) -> None:
        """Record progress within a job."""
        self.events.append(("advance", done, total))

    def finish(self, result=None) -> None:
        """Record the end of a job."""
        self.events.append(("finish", result.slug, result.status))


class Interrupt(Silent):
    """A Progress that interrupts the run (like Ctrl-C in the driver) once the first job is done."""

    def finish(self, result=None) -> None:
        """Raise KeyboardInterrupt."""
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def cluster():
    """Start one local Ray instance with 2 CPUs for the whole module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_run(path: Path, jobs: list[jobs_mod.Job], executor) -> runfolder.Run:
    """Run jobs through an executor and save their entries, frames and arrays (no report, to stay fast)."""
    return runfolder.write(path, {"executor": type(executor).__name__}, list(pipeline.outputs(jobs, executor)))


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> tuple[runfolder.Run, runfolder.Run, Recorder]:
    """Run the test config in-process and on Ray (chunking the two larger jobs), with the driver's log."""
    folder = tmp_path_factory.mktemp("runs")
    attempts = {where: folder / f"{where}-attempts" for where in ("local", "ray")}
    for path in attempts.values():
        path.mkdir()
    broken = model_table("broken", f"{HERE}:exploding", [1, 1, 8, 8], kwargs=f'{{attempts = "{attempts["local"]}"}}')
    jobs = jobs_mod.make_jobs(config.load([write_config(folder, *MODELS, broken)]))
    local = write_run(folder / "local", jobs, LocalExecutor())
    recorder = Recorder()
    jobs[-1] = replace(jobs[-1], spec=replace(jobs[-1].spec, kwargs={"attempts": str(attempts["ray"])}))
    executor = RayExecutor(chunk_positions=CHUNK, max_retries=RETRIES, progress=recorder)
    with pipeline.log_to(folder / "ray.log"):
        on_ray = write_run(folder / "ray", jobs, executor)
    return local, on_ray, recorder


def files(run: runfolder.Run) -> list[str]:
    """Return the relative paths of a run folder's model files."""
    return sorted(str(p.relative_to(run.path)) for p in (run.path / "models").rglob("*") if p.is_file())


def assert_arrays_equal(a, b) -> None:
    """Assert two stored arrays (or dicts of arrays, like masks) are equal element for element."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    else:
        np.testing.assert_array_equal(a, b)


def test_same_model_files(runs):
    local, on_ray, _ = runs
    assert files(on_ray) == files(local)
    assert len(files(local)) > 20


def test_frames_and_arrays_identical_row_for_row(runs):
    local, on_ray, _ = runs
    for model in local.models:
        other = on_ray.model(model.slug)
        assert model.frames.keys() == other.frames.keys()
        for name, frame in model.frames.items():
            pd.testing.assert_frame_equal(other.frames[name], frame, check_exact=True)
        assert model.arrays.keys() == other.arrays.keys()
        for name, values in model.arrays.items():
            assert_arrays_equal(other.arrays[name], values)
    assert "erf" in local.model("tiny-10x10").frames and "masks" in local.model("tiny-10x10").arrays


def test_csv_files_identical_byte_for_byte(runs):
    local, on_ray, _ = runs
    for rel in files(local):
        if rel.endswith(".csv"):
            assert (on_ray.path / rel).read_bytes() == (local.path / rel).read_bytes(), rel


def test_summary_entries_equal_except_timings(runs):
    local, on_ray, _ = runs
    strip = lambda entry: {k: v for k, v in entry.items() if k not in PER_RUN}  # noqa: E731
    assert [strip(m.entry) for m in on_ray.models] == [strip(m.entry) for m in local.models]
    assert [m.entry["spec"] for m in on_ray.models if m.ok] == [m.entry["spec"] for m in local.models if m.ok]
    assert local.model("se-8x8").entry["global"] and local.model("tiny-10x10").entry["arch_rf_size"] == [5, 5]


def test_failing_model_is_isolated(runs):
    local, on_ray, _ = runs
    broken = on_ray.model("broken-8x8")
    assert broken.status == "failed"
    assert broken.entry["error"] == local.model("broken-8x8").entry["error"]
    assert "ValueError: boom" in broken.entry["error"] and "\n" not in broken.entry["error"]
    assert len(list((on_ray.path.parent / "ray-attempts").iterdir())) == 1 + RETRIES
    assert [m.slug for m in on_ray.models if m.ok] == ["tiny-10x10", "tiny-9x7", "strided-12x12", "se-8x8"]


def test_large_sweeps_are_chunked_and_equal_unchunked(runs):
    local, on_ray, _ = runs
    log = (on_ray.path.parent / "ray.log").read_text(encoding="utf-8")
    assert "tiny-10x10: 64 positions in 3 chunks" in log
    assert "tiny-9x7: 35 positions in 2 chunks" in log
    chunked = sorted(line.split()[-6].rstrip(":") for line in log.splitlines() if line.endswith(" chunks"))
    assert chunked == ["tiny-10x10", "tiny-9x7"]
    for slug in ("tiny-10x10", "tiny-9x7"):
        pd.testing.assert_frame_equal(on_ray.model(slug).frames["positions"], local.model(slug).frames["positions"],
                                      check_exact=True)
        assert_arrays_equal(on_ray.model(slug).arrays["masks"], local.model(slug).arrays["masks"])


def test_progress_counts_jobs_done_of_total(runs):
    _, on_ray, recorder = runs
    starts = [e for e in recorder.events if e[0] == "start"]
    finishes = [e for e in recorder.events if e[0] == "finish"]
    assert [e[2] for e in starts] == list(range(5)) and {e[3] for e in starts} == {5}
    assert sorted(e[1] for e in finishes) == sorted(m.slug for m in on_ray.models)
    assert [e[1] for e in starts] == [e[1] for e in finishes]


def test_lost_worker_is_retried_then_recorded_as_failed(cluster, tmp_path):
    marker = tmp_path / "first-attempt"
    path = write_config(tmp_path, model_table("crash", f"{HERE}:crashing", [1, 1, 8, 8]),
                        model_table("flaky", f"{HERE}:flaky", [1, 1, 8, 8], kwargs=f'{{marker = "{marker}"}}'))
    crash, recovered = RayExecutor(max_retries=1).map(jobs_mod.make_jobs(config.load([path])))
    assert crash.status == "failed" and crash.error.startswith("WorkerCrashedError: ") and "\n" not in crash.error
    assert recovered.status == "ok" and marker.exists()
    assert recovered.summary.to_json()["arch_rf_size"] == [5, 5]


def test_config_run_table_selects_ray(cluster, tmp_path):
    path = write_config(tmp_path, MODELS[1], run='[run]\nexecutor = "ray"\n')
    result = CliRunner().invoke(cli.cli, ["run", str(path), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / runfolder.SUMMARY).read_text(encoding="utf-8"))
    assert summary["run"]["executor"] == "ray" and summary["models"][0]["status"] == "ok"


def test_interrupted_driver_leaves_previous_run_untouched(cluster, tmp_path):
    out = tmp_path / "out"
    runfolder.write(out, {"seed": "previous"}, [], log="old run")
    loaded = config.load([write_config(tmp_path, *MODELS[:3])])
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(loaded, out, RayExecutor(progress=Interrupt()))
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "summary.json"]
    assert runfolder.load(out).meta == {"seed": "previous"} and (out / "log.txt").read_text() == "old run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "out"]


@pytest.mark.parametrize("chunk_positions", [CHUNK_POSITIONS, 20], ids=["whole", "chunked"])
def test_ray_seconds_cover_the_same_stages_as_in_process(cluster, chunk_positions):
    spec = config.ModelSpec(name="slow", factory=f"{HERE}:slow", input_shapes=((1, 1, 8, 8),), positions="all")
    job = jobs_mod.Job(spec, (1, 1, 8, 8), config.RunOptions(cache=False))
    [local] = LocalExecutor().map([job])
    [on_ray] = RayExecutor(chunk_positions=chunk_positions).map([job])
    # building and a sweep of 36 positions
    assert local.status == on_ray.status == "ok" and local.seconds > BUILD_S + 0.1
    # the model building and the main sweep count on Ray too (the tasks build the model more than once)
    assert on_ray.seconds >= local.seconds - 0.2, (on_ray.seconds, local.seconds)


def test_the_time_limit_holds_on_ray(cluster):
    spec = config.ModelSpec(name="loop", factory=f"{HERE}:looping", input_shapes=((1, 1, 8, 8),))
    job = jobs_mod.Job(spec, (1, 1, 8, 8), config.RunOptions(cache=False, job_timeout=1))
    [result] = RayExecutor(max_retries=0).map([job])
    assert result.error == "model 'loop': timed out after 1 s in the model building"


def test_jobs_ask_for_a_gpu_when_the_cluster_has_gpus(cluster, monkeypatch):
    assert task_resources() == {"num_cpus": 1}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert task_resources() == {"num_gpus": 1}


def test_without_ray_the_cli_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` now raises ImportError
    monkeypatch.delitem(sys.modules, "rfreport.run.ray_executor")
    path = write_config(tmp_path, MODELS[2])   # a factory in rfreport: importing this file needs Ray
    result = CliRunner().invoke(cli.cli, ["run", str(path), "--out", str(tmp_path / "out"), "--executor", "ray"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'rfreport[ray]'" in lines[0]
    assert not (tmp_path / "out").exists()
