"""Faults, concurrency and hostile files: every step of the run folder's swap failing or killed, two writers at
once, a full disk, a write cut by `ulimit -f`, and run folders tampered with before they are read back.

Faults are injected (os.replace, shutil.rmtree, writers that raise ENOSPC or EFBIG, os._exit at a chosen call),
never timed with sleeps. Run folders here hold failed entries only (no sweep), or a copy of the golden run.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rfreport import atomic, runfolder
from rfreport.errors import OutputError, RunFolderError
from rfreport.run import pipeline
from rfreport.slugs import SLUG_CHARS, slugify
from tests.support import GOLD_RUN, NETS, invoke

ROOT = Path(__file__).parents[1]


def output(name: str = "net") -> runfolder.ModelOutput:
    """Return a failed model's output: an entry with no frames, enough for a complete run folder."""
    entry = {"name": name, "slug": slugify(name, (1, 1, 8, 8)), "input_shape": [1, 1, 8, 8], "status": "failed",
             "output_shape": None, "error": "RuntimeError: boom"}
    return runfolder.ModelOutput(entry, {}, {})


def write(path: Path, seed: int) -> runfolder.Run:
    """Write a run folder whose `run` metadata records `seed`."""
    return runfolder.write(path, {"seed": seed}, [output()])


def seed(path: Path) -> int:
    """Return the seed recorded by the run folder at `path`."""
    return runfolder.load(path).meta["seed"]


def siblings(path: Path) -> list[str]:
    """Return the names beside a run folder (staging folders and lock files show up here)."""
    return sorted(p.name for p in path.parent.iterdir())


def failing_at(calls: set[int], real=os.replace):
    """Return an os.replace that raises ENOSPC at the chosen calls (1-based) and renames otherwise."""
    count = {"n": 0}

    def replace(src, dst):
        count["n"] += 1
        if count["n"] in calls:
            raise OSError(errno.EIO, "Input/output error", str(src))
        real(src, dst)
    return replace


# --- the swap: each rename failing, by injection ---------------------------------------------------------------------

@pytest.mark.parametrize("calls", [{1}, {2}])
def test_a_failed_rename_of_the_swap_keeps_the_previous_run(tmp_path, monkeypatch, calls):
    path = tmp_path / "run"
    write(path, 1)
    monkeypatch.setattr(os, "replace", failing_at(calls))
    with pytest.raises(OutputError, match=r"cannot write the run \(Input/output error at .*\); the previous run is "
                                          r"unchanged$"):
        write(path, 2)
    monkeypatch.undo()
    assert seed(path) == 1 and siblings(path) == ["run"]


def test_a_swap_whose_restore_fails_keeps_the_previous_run_aside_and_the_next_run_restores_it(tmp_path, monkeypatch):
    path = tmp_path / "run"
    write(path, 1)
    monkeypatch.setattr(os, "replace", failing_at({2, 3}))   # the new run cannot move in, the old one not back
    with pytest.raises(OutputError, match=r"the previous run is kept in .*\.run\.tmp-\w+/\.old and the next run "
                                          r"into .* restores it$"):
        write(path, 2)
    monkeypatch.undo()
    assert not path.exists()
    with pytest.raises(RunFolderError, match=r"no run folder there \(a run was killed while replacing it: the "
                                             r"previous run is in .*/\.old; the next run into it restores it\)$"):
        runfolder.load(path)
    done = invoke("check", path)   # not taken for a config file that cannot be read
    assert done.exit_code == 2 and "a run was killed while replacing it" in done.output
    path.mkdir()   # someone made an empty folder there meanwhile: the restore takes its place
    monkeypatch.setattr(runfolder, "write_summary", lambda *_a: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):    # the next run restores the previous one first, then fails itself
        write(path, 3)
    assert seed(path) == 1 and siblings(path) == ["run"]


def test_a_crash_while_removing_the_staging_folder_keeps_the_new_run_and_the_next_run_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "run"
    write(path, 1)
    monkeypatch.setattr(shutil, "rmtree", lambda *_a, **_k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write(path, 2)
    monkeypatch.undo()
    assert seed(path) == 2 and any(name.startswith(".run.tmp-") for name in siblings(path))
    (next(tmp_path.glob(".run.tmp-*")) / runfolder.OWNER).write_text(f"{socket.gethostname()} 999999999")  # gone
    write(path, 3)
    assert seed(path) == 3 and siblings(path) == ["run"]


def test_ctrl_c_while_the_run_is_swapped_in_finishes_the_swap_and_says_the_run_was_written(tmp_path, monkeypatch):
    path, swap = tmp_path / "run", runfolder._swap
    write(path, 1)

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C arrives between the render and the swap
        swap(*args)

    monkeypatch.setattr(runfolder, "_swap", interrupted)
    with pytest.raises(KeyboardInterrupt, match=f"^the run was written to {path}$"):
        write(path, 2)
    assert seed(path) == 2 and siblings(path) == ["run"]


TERMINATED_RUN = """
import os, signal, sys
from rfreport import cli, runfolder
real = runfolder.write_summary

def terminated(*args):
    os.kill(os.getpid(), signal.SIGTERM)   # a cancelled CI job, while the run is being written
    real(*args)

runfolder.write_summary = terminated
sys.argv = ["rfreport", "run", sys.argv[1], "--out", sys.argv[2], "--workers", "1", "--no-cache", "-q"]
cli.main()
"""


def test_sigterm_stops_a_run_as_ctrl_c_does_and_leaves_the_previous_run(tmp_path):
    config, out = tmp_path / "c.toml", tmp_path / "out"
    config.write_text('[[model]]\nname = "net"\nfactory = "rfreport.examples:dilated_net"\n'
                      'input_shape = [1, 3, 16, 16]\n')
    assert invoke("run", config, "--out", out, "--workers", "1", "--no-cache").exit_code == 0
    before = (out / runfolder.SUMMARY).read_bytes()
    done = subprocess.run([sys.executable, "-c", TERMINATED_RUN, str(config), str(out)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 143 and done.stderr.strip().endswith("Error: terminated; nothing was written")
    assert (out / runfolder.SUMMARY).read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "c.toml", "out"]


KILLER = """
import os, shutil, sys
from pathlib import Path
from rfreport import runfolder
path, point = Path(sys.argv[1]), sys.argv[2]
real, count = os.replace, [0]

def replace(src, dst):
    count[0] += 1
    if point == f"before{count[0]}":
        os._exit(9)
    real(src, dst)
    if point == f"after{count[0]}":
        os._exit(9)

os.replace = replace
if point == "staging":
    runfolder.write_summary = lambda *args: os._exit(9)
entry = {"name": "net", "slug": "net-8x8", "input_shape": [1, 1, 8, 8], "status": "failed", "output_shape": None}
runfolder.write(path, {"seed": 2}, [runfolder.ModelOutput(entry, {}, {})])
"""


@pytest.mark.parametrize("point, survivor", [("staging", 1), ("before1", 1), ("after1", 1), ("after2", 2)])
def test_a_run_killed_at_any_step_of_the_swap_leaves_a_whole_run_for_the_next(tmp_path, monkeypatch, point, survivor):
    """Killed while writing, before the first rename, between the two renames, after the swap: the next run
    finds the previous run (restored from the staging folder when needed) or the new one, never nothing."""
    path = tmp_path / "run"
    write(path, 1)
    done = subprocess.run([sys.executable, "-c", KILLER, str(path), point], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 9, done.stderr
    monkeypatch.setattr(runfolder, "write_summary", lambda *_a: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):       # the next run recovers, then fails: what it recovered stays
        write(path, 3)
    assert seed(path) == survivor and siblings(path) == ["run"]   # the stale lock was taken over and removed


# --- two writers at once ---------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_first_and_runs_once_it_is_done(tmp_path):
    path, inside, release, errors = tmp_path / "run", threading.Event(), threading.Event(), []

    def first() -> None:
        with runfolder.staged(path) as staging:
            summary = {"format": runfolder.FORMAT, "run": {"seed": 1}, "models": []}
            (staging / runfolder.SUMMARY).write_text(json.dumps(summary))
            inside.set()
            release.wait(60)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(60)
        with pytest.raises(OutputError, match=rf"^{path}: another rfreport process \(host {socket.gethostname()} "
                                              rf"pid {os.getpid()} since [-0-9T:+]+\) is writing it; wait"):
            write(path, 2)
    except BaseException as exc:
        errors.append(exc)
    finally:
        release.set()
        thread.join(60)
    assert not errors, errors
    assert seed(path) == 1
    write(path, 2)
    assert seed(path) == 2 and siblings(path) == ["run"]


HOLDER = """
import sys
from rfreport import runfolder
with runfolder.locked(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_run_into_a_folder_another_process_writes_exits_2_naming_it(tmp_path):
    path = tmp_path / "run"
    write(path, 1)
    (tmp_path / "cfg.toml").write_text('[[model]]\nname = "m"\nfactory = "nets.py:tiny"\ninput_shape = [1, 1, 8, 8]\n')
    (tmp_path / "nets.py").write_text(NETS)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "locked\n"
        done = invoke("run", tmp_path / "cfg.toml", "--out", path)
        assert done.exit_code == 2 and done.stderr.count("\n") == 1
        assert f"another rfreport process (host {socket.gethostname()} pid {holder.pid} since" in done.stderr
        done = invoke("report", path)
        assert done.exit_code == 2 and f"pid {holder.pid}" in done.stderr
    finally:
        holder.communicate("", timeout=60)
    assert seed(path) == 1
    assert invoke("report", path).exit_code == 0


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / "run"
    (tmp_path / ".run.lock").write_text("host elsewhere pid 999999999 since 2020-01-01T00:00:00+00:00\n")
    write(path, 1)
    assert seed(path) == 1 and siblings(path) == ["run"]


# --- a full disk, and writes cut short -------------------------------------------------------------------------------

def full_disk(*_args, **_kwargs):
    """A writer on a full disk."""
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def ws(tmp_path) -> Path:
    """A folder with the factory file, a one-model config and a run folder of it."""
    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "cfg.toml").write_text('[[model]]\nname = "tiny"\nfactory = "nets.py:tiny"\n'
                                       'input_shape = [1, 1, 9, 9]\npositions = "center"\n')
    done = invoke("run", tmp_path / "cfg.toml", "--out", tmp_path / "run", "-q")
    assert done.exit_code == 0, done.output
    return tmp_path


def test_a_full_disk_during_run_exits_2_in_one_line_and_keeps_the_previous_run(ws, monkeypatch):
    import pandas as pd

    before = (ws / "run" / "summary.json").read_bytes()
    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_disk)
    done = invoke("run", ws / "cfg.toml", "--out", ws / "run", "-q")
    assert done.exit_code == 2, done.output
    assert done.stderr == f"Error: {ws / 'run'}: cannot write the run (No space left on device); the previous run " \
                          "is unchanged\n"
    assert (ws / "run" / "summary.json").read_bytes() == before and siblings(ws / "run") == sorted(
        ["cfg.toml", "nets.py", "run"])


def test_a_full_disk_under_the_run_log_is_one_line_not_a_logging_traceback(ws, monkeypatch):
    before = (ws / "run" / "summary.json").read_bytes()
    monkeypatch.setattr(pipeline.RunLog, "flush", full_disk)
    done = invoke("run", ws / "cfg.toml", "--out", ws / "run")
    assert done.exit_code == 2 and "Logging error" not in done.output and "Traceback" not in done.output
    assert done.stderr.endswith("cannot write the run (No space left on device); the previous run is unchanged\n")
    assert (ws / "run" / "summary.json").read_bytes() == before


class CutShort:
    """A file that takes half of what is written, then fails as `ulimit -f` (EFBIG) or a full disk (ENOSPC) would."""

    def __init__(self, path, mode, code):
        self.file, self.code = open(path, mode), code   # noqa: SIM115  (closed in __exit__)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        raise OSError(self.code, os.strerror(self.code))


@pytest.mark.parametrize("code", [errno.EFBIG, errno.ENOSPC])
def test_report_diff_and_check_outputs_cut_short_keep_the_previous_file(ws, monkeypatch, code):
    run = ws / "run"
    (ws / "audit.toml").write_text((ws / "cfg.toml").read_text() + "[model.audit]\nmin_rf = 1\n")
    outputs = {"index": run / "index.html", "html": ws / "d.html", "json": ws / "d.json", "md": ws / "d.md",
               "junit": ws / "j.xml"}
    for name, path in outputs.items():
        if not path.exists():
            path.write_text(f"previous {name}")
    before = {name: path.read_bytes() for name, path in outputs.items()}
    monkeypatch.setattr(atomic, "open", lambda path, mode: CutShort(path, mode, code), raising=False)
    commands = [("report", run), ("diff", run, run, "--html", outputs["html"]), ("diff", run, run, "--json",
                outputs["json"]), ("diff", run, run, "--markdown", outputs["md"]),
                ("check", ws / "audit.toml", "-q", "--junit", outputs["junit"])]
    for command in commands:
        done = invoke(*command)
        assert done.exit_code == 2, (command, done.output)
        assert done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1, done.stderr
        assert f"cannot write ({os.strerror(code)}); the previous file is unchanged" in done.stderr
    assert {name: path.read_bytes() for name, path in outputs.items()} == before
    assert not list(ws.rglob("*.partial"))


def test_a_real_file_size_limit_keeps_the_previous_diff_page(ws):
    page = ws / "d.html"
    page.write_text("previous page")
    limit = 4096   # the page (CSS inline) is larger: the kernel cuts the write and Python gets EFBIG

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-c", "from rfreport.cli import main; main()", "diff", str(ws / "run"),
                           str(ws / "run"), "--html", str(page)], capture_output=True, text=True, timeout=300,
                          preexec_fn=cap, cwd=ws, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"Error: {page}: cannot write (File too large); the previous file is unchanged\n"
    assert page.read_text() == "previous page" and not list(ws.glob(".d.html*"))


@pytest.mark.parametrize("option", ["--json", "--markdown", "--html"])
def test_diff_into_a_missing_folder_creates_it_and_into_an_impossible_one_exits_2(ws, option):
    run = ws / "run"
    done = invoke("diff", run, run, option, ws / "new" / "deeper" / "out")
    assert done.exit_code == 0 and (ws / "new" / "deeper" / "out").is_file()
    (ws / "afile").write_text("x")
    done = invoke("diff", run, run, option, ws / "afile" / "out")
    assert done.exit_code == 2 and done.stderr.startswith(f"Error: {ws / 'afile' / 'out'}: cannot write (")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.output


# --- what a run folder may hold before it is replaced ----------------------------------------------------------------

@pytest.mark.parametrize("stranger", ["NOTES.md", "models/mine.txt", "assets/photo.png", "private/"])
def test_a_run_folder_holding_files_rfreport_did_not_write_is_refused_and_kept(tmp_path, stranger):
    path = tmp_path / "run"
    write(path, 1)
    (path / stranger).parent.mkdir(parents=True, exist_ok=True)
    if stranger.endswith("/"):
        (path / stranger).mkdir()
    else:
        (path / stranger).write_text("mine")
    with pytest.raises(RunFolderError, match=rf"^{path}: holds {stranger}, which rfreport did not write; refusing"):
        write(path, 2)
    assert seed(path) == 1 and (path / stranger).exists()


def test_the_config_being_run_inside_its_own_out_folder_is_refused(ws):
    for name in ("cfg.toml", "nets.py"):
        shutil.copy(ws / name, ws / "run" / name)
    done = invoke("run", ws / "run" / "cfg.toml", "--out", ws / "run")
    assert done.exit_code == 2 and f"{ws / 'run'}: holds cfg.toml, which rfreport did not write" in done.stderr
    assert (ws / "run" / "cfg.toml").is_file()


def test_a_run_with_an_assets_folder_and_an_interrupted_write_is_replaced(ws):
    assert invoke("report", ws / "run", "--assets-dir", "assets").exit_code == 0
    assert (ws / "run" / "assets" / "report.css").is_file()
    (ws / "run" / ".index.html.abcd1234.partial").write_text("killed mid-write")
    done = invoke("run", ws / "cfg.toml", "--out", ws / "run", "-q", "--assets-dir", "figures")
    assert done.exit_code == 0, done.output
    assert not (ws / "run" / "assets").exists() and (ws / "run" / "figures" / "report.css").is_file()


def test_the_current_folder_named_through_a_linked_parent_is_refused(tmp_path, monkeypatch):
    (tmp_path / "real" / "work").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "real" / "work")
    with pytest.raises(RunFolderError, match=rf"^{tmp_path / 'link' / 'work'}: refusing to write a run over the "
                                             "current folder"):
        write(tmp_path / "link" / "work", 1)
    assert list((tmp_path / "real" / "work").iterdir()) == []


# --- run folders tampered with, read back ----------------------------------------------------------------------------

@pytest.fixture
def tampered(tmp_path):
    """Return a function editing the first entry of a copy of the golden run, and the copy."""
    path = shutil.copytree(GOLD_RUN, tmp_path / "run")

    def edit(change) -> Path:
        document = json.loads((path / "summary.json").read_text())
        change(document["models"][0])
        (path / "summary.json").write_text(json.dumps(document))
        return path
    return edit


EDITS = {
    "scheme": (lambda e: e["files"].__setitem__(1, "javascript:alert(document.domain)//geometry.csv"), "'files'"),
    "outside": (lambda e: e["files"].append("models/../../etc/passwd.csv"), "'files'"),
    "absolute": (lambda e: e["files"].append("/etc/passwd.csv"), "'files'"),
    "climbing slug": (lambda e: e.update(slug="../../evil"), "'slug': must be a plain folder name"),
    "no slug": (lambda e: e.pop("slug"), "'slug' is missing"),
    "text shape": (lambda e: e.update(input_shape="abc"), "'input_shape': must be a list of at least 3 positive "
                                                          "integers, found \"abc\""),
    "short shape": (lambda e: e.update(input_shape=[1, True, 8]), "'input_shape'"),
    "bad status": (lambda e: e.update(status="fine"), "'status': must be ok or failed"),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("command", ["report", "check", "diff"])
def test_a_tampered_entry_is_refused_in_one_line_naming_the_file_and_key(tampered, edit, command):
    change, key = EDITS[edit]
    path = tampered(change)
    done = invoke(command, path, *([path] if command == "diff" else []))
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert done.stderr.startswith(f"Error: {path / 'summary.json'}: model #1") and done.stderr.count("\n") == 1
    assert f"key {key}" in done.stderr
    assert not (path / "index.html").exists()


def test_two_entries_with_one_slug_are_refused(tampered):
    path = tampered(lambda e: e.update(slug="volume-6x8x8", files=[f.replace("dilated-16x20", "volume-6x8x8")
                                                                   for f in e["files"]]))
    done = invoke("report", path)
    assert done.exit_code == 2 and "model #3 ('volume'): key 'slug': 'volume-6x8x8' is also the slug of model #1; " \
                                   "each model needs its own" in done.stderr


def test_a_listed_file_linking_out_of_the_folder_is_never_read(tampered, tmp_path):
    path = tampered(lambda e: None)
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    target = path / "models" / "dilated-16x20" / "geometry.csv"
    target.unlink()
    target.symlink_to(secret)
    done = invoke("report", path)
    assert done.exit_code == 2 and "geometry.csv, a link out of the run folder; refusing to read it" in done.stderr
    assert not (path / "index.html").exists()


@pytest.mark.parametrize("assets", ["..", "../elsewhere", "/tmp/elsewhere", "a/../../b"])
def test_assets_dir_outside_the_run_folder_is_refused(tampered, assets):
    path = tampered(lambda e: None)
    done = invoke("report", path, "--assets-dir", assets)
    assert done.exit_code == 2 and "must be a relative folder inside the run folder" in done.stderr
    assert not (path / "index.html").exists()


def test_assets_dir_through_a_link_out_of_the_run_folder_is_refused(tampered, tmp_path):
    path = tampered(lambda e: None)
    (tmp_path / "outside").mkdir()
    (path / "assets").symlink_to(tmp_path / "outside")
    done = invoke("report", path, "--assets-dir", "assets")
    assert done.exit_code == 2 and "a link leads it out of the run folder" in done.stderr
    assert list((tmp_path / "outside").iterdir()) == []


BIDI = "net\u202egnp.exe\u2066x\u2069"


def test_bidi_controls_in_names_are_shown_as_escapes_in_the_report_and_the_terminal(tampered, tmp_path):
    path = tampered(lambda e: e.update(name=BIDI, spec={**e.get("spec", {}), "factory": BIDI}))
    assert invoke("report", path).exit_code == 0
    page = (path / "index.html").read_text()
    assert "\u202e" not in page and "\u2066" not in page and "net\\u202egnp.exe\\u2066x\\u2069" in page
    other = shutil.copytree(GOLD_RUN, tmp_path / "plain")
    done = invoke("diff", other, path)
    assert "\u202e" not in done.stdout and "net\\u202egnp.exe" in done.stdout
    done = invoke("diff", other, path, "--markdown", "-")
    assert "\u202e" not in done.stdout


# --- slugs: unique, short -------------------------------------------------------------------------------------------

def test_models_whose_names_slug_alike_are_refused_naming_both(tmp_path):
    (tmp_path / "nets.py").write_text(NETS)
    model = 'factory = "nets.py:tiny"\ninput_shape = [1, 1, 8, 8]\n'
    (tmp_path / "a.toml").write_text(f'[[model]]\nname = "a b"\n{model}')
    (tmp_path / "b.toml").write_text(f'[[model]]\nname = "a_b"\n{model}')
    done = invoke("run", tmp_path / "a.toml", tmp_path / "b.toml", "--out", tmp_path / "run")
    assert done.exit_code == 2 and not (tmp_path / "run").exists()
    assert done.stderr == (f"Error: {tmp_path / 'b.toml'}: model 'a_b': key 'name': model 'a b' (in "
                           f"{tmp_path / 'a.toml'}) shares the run folder name 'a_b-8x8'; rename one so each job has "
                           "its own folder\n")
    (tmp_path / "c.toml").write_text(f'[[model]]\nname = "c"\n{model}'.replace("[1, 1, 8, 8]",
                                                                              "[[1, 1, 8, 8], [2, 1, 8, 8]]"))
    done = invoke("check", tmp_path / "c.toml")
    assert done.exit_code == 2 and "key 'input_shape': its input shapes [1, 1, 8, 8] and [2, 1, 8, 8] share" in \
        done.stderr


def test_a_very_long_model_name_runs_with_a_short_unique_slug(tmp_path):
    long_a, long_b = "n" * 300 + "a", "n" * 300 + "b"
    slugs = {slugify(name, (1, 1, 9, 9)) for name in (long_a, long_b)}
    assert len(slugs) == 2 and all(len(slug) < SLUG_CHARS for slug in slugs)
    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "cfg.toml").write_text("".join(f'[[model]]\nname = "{name}"\nfactory = "nets.py:tiny"\n'
                                               'input_shape = [1, 1, 9, 9]\npositions = "center"\n'
                                               for name in (long_a, long_b)))
    done = invoke("run", tmp_path / "cfg.toml", "--out", tmp_path / "run", "-q")
    assert done.exit_code == 0, done.output
    assert sorted(m.slug for m in runfolder.load(tmp_path / "run").models) == sorted(slugs)
