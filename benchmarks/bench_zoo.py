"""Benchmark: does rfreport answer the timm zoo? One line per family: answered, refused or crashed.

Every entry is the smallest variant of a timm family, built with random weights (pretrained=False:
nothing is downloaded) at the smallest square input it accepts: sizes are tried in ascending order
(SIZES), passing `img_size` to families whose constructor takes one, until a plain forward pass of
the model runs. The analysed tensor is the last level of its `features_only` backbone, or, for a
family timm builds no feature backbone of, the unpooled output of `forward_features` as a layer-free
model output (num_classes=0, global_pool=""). Each model runs through the same path as
`rfreport inspect --json` (centre position, verification on, no cache), in this process.

* answered: an inspect record came back (its `exact` flag and centre RF size are printed);
* refused: rfreport said no in one line (an RfReportError: the line is printed);
* crashed: anything else escaped (the exception is printed): the exit status is then 1.

Models that cannot be built or run at any size are `skipped` (not rfreport's doing). Not a timed
test: the sweep takes minutes on a few CPU cores. `--only NAME` (repeatable) runs some entries;
`--log FILE` also appends every line to a file.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SIZES = (32, 48, 64, 96, 112, 128, 160, 192, 224, 256)


@dataclass(frozen=True)
class Entry:
    """One zoo family: its smallest timm variant and how its analysed tensor is laid out."""

    name: str
    layout: str = "nchw"
    kwargs: dict[str, Any] = field(default_factory=dict)


ZOO = [
    Entry("resnet10t"), Entry("regnetx_002"), Entry("efficientnet_b0"), Entry("ghostnet_050"),
    Entry("convnext_atto"), Entry("convnextv2_atto"), Entry("poolformer_s12"), Entry("poolformerv2_s12"),
    Entry("mobileone_s0"), Entry("repvgg_a0"), Entry("fastvit_t8"), Entry("efficientformer_l1"),
    Entry("efficientformerv2_s0"), Entry("levit_128s"), Entry("vit_tiny_patch16_224"),
    Entry("deit_tiny_patch16_224"), Entry("swin_tiny_patch4_window7_224", "nhwc"),
    Entry("swinv2_tiny_window8_256", "nhwc"), Entry("swinv2_cr_tiny_ns_224"), Entry("maxvit_pico_rw_256"),
    Entry("coatnet_pico_rw_224"), Entry("halonet26t"), Entry("lambda_resnet26t"), Entry("botnet26t_256"),
    Entry("volo_d1_224"), Entry("xcit_nano_12_p16_224"), Entry("mixer_s32_224"), Entry("resmlp_12_224"),
    Entry("gmlp_ti16_224"), Entry("sequencer2d_s", "nhwc"), Entry("crossvit_tiny_240"), Entry("pvt_v2_b0"),
    Entry("twins_pcpvt_small"), Entry("twins_svt_small"), Entry("nest_tiny"), Entry("hrnet_w18_small"),
    Entry("dla46_c"), Entry("cs3darknet_s"), Entry("ese_vovnet19b_slim_dw"), Entry("inception_next_atto"),
    Entry("edgenext_xx_small"), Entry("focalnet_tiny_srf"), Entry("davit_tiny"), Entry("tiny_vit_5m_224"),
    Entry("mobilevit_xxs"), Entry("mobilevitv2_050"),
]


@dataclass(frozen=True)
class Built:
    """A zoo entry resolved to factory keyword arguments, an input shape and the analysed output."""

    kwargs: dict[str, Any]
    input_shape: tuple[int, ...]
    output: int | None


def build(entry: Entry) -> Built | None:
    """Find the smallest size (and the feature backbone, when timm has one) at which the model runs."""
    import timm

    for features in (True, False):
        base = {"model_name": entry.name, "pretrained": False, **entry.kwargs,
                **({"features_only": True} if features else {"num_classes": 0, "global_pool": ""})}
        for size in SIZES:
            for kwargs in ({**base, "img_size": size}, base):
                try:
                    model = timm.create_model(**kwargs).eval()
                    with torch.no_grad():
                        model(torch.zeros(1, 3, size, size))
                except Exception:  # a size or a keyword the family refuses: try the next
                    continue
                return Built(kwargs, (1, 3, size, size), -1 if features else None)
    return None


def run(entry: Entry) -> tuple[str, str]:
    """Inspect one entry in-process; return (outcome, detail)."""
    from rfreport.config import ModelSpec, RunOptions
    from rfreport.errors import RfReportError
    from rfreport.run import jobs, pipeline

    built = build(entry)
    if built is None:
        return "skipped", "timm cannot build or run it at any of the sizes tried"
    spec = ModelSpec(name=entry.name, factory="timm:create_model", input_shapes=(built.input_shape,),
                     kwargs=built.kwargs, output=built.output, positions="center", layout=entry.layout)
    job = jobs.Job(spec, built.input_shape, RunOptions(cache=False))
    size = f"{built.input_shape[2]}px{' features' if built.output is not None else ''}"
    try:
        record = pipeline.inspect(job)
    except RfReportError as exc:
        return "refused", f"{size}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    except Exception as exc:  # a crash is what this benchmark is for
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return "crashed", f"{size}: {type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"
    centre = record["positions"][0]
    return "answered", (f"{size}, output {'x'.join(map(str, record['output_shape']))}, centre RF "
                        f"{'x'.join(map(str, centre['size']))}, exact {record['exact']}")


def main() -> int:
    """Run the zoo and print one line per entry, then the counts; exit 1 when anything crashed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run only this entry (repeatable)")
    parser.add_argument("--log", default=None, help="also append every line to this file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    chosen = [e for e in ZOO if not args.only or e.name in args.only]
    counts: dict[str, int] = {}
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115 (kept open for the run)

    def say(line: str) -> None:
        print(line, flush=True)
        if log:
            log.write(line + "\n")
            log.flush()

    for entry in chosen:
        started = time.perf_counter()
        outcome, detail = run(entry)
        counts[outcome] = counts.get(outcome, 0) + 1
        say(f"{outcome:9} {entry.name:32} {time.perf_counter() - started:6.1f}s  {detail}")
    say(", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))
    return 1 if counts.get("crashed") else 0


if __name__ == "__main__":
    sys.exit(main())
