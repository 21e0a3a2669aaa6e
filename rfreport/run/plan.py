"""The measurement plan: the one place that decides what to measure for a job.

A job's first pass is cheap: the main sweep of its positions, and the global operations its
output depends on (looked for only when every swept position has the same RF box). From it,
:meth:`Plan.first` decides every extra pass: the local sweep (global context held constant), the
target geometry composed from per-layer windows, the per-layer growth, the extra positions the
geometry fit needs, enlarged inputs as the last resort, and the ERF. :func:`measure` executes the
plan in that order; a pass can only *drop* later passes (:meth:`Plan.after_local`,
:meth:`Plan.after_composed`, :meth:`Plan.after_geometry`), never add a kind the first pass did
not plan, except the local sweep when the geometry positions turn out global. The result is a
:class:`Measurements`, analysed once (`rfreport.analysis.analyze.analyze`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from rfreport import positions as positions_mod
from rfreport.analysis.analyze import Analysis, analyze
from rfreport.analysis.geometry import Boxes, fit_geometry, is_global, one_box
from rfreport.compute import attention, erf, layers, models
from rfreport.compute import global_context as context
from rfreport.compute import verify as verify_mod
from rfreport.compute.engine import Engine, Target
from rfreport.compute.shapes import scaled
from rfreport.compute.sweep import sweep
from rfreport.config import ModelSpec
from rfreport.errors import ConfigError, NoGradient, RfReportError, SweepError
from rfreport.layouts import parse_layout
from rfreport.positions import PositionSpec, center
from rfreport.results import GlobalOp, SweepResult
from rfreport.run import limits, progress
from rfreport.run.jobs import Advance, Job

logger = logging.getLogger("rfreport")
KEEP_MASKS = ("center", "corners", "edges")
GEOMETRY_REACH = 3             # the geometry positions are the centre +- this many steps per axis
ENLARGE_DOUBLINGS = 3          # at most 8x the input size per axis for the geometry fit
ENLARGE_PIXELS = 1024 * 1024   # and never beyond this many input positions
FULL_GRID = 64                 # a sampled grid (`grid:K`) on an output of at most this many positions is swept whole


@dataclass(frozen=True)
class Measurements:
    """Everything measured for one job: what `analyze` reads, and the ERF."""

    main: SweepResult
    global_ops: tuple[GlobalOp, ...]
    geometry: SweepResult | None = None       # the extra positions of the geometry fit
    local: SweepResult | None = None          # the geometry positions with global context held constant
    composed: layers.TargetGeometry | None = None
    grown: list[tuple] | None = None          # exact (size, stride, padding) per axis from the target's growth row
    growth: pd.DataFrame | None = None        # the layers frame
    enlarged: SweepResult | None = None       # the fit's positions on a doubled input
    erf: erf.ErfResult | None = None
    attention: dict | None = None             # attention modules and their reach (attention_record)
    global_before: dict | None = None         # the first global op outside the audit's global_not_before layer

    @property
    def composed_axes(self) -> list[tuple] | None:
        """Return (size, stride, padding) per axis of the exact geometry composed from per-layer windows, else None."""
        found = self.composed
        if found is not None and found.exact:
            return list(zip(found.rf, found.stride, found.padding))
        return self.grown

    def analyse(self) -> Analysis:
        """Analyse the measurements (once per job)."""
        return analyze(self.main, geometry=self.geometry, local=self.local, layers=self.growth,
                       enlarged=self.enlarged, composed=self.composed_axes, global_ops=self.global_ops,
                       attention=attention.with_context(self.attention, self.global_ops),
                       global_before=self.global_before)


@dataclass(frozen=True)
class Plan:
    """The extra passes a job needs, decided from its first pass; later passes can only drop some."""

    local: bool                       # sweep the geometry positions with global context held constant, first
    grown: bool                       # read the target's geometry from its exact layer-growth row
    composed: bool                    # compose the target's geometry from per-layer windows
    growth: bool                      # the per-layer growth table
    geometry: PositionSpec | None     # extra positions for the fit (None: the main sweep holds what helps)
    enlarged: bool                    # enlarged inputs, where every RF is clipped and nothing exact helped
    erf: bool                         # the effective RF
    global_context: bool = False      # RFs are global through global context: no larger input helps
    saturated: bool = False           # the exact geometry is known: an RF covering the input is no global context

    @classmethod
    def first(cls, job: Job, main: SweepResult, global_ops: Sequence[GlobalOp], growth: bool) -> Plan:
        """Decide the extra passes from the main sweep and the global operations found."""
        spec = job.spec
        clipped = not main.size_dependent_ops and needs_larger_input(main)
        spans = covers(main, "corners") and is_global(Boxes.of(main), main.input_spatial)
        named_grid = spec.layer is not None and spec.output is None and spec.layout == "nchw"
        pooled = pooling(global_ops)
        mixed = bool(global_ops) and not pooled   # attention or token mixing: global at every size, no local sweep
        return cls(local=spans or pooled, grown=clipped and spec.layout == "nchw" and not mixed,
                   composed=clipped and named_grid and not mixed, growth=growth, geometry=geometry_extra(main),
                   enlarged=clipped and not mixed, erf=spec.erf is not None, global_context=mixed)

    def after_local(self, local: SweepResult | None) -> Plan:
        """RFs that are global only through global context stay so at every size: no geometry helps."""
        if not context_bound(local):
            return self
        return replace(self, grown=False, composed=False, enlarged=False, global_context=True)

    def after_grown(self, grown: list[tuple] | None, main: SweepResult) -> Plan:
        """The target's exact growth row is its geometry: no composition, no larger input, and the corners only
        where that geometry lets every RF cover the input."""
        if grown is None:
            return replace(self, grown=False)
        return replace(self, grown=False, composed=False, enlarged=False, saturated=True,
                       geometry=self._corners_if_global(grown, main))

    def after_composed(self, found: layers.TargetGeometry | None, main: SweepResult) -> Plan:
        """An exact composed geometry needs at most the corners (to tell a global RF), and no local sweep: every
        window on the way is finite, so an RF covering the input is saturation. Global pooling on the way makes
        every RF global at every size: no larger input helps either."""
        if found is None:
            return self
        exact, pooled = found.exact, found.pooled
        axes = list(zip(found.rf, found.stride, found.padding))
        return replace(self, enlarged=self.enlarged and not exact and not pooled,
                       grown=self.grown and not exact and not pooled,
                       global_context=self.global_context or pooled, saturated=exact and not pooled,
                       geometry=self._corners_if_global(axes, main) if exact else self.geometry)

    def _corners_if_global(self, axes: Sequence[tuple], main: SweepResult) -> PositionSpec | None:
        """Return the corners when an exact geometry lets every output's RF cover the input (they confirm a global
        RF), else None: the geometry already says the first or last position sees less than the input."""
        if self.geometry is None or not covers_everywhere(axes, main.input_spatial, main.output_spatial):
            return None
        return "corners"

    def after_geometry(self, main: SweepResult, geometry: SweepResult | None) -> Plan:
        """Growth rows and enlarged inputs only while the merged sweeps still leave an axis estimated."""
        needed = needs_larger_input(main, geometry)
        return replace(self, grown=self.grown and needed, enlarged=self.enlarged and needed)

    def describe(self) -> str:
        """Return the plan as one line for the log."""
        passes = [name for name, on in (("local sweep", self.local), ("layer growth", self.growth),
                                        ("geometry from the growth row", self.grown),
                                        ("composed geometry", self.composed), ("enlarged inputs", self.enlarged),
                                        ("effective RF", self.erf)) if on]
        if self.geometry is not None:
            passes.append("geometry positions" if self.geometry != "corners" else "corners")
        return "plan: main sweep" + "".join(f", {p}" for p in passes)


def measure(model: nn.Module, job: Job, advance: Advance | None = None, main: SweepResult | None = None, *,
            growth: bool = True, find_attention: bool = False, known: pd.DataFrame | None = None
            ) -> Measurements:
    """Measure a job on its built model: the first pass, then the plan it decides, in order.

    `main` is the job's main sweep when it was computed elsewhere; `growth` asks for the per-layer
    growth; `find_attention` looks for attention modules and how far RFs reach around them; `known` is a
    layer growth of the same model already measured (a pyramid level's parent job's), whose exact rows
    can give the target's geometry.
    """
    attention_found = attention_record(model, job) if find_attention else None
    with timed(job, "main sweep"):
        main = main or main_sweep(model, job, None, advance)
    with timed(job, "global context"):
        found_ops = global_context(model, job, main)
    main = with_shifted_ops(model, job, main)
    plan = Plan.first(job, main, found_ops, growth)
    logger.debug("%s: %s", job.slug, plan.describe())
    local = found = grown = growth_frame = geometry = enlarged = None
    with timed(job, "local sweep"):
        if plan.local:
            local = local_sweep(model, job, main)
            plan = plan.after_local(local)
    with timed(job, "layer growth"):
        growth_frame = layer_frame(model, job, plan.global_context) if plan.growth else None
    rows = growth_frame if growth_frame is not None else known
    with timed(job, "target geometry"):
        if plan.composed and plan.grown:   # the growth rows, when exact, spare the composition
            grown = grown_geometry(model, job, rows)
            plan = plan.after_grown(grown, main)
        if plan.composed:
            found = composed_geometry(model, job)
            plan = plan.after_composed(found, main)
    with timed(job, "geometry and local sweeps"):
        geometry = geometry_sweep(model, job, main, plan.geometry)
        if local is None and not plan.local and not plan.saturated and (pooling(found_ops) or (
                not found_ops and is_global(Boxes.of(main, geometry), main.input_spatial))):
            local = local_sweep(model, job, main)
            plan = plan.after_local(local)
        plan = plan.after_geometry(main, geometry)
        if plan.grown:
            grown = grown_geometry(model, job, rows)
            plan = plan.after_grown(grown, main)
        if plan.enlarged:
            enlarged = enlarged_sweep(model, job, growth_frame)
    with timed(job, "effective RF"):
        measured = effective(model, job, main) if plan.erf else None
    logger.debug("%s: %s (as run)", job.slug, plan.describe())
    return Measurements(main, found_ops, geometry, local, found, grown, growth_frame, enlarged, measured,
                        attention_found, global_before(model, job))


@contextmanager
def timed(job: Job, stage: str) -> Iterator[None]:
    """Log how long a stage of a job took (in log.txt, and on the console when it was slow); name it in a timeout."""
    with progress.stage(f"{job.slug}: {stage}"), limits.during(stage):
        yield


def sweep_options(job: Job) -> dict[str, Any]:
    """Return the sweep keyword arguments every sweep of a job shares."""
    spec, options = job.spec, job.options
    return {"mode": spec.mode, "layer": spec.layer, "output": spec.output, "device": options.device,
            "seed": options.seed, "batch_size": options.batch_size, "layout": spec.layout}


def keep_masks(spec: ModelSpec) -> list:
    """Return the positions whose support masks are kept (when swept): centre, corners, edges, explicit ones."""
    explicit = [] if isinstance(spec.positions, str) else [p for p in spec.positions if not isinstance(p, str)]
    return [*KEEP_MASKS, *explicit]


def target_of(job: Job) -> Target:
    """Return the tensor a job analyses: its layer and output, read in its layout."""
    return Target(job.spec.layer, job.spec.output, parse_layout(job.spec.layout))


def selected_positions(model: nn.Module, job: Job) -> np.ndarray:
    """Resolve the job's positions on its output grid (one forward pass, which checks the input's rank)."""
    spec, options = job.spec, job.options
    with models.rank_guard(model, job.input_shape, spec.name), Engine(
            model, job.input_shape, mode=spec.mode, target=target_of(job), device=options.device,
            seed=options.seed) as engine:
        return main_positions(spec.positions, engine.output_spatial)


def main_positions(spec: PositionSpec, output_spatial: Sequence[int]) -> np.ndarray:
    """Resolve the main sweep's positions; a sampled grid on an output of at most FULL_GRID positions is all of it.

    At most FULL_GRID positions cost at most that many backward passes, and less where passes are
    shared: the whole 7 x 7 output at 224 x 224 against a 3 x 3 grid takes 2.2x as long for
    resnet18 (local, compressed) and 4.4x for efficientnet_b0 (global, one pass per position),
    measured in one process; only the whole grid shows how every RF meets the border (docs/config.md).
    """
    if isinstance(spec, str) and spec.startswith("grid:") and math.prod(output_spatial) <= FULL_GRID:
        spec = "all"
    return positions_mod.resolve(spec, output_spatial)


def main_sweep(model: nn.Module, job: Job, selected: np.ndarray | None,
               advance: Advance | None = None) -> SweepResult:
    """Sweep the selected positions of a job (its own selection when None), keeping the masks of the chosen ones."""
    done, total = 0, 0 if selected is None else len(selected)

    def chosen(output_spatial: tuple[int, ...]) -> np.ndarray:
        nonlocal total
        picked = main_positions(job.spec.positions, output_spatial)
        total = len(picked)
        return picked

    def progress(count: int) -> None:
        nonlocal done
        done += count
        advance(done, total)

    checks = verify_mod.among(job.spec.positions, job.spec.verify, mode=job.spec.mode, seed=job.options.seed)
    with models.rank_guard(model, job.input_shape, job.spec.name):
        return sweep(model, job.input_shape, chosen if selected is None else selected,
                     keep_masks=keep_masks(job.spec), progress=progress if advance else None, verify=checks,
                     **sweep_options(job))


def geometry_positions(output_spatial: Sequence[int]) -> PositionSpec:
    """Return the positions the geometry fit needs: the centre +- GEOMETRY_REACH per axis, and the axis ends."""
    return ["center", "edges", *axis_lines(output_spatial)]


def axis_lines(output_spatial: Sequence[int]) -> list[list[int]]:
    """Return the positions centre +- GEOMETRY_REACH along each axis (the other axes at the centre)."""
    mid = center(output_spatial)
    return [[p if a == axis else m for a, m in enumerate(mid)] for axis, n in enumerate(output_spatial)
            for p in range(max(0, mid[axis] - GEOMETRY_REACH), min(n, mid[axis] + GEOMETRY_REACH + 1))]


def enlarged_positions(output_spatial: Sequence[int]) -> PositionSpec:
    """Return the few positions an enlarged-input fit needs: the centre and its next neighbour on each axis."""
    mid = center(output_spatial)
    return ["center", *([min(m + 1, n - 1) if a == axis else m for a, (m, n) in enumerate(zip(mid, output_spatial))]
                        for axis in range(len(mid)))]


def needs_larger_input(*results: SweepResult | None) -> bool:
    """Tell whether some axis can only be estimated here: no two full-size RFs lie clear of the border."""
    first = next(r for r in results if r is not None)
    fits = fit_geometry(Boxes.of(*results), first.input_spatial, first.output_spatial)
    return any(fit.fit == "estimated" for fit in fits)


def covers(result: SweepResult, spec: PositionSpec) -> bool:
    """Return whether a sweep already holds every position of a selection."""
    wanted = positions_mod.resolve(spec, result.output_spatial)
    return bool(positions_mod.rows_in(wanted, result.positions, result.output_spatial).all())


def geometry_extra(main: SweepResult) -> PositionSpec | None:
    """Return the positions the fit still needs beyond the main sweep, or None when none can help.

    When the corners were swept and every RF already spans the whole input, no position at this size
    can show a box clear of the border: the fit then comes from the composed or enlarged geometry (or
    the local sweep). When the centre's RF spans the whole input, only the corners are needed (to
    tell a global RF): no other position can be clear of the border either.
    """
    extra = geometry_positions(main.output_spatial)
    spans = covers(main, "corners") and is_global(Boxes.of(main), main.input_spatial)
    if spans or covers(main, extra):
        return None
    return "corners" if centre_spans(main) else extra


def geometry_sweep(model: nn.Module, job: Job, main: SweepResult, extra: PositionSpec | None) -> SweepResult | None:
    """Sweep the extra positions of the geometry fit, unless the main sweep holds them all."""
    if extra is None or covers(main, extra):
        return None
    return sweep(model, job.input_shape, extra, verify=False, **sweep_options(job))


def covers_everywhere(axes: Sequence[tuple], input_spatial: Sequence[int], output_spatial: Sequence[int]) -> bool:
    """Tell whether an exact (size, stride, padding) per axis makes every output position's RF cover the input:
    the first position's RF reaches the last pixel and the last position's starts at or before the first."""
    return all(-padding + size - 1 >= n - 1 and -padding + (out - 1) * stride <= 0
               for (size, stride, padding), n, out in zip(axes, input_spatial, output_spatial))


def context_bound(local: SweepResult | None) -> bool:
    """Tell whether every RF is global through global context (the local sweep's RFs are smaller than the
    input): then no larger input has an RF clear of the border either."""
    return local is not None and not is_global(Boxes.of(local), local.input_spatial)


def centre_spans(result: SweepResult) -> bool:
    """Tell whether the sweep holds the centre position and its RF spans the whole input on every axis."""
    mid = positions_mod.center(result.output_spatial)
    rows = np.flatnonzero((result.positions == np.array(mid)).all(axis=1) & (result.support > 0))
    n = np.array(result.input_spatial)
    return bool(len(rows) and ((result.lo[rows[0]] <= 0) & (result.hi[rows[0]] >= n - 1)).all())


def with_shifted_ops(model: nn.Module, job: Job, main: SweepResult) -> SweepResult:
    """Add to the main sweep's size-dependent ops those that place their windows or slices differently at the
    input doubled (TensorFlow's "same" padding at an odd map size): the geometry measured here then holds at
    this size only and says so, and where every RF is clipped no larger input stands in for this one (the
    geometry says so instead of carrying another size's padding)."""
    if main.size_dependent_ops:
        return main
    shifted = verify_mod.shifted_ops(model, job.input_shape, scaled(job.input_shape, 2), target_of(job))
    return replace(main, size_dependent_ops=shifted) if shifted else main


def enlarged_sweep(model: nn.Module, job: Job, growth: pd.DataFrame | None = None) -> SweepResult | None:
    """Fit the geometry on doubled inputs (every RF is clipped at the job's input, so it is always filled).

    Starts at the first doubling larger than every RF the layer growth measured, stops at the first
    size where two full-size RFs lie clear of the border (then swept along each axis's line through the
    centre, whose fit says whether the RF moves by a stride), after ENLARGE_DOUBLINGS, past
    ENLARGE_PIXELS, when the model refuses the size or places its windows differently there
    (verify.shifted_ops); returns None when none helped.
    """
    for doubling in range(first_doubling(job.input_shape[2:], growth), ENLARGE_DOUBLINGS + 1):
        bigger = (*job.input_shape[:2], *(n << doubling for n in job.input_shape[2:]))
        if math.prod(bigger[2:]) > ENLARGE_PIXELS or verify_mod.shifted_ops(model, job.input_shape, bigger,
                                                                               target_of(job)):
            return None
        try:
            # one probe: only the box bounds of three positions are read, and the input is 4-64x larger
            larger = sweep(model, bigger, enlarged_positions, probes=1, verify=False, **sweep_options(job))
            if not needs_larger_input(larger):
                # several steps either side of the centre before the fit is taken: an RF that moves by turns
                # (upsampling, a pixel shuffle: 0, 2, 0, 2 pixels a step) is then not affine, not a stride of 2
                return sweep(model, bigger, axis_lines, probes=1, verify=False, **sweep_options(job))
        except SweepError:
            return None
    return None


def composed_geometry(model: nn.Module, job: Job) -> layers.TargetGeometry | None:
    """Compose the target's geometry from per-layer windows (a named NCHW layer); None when the model refuses."""
    spec = job.spec
    try:
        return layers.target_geometry(model, job.input_shape, spec.layer, mode=spec.mode,
                                      device=job.options.device, seed=job.options.seed)
    except SweepError:
        return None


def grown_geometry(model: nn.Module, job: Job, growth: pd.DataFrame | None) -> list[tuple] | None:
    """Return the target's exact (size, stride, padding) per axis from the layer-growth row of the module whose
    output it is (a layer, or an output that is a named module's very output: a `features_only` level), else None."""
    if growth is None or growth.empty:
        return None
    names = layers.output_layers(model, job.input_shape, Target(job.spec.layer, job.spec.output))
    return layers.exact_geometry(growth, names)


def first_doubling(spatial: Sequence[int], growth: pd.DataFrame | None) -> int:
    """Return how many doublings make the input larger than every RF in the layer growth (at least one)."""
    if growth is None or growth.empty:
        return 1
    widest = [int(growth[f"{a}_rf"].max()) + 2 for a in positions_mod.axis_names(len(spatial))]
    return max(1, *(math.ceil(math.log2(max(w / n, 1.0))) for w, n in zip(widest, spatial)))


def local_sweep(model: nn.Module, job: Job, main: SweepResult) -> SweepResult:
    """Sweep the geometry positions with global-context paths held constant."""
    return sweep(model, job.input_shape, geometry_positions(main.output_spatial), local=True, **sweep_options(job))


def pooling(global_ops: Sequence[GlobalOp]) -> bool:
    """Tell whether some global operation is of a kind a local sweep holds constant (pooling, sampling)."""
    return any(op.kind.held_by_local_sweep for op in global_ops)


def global_context(model: nn.Module, job: Job, main: SweepResult) -> tuple[GlobalOp, ...]:
    """Find the global operations the analysed output depends on (one forward and backward pass).

    A global operation on the path gives every output position the same RF box (all that its input
    feature map sees), so they are looked for only when every swept position has one box.
    """
    if not one_box(Boxes.of(main)):
        return ()
    return context.global_ops(model, job.input_shape, target=Target(job.spec.layer, job.spec.output),
                              device=job.options.device, seed=job.options.seed)


def global_before(model: nn.Module, job: Job) -> dict | None:
    """For the audit rule `global_not_before`, find the first global operation outside its layer that the layer's
    output depends on: {layer, module, op} (module and op None when none); None when the rule is not set."""
    layer = job.spec.audit.get("global_not_before")
    if not layer:
        return None
    with timed(job, "global context before " + layer):
        ops = context.global_ops(model, job.input_shape, target=Target(layer), device=job.options.device,
                                 seed=job.options.seed)
    outside = next((op for op in ops if op.layer != layer and not op.layer.startswith(layer + ".")), None)
    return {"layer": layer, "module": outside.layer if outside else None, "op": outside.op if outside else None}


def layer_frame(model: nn.Module, job: Job, global_context: bool = False) -> pd.DataFrame:
    """Return the per-layer RF growth of a job's model: the architecture's, so always structural."""
    return layers.layer_growth(model, job.input_shape, layers=job.spec.layers, mode="structural",
                               device=job.options.device, seed=job.options.seed, layout=job.spec.layout,
                               global_context=global_context, target=Target(job.spec.layer, job.spec.output))


def effective(model: nn.Module, job: Job, main: SweepResult) -> erf.ErfResult | None:
    """Measure the effective RF when the spec asks for it, reusing the main sweep's RF boxes."""
    if job.spec.erf is None:
        return None
    settings = dict(job.spec.erf)
    chosen = settings.pop("positions", "center")
    options = sweep_options(job)
    del options["mode"]
    try:
        return erf.effective_rf(model, job.input_shape, chosen, theoretical=main if covers(main, chosen) else None,
                                **settings, **options)
    except NoGradient as exc:
        raise ConfigError(f"erf: {exc.what}, so it has no effective RF; set erf = false for this model") from exc


def attention_record(model: nn.Module, job: Job) -> dict | None:
    """Find the model's attention modules and sweep how far RFs reach around them; None without attention."""
    with timed(job, "attention search"):
        try:
            calls = attention.detect(model, job.input_shape, Target(job.spec.layer, job.spec.output))
        except RfReportError:
            logger.debug("%s: no attention findings", job.slug, exc_info=True)
            return None
        if not calls:
            return None

        def rf_of(layer: str, layout: str) -> tuple[list[int], bool] | None:
            # structural sweeps are exact by construction; the run-time check on the model (float64 forward
            # passes, most of this stage's time) is left to the job's own sweeps of the same engine
            try:
                found = sweep(model, job.input_shape, "center", verify=False, **(sweep_options(job) | {
                    "layer": layer, "output": None, "layout": layout}))
            except RfReportError:
                logger.debug("%s: no RF for attention block %s", job.slug, layer, exc_info=True)
                return None
            return found.size[0].tolist(), is_global(Boxes.of(found), found.input_spatial)

        return attention.reach(calls, rf_of, job.input_shape[2:], str(parse_layout(job.spec.layout)))
