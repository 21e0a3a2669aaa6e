"""The measurement plan: what the first pass decides, that later passes only drop work, and shared surrogates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rfreport.analysis.geometry import Boxes, is_global
from rfreport.compute import layers, models
from rfreport.compute.surrogate import build_surrogate, surrogates_reused
from rfreport.compute.sweep import sweep
from rfreport.config import ModelSpec, RunOptions
from rfreport.run import plan
from rfreport.run.jobs import Job


def job_of(factory: str, shape: tuple[int, ...], **changes) -> Job:
    """Return a job of an example model."""
    spec = ModelSpec(name=factory, factory=f"rfreport.examples:{factory}", input_shapes=(shape,), **changes)
    return Job(spec, shape, RunOptions())


def first_plan(job: Job) -> tuple[plan.Plan, object]:
    """Return the first plan of a job and its built model."""
    model = models.build(job.spec)
    main = plan.main_sweep(model, job, None)
    return plan.Plan.first(job, main, plan.global_context(model, job, main), growth=True), model


def test_a_clipped_named_layer_plans_composed_geometry_and_enlarged_inputs_as_a_fallback():
    job = job_of("resnet_small", (1, 3, 16, 16), kwargs={"width": 4, "blocks": 2}, layer="stages",
                 positions="center")
    first, _ = first_plan(job)
    assert first.composed and first.enlarged and first.growth and not first.erf
    assert first.geometry is not None   # the centre alone cannot fit a stride
    assert "composed geometry" in first.describe() and first.describe().startswith("plan: main sweep")


def test_an_unclipped_model_plans_no_geometry_pass():
    job = job_of("dilated_net", (1, 3, 32, 32), positions="all")
    first, _ = first_plan(job)
    assert (first.local, first.composed, first.enlarged, first.geometry) == (False, False, False, None)


def test_global_context_plans_the_local_sweep_and_drops_every_larger_input():
    job = job_of("se_net", (1, 3, 32, 32), positions="center")
    first, model = first_plan(job)
    assert first.local
    local = plan.local_sweep(model, job, plan.main_sweep(model, job, None))
    after = first.after_local(local)
    assert after.global_context and not after.composed and not after.enlarged


def test_an_exact_composed_geometry_leaves_only_the_corners_to_sweep():
    job = job_of("resnet_small", (1, 3, 16, 16), kwargs={"width": 4, "blocks": 2}, layer="stages",
                 positions="center")
    first, model = first_plan(job)
    found = plan.composed_geometry(model, job)
    assert found is not None and found.exact
    after = first.after_composed(found, plan.main_sweep(model, job, None))
    assert after.geometry == "corners" and not after.enlarged


@pytest.mark.parametrize("size", [16, 32])
def test_the_corners_are_swept_only_where_the_exact_geometry_lets_them_be_global(size):
    """The corners only tell a global RF; whether they can be global follows from the exact geometry, and that
    decision agrees with the corners swept on the model."""
    job = job_of("resnet_small", (1, 3, size, size), kwargs={"width": 4, "blocks": 2}, layer="stages",
                 positions="center")
    first, model = first_plan(job)
    main = plan.main_sweep(model, job, None)
    found = plan.composed_geometry(model, job)
    assert first.composed and found is not None and found.exact
    corners = sweep(model, job.input_shape, "corners", layer="stages")
    swept_global = is_global(Boxes.of(corners), corners.input_spatial)
    assert first.after_composed(found, main).geometry == ("corners" if swept_global else None)
    assert swept_global == (size == 16)


@pytest.mark.parametrize(("factory", "changes"), [("resnet_small", {"layer": "stages"}), ("unet", {}), ("se_net", {})])
def test_later_passes_never_add_work(factory, changes):
    job = job_of(factory, (1, 3, 16, 16), positions="center", **changes)
    first, model = first_plan(job)
    main = plan.main_sweep(model, job, None)
    steps = [first.after_local(plan.local_sweep(model, job, main)),
             first.after_composed(layers.TargetGeometry(np.ones(2), np.ones(2), np.zeros(2), True, True), main),
             first.after_geometry(main, None)]
    for later in steps:
        for kind in ("local", "composed", "growth", "enlarged", "erf"):
            assert getattr(later, kind) <= getattr(first, kind), (factory, kind)


def test_a_shared_surrogate_gives_the_same_answers_and_keeps_no_hooks():
    model = models.build(ModelSpec(name="u", factory="rfreport.examples:unet", input_shapes=((1, 3, 32, 32),)))
    alone = [sweep(model, (1, 3, 32, 32), "all"), layers.layer_growth(model, (1, 3, 32, 32))]
    with surrogates_reused():
        shared = [sweep(model, (1, 3, 32, 32), "all"), layers.layer_growth(model, (1, 3, 32, 32)),
                  layers.layer_growth(model, (1, 3, 32, 32))]
        reused = build_surrogate(model, 0)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in reused.modules())
    for a, b in zip((alone[0].lo, alone[0].hi, alone[0].support), (shared[0].lo, shared[0].hi, shared[0].support)):
        np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(alone[1], shared[1])
    pd.testing.assert_frame_equal(shared[1], shared[2])   # the first growth left no hooks behind




def test_a_clipped_block_ending_in_a_reused_module_takes_its_own_growth_row():
    """Every RF of block `0` is clipped at 8x8; its geometry comes from its own growth row (RF 7, stride 4,
    padding 3), not from the row of its shared ReLU's first call (RF 3, stride 2, padding 1)."""
    spec = ModelSpec(name="reused", factory="tests.support:reused_relu_net", input_shapes=((1, 1, 8, 8),), layer="0")
    job = Job(spec, (1, 1, 8, 8), RunOptions())
    summary = plan.measure(models.build(spec), job).analyse().summary
    assert (summary.arch_rf_size, summary.stride, summary.padding) == ((7, 7), (4.0, 4.0), (3.0, 3.0))


@pytest.mark.parametrize(("dilation", "size"), [(6, 4), (6, 6), (12, 8)])
def test_a_dilation_past_a_small_grid_gives_the_kernels_architecture_rf(dilation, size):
    """Every RF of the branch at this size looks like a 3x3 stack's (3 pixels, clear of the border): the fit
    must not take that for the architecture RF, 3 + 2 x dilation."""
    spec = ModelSpec(name="aspp", factory="tests.support:aspp_branch", kwargs={"dilation": dilation},
                     input_shapes=((1, 1, size, size),))
    analysed = plan.measure(models.build(spec), Job(spec, (1, 1, size, size), RunOptions())).analyse()
    assert analysed.summary.arch_rf_size == (3 + 2 * dilation,) * 2
    assert analysed.summary.in_input_rf_size == (3, 3)
    assert set(analysed.geometry["fit"]) <= {"enlarged", "composed"}


@pytest.mark.parametrize(("spatial", "swept"), [((7, 7), 49), ((8, 8), 64), ((9, 9), 9), ((40,), 40), ((100,), 26)])
def test_a_sampled_grid_on_a_small_output_sweeps_all_of_it(spatial, swept):
    """grid:K widens to every position up to FULL_GRID output positions; larger outputs keep the sampled grid."""
    assert len(plan.main_positions("grid:4", spatial)) == swept
    assert len(plan.main_positions("center", (7, 7))) == 1   # a named selection is kept as asked


def test_the_main_sweep_of_a_small_output_covers_the_whole_grid():
    """A 4 x 4 output asked on grid:3 (2 x 2 sampled) is swept at all 16 positions."""
    job = job_of("resnet_small", (1, 3, 16, 16), kwargs={"width": 4, "blocks": 1}, layer="stages",
                 positions="grid:3")
    main = plan.main_sweep(models.build(job.spec), job, None)
    assert main.output_spatial == (4, 4) and len(main.positions) == 16
