"""The exception hierarchy: one root, one subclass per stage, converted to messages in cli.py only."""

from __future__ import annotations

GRADIENT_HINT = 'gradient mode (--mode gradient; config: mode = "gradient")'   # where structural mode cannot follow


class RfReportError(Exception):
    """Root of every error rfreport raises on purpose; its message is one line for the user."""


class ConfigError(RfReportError):
    """A config file, key or value is wrong (names the file, the model and the key)."""


class ModelLoadError(RfReportError):
    """A model factory could not be imported or called, or its checkpoint did not load."""


class SweepError(RfReportError):
    """The sweep could not run: bad input shape, a model that raises, a missing output or layer."""


class NoGradient(SweepError):
    """The analysed tensor is integer or boolean (an argmax, a mask): the model as given has no gradient there."""

    def __init__(self, what: str):
        super().__init__(f"{what} (structural mode follows what integer and boolean values are computed from)")
        self.what = what   # the sentence without the hint, for a caller that says what it needed the gradient for


class PositionError(SweepError):
    """A requested output position is malformed or outside the output grid."""


class LayoutError(SweepError):
    """An analysed tensor's rank or size cannot be read with the chosen layout."""


class RunFolderError(RfReportError):
    """A run folder is missing, incomplete, damaged, of an unknown format version, or not ours to replace."""


class OutputError(RfReportError):
    """A file or folder cannot be written (no permission, a full disk) or another run is writing it."""


class JobTimeout(BaseException):
    """A job ran past its time limit (rfreport.run.limits); its message is one line naming the model and the stage.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` in a model's code or around
    it (rfreport's own fallbacks) swallows it on its way to the job.
    """


# Raised into a model's code from outside it: they pass through every wrapper of model code untouched,
# while anything else the model's code raises (SystemExit and GeneratorExit included) is that model's failure.
class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job, `timeout`, `kill`): stops the command as Ctrl-C does, cleaning up on the way."""


PASS_THROUGH = (KeyboardInterrupt, JobTimeout)


def first_line(exc: BaseException) -> str:
    """Return the first line of an exception's message ("" when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def reason(exc: OSError) -> str:
    """Return why an operating-system call failed, e.g. `No space left on device`."""
    return exc.strerror or one_line(exc)


def one_line(exc: BaseException) -> str:
    """Return an exception as one line: our own messages as they are, others prefixed with their type."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: the code called sys.exit({exc.code!r})"
    text = first_line(exc)
    if isinstance(exc, (RfReportError, JobTimeout)):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
