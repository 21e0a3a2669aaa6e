"""rfreport: what every output position of a convolutional network can see."""

from rfreport.sweep import SweepResult, sweep

__all__ = ["SweepResult", "sweep"]
__version__ = "0.1.0"
