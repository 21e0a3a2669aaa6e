"""Jobs in worker processes: the same run folder as in-process, faults that end a worker fail its job alone.

The models are built in the workers from a file written beside each config (`file.py:callable`
factories). A model that kills its own process only ever runs with `--workers 2`, never in the
test process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from rfreport.cli import cli
from rfreport.run import threads, workers

NETS = '''
import os
import signal

from torch import nn


def tiny(channels=2):
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 1, 3, stride=2))


class Forward(nn.Module):
    """A convolution whose forward on values (not the meta-device trace) does something bad."""

    def __init__(self, what):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)
        self.what = what

    def forward(self, x):
        if x.device.type != "meta":
            if self.what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.what == "deaf":   # as stuck in one call into C++: the time limit's signal never gets through
                signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
                while True:
                    pass
            while self.what == "loop":
                pass
        return self.conv(x)


def bad(what):
    return Forward(what)


def broken():
    raise RuntimeError("no model today")


def frozen(note):
    """tiny(), noting how many objects its process keeps out of the garbage collector's walks."""
    import gc

    with open(note, "a") as file:
        print(gc.get_freeze_count(), file=file)
    return tiny()
'''


def model(name: str, factory: str, shapes: str = "[1, 1, 12, 12]", extra: str = "") -> str:
    """Return a [[model]] table of a factory in nets.py."""
    return f'[[model]]\nname = "{name}"\nfactory = "nets.py:{factory}"\ninput_shape = {shapes}\n{extra}\n'


def write(folder: Path, *tables: str, run: str = "") -> Path:
    """Write nets.py and a config of the given tables into `folder`; return the config's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nets.py").write_text(NETS, encoding="utf-8")
    path = folder / "config.toml"
    path.write_text(run + "\n" + "\n".join(tables), encoding="utf-8")
    return path


MODELS = (
    model("tiny", "tiny", "[[1, 1, 12, 12], [1, 1, 9, 7]]", 'positions = "all"\nerf = { samples = 2 }'),
    model("se", "tiny", "[1, 1, 10, 10]", "kwargs = { channels = 3 }\n[model.audit]\nmax_rf = 3"),
    model("broken", "broken"),
    model("dilated", "tiny", "[1, 1, 16, 16]", 'positions = "grid:2"'),
)


def run(config: Path, out: Path, *flags: str):
    """Invoke `rfreport run` on one config."""
    return CliRunner().invoke(cli, ["run", str(config), "--out", str(out), "--no-cache", *flags])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """The same four-model config run in-process and in two workers: run folder and CLI result of each."""
    folder = tmp_path_factory.mktemp("runs")
    config = write(folder, *MODELS)
    outs = {count: folder / count / "run" for count in ("1", "2")}   # one name: the report's title
    return {count: (out, run(config, out, "--workers", count)) for count, out in outs.items()}


def model_files(out: Path) -> dict[str, bytes]:
    """Return every file of a run folder's models (frames, arrays) by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "models").rglob("*")) if p.is_file()}


def timeless(out: Path) -> tuple[dict, str]:
    """Return a run's summary.json without its timings and command, and its index.html without them."""
    summary = json.loads((out / "summary.json").read_text())
    for key in ("duration_s", "date", "argv"):
        summary["run"].pop(key)
    for entry in summary["models"]:
        entry.pop("seconds")
    page = (out / "index.html").read_text()
    page = re.sub(r'<time datetime="[^"]*">[^<]*</time>', "", page)
    page = re.sub(r'<span class="duration">[^<]*</span>', "", page)
    page = re.sub(r"<dt>command</dt><dd><code>[^<]*</code></dd>", "", page)
    return summary, page


def test_workers_write_the_same_run_folder_as_in_process(runs):
    (serial, one), (parallel, two) = runs["1"], runs["2"]
    assert one.exit_code == two.exit_code == 1, two.output   # the broken model fails in both
    assert model_files(parallel) == model_files(serial)
    assert len(model_files(serial)) > 15
    assert timeless(parallel) == timeless(serial)


def test_workers_print_the_same_summary_table_and_verdicts(runs):
    (serial, one), (parallel, two) = runs["1"], runs["2"]
    table = one.stderr[re.search(r"^model +input", one.stderr, flags=re.M).start():]
    assert two.stderr.endswith(table.replace(str(serial), str(parallel)))
    assert two.stdout == one.stdout.replace(str(serial), str(parallel))


def test_each_job_says_when_it_starts_and_ends_under_its_own_number(runs):
    _, two = runs["2"]
    slugs = ["tiny-12x12", "tiny-9x7", "se-10x10", "broken-12x12", "dilated-16x16"]
    for number, slug in enumerate(slugs, 1):
        assert f"[{number}/5] {slug}: running\n" in two.stderr
    ends = re.findall(r"^\[(\d)/5\] (\S+): (ok|FAILED)", two.stderr, flags=re.M)
    assert sorted(ends) == sorted((str(n), s, "FAILED" if s.startswith("broken") else "ok")
                                  for n, s in enumerate(slugs, 1))
    assert re.search(r"^\[4/5\] broken-12x12: FAILED: model 'broken': .* no model today \(", two.stderr, flags=re.M)


def test_the_workers_log_reaches_the_run_log(runs):
    folder, _ = runs["2"]
    log = (folder / "log.txt").read_text()
    for slug in ("tiny-12x12", "tiny-9x7", "se-10x10", "broken-12x12", "dilated-16x16"):
        assert f"DEBUG {slug}: started" in log
    assert "Traceback" in log and 'raise RuntimeError("no model today")' in log   # the failed job's, for the user


def test_a_job_that_kills_its_worker_fails_alone(tmp_path):
    config = write(tmp_path, model("first", "tiny"), model("killer", "bad", extra='kwargs = { what = "kill" }'),
                   model("last", "tiny", "[1, 1, 9, 9]"), model("after", "tiny", "[1, 1, 8, 8]"))
    result = run(config, tmp_path / "out", "--workers", "2")
    assert result.exit_code == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    verdicts = {e["slug"]: (e["status"], e["error"]) for e in summary["models"]}
    assert verdicts == {"first-12x12": ("ok", None), "last-9x9": ("ok", None), "after-8x8": ("ok", None),
                        "killer-12x12": ("failed", "model 'killer': its worker process was killed by SIGKILL "
                                                   "(out of memory?)")}
    assert "[2/4] killer-12x12: FAILED: model 'killer': its worker process was killed by SIGKILL" in result.stderr
    assert "Traceback" not in result.output


def test_a_job_timeout_fires_inside_a_worker(tmp_path):
    config = write(tmp_path, model("loop", "bad", extra='kwargs = { what = "loop" }\njob_timeout = 1'),
                   model("tiny", "tiny"))
    result = run(config, tmp_path / "out", "--workers", "2")
    assert result.exit_code == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    [looping, tiny] = summary["models"]
    assert re.fullmatch(r"model 'loop': timed out after 1 s in the [a-z ]+", looping["error"])
    assert tiny["status"] == "ok"


def test_a_worker_stuck_past_its_jobs_limit_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "GRACE_S", 0.5)
    config = write(tmp_path, model("deaf", "bad", extra='kwargs = { what = "deaf" }\njob_timeout = 1'),
                   model("tiny", "tiny"), model("next", "tiny", "[1, 1, 8, 8]"))
    result = run(config, tmp_path / "out", "--workers", "2")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(e["status"], e["error"]) for e in summary["models"]] == [
        ("failed", "model 'deaf': timed out after 1 s; its worker process did not stop, and was killed"),
        ("ok", None), ("ok", None)]
    assert result.exit_code == 1


def test_workers_share_the_cache_and_store_an_entry_once(tmp_path, cache_dir):
    twins = (model("a", "tiny"), model("b", "tiny"), model("c", "tiny", "[1, 1, 8, 8]"))   # a and b: the same key
    config = write(tmp_path, *twins)
    first = CliRunner().invoke(cli, ["run", str(config), "--out", str(tmp_path / "first"), "--workers", "2"])
    second = CliRunner().invoke(cli, ["run", str(config), "--out", str(tmp_path / "second"), "--workers", "2"])
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    assert len([p for p in cache_dir.rglob("result.json")]) == 2
    assert [e["cached"] for e in json.loads((tmp_path / "second" / "summary.json").read_text())["models"]] == [
        True, True, True]
    assert model_files(tmp_path / "second") == model_files(tmp_path / "first")


def test_check_runs_its_jobs_in_workers(tmp_path):
    config = write(tmp_path, MODELS[1], model("ok", "tiny", extra="[model.audit]\nmax_rf = 99"))
    result = CliRunner().invoke(cli, ["check", str(config), "--no-cache", "--workers", "2", "--json"])
    assert result.exit_code == 1
    verdicts = json.loads(result.stdout)
    assert [m["passed"] for m in verdicts["models"]] == [False, True]
    assert "[2/2] ok-12x12: running" in result.stderr


def default_interrupt() -> None:
    """Give a child SIGINT's default disposition: a suite started in the background (`nohup make test &`)
    ignores SIGINT, and a child that inherits that ignores Ctrl-C, as a shell's background job does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted_run(tmp_path: Path, marker: str) -> tuple[int, str]:
    """Start `rfreport run` on two endless models in two workers, press Ctrl-C once both run; return its exit and
    stderr."""
    loop = 'kwargs = { what = "loop" }'
    config = write(tmp_path, model("loop1", "bad", extra=loop), model("loop2", "bad", "[1, 1, 9, 9]", extra=loop))
    command = [str(Path(sys.executable).parent / "rfreport"), "run", str(config), "--out", str(tmp_path / "out"),
               "--no-cache", "--workers", "2"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | {"RFREPORT_MARK": marker},
                               preexec_fn=default_interrupt)
    lines = []
    while sum("running" in line for line in lines) < 2:
        lines.append(process.stderr.readline())
        assert lines[-1], "".join(lines)
    process.send_signal(signal.SIGINT)
    return process.wait(60), "".join(lines) + process.stderr.read()


def marked_processes(marker: str) -> list[int]:
    """Return the processes whose environment holds the marker."""
    found = []
    for folder in Path("/proc").iterdir():
        try:
            if folder.name.isdigit() and f"RFREPORT_MARK={marker}".encode() in (folder / "environ").read_bytes():
                found.append(int(folder.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads processes' environments in /proc")
def test_ctrl_c_stops_the_workers_and_leaves_no_process(tmp_path):
    marker = uuid.uuid4().hex
    code, stderr = interrupted_run(tmp_path, marker)
    assert code == 130, stderr
    assert "interrupted; nothing was written" in stderr and "Traceback" not in stderr
    deadline = time.monotonic() + 10
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marked_processes(marker) == []
    assert not (tmp_path / "out").exists()


def test_a_worker_keeps_what_the_fork_server_loaded_out_of_the_collectors_walks(tmp_path):
    import gc

    before = gc.get_freeze_count()
    note = tmp_path / "frozen.txt"
    built = f'kwargs = {{ note = "{note}" }}'
    config = write(tmp_path, model("frozen", "frozen", extra=built), model("again", "frozen", "[1, 1, 8, 8]", built))
    assert run(config, tmp_path / "out", "--workers", "2").exit_code == 0
    counts = list(map(int, note.read_text().split()))
    assert len(counts) == 2 and min(counts) > 10_000     # torch's and the pipeline's modules, at least
    assert gc.get_freeze_count() == before                     # the command ran in this process: nothing frozen


@pytest.mark.parametrize(("requested", "jobs", "free", "expected"), [
    ("auto", 16, 2, workers.Share(2, 1)),
    ("auto", 16, 1, workers.Share(1, 1)),
    ("auto", 3, 8, workers.Share(3, 2)),
    ("auto", 1, 8, workers.Share(1, 8)),
    (4, 16, 2, workers.Share(4, 1)),
    (2, 16, 8, workers.Share(2, 4)),
    (5, 2, 8, workers.Share(2, 4)),
])
def test_workers_are_the_idle_cpus_at_most_one_per_job_and_share_them(requested, jobs, free, expected, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(workers, "choose_threads", lambda: threads.ThreadChoice(free, 8, float(free)))
    assert workers.share(requested, jobs) == expected


def test_an_explicit_thread_count_is_every_workers(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(workers, "choose_threads", lambda: threads.ThreadChoice(4, 4, 4.0))
    assert workers.share("auto", 16) == workers.Share(4, None)


@pytest.mark.parametrize(("flag", "message"), [("0", "'0' must be a positive integer or auto"),
                                               ("two", "'two' must be a positive integer or auto")])
def test_a_bad_workers_flag_is_a_usage_error(tmp_path, flag, message):
    result = run(write(tmp_path, MODELS[1]), tmp_path / "out", "--workers", flag)
    assert result.exit_code == 2
    assert f"Invalid value for --workers: {message}" in result.stderr


@pytest.mark.parametrize(("value", "message"), [("0", "must be a positive integer, not 0"),
                                                ('"many"', "must be one of auto, not 'many'"),
                                                ("1.5", "must be a positive integer, not float 1.5")])
def test_a_bad_workers_key_names_the_file_and_key(tmp_path, value, message):
    config = write(tmp_path, MODELS[1], run=f"[run]\nworkers = {value}\n")
    result = run(config, tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"Error: {config}: [run]: key 'workers': {message}"]


def test_jobs_are_handed_out_largest_input_first_config_order_among_equals():
    """The longest-processing-time rule on the input's size; the results still come back in job order."""
    shapes = [(1, 1, 12, 12), (1, 1, 9, 7), (1, 3, 32, 32), (1, 1, 12, 12), (2, 1, 16, 16)]
    jobs = [SimpleNamespace(input_shape=shape) for shape in shapes]
    assert workers.largest_first(jobs) == [2, 4, 0, 3, 1]
