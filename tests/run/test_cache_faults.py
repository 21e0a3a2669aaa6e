"""The cache under faults: edited, damaged and unreadable entries are misses with a warning, never an answer."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from rfreport.cli import cli
from rfreport.config import ModelSpec, RunOptions
from rfreport.run import cache, pipeline
from rfreport.run import jobs as jobs_mod

SHAPE = (1, 1, 12, 12)
NETS = '''
from torch import nn


def tiny(k=3):
    return nn.Sequential(nn.Conv2d(1, 2, k, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, stride=2))
'''


@pytest.fixture
def nets(tmp_path) -> Path:
    """Write the factory file."""
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


@pytest.fixture
def log(caplog, monkeypatch):
    """Capture rfreport's log records, even after a CLI test has stopped them propagating."""
    monkeypatch.setattr(logging.getLogger("rfreport"), "propagate", True)
    caplog.set_level(logging.INFO, logger="rfreport")
    return caplog


def file_job(nets: Path, cache_dir: Path) -> jobs_mod.Job:
    """Return a job of the tiny file factory, cached in `cache_dir`."""
    spec = ModelSpec(name="tiny", factory=f"{nets}:tiny", input_shapes=(SHAPE,), positions="all")
    return jobs_mod.Job(spec, SHAPE, RunOptions(cache_dir=str(cache_dir)))


def edit_entry(root: Path, change: Callable[[dict], None], *, resign: bool) -> None:
    """Edit the stored values of the one entry under `root`; with `resign`, write a matching checksum too
    (as a writer who knows the format would), so that only the values are wrong."""
    [stored] = root.rglob(cache.RESULT)
    document = json.loads(stored.read_bytes())
    change(document["values"])
    stored.write_text(json.dumps(document) + "\n")
    if resign:
        (stored.parent / cache.CHECKSUM).write_text(hashlib.sha256(stored.read_bytes()).hexdigest() + "\n")


@pytest.mark.parametrize("change", [
    lambda values: values["summary"].update(arch_rf_size={"__tuple__": ["abc", 5]}),
    lambda values: values.update(surplus=1),
    lambda values: values.update(status="failed"),
], ids=["bad arch_rf_size", "extra field", "failed status"])
def test_an_entry_with_bad_values_is_discarded_and_recomputed(nets, tmp_path, log, change):
    job = file_job(nets, tmp_path / "c")
    first = pipeline.run_job(job)
    edit_entry(tmp_path / "c", change, resign=True)
    again = pipeline.run_job(job)
    assert again.status == "ok" and not again.cached and again.summary == first.summary
    assert "tiny-12x12: discarding damaged cache entry" in log.text
    assert pipeline.run_job(job).cached   # the recomputed result replaced the bad entry


def test_an_edited_entry_fails_its_checksum_and_is_never_an_answer(nets, tmp_path, log):
    job = file_job(nets, tmp_path / "c")
    first = pipeline.run_job(job)
    assert first.summary.in_input_rf_size == (5, 5)
    edit_entry(tmp_path / "c", lambda values: values["summary"].update(in_input_rf_size={"__tuple__": [1, 1]}),
               resign=False)
    again = pipeline.run_job(job)
    assert not again.cached and again.summary.in_input_rf_size == (5, 5)
    assert "does not match its checksum" in log.text


def test_an_edited_frame_file_is_a_miss(nets, tmp_path, log):
    job = file_job(nets, tmp_path / "c")
    pipeline.run_job(job)
    [frame] = (tmp_path / "c").rglob("geometry.csv")
    frame.write_text(frame.read_text().replace("5", "1"))
    assert not pipeline.run_job(job).cached and "do not match their digests" in log.text


def test_check_does_not_pass_an_audit_on_an_edited_entry(nets, tmp_path):
    config = tmp_path / "audit.toml"
    config.write_text(f'[[model]]\nname = "tiny"\nfactory = "{nets}:tiny"\ninput_shape = {list(SHAPE)}\n'
                      "[model.audit]\nmax_rf = 3\n")
    args = ["check", str(config), "--cache-dir", str(tmp_path / "c"), "--json"]
    assert CliRunner().invoke(cli, args).exit_code == 1
    edit_entry(tmp_path / "c", lambda values: values["summary"].update(in_input_rf_size={"__tuple__": [1, 1]}),
               resign=False)
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 1 and "discarding damaged cache entry" in done.stderr
    [verdict] = json.loads(done.stdout)["models"]
    assert verdict["audit"][0]["value"] == [5, 5] and not verdict["passed"]


def deny(monkeypatch, root: Path) -> None:
    """Make every file-system call under `root` fail with EACCES, as `chmod 000` does for a user other than root."""
    def denied(name: str, original: Callable) -> Callable:
        def call(path, *args, **kwargs):
            if str(path).startswith(str(root)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return original(path, *args, **kwargs)
        return call

    for name in ("stat", "mkdir", "open", "read_bytes", "read_text", "rglob", "iterdir"):
        monkeypatch.setattr(pathlib.Path, name, denied(name, getattr(pathlib.Path, name)))


def test_an_unreadable_cache_folder_is_a_warning_and_the_run_goes_on_uncached(nets, tmp_path, log, monkeypatch):
    job = file_job(nets, tmp_path / "c")
    pipeline.run_job(job)                      # a stored entry that cannot be read
    deny(monkeypatch, tmp_path / "c")
    result = pipeline.run_job(job)
    assert result.status == "ok" and not result.cached
    assert "tiny-12x12: cannot read the cache entry" in log.text and "Permission denied" in log.text
    monkeypatch.undo()
    assert pipeline.run_job(job).cached        # the entry was left as it was


def test_an_unreadable_cache_folder_through_the_cli(nets, tmp_path, monkeypatch):
    config = tmp_path / "audit.toml"
    config.write_text(f'[[model]]\nname = "tiny"\nfactory = "{nets}:tiny"\ninput_shape = {list(SHAPE)}\n')
    deny(monkeypatch, tmp_path / "c")
    done = CliRunner().invoke(cli, ["run", str(config), "--out", str(tmp_path / "out"), "--cache-dir",
                                    str(tmp_path / "c")])
    assert done.exit_code == 0, done.output
    assert "WARNING tiny-12x12: cannot write the cache entry" in done.stderr
