"""The incremental-audit cache: keys that change with anything that can change the answer, hits that equal a sweep."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

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


def stack(k=3, padding=1, dilation=1, stride=1) -> nn.Sequential:
    """Two small convolutions; the first one's arguments vary."""
    return nn.Sequential(nn.Conv2d(1, 2, k, stride=stride, padding=padding, dilation=dilation), nn.ReLU(),
                         nn.Conv2d(2, 1, 3))


class Skip(nn.Module):
    """Three convolutions and a skip connection from the first one."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(1, 1, 3, padding=1) for _ in range(3))

    def forward(self, x):
        h1 = self.a(x)
        h2 = self.b(h1)
        return self.c(h2) + h1


class SkipFromSecond(Skip):
    """The same modules and shapes; the skip comes from the second convolution (a larger RF at one spot)."""

    def forward(self, x):
        h1 = self.a(x)
        h2 = self.b(h1)
        return self.c(h2) + h2


class Sliced(Skip):
    """Crops the first row before the last convolution."""

    def forward(self, x):
        return self.c(self.b(self.a(x))[:, :, 1:])


class SlicedAtTheEnd(Skip):
    """Crops the last row instead: the same shapes, other positions."""

    def forward(self, x):
        return self.c(self.b(self.a(x))[:, :, :-1])


class ExtraOp(Skip):
    """One more elementwise op, which changes no shape."""

    def forward(self, x):
        return self.c(self.b(self.a(x)) * 2)


class Indexed(nn.Module):
    """Gathers columns through an index buffer, as relative-position tables do."""

    def __init__(self, order):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.register_buffer("order", torch.tensor(order))

    def forward(self, x):
        return self.conv(x)[..., self.order]


class Branchy(nn.Module):
    """Branches on a value, which the meta device cannot run: the trace falls back to the CPU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if bool(x.sum() > 0) else y[:, :, 1:]


class Broken(nn.Module):
    """Raises on every forward pass."""

    def forward(self, x):
        raise RuntimeError("no")


def job(shape=SHAPE, options: RunOptions | None = None, **changes) -> jobs_mod.Job:
    """Return a job for the key tests (the factory string only labels the spec)."""
    spec = ModelSpec(name="net", factory="tests.run.test_cache:stack", input_shapes=(shape,), positions="all")
    return jobs_mod.Job(replace(spec, **changes), shape, options or RunOptions())


def key(model: nn.Module, the_job: jobs_mod.Job | None = None, kind: str = "job") -> str:
    """Return a model's cache key for a job."""
    found = cache.job_key(model, the_job or job(), kind)
    assert found is not None
    return found


def test_a_rebuilt_model_with_other_weights_has_the_same_structural_key():
    torch.manual_seed(1)
    first = stack()
    torch.manual_seed(2)
    assert key(first) == key(stack())


@pytest.mark.parametrize("changed", [dict(k=5, padding=2), dict(padding=0), dict(dilation=2, padding=2),
                                     dict(stride=2)], ids=["kernel", "padding", "dilation", "stride"])
def test_one_layer_argument_changes_the_key(changed):
    assert key(stack()) != key(stack(**changed))


@pytest.mark.parametrize("variant", [SkipFromSecond, Sliced, SlicedAtTheEnd, ExtraOp],
                         ids=["skip-source", "slice", "other-slice", "extra-op"])
def test_one_forward_line_changes_the_trace_and_the_key(variant):
    # the same modules, parameters, shapes and source file: only the recorded data flow differs
    assert cache.op_trace(Skip(), SHAPE) != cache.op_trace(variant(), SHAPE)
    assert key(Skip()) != key(variant())


@pytest.mark.parametrize("changes", [
    dict(layer="0"), dict(layer="2"), dict(output=0), dict(positions="center"), dict(mode="gradient"),
    dict(erf={"samples": 2}), dict(layers=("0",)), dict(kwargs={"k": 5}), dict(factory="tests.run.test_cache:other"),
    dict(layout="nhwc"), dict(audit={"global_not_before": "1"}),
], ids=lambda c: next(iter(c)))
def test_every_job_setting_changes_the_key(changes):
    assert key(stack()) != key(stack(), job(**changes))


def test_the_input_shape_seed_and_kind_change_the_key_and_labels_do_not():
    model = stack()
    assert key(model) != key(model, job(shape=(1, 1, 12, 13)))
    assert key(model) != key(model, job(options=RunOptions(seed=1)))
    assert key(model) != key(model, kind="inspect")
    same = [job(name="renamed"), job(audit={"min_rf": 3}), job(options=RunOptions(batch_size=7, executor="ray"))]
    assert {key(model, j) for j in same} == {key(model)}


def test_weights_key_gradient_mode_and_the_erf_only():
    torch.manual_seed(1)
    first = stack()
    torch.manual_seed(2)
    second = stack()
    copied = stack()
    copied.load_state_dict(first.state_dict())
    for weighted in (job(mode="gradient"), job(erf={"samples": 2})):
        assert key(first, weighted) != key(second, weighted)
        assert key(first, weighted) == key(copied, weighted)


def test_buffer_values_change_the_structural_key():
    assert key(Indexed([0, 1, 2] * 4)) != key(Indexed([2, 1, 0] * 4))


def test_a_value_dependent_model_is_traced_on_the_cpu():
    with pytest.raises(RuntimeError, match="meta"):
        cache.op_trace(Branchy(), SHAPE)
    assert cache.op_trace(Branchy(), SHAPE, device="cpu")
    assert key(Branchy()) == key(Branchy())


def test_a_model_that_cannot_be_traced_is_not_cached(tmp_path):
    assert cache.job_key(Broken(), job(), "job") is None
    assert cache.slot(Broken(), job(options=RunOptions(cache_dir=str(tmp_path)))).path is None


def test_the_trace_leaves_the_model_as_it_was():
    model = stack().train()
    weight = model[0].weight.detach().clone()
    cache.op_trace(model, SHAPE, layer="0")
    key(model)
    assert model.training and all(m.training for m in model.modules())
    assert model[0].weight.device.type == "cpu" and torch.equal(model[0].weight, weight)
    assert not model[0]._forward_hooks


def test_the_cache_folder_comes_from_the_options_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "env"))
    assert cache.folder(RunOptions()) == tmp_path / "env"
    assert cache.folder(RunOptions(cache_dir=str(tmp_path / "flag"))) == tmp_path / "flag"
    assert cache.folder(RunOptions(cache=False)) is None
    monkeypatch.delenv(cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_dir() == tmp_path / "xdg" / "rfreport"


# --------------------------------------------------------------------------------------
# Through the pipeline and the CLI


@pytest.fixture
def nets(tmp_path) -> Path:
    """Write the factory file of the pipeline tests."""
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


def file_job(nets: Path, cache_dir: Path, **changes) -> jobs_mod.Job:
    """Return a job of the tiny file factory, cached in `cache_dir`."""
    spec = ModelSpec(name="tiny", factory=f"{nets}:tiny", input_shapes=(SHAPE,), positions="all", **changes)
    return jobs_mod.Job(spec, SHAPE, RunOptions(cache_dir=str(cache_dir)))


def assert_same(a: jobs_mod.JobResult, b: jobs_mod.JobResult) -> None:
    """Assert two job results hold the same values, frames and arrays."""
    assert (a.input_shape, a.output_shape, a.mode, a.target) == (b.input_shape, b.output_shape, b.mode, b.target)
    assert a.summary == b.summary and a.findings == b.findings and a.frames.keys() == b.frames.keys()
    for name, frame in a.frames.items():
        pd.testing.assert_frame_equal(frame, b.frames[name])
    np.testing.assert_array_equal(a.arrays["coverage"], b.arrays["coverage"])
    assert a.arrays["masks"].keys() == b.arrays["masks"].keys()
    assert all(np.array_equal(mask, b.arrays["masks"][p]) for p, mask in a.arrays["masks"].items())


def test_a_second_run_of_a_job_comes_from_the_cache_and_equals_the_sweep(nets, tmp_path):
    the_job = file_job(nets, tmp_path / "c", erf={"samples": 2})
    first = pipeline.run_job(the_job)
    second = pipeline.run_job(the_job)
    assert first.status == second.status == "ok" and not first.cached and second.cached
    assert_same(first, second)
    uncached = pipeline.run_job(replace(the_job, options=RunOptions(cache=False)))
    assert not uncached.cached
    assert_same(uncached, second)


def test_a_changed_job_misses_and_gets_its_own_answer(nets, tmp_path):
    pipeline.run_job(file_job(nets, tmp_path / "c"))
    wider = pipeline.run_job(file_job(nets, tmp_path / "c", kwargs={"k": 5}))
    again = pipeline.run_job(file_job(nets, tmp_path / "c"))
    assert not wider.cached and again.cached and wider.summary.arch_rf_size != again.summary.arch_rf_size


def test_no_cache_writes_nothing(nets, tmp_path):
    the_job = replace(file_job(nets, tmp_path / "c"), options=RunOptions(cache=False, cache_dir=str(tmp_path / "c")))
    assert not pipeline.run_job(the_job).cached and not pipeline.run_job(the_job).cached
    assert not (tmp_path / "c").exists()


@pytest.fixture
def log(caplog, monkeypatch):
    """Capture rfreport's log records, even after a CLI test has stopped them propagating."""
    monkeypatch.setattr(logging.getLogger("rfreport"), "propagate", True)
    caplog.set_level(logging.INFO, logger="rfreport")
    return caplog


def test_a_damaged_entry_is_recomputed_and_replaced(nets, tmp_path, log):
    the_job = file_job(nets, tmp_path / "c")
    first = pipeline.run_job(the_job)
    [stored] = (tmp_path / "c").rglob(cache.RESULT)
    stored.write_text("{not json", encoding="utf-8")
    again = pipeline.run_job(the_job)
    assert again.status == "ok" and not again.cached and "damaged cache entry" in log.text
    assert_same(first, again)
    assert pipeline.run_job(the_job).cached


def test_an_unwritable_cache_only_warns(nets, tmp_path, log):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = pipeline.run_job(file_job(nets, blocker / "cache"))
    assert result.status == "ok" and not result.cached and "cannot write the cache entry" in log.text


def invoke(*args) -> str:
    """Invoke the CLI; return its standard output."""
    return run_cli(*args).stdout


def run_cli(*args):
    """Invoke the CLI and require success; return click's result (stdout and stderr apart)."""
    done = CliRunner().invoke(cli, [str(a) for a in args])
    assert done.exit_code == 0, done.output
    return done


def test_run_metadata_says_which_models_came_from_the_cache(nets, tmp_path):
    config = tmp_path / "audit.toml"
    config.write_text(f'[[model]]\nname = "tiny"\nfactory = "{nets}:tiny"\ninput_shape = [1, 1, 12, 12]\n'
                      f'[[model]]\nname = "wide"\nfactory = "{nets}:tiny"\ninput_shape = [1, 1, 12, 12]\n'
                      'kwargs = { k = 5 }\n')
    folder = tmp_path / "c"
    invoke("run", config, "--out", tmp_path / "a", "--cache-dir", folder, "-q")
    invoke("run", config, "--out", tmp_path / "b", "--cache-dir", folder, "-q")
    invoke("run", config, "--out", tmp_path / "n", "--cache-dir", folder, "--no-cache", "-q")
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in "abn"}
    assert summaries["a"]["run"]["cache"] == {"dir": str(folder), "hits": []}
    assert summaries["b"]["run"]["cache"] == {"dir": str(folder), "hits": ["tiny-12x12", "wide-12x12"]}
    assert summaries["n"]["run"]["cache"] == {"dir": None, "hits": []}
    assert [m["cached"] for m in summaries["b"]["models"]] == [True, True]
    volatile = ("seconds", "cached", "files")
    for before, after in zip(summaries["a"]["models"], summaries["b"]["models"], strict=True):
        assert {k: v for k, v in before.items() if k not in volatile} == {
            k: v for k, v in after.items() if k not in volatile}
    assert "from the cache" in (tmp_path / "b" / "index.html").read_text()


def test_inspect_reuses_the_cache_unless_told_not_to(nets, tmp_path):
    args = ("inspect", f"{nets}:tiny", "--input-shape", "1,1,12,12", "--positions", "corners", "--json",
            "--cache-dir", tmp_path / "c")
    first, second = (json.loads(invoke(*args)) for _ in range(2))
    assert not first.pop("cached") and second.pop("cached") and first == second
    assert "from the cache" in invoke(*args[:-3], "--cache-dir", tmp_path / "c")
    assert json.loads(invoke(*args, "--no-cache"))["cached"] is False


class Passthrough(torch.autograd.Function):
    """A custom autograd function: its backward is code the forward pass does not show."""

    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        return grad


class Custom(Skip):
    """Sends the middle activation through the custom function."""

    def forward(self, x):
        return self.c(Passthrough.apply(self.b(self.a(x))))


class Doubled(Skip):
    """The same ops without the custom function."""

    def forward(self, x):
        return self.c(self.b(self.a(x)) * 1)


def test_a_custom_autograd_function_is_part_of_the_trace():
    assert cache.op_trace(Custom(), SHAPE) != cache.op_trace(Doubled(), SHAPE)
    assert any("Passthrough@" in call for call in cache.op_trace(Custom(), SHAPE))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_scripted_model_is_not_cached():
    assert cache.job_key(torch.jit.script(stack()), job(), "job") is None


def test_module_settings_are_keyed_even_where_the_trace_cannot_see_them():
    assert cache.structure_digest(stack()) == cache.structure_digest(stack())
    assert cache.structure_digest(stack()) != cache.structure_digest(stack(padding=2))


def test_check_of_a_config_reuses_the_cache(nets, tmp_path):
    config = tmp_path / "audit.toml"
    config.write_text(f'[[model]]\nname = "tiny"\nfactory = "{nets}:tiny"\ninput_shape = [1, 1, 12, 12]\n'
                      '[model.audit]\nmin_rf = 3\n')
    first, second = (run_cli("check", config, "--cache-dir", tmp_path / "c", "-v") for _ in range(2))
    assert "from the cache" not in first.stderr and "tiny-12x12: from the cache" in second.stderr
    assert first.stdout == second.stdout and "pass" in first.stdout


KEY_IN_A_FRESH_PROCESS = """
from tests.run.test_cache import Skip, job
from rfreport.run import cache
print(cache.job_key(Skip(), job(), "job"))
"""


def test_the_key_is_the_same_in_every_process():
    # a scheduled audit runs in a new process: nothing in the key may depend on ids, addresses or hash seeds
    keys = {subprocess.run([sys.executable, "-c", KEY_IN_A_FRESH_PROCESS], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, cwd=Path(__file__).parents[2]).stdout.strip()
            for seed in ("1", "2")}
    assert keys == {key(Skip())}


def test_the_source_digest_covers_every_stage_of_rfreport(monkeypatch):
    hashed = []
    monkeypatch.setattr(cache, "_file_digest", lambda path: hashed.append(Path(path)) or "x")
    cache.source_digest.__wrapped__()
    package = Path(cache.__file__).parents[1]
    expected = {p.relative_to(package) for p in package.rglob("*.py")}
    assert {p.relative_to(package) for p in hashed} == expected
    assert {Path("analysis/analyze.py"), Path("compute/engine.py"), Path("report/render.py"),
            Path("run/cache.py")} <= expected   # a change to the analysis invalidates entries as a sweep's does


def test_stored_values_come_back_with_their_types():
    values = {"shape": (1, 3, 8, 8), "nested": [(1, 2), {"a": (np.int64(3), np.float64(0.5))}], "nan": float("nan"),
              "none": None, "flag": np.bool_(True), "rows": np.arange(3)}
    back = cache.untagged(json.loads(json.dumps(cache.tagged(values))))
    assert back["shape"] == (1, 3, 8, 8) and back["nested"] == [(1, 2), {"a": (3, 0.5)}]
    assert np.isnan(back["nan"]) and back["none"] is None and back["flag"] is True and back["rows"] == [0, 1, 2]
    with pytest.raises(TypeError):
        cache.tagged({(1, 2): "a tuple key"})
