"""The run folder: round trip, layout, load errors, atomic replacement, and no torch on import."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rfreport import runfolder, summary
from rfreport.errors import OutputError, RunFolderError
from rfreport.slugs import slugify
from tests.support import GOLD_RUN, invoke

GOLD_ENTRY = json.loads((Path(__file__).parent / "gold" / "run" / "summary.json").read_text())["models"][0]
SUMMARY = {key: value for key, value in GOLD_ENTRY.items() if key in summary.json_keys()}   # a valid summary


def model_output(name: str = "net", shape=(1, 3, 8, 6), seed: int = 0) -> runfolder.ModelOutput:
    """Build a model output with frames of several dtypes and every kind of array."""
    rng = np.random.default_rng(seed)
    positions = pd.DataFrame({"pos_h": np.arange(4, dtype=np.int64), "fill": rng.random(4),
                              "edge": [True, False, False, True], "path": pd.array(["dense"] * 4, dtype="string")})
    geometry = pd.DataFrame({"axis": ["h", "w"], "stride": [2, 2]})
    entry = {"name": name, "slug": slugify(name, shape), "input_shape": list(shape), "status": "ok",
             "output_shape": [1, 2, *shape[2:]],
             **SUMMARY, "arch_rf_size": [5, 5], "ratio": float("nan"), "count": np.int64(3), "findings": []}
    arrays = {"coverage": rng.integers(0, 5, shape[2:]),
              "masks": {(1, 2): rng.random(shape[2:]) > 0.5, (0, 0): np.zeros(shape[2:], bool)},
              "erf_maps": {(1, 2): rng.random(shape[2:])}}
    return runfolder.ModelOutput(entry, {"positions": positions, "geometry": geometry}, arrays)


def test_round_trip_keeps_frames_arrays_and_entries(tmp_path):
    outputs = [model_output("net"), model_output("other", (1, 1, 5, 7), seed=1)]
    run = runfolder.write(tmp_path / "run", {"seed": 3}, outputs, log="hello\n")
    assert run.meta == {"seed": 3}
    assert [m.slug for m in run.models] == ["net-8x6", "other-5x7"]
    for saved, original in zip(run.models, outputs, strict=True):
        for name, frame in original.frames.items():
            pd.testing.assert_frame_equal(saved.frames[name], frame)
            csv = pd.read_csv(run.path / "models" / saved.slug / f"{name}.csv")
            assert csv.shape == frame.shape
        assert np.array_equal(saved.arrays["coverage"], original.arrays["coverage"])
        for key in ("masks", "erf_maps"):
            assert saved.arrays[key].keys() == original.arrays[key].keys()
            for pos, value in original.arrays[key].items():
                assert np.array_equal(saved.arrays[key][pos], value)
    assert (run.path / "log.txt").read_text() == "hello\n"


def test_layout_and_summary_are_strict_json(tmp_path):
    run = runfolder.write(tmp_path / "run", {"seed": 0}, [model_output()])
    document = json.loads((run.path / "summary.json").read_text(), parse_constant=pytest.fail)
    assert document["format"] == summary.FORMAT
    entry = document["models"][0]
    assert entry["ratio"] is None and entry["count"] == 3
    assert sorted(entry["files"]) == sorted(f"models/net-8x6/{f}" for f in (
        "positions.parquet", "positions.csv", "geometry.parquet", "geometry.csv", "coverage.npy", "masks.npz",
        "erf_maps.npz"))
    with np.load(run.path / "models/net-8x6/masks.npz") as archive:
        assert sorted(archive.files) == ["h0_w0", "h1_w2"]


@pytest.mark.parametrize("position, key", [((3,), "l3"), ((3, 4), "h3_w4"), ((0, 12, 7), "d0_h12_w7")])
def test_position_keys_round_trip(position, key):
    assert runfolder.position_key(position) == key
    assert runfolder.parse_position_key(key) == position


def test_load_rejects_missing_incomplete_and_unknown_folders(tmp_path):
    with pytest.raises(RunFolderError, match="no run folder"):
        runfolder.load(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(RunFolderError, match=r"incomplete.*summary\.json"):
        runfolder.load(tmp_path / "half")
    (tmp_path / "half" / "summary.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="unreadable"):
        runfolder.load(tmp_path / "half")
    (tmp_path / "half" / "summary.json").write_text(json.dumps({"format": summary.FORMAT + 1, "models": []}))
    with pytest.raises(RunFolderError, match=f"unknown run folder format {summary.FORMAT + 1}"):
        runfolder.load(tmp_path / "half")


def test_a_listed_file_that_is_missing_is_reported(tmp_path):
    run = runfolder.write(tmp_path / "run", {}, [model_output()])
    (run.path / "models/net-8x6/geometry.parquet").unlink()
    with pytest.raises(RunFolderError, match=r"geometry\.parquet but the file is missing"):
        runfolder.load(run.path)   # on load, so that diff (which reads no frame) refuses it too
    other = runfolder.write(tmp_path / "other", {}, [model_output()])
    done = invoke("diff", other.path, run.path)
    assert done.exit_code == 2 and "geometry.parquet but the file is missing" in done.output


def siblings(path: Path) -> list[str]:
    """Return the names in a run folder's parent folder."""
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("crash", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_crash_midway_keeps_the_old_run_and_leaves_nothing_complete(tmp_path, monkeypatch, crash):
    path = tmp_path / "run"
    runfolder.write(path, {"seed": 1}, [model_output()])

    def broken(*_args, **_kwargs):
        raise crash

    monkeypatch.setattr(runfolder, "write_summary", broken)
    with pytest.raises(type(crash)):
        runfolder.write(path, {"seed": 2}, [model_output("other")])
    assert runfolder.load(path).meta == {"seed": 1}
    assert [m.slug for m in runfolder.load(path).models] == ["net-8x6"]
    assert siblings(path) == ["run"]


def test_a_crash_on_a_fresh_path_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(runfolder, "write_model", lambda *_a: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OutputError, match=r"cannot write the run \(OSError: boom\); nothing was written$"):
        runfolder.write(tmp_path / "run", {}, [model_output()])
    assert list(tmp_path.iterdir()) == []


def test_a_new_run_replaces_the_old_one(tmp_path):
    path = tmp_path / "run"
    runfolder.write(path, {"seed": 1}, [model_output("old")])
    run = runfolder.write(path, {"seed": 2}, [model_output("new")])
    assert run.meta == {"seed": 2} and [m.name for m in run.models] == ["new"]
    assert not (path / "models" / "old-8x6").exists()
    assert siblings(path) == ["run"]


def test_the_staging_folder_has_the_final_name(tmp_path):
    with runfolder.staged(tmp_path / "latest") as staging:
        assert staging.name == "latest" and staging.parent.name.startswith(".latest.tmp-")
        (staging / "x").write_text("1")
    assert (tmp_path / "latest" / "x").read_text() == "1"


TORCH_BLOCKED = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import rfreport.runfolder, rfreport.audit, rfreport.diff, rfreport.report.render
print("ok")
"""


def test_readers_import_without_torch():
    done = subprocess.run([sys.executable, "-c", TORCH_BLOCKED], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_an_empty_folder_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    run = runfolder.write(tmp_path / "empty", {"seed": 1}, [model_output()])
    assert [m.slug for m in run.models] == ["net-8x6"]


def test_a_path_below_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunFolderError, match=rf"^{tmp_path / 'afile' / 'sub'}: cannot create a run folder there "
                                             rf"\({tmp_path / 'afile'} is a file\)$"):
        runfolder.write(tmp_path / "afile" / "sub", {}, [model_output()])


@pytest.mark.parametrize("make", ["file", "notes", "link", "incomplete"])
def test_anything_but_a_run_folder_or_an_empty_one_is_refused_and_kept(tmp_path, make):
    path = tmp_path / "out"
    if make == "file":
        path.write_text("x")
    elif make == "link":
        (tmp_path / "target").mkdir()
        path.symlink_to(tmp_path / "target")
    else:
        path.mkdir()
        (path / ("notes.txt" if make == "notes" else "log.txt")).write_text("keep me")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(RunFolderError, match=rf"^{path}: .*refusing to replace it"):
        runfolder.write(path, {}, [model_output()])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_the_current_folder_and_its_parents_are_refused(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for path in (".", "..", str(tmp_path / "work")):
        with pytest.raises(RunFolderError, match="current folder"):
            runfolder.write(Path(path), {}, [model_output()])
    assert list((tmp_path / "work").iterdir()) == []


def test_leftovers_of_killed_runs_are_cleaned_but_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = {".run.tmp-dead": f"{socket.gethostname()} {dead.stdout.strip()}",
              ".run.tmp-live": f"{socket.gethostname()} {os.getpid()}", ".run.tmp-other": "elsewhere 1"}
    for name, owner in owners.items():
        (tmp_path / name / "run").mkdir(parents=True)
        (tmp_path / name / "owner").write_text(owner)
    (tmp_path / ".run.tmp-old" / "run").mkdir(parents=True)   # killed before writing its owner file
    os.utime(tmp_path / ".run.tmp-old", (0, 0))
    (tmp_path / ".runner.tmp-x").mkdir()                       # another run's name: not ours to clean
    runfolder.write(tmp_path / "run", {}, [model_output()])
    assert siblings(tmp_path / "run") == [".run.tmp-live", ".run.tmp-other", ".runner.tmp-x", "run"]


@pytest.mark.parametrize("edit", ["flip", "drop"])
def test_stored_verdicts_that_its_rules_do_not_give_are_refused(tmp_path, edit):
    """`check RUN_DIR` reads the stored verdicts: one flipped or removed by hand must not pass as the run's."""
    root = shutil.copytree(GOLD_RUN, tmp_path / "run")
    document = json.loads((root / runfolder.SUMMARY).read_text())
    entry = next(m for m in document["models"] if any(not row["passed"] for row in m.get("audit") or []))
    row = next(row for row in entry["audit"] if not row["passed"])
    if edit == "flip":
        row["passed"] = True
    else:
        entry["audit"].remove(row)
    (root / runfolder.SUMMARY).write_text(json.dumps(document))
    expected = (rf"model #\d+ \('{entry['name']}'\): key 'audit': the stored verdicts are not what .* "
                rf"\(first at rule '{row['rule']}'\); the file was edited")
    with pytest.raises(RunFolderError, match=expected):
        runfolder.load(root)
    done = invoke("check", root)
    assert done.exit_code == 2 and "the file was edited" in done.output
