"""Helpers shared by several test modules: the example run and golden files, edited runs, small nets, strategies.

A test module takes shared helpers from here (or from tests/oracle.py), never from another test module
(tests/test_stages.py checks it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import xml.dom.minidom
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

from rfreport import runfolder
from rfreport.cli import cli
from rfreport.config import ModelSpec, RunOptions
from rfreport.run import jobs as jobs_mod
from rfreport.run import pipeline
from tests.oracle import Layer, lengths

# --- the example run and the golden files (report/test_render, test_diff, report/test_browser) -----------------------

GOLD = Path(__file__).parent / "gold"
GOLD_RUN = GOLD / "run"
EVIL = "<script>alert(1)</script>"
META = {"config_files": ["configs/examples.toml"], "versions": {"rfreport": "0.1.0", "torch": "2.14.1",
                                                                 "python": "3.11.7"},
        "device": "cpu", "date": "2026-11-26T00:00:00+00:00", "seed": 0, "duration_s": 1.25,
        "argv": ["rfreport", "run", "configs/examples.toml"]}


def conv_stack(rank: int = 2) -> nn.Module:
    """Return a small deterministic conv stack of a spatial rank: stride 2, then a dilated conv (holes)."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
    torch.manual_seed(0)
    return nn.Sequential(conv(1, 2, 3, 2, 1), nn.ReLU(), conv(2, 1, 3, 1, 2, dilation=2)).eval()


def broken() -> nn.Module:
    """A factory that fails, with HTML in its message."""
    raise ValueError("layer 'head' raised <ValueError> & stopped")


OPTIONS = RunOptions(device="cpu")
SPECS = (
    ModelSpec(name="dilated", factory="rfreport.examples:dilated_net", input_shapes=((1, 3, 16, 20),),
              kwargs={"width": 4}, audit={"min_rf": 7, "max_edge_fraction": 0.25},
              erf={"samples": 4, "positions": ["center", "corners"]}),
    ModelSpec(name=EVIL, factory="tests.support:conv_stack", kwargs={"rank": 1}, input_shapes=((1, 1, 24),)),
    ModelSpec(name="volume", factory="tests.support:conv_stack", kwargs={"rank": 3},
              input_shapes=((1, 1, 6, 8, 8),)),
    ModelSpec(name="broken <b>&</b>", factory="tests.support:broken", input_shapes=((1, 3, 32, 32),)),
)


def outputs(specs, options: RunOptions = OPTIONS) -> list[runfolder.ModelOutput]:
    """Run each spec's jobs through the pipeline and package them as the run folder stores them."""
    jobs = [jobs_mod.Job(spec, shape, options) for spec in specs for shape in spec.input_shapes]
    return [runfolder.ModelOutput(pipeline.entry(job, result), result.frames, result.arrays)
            for job, result in ((job, pipeline.run_job(job)) for job in jobs)]


def example_run(path: Path) -> runfolder.Run:
    """Write the example run folder: 2-D with ERF and an audit, 1-D named like a script tag, 3-D and a failure."""
    return runfolder.write(path / "run", META, outputs(SPECS))


def assert_gold(name: str, text: str) -> None:
    """Compare text with tests/gold/<name>; write <name>.actual beside it on mismatch; update when asked."""
    gold = GOLD / name
    actual = gold.with_name(name + ".actual")
    gold.parent.mkdir(exist_ok=True)
    if os.environ.get("RFREPORT_GOLD_UPDATE"):
        gold.write_text(text, encoding="utf-8")
        actual.unlink(missing_ok=True)
        return
    if not gold.is_file() or gold.read_text(encoding="utf-8") != text:
        actual.write_text(text, encoding="utf-8")
        pytest.fail(f"{name} differs from the golden file; see {actual} (RFREPORT_GOLD_UPDATE=1 to accept)")
    actual.unlink(missing_ok=True)


# --- two edited copies of the golden run, and the CLI (test_diff, test_browser) --------------------------------------

SPEC = {"factory": "rfreport.examples:dilated_net", "kwargs": {"width": 4}, "input_shape": [1, 3, 16, 20],
        "layer": None, "output": None, "mode": "structural"}


def edited_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Copy the golden run twice; in B widen the dilated net, fail the volume model, drop the 1-D one, add one."""
    a, b = (shutil.copytree(GOLD_RUN, tmp_path / name) for name in ("a", "b"))
    for root, edit in ((a, _edit_a), (b, _edit_b)):
        document = json.loads((root / "summary.json").read_text())
        document["models"] = edit(document["models"])
        (root / "summary.json").write_text(json.dumps(document))
    return a, b


def _edit_a(models: list[dict]) -> list[dict]:
    """Record the spec of the dilated net in run A."""
    models[0]["spec"] = SPEC
    return models


def _edit_b(models: list[dict]) -> list[dict]:
    """Change the dilated net, fail the volume model, drop the 1-D model and add a failed one."""
    dilated, _one_d, volume, broken = models
    dilated.update(spec={**SPEC, "kwargs": {"width": 8}}, arch_rf_size=[15, 15], in_input_rf_size=[15, 15],
                   edge_fraction=0.95)
    dilated["findings"] = [*dilated["findings"], {"code": "unseen", "severity": "warning",
                                                  "message": "3 <b>pixels</b> are unseen"}]
    dilated["audit"] = [{**row, "passed": True} if row["rule"] == "max_edge_fraction" else row
                        for row in dilated["audit"]]
    failed_volume = {k: volume[k] for k in ("name", "slug", "input_shape", "mode", "target", "spec")} | {
        "status": "failed", "error": "RuntimeError: out of memory", "output_shape": None, "files": [],
        "findings": [], "audit": [{"rule": "status", "limit": "ok", "value": "failed", "passed": False, "note": None}]}
    newcomer = {**broken, "name": "newcomer", "slug": "newcomer-32x32"}
    return [dilated, failed_volume, broken, newcomer]


def parse_junit(path: Path) -> ET.Element:
    """Parse a JUnit file strictly (expat through minidom refuses any character XML 1.0 forbids); return its root."""
    data = path.read_bytes()
    xml.dom.minidom.parseString(data)    # raises ExpatError on a control character, where lenient readers go on
    root = ET.fromstring(data)
    assert root.tag == "testsuites", f"{path} is not a JUnit file"
    return root


def junit_files(folder: Path) -> list[Path]:
    """Return the JUnit files under a folder (XML files whose root is <testsuites>)."""
    return [p for p in folder.rglob("*.xml") if p.is_file() and b"<testsuites" in p.read_bytes()[:512]]


def invoke(*args) -> Any:
    """Invoke the CLI with string arguments."""
    return CliRunner().invoke(cli, [str(a) for a in args])


# --- small nets for whole runs (test_pipeline, test_cli) -------------------------------------------------------------

NETS = '''
from torch import nn


def tiny(channels=2, k=3):
    return nn.Sequential(nn.Conv2d(1, channels, k, padding=k // 2), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, stride=2), nn.Conv2d(channels, 1, 3, padding=2, dilation=2))


def squeeze():
    from rfreport.examples import se_net
    return se_net(in_channels=1, width=4, depth=1)


def broken():
    raise RuntimeError("no model today")
'''
TINY = [Layer("conv", (3, 3), (1, 1), (1, 1), (1, 1)), Layer("conv", (3, 3), (2, 2), (0, 0), (1, 1)),
        Layer("conv", (3, 3), (1, 1), (2, 2), (2, 2))]


# --- conv/pool stacks with closed-form answers (analysis/test_geometry, compute: test_layers, test_sweep, test_verify)

def recurrence(layers: list[Layer], axis: int) -> tuple[int, int, int]:
    """Return (RF size, stride, padding) of a stack from r += (k_eff - 1) S, P += p S, S *= s."""
    r, s, p = 1, 1, 0
    for layer in layers:
        k = layer.d[axis] * (layer.k[axis] - 1) + 1
        r, p, s = r + (k - 1) * s, p + layer.p[axis] * s, s * layer.s[axis]
    return r, s, p


@st.composite
def hole_free_stacks(draw, rank: int = 2):
    """Draw a conv/pool stack whose kernels cover their strides (no holes) and an input it accepts."""
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "max", "avg"]))
        s = tuple(draw(st.integers(1, 3)) for _ in range(rank))
        k = tuple(draw(st.integers(s_i, 4)) for s_i in s)
        # padding below the kernel: no window lies wholly in padding (an output that reads nothing)
        p = tuple(draw(st.integers(0, min(3, k_i - 1) if kind == "conv" else k_i // 2)) for k_i in k)
        layers.append(Layer(kind, k, s, p, (1,) * rank, kind != "conv" and draw(st.booleans())))
    shape = tuple(draw(st.integers(4, 24)) for _ in range(rank))
    for axis, n in enumerate(shape):
        assume(min(lengths(layers, axis, n)) >= 1)
    return layers, shape


@st.composite
def layer_stacks(draw, rank: int):
    """Draw a random Conv / MaxPool / AvgPool stack and an input size it accepts."""
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "max", "avg"]))
        k = tuple(draw(st.integers(1, 4)) for _ in range(rank))
        s = tuple(draw(st.integers(1, 3)) for _ in range(rank))
        d = tuple(draw(st.integers(1, 3)) if kind != "avg" else 1 for _ in range(rank))
        if kind == "conv":
            p = tuple(draw(st.integers(0, 3)) for _ in range(rank))
        else:
            p = tuple(draw(st.integers(0, k_i // 2)) for k_i in k)
        ceil = kind != "conv" and draw(st.booleans())
        layers.append(Layer(kind, k, s, p, d, ceil))
    shape = tuple(draw(st.integers(4, 20)) for _ in range(rank))
    for axis, n in enumerate(shape):
        assume(min(lengths(layers, axis, n)) >= 1)
    return layers, shape


def build(layers: list[Layer], channels: int = 2) -> nn.Module:
    """Build the PyTorch stack of an oracle description."""
    torch.manual_seed(0)
    return nn.Sequential(*(layer.module(channels) for layer in layers))


class ReusedReLU(nn.Module):
    """Two strided convs sharing one ReLU module: the block's output is the ReLU's second call."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(1, 1, 3, stride=2, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def reused_relu_net() -> nn.Module:
    """A model whose only block ends in a ReLU module called twice (for `layer="0"`)."""
    return nn.Sequential(ReusedReLU())


class TfSameConv(nn.Conv2d):
    """A convolution with TensorFlow's "same" padding (timm's Conv2dSame): the pad before each axis is half of
    what makes the output ceil(n / stride), so it depends on the input size n."""

    def forward(self, x):
        pads = []
        for n, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride)):
            pads += [tf_same_before(n, k, s), tf_same_total(n, k, s) - tf_same_before(n, k, s)]
        return super().forward(nn.functional.pad(x, pads))


def tf_same_total(n: int, k: int, s: int) -> int:
    """Return the padding TensorFlow's "same" adds to an axis of n cells for a kernel k and stride s."""
    return max((math.ceil(n / s) - 1) * s + k - n, 0)


def tf_same_before(n: int, k: int, s: int) -> int:
    """Return the part of it before the axis (the smaller half)."""
    return tf_same_total(n, k, s) // 2


class _Body(nn.Module):
    """A backbone returning its levels in a dict, as torchvision's IntermediateLayerGetter does."""

    def __init__(self):
        super().__init__()
        self.fine = nn.Conv2d(1, 1, 3, padding=1)
        self.coarse = nn.Conv2d(1, 1, 3, stride=2, padding=1)

    def forward(self, x):
        fine = self.fine(x)
        return {"fine": fine, "coarse": self.coarse(fine)}


class _Detector(nn.Module):
    """A model whose own output is a list of scores, its backbone's levels reachable by layer and key only."""

    def __init__(self):
        super().__init__()
        self.body = _Body()

    def forward(self, x):
        return [level.mean() for level in self.body(x).values()]


def detector() -> nn.Module:
    """A _Detector: analyse `--layer body --output coarse` (a 3x3 stride-1 then a 3x3 stride-2 convolution)."""
    return _Detector()


def pixel_shuffled() -> nn.Module:
    """A 3x3 convolution between a pixel unshuffle and a pixel shuffle: output rows 2i and 2i + 1 share one RF,
    which moves 0, 2, 0, 2 input pixels a step (no stride)."""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4, 4, 3, padding=1), nn.PixelShuffle(2))


def upsampled() -> nn.Module:
    """A valid 3x3 stride-2 convolution, then a nearest upsampling by 2: two output cells to each RF."""
    return nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.Upsample(scale_factor=2, mode="nearest"))


def tf_same_conv() -> nn.Module:
    """One 5x5 stride-2 convolution with TensorFlow's "same" padding."""
    return TfSameConv(1, 1, 5, stride=2)


def tf_same_chain() -> nn.Module:
    """A stride-2 convolution with fixed padding, then two 5x5 stride-2 convolutions with TensorFlow's "same"."""
    return nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), TfSameConv(1, 1, 5, stride=2),
                         TfSameConv(1, 1, 5, stride=2))


def tf_same_geometry(n: int) -> list[tuple[int, int, int]]:
    """Return (RF size, stride, padding) of every layer of tf_same_chain on an axis of n input cells, by the
    recurrences with each layer's padding at the size of the map it reads."""
    rows, rf, stride, padding = [], 1, 1, 0
    for k, s, before in ((3, 2, lambda m: 1), (5, 2, lambda m: tf_same_before(m, 5, 2)),
                         (5, 2, lambda m: tf_same_before(m, 5, 2))):
        padding += before(n) * stride
        rf += (k - 1) * stride
        stride *= s
        n = math.ceil(n / s)
        rows.append((rf, stride, padding))
    return rows


def aspp_branch(dilation: int = 6) -> nn.Module:
    """A 3x3 convolution, then an ASPP-like 3x3 branch of a large dilation: on a grid of at most `dilation` cells
    its outer taps lie in padding at every position, so every window looks like a 1 x 1 kernel's."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=dilation, dilation=dilation))
