"""A tiny model file for config and model-loading tests: a factory given by file path."""

from torch import nn

CALLS = []


def build(channels: int = 2, kernel: int = 3) -> nn.Module:
    """Return two convolutions (RF 2 * kernel - 1 at stride 1)."""
    CALLS.append((channels, kernel))
    return nn.Sequential(nn.Conv2d(1, channels, kernel), nn.ReLU(), nn.Conv2d(channels, 1, kernel))


def broken(channels: int = 2) -> nn.Module:
    """Raise like a factory given a bad argument."""
    raise ValueError(f"channels must be even, got {channels}")


def not_a_model() -> dict:
    """Return something that is not a module."""
    return {"channels": 2}


NOT_CALLABLE = 42
