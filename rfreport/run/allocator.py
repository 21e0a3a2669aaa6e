"""Memory settings of a command-line process (never on import): the C allocator's thresholds, set once at its
start, and what Python's cyclic garbage collector looks at.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with fresh pages from the
kernel and hands them back on free, so a buffer allocated again and again costs a page fault and a
zeroed page each time. A float64 convolution on the CPU runs through an im2col buffer of tens to
hundreds of MiB per layer (75 MiB for a 16-channel 3x3 layer at 256x256, 231 MiB for vgg16's first
block at 224x224), and the run-time verification runs many of them: measured with one thread, the
all-positions FCN inspect of docs/benchmarks.md spends 8 CPU s in the kernel with the defaults and
under 1 s with blocks up to 256 MiB served from the heap and up to 256 MiB of free heap kept for reuse.
A library caller's process is left as it is: the thresholds are process-wide.

torch, torchvision, pandas and matplotlib load hundreds of thousands of long-lived objects (modules,
classes, functions) that end in the collector's oldest generation. Every full collection walks all of
them again (several times a run), and so do the collections of the interpreter's teardown at exit
(0.5-1 s with torch loaded), though none of them is ever garbage. The command's process and its
workers freeze what is alive once their imports are done, and again as the command exits
(`gc.freeze`: frozen objects are skipped by every collection and still freed by reference count).
A command run in-process by a caller (click's CliRunner) freezes nothing.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

M_TRIM_THRESHOLD = -1          # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20     # blocks below this come from the heap and are reused after free
TRIM_THRESHOLD = 256 << 20     # free heap kept for reuse before memory is returned to the kernel
_managed = False               # set in the command's own processes: see manage_collector


def user_chose_allocator() -> bool:
    """Tell whether the environment already sets malloc's thresholds (GLIBC_TUNABLES or MALLOC_*_)."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        name.startswith("MALLOC_") and name.endswith("_") for name in os.environ)


def reuse_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; return whether they were set.

    Nothing happens outside glibc (mallopt missing) or when the environment sets them itself.
    """
    if not sys.platform.startswith("linux") or user_chose_allocator():
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return all(mallopt(option, value) == 1 for option, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                                 (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))


def manage_collector() -> None:
    """Let freeze_loaded freeze: called where this process is the command's own (its entry point, a worker)."""
    global _managed
    _managed = True


def freeze_loaded() -> None:
    """Keep every object alive now out of the cyclic collector's walks in a managed process (see the module
    docstring): call it once the imports are done, and on the way out."""
    if _managed:
        gc.freeze()
