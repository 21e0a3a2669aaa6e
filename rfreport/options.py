"""The closed vocabularies of rfreport: every string constant a config, a result or a report chooses from.

Each is a `StrEnum`, so a member is the string itself: it compares equal to its value, formats as
its value and is written to JSON as its value, so configs and run folders read and write the same
text as before. Torch-free; the config, the engine and the reports share these definitions.
"""

from __future__ import annotations

from enum import StrEnum

# How an axis's geometry (architecture RF, stride, padding) was found (geometry frame `fit`, summary `arch_rf_fit`):
# these three are exact; `estimated` (a lower bound on the size), `nonaffine` (position-dependent) and `none` are not.
EXACT_FITS = ("affine", "enlarged", "composed")
# a layers-frame row's `estimated` reason when its RF is global at every input size (after global pooling)
POOLED_LAYER = "reads through global pooling: its RF is global at every input size"


class Mode(StrEnum):
    """How a sweep measures receptive fields."""

    STRUCTURAL = "structural"   # exact: the positive linearised surrogate, batched one-hot gradients
    GRADIENT = "gradient"       # naive: gradients of the model itself (data-dependent support)


class SweepMethod(StrEnum):
    """How a structural sweep computes supports."""

    AUTO = "auto"               # compressed where the rank guard allows it, dense otherwise
    DENSE = "dense"
    COMPRESSED = "compressed"


class ExecutorKind(StrEnum):
    """Where jobs run."""

    LOCAL = "local"
    RAY = "ray"


class Distribution(StrEnum):
    """What the inputs of an ERF measurement are drawn from."""

    NORMAL = "normal"           # standard normal
    UNIFORM = "uniform"         # uniform on [-1, 1)
    IMAGES = "images"           # files of the `images` folder


class ContextKind(StrEnum):
    """How an operation gives every output position the whole input: global context."""

    POOLING = "pooling"         # a reduction or normalisation over a whole feature map (GAP, SE, group norm)
    ATTENTION = "attention"     # every token attends to every token (one group spanning the image)
    MIXING = "token mixing"     # a dense map over the token axis (MLP-Mixer, ResMLP, gMLP, a linear on flattened maps)
    SAMPLING = "sampling"       # sampling at positions computed from the input (grid_sample, deform_conv2d, RoI ops)

    @property
    def held_by_local_sweep(self) -> bool:
        """Tell whether a local sweep holds this kind constant (pooling and sampling; not attention or mixing)."""
        return self in (ContextKind.POOLING, ContextKind.SAMPLING)


class Status(StrEnum):
    """How a job ended."""

    OK = "ok"
    FAILED = "failed"


class AuditVerdict(StrEnum):
    """A model's audit as a whole: every rule passed, some failed, or there were no rules."""

    PASS = "pass"
    FAIL = "fail"
    NONE = "none"


def values(kind: type[StrEnum]) -> tuple[str, ...]:
    """Return the values of a vocabulary in definition order, e.g. for `click.Choice` or a message."""
    return tuple(member.value for member in kind)
