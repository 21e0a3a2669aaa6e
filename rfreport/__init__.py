"""rfreport: what every output position of a convolutional network can see."""

from importlib import import_module

__version__ = "0.1.0"
# Torch-backed names load on first use, so the torch-free stages (analysis, report, runfolder, audit, diff)
# import without torch.
LAZY = {"NumericRF": "rfreport.compat", "SweepResult": "rfreport.results", "sweep": "rfreport.compute.sweep",
        "layer_growth": "rfreport.compute.layers", "effective_rf": "rfreport.compute.erf"}
__all__ = ["NumericRF", "SweepResult", "effective_rf", "layer_growth", "sweep"]


def __getattr__(name: str):
    """Import a torch-backed public name on first use."""
    if name in LAZY:
        return getattr(import_module(LAZY[name]), name)
    raise AttributeError(f"module 'rfreport' has no attribute {name!r}")
