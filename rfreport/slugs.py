"""Run-folder names of jobs: `<model name made file-safe>-<spatial size>`, short and unique by construction.

A slug names a job's folder under `models/`, its section id in the report and its row in a diff,
so two jobs of one run must never share one (config validation refuses that) and a slug read
back from a run folder must never leave its folder (:func:`is_safe`). Pure Python.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

NAME_CHARS = 96          # longest file-safe name kept whole; longer ones are cut and get a hash of the full name
HASH_CHARS = 10          # hex digits of that hash (40 bits)
SLUG_CHARS = 160         # longest slug a run folder may hold (file names add at most ~60 characters to it)
SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")   # no separators, never `.` or `..`, never hidden


def slugify(name: str, input_shape: Sequence[int]) -> str:
    """Return `<name>-<spatial sizes joined by x>`, made safe as a folder name.

    A name longer than NAME_CHARS once made safe is cut and ends in a hash of the whole name,
    so slugs stay well below the file-name limit (255 bytes) and two long names still differ.
    """
    spatial = "x".join(str(int(n)) for n in input_shape[2:])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    if len(safe) > NAME_CHARS:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
        safe = f"{safe[:NAME_CHARS - HASH_CHARS - 1]}-{digest}"
    return f"{safe}-{spatial}"


def is_safe(slug: str) -> bool:
    """Tell whether a slug read back from a run folder is a plain, short folder name (no `/`, `..`, leading dot)."""
    return len(slug) <= SLUG_CHARS and SAFE.fullmatch(slug) is not None
