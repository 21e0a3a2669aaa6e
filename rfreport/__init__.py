"""rfreport: what every output position of a convolutional network can see."""

from importlib import import_module

__version__ = "0.1.0"
# Torch-backed names load on first use, so the torch-free stages (runfolder, audit, diff, report) import
# without torch. The sweep function is `rfreport.sweep.sweep`: a lazy `rfreport.sweep` would clash with
# the submodule of the same name.
LAZY = {"NumericRF": "rfreport.compat", "SweepResult": "rfreport.sweep"}
__all__ = ["NumericRF", "SweepResult"]


def __getattr__(name: str):
    """Import a torch-backed public name on first use."""
    if name in LAZY:
        return getattr(import_module(LAZY[name]), name)
    raise AttributeError(f"module 'rfreport' has no attribute {name!r}")
