"""The pipeline: jobs against the set-propagation oracle, failures, determinism, chunks, ERF, and whole runs."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rfreport import config, runfolder
from rfreport.analysis.analyze import analyze
from rfreport.analysis.geometry import Boxes, is_global
from rfreport.compute import models
from rfreport.config import ModelSpec, RunOptions
from rfreport.report import render as report
from rfreport.run import executors, pipeline, plan
from rfreport.run import jobs as jobs_mod
from tests.oracle import support_mask
from tests.support import NETS, TINY

SHAPE = (1, 1, 17, 17)


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> Path:
    """Write the factory file the specs point at."""
    path = tmp_path_factory.mktemp("nets") / "nets.py"
    path.write_text(NETS)
    return path


def job_of(nets: Path, factory: str = "tiny", shape=SHAPE, options: RunOptions | None = None, **changes):
    """Return a job for one factory of the nets file."""
    spec = ModelSpec(name=factory, factory=f"{nets}:{factory}", input_shapes=(shape,), **changes)
    return jobs_mod.Job(spec, shape, options or RunOptions())


@pytest.fixture(scope="module")
def tiny_result(nets):
    """Run the tiny job over every position once."""
    return pipeline.run_job(job_of(nets))


def test_jobs_cover_every_model_and_shape_in_order(nets, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[[model]]\nname = "a"\nfactory = "{nets}:tiny"\ninput_shape = [[1, 1, 11, 11], [1, 1, 9, 13]]\n'
                    f'[[model]]\nname = "b"\nfactory = "{nets}:tiny"\ninput_shape = [1, 1, 8, 8]\n')
    jobs = jobs_mod.make_jobs(config.load([path]))
    assert [job.slug for job in jobs] == ["a-11x11", "a-9x13", "b-8x8"]
    assert [job.input_shape for job in jobs] == [(1, 1, 11, 11), (1, 1, 9, 13), (1, 1, 8, 8)]


def test_a_job_matches_the_set_propagation_oracle(tiny_result):
    result = tiny_result
    assert result.status == "ok" and result.error is None and result.output_shape == (1, 1, 8, 8)
    frame = result.frames["positions"]
    assert len(frame) == 64
    for row in frame.itertuples(index=False):
        mask = support_mask(TINY, SHAPE[2:], (row.pos_h, row.pos_w))
        hs, ws = np.nonzero(mask)
        assert (row.h_lo, row.h_hi, row.w_lo, row.w_hi) == (hs.min(), hs.max(), ws.min(), ws.max())
        assert row.support == mask.sum()
    oracle_coverage = sum(support_mask(TINY, SHAPE[2:], (h, w)).astype(int) for h in range(8) for w in range(8))
    assert np.array_equal(result.arrays["coverage"], oracle_coverage)
    assert sorted(result.arrays["masks"]) == [(0, 0), (0, 3), (0, 7), (3, 0), (3, 3), (3, 7), (7, 0), (7, 3), (7, 7)]
    for pos, mask in result.arrays["masks"].items():
        assert np.array_equal(mask, support_mask(TINY, SHAPE[2:], pos))


def test_a_job_result_has_every_stage_and_no_torch(tiny_result):
    assert set(tiny_result.frames) == {"positions", "edges", "geometry", "layers"}
    summary = tiny_result.summary.to_json()
    assert (summary["arch_rf_size"], summary["stride"], summary["padding"]) == ([13, 13], [2, 2], [5, 5])
    assert all(set(f) == {"code", "severity", "message"} for f in tiny_result.findings)
    data = pickle.dumps(tiny_result)
    assert b"torch" not in data
    again = pickle.loads(data)
    pd.testing.assert_frame_equal(again.frames["edges"], tiny_result.frames["edges"])


def assert_same_results(a: jobs_mod.JobResult, b: jobs_mod.JobResult) -> None:
    """Assert two job results have identical frames, arrays and summaries."""
    assert a.status == b.status == "ok", (a.error, b.error)
    assert a.frames.keys() == b.frames.keys() and a.arrays.keys() == b.arrays.keys()
    for name in a.frames:
        pd.testing.assert_frame_equal(a.frames[name], b.frames[name])
    assert np.array_equal(a.arrays["coverage"], b.arrays["coverage"])
    assert a.arrays["masks"].keys() == b.arrays["masks"].keys()
    assert all(np.array_equal(a.arrays["masks"][p], b.arrays["masks"][p]) for p in a.arrays["masks"])
    assert a.summary == b.summary and a.findings == b.findings


def test_the_same_seed_gives_identical_frames(nets):
    job = job_of(nets, mode="gradient", positions="grid:2", options=RunOptions(seed=7, cache=False))
    assert_same_results(pipeline.run_job(job), pipeline.run_job(job))


def failure(job: jobs_mod.Job) -> str:
    """Run a job that must fail and return its error."""
    result = pipeline.run_job(job)
    assert result.status == "failed" and result.frames == {} and result.arrays == {} and result.summary is None
    assert "\n" not in result.error
    return result.error


def test_failures_become_failed_results_with_one_line(nets, monkeypatch):
    assert failure(job_of(nets, "broken")) == (f"model 'broken': factory {nets}:broken raised RuntimeError: "
                                               "no model today")
    assert "cannot import module 'no_such_module_rf'" in failure(
        jobs_mod.Job(ModelSpec("x", "no_such_module_rf:f", (SHAPE,)), SHAPE, RunOptions()))
    assert "Kernel size can't be greater than actual input size" in failure(job_of(nets, shape=(1, 1, 2, 2)))

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore detail")

    monkeypatch.setattr(plan, "measure", out_of_memory)
    assert failure(job_of(nets)) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"


def test_chunks_merge_to_the_unchunked_sweep_and_frames(nets, tiny_result):
    job = job_of(nets)
    chunks = executors.split(job, 3)
    assert [len(c.positions) for c in chunks] == [22, 21, 21]
    merged = executors.merge([executors.run_chunk(chunk) for chunk in reversed(chunks)])
    whole = plan.main_sweep(models.build(job.spec), job, np.concatenate([c.positions for c in chunks]))
    for name in ("positions", "lo", "hi", "support", "wrapped", "path", "coverage"):
        assert np.array_equal(getattr(merged, name), getattr(whole, name)), name
    assert merged.masks.keys() == whole.masks.keys()
    assert_same_results(pipeline.run_job(job, main=merged), tiny_result)


def test_more_chunks_than_positions_gives_one_per_position(nets):
    chunks = executors.split(job_of(nets, positions="corners"), 10)
    assert [c.positions.tolist() for c in chunks] == [[[0, 0]], [[0, 7]], [[7, 0]], [[7, 7]]]


def test_erf_runs_only_when_asked(nets, tiny_result):
    assert "erf" not in tiny_result.frames and "erf_maps" not in tiny_result.arrays
    result = pipeline.run_job(job_of(nets, positions="grid:2", erf={"samples": 2, "positions": "corners"}))
    assert result.status == "ok", result.error
    assert len(result.frames["erf"]) == 4
    assert sorted(result.arrays["erf_maps"]) == [(0, 0), (0, 7), (7, 0), (7, 7)]


def test_a_global_model_gets_a_local_sweep(nets, tiny_result):
    result = pipeline.run_job(job_of(nets, "squeeze", shape=(1, 1, 8, 8)))
    assert result.status == "ok", result.error
    assert result.summary.to_json()["global"] is True and result.summary.to_json()["local_rf_size"] == [3, 3]
    assert tiny_result.summary.to_json()["global"] is False and tiny_result.summary.to_json()["local_rf_size"] is None


def write_config(tmp_path: Path, nets: Path, *models: str, audit: str = "min_rf = 9") -> Path:
    """Write a config with one tiny model per name (`broken` builds the failing factory)."""
    text = "[defaults]\npositions = \"grid:2\"\n"
    for name in models:
        text += (f'[[model]]\nname = "{name}"\nfactory = "{nets}:{"broken" if name == "broken" else "tiny"}"\n'
                 f"input_shape = [1, 1, 17, 17]\n[model.audit]\n{audit}\n")
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_a_run_records_failed_models_and_completes_the_others(nets, tmp_path):
    cfg = config.load([write_config(tmp_path, nets, "good", "broken", "other")])
    run = pipeline.run(cfg, tmp_path / "run", executors.LocalExecutor(), argv=["rfreport", "run"])
    assert [(m.slug, m.status) for m in run.models] == [("good-17x17", "ok"), ("broken-17x17", "failed"),
                                                        ("other-17x17", "ok")]
    good, broken = run.models[0].entry, run.models[1].entry
    assert good["audit"] == [{"rule": "min_rf", "limit": 9, "value": [13, 13], "passed": True, "note": None}]
    assert broken["audit"][0]["passed"] is False and "no model today" in broken["error"]
    assert run.meta["argv"] == ["rfreport", "run"] and run.meta["seed"] == 0
    assert (run.path / "index.html").is_file()
    log = (run.path / "log.txt").read_text()
    assert "broken-17x17: failed: model 'broken'" in log and "Traceback" in log
    pd.testing.assert_frame_equal(run.models[0].frames["positions"], run.models[2].frames["positions"])


def test_a_crash_while_rendering_keeps_the_old_run(nets, tmp_path, monkeypatch):
    cfg = config.load([write_config(tmp_path, nets, "good")])
    pipeline.run(cfg, tmp_path / "run", executors.LocalExecutor())
    before = (tmp_path / "run" / "summary.json").read_text()

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "render", crash)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(replace(cfg, options=RunOptions(seed=5)), tmp_path / "run", executors.LocalExecutor())
    assert (tmp_path / "run" / "summary.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "run"]
    assert runfolder.load(tmp_path / "run").meta["seed"] == 0


@pytest.mark.parametrize(("shape", "fit"), [((1, 3, 32, 32), "composed"), ((1, 3, 16, 16), "composed")])
def test_clipped_geometry_equals_the_enlarged_fit(shape, fit):
    spec = ModelSpec(name="small", factory="rfreport.examples:resnet_small", kwargs={"width": 4, "blocks": 2},
                     input_shapes=(shape,), layer="stages", positions="center")
    job = jobs_mod.Job(spec, shape, RunOptions())
    model = models.build(spec)
    measured = plan.measure(model, job, growth=False)
    main, done = measured.main, measured.analyse()
    geometry = plan.geometry_sweep(model, job, main, plan.geometry_extra(main))
    enlarged = plan.enlarged_sweep(model, job)
    found = plan.global_context(model, job, main)
    spans = is_global(Boxes.of(main, geometry), main.input_spatial)
    local = plan.local_sweep(model, job, main) if found or spans else None
    reference = analyze(main, geometry=geometry, enlarged=enlarged, local=local, global_ops=found)
    assert (done.geometry["fit"] == fit).all() and (reference.geometry["fit"] == "enlarged").all()
    # every window composed is finite: an RF covering the input is saturation, so no local sweep ran
    assert not reference.summary.global_context and measured.local is None
    assert done.summary == replace(reference.summary, local_rf_size=None, local_rf_clipped=None,
                                   arch_rf_fit=(fit, fit))
    same = [c for c in reference.geometry.columns if c not in ("fit", "problem", "positions_used", "local_size")]
    pd.testing.assert_frame_equal(done.geometry[same], reference.geometry[same])
