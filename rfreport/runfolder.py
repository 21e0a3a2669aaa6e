"""The run folder: what `rfreport run` leaves on disk, written atomically and read back lazily.

Layout (format 1)::

    RUN/summary.json     {"format": 1, "run": {...}, "models": [entry, ...]}   written last
    RUN/log.txt
    RUN/index.html       (report.py)
    RUN/models/<slug>/<frame>.parquet + <frame>.csv, coverage.npy, masks.npz, erf_maps.npz

A run is assembled in a hidden sibling folder (:func:`staged`) and renamed into place only
once everything is written, so a crash never leaves a folder that looks complete. No torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rfreport.errors import RunFolderError
from rfreport.positions import axis_names

FORMAT = 1
SUMMARY = "summary.json"
LOG = "log.txt"
POSITION_KEYED = ("masks", "erf_maps")


@dataclass(frozen=True)
class ModelOutput:
    """What the run folder stores for one model: its summary entry, its frames and its arrays."""

    entry: dict
    frames: Mapping[str, pd.DataFrame]
    arrays: Mapping[str, Any]   # "coverage": ndarray; "masks", "erf_maps": {position tuple: ndarray}


@dataclass(frozen=True)
class ModelRun:
    """One model entry of a saved run; its frames and arrays are read from disk on first use."""

    root: Path
    entry: dict

    @property
    def name(self) -> str:
        """Return the model's name."""
        return self.entry["name"]

    @property
    def slug(self) -> str:
        """Return the model's folder name, e.g. `resnet50-224x224`."""
        return self.entry["slug"]

    @property
    def status(self) -> str:
        """Return `ok` or `failed`."""
        return self.entry["status"]

    @property
    def ok(self) -> bool:
        """Return whether the model's job completed."""
        return self.entry["status"] == "ok"

    @cached_property
    def frames(self) -> dict[str, pd.DataFrame]:
        """Read every Parquet frame of this model, keyed by frame name (positions, geometry, ...)."""
        return {Path(rel).stem: pd.read_parquet(self._file(rel))
                for rel in self.entry.get("files", []) if rel.endswith(".parquet")}

    @cached_property
    def arrays(self) -> dict[str, Any]:
        """Read coverage (ndarray) and the position-keyed masks and erf_maps ({position: ndarray})."""
        arrays: dict[str, Any] = {}
        for rel in self.entry.get("files", []):
            stem, path = Path(rel).stem, self._file(rel)
            if rel.endswith(".npy"):
                arrays[stem] = np.load(path)
            elif rel.endswith(".npz"):
                with np.load(path) as archive:
                    arrays[stem] = {parse_position_key(key): archive[key] for key in archive.files}
        return arrays

    def _file(self, rel: str) -> Path:
        """Return the absolute path of a file the entry lists, or raise if it is missing."""
        path = self.root / rel
        if not path.is_file():
            raise RunFolderError(f"{self.root}: model {self.name!r} lists {rel} but the file is missing")
        return path


@dataclass(frozen=True)
class Run:
    """A saved run: its folder, the `run` metadata of summary.json and one ModelRun per entry."""

    path: Path
    meta: dict
    models: tuple[ModelRun, ...]

    def model(self, slug: str) -> ModelRun:
        """Return the model entry with this slug."""
        for model in self.models:
            if model.slug == slug:
                return model
        raise RunFolderError(f"{self.path}: no model {slug!r}")


def slugify(name: str, input_shape: Sequence[int]) -> str:
    """Return `<name>-<spatial sizes joined by x>`, made safe as a folder name."""
    spatial = "x".join(str(int(n)) for n in input_shape[2:])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return f"{safe}-{spatial}"


def position_key(position: Sequence[int]) -> str:
    """Return the npz key of an output position, e.g. `h3_w4` for (3, 4)."""
    return "_".join(f"{a}{int(i)}" for a, i in zip(axis_names(len(position)), position, strict=True))


def parse_position_key(key: str) -> tuple[int, ...]:
    """Return the output position of an npz key such as `h3_w4`."""
    match = re.fullmatch(r"[a-z](\d+)(?:_[a-z](\d+))?(?:_[a-z](\d+))?", key)
    if not match:
        raise RunFolderError(f"array key {key!r} is not a position key such as h3_w4")
    return tuple(int(g) for g in match.groups() if g is not None)


def _json_default(value: Any) -> Any:
    """Convert numpy scalars and arrays and paths for json.dump."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite(value: Any) -> Any:
    """Replace NaN and infinities by None, recursively, so summary.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_model(staging: Path, output: ModelOutput) -> dict:
    """Write one model's frames (Parquet and CSV) and arrays; return its entry with `files` filled in."""
    rel_dir = Path("models") / output.entry["slug"]
    folder = staging / rel_dir
    folder.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    for name, frame in output.frames.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
        frame.to_csv(folder / f"{name}.csv", index=False)
        files += [str(rel_dir / f"{name}.parquet"), str(rel_dir / f"{name}.csv")]
    for name, value in output.arrays.items():
        files.append(str(rel_dir / _write_array(folder, name, value)))
    return {**output.entry, "files": files}


def _write_array(folder: Path, name: str, value: Any) -> str:
    """Write an ndarray as .npy or a {position: ndarray} dict as .npz; return the file name."""
    if isinstance(value, Mapping):
        np.savez_compressed(folder / f"{name}.npz", **{position_key(pos): arr for pos, arr in value.items()})
        return f"{name}.npz"
    np.save(folder / f"{name}.npy", np.asarray(value))
    return f"{name}.npy"


def write_summary(staging: Path, meta: dict, entries: Sequence[dict]) -> None:
    """Write summary.json, the file whose presence marks a run folder as complete."""
    document = _finite(json.loads(json.dumps({"format": FORMAT, "run": meta, "models": list(entries)},
                                             default=_json_default)))
    text = json.dumps(document, indent=2, allow_nan=False)
    (staging / SUMMARY).write_text(text + "\n", encoding="utf-8")


def write(path: Path, meta: dict, outputs: Sequence[ModelOutput], log: str = "") -> Run:
    """Write a complete run folder atomically (replacing `path` if it exists) and return it loaded."""
    with staged(Path(path)) as staging:
        (staging / LOG).write_text(log, encoding="utf-8")
        write_summary(staging, meta, [write_model(staging, output) for output in outputs])
    return load(path)


@contextmanager
def staged(path: Path) -> Iterator[Path]:
    """Yield a folder to assemble a run in, named like `path` inside a hidden sibling; move it to `path` on success.

    On any exception (KeyboardInterrupt included) the staging folder is removed and an existing
    `path` is left untouched; an old run is moved aside only once the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        staging = holder / path.name
        staging.mkdir()
        yield staging
        _replace(staging, path, holder / ".old")
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _replace(staging: Path, path: Path, aside: Path) -> None:
    """Rename the staging folder onto `path`, first moving an existing folder to `aside` (restored on failure)."""
    if path.exists():
        os.replace(path, aside)
    try:
        os.replace(staging, path)
    except BaseException:
        if aside.exists():
            os.replace(aside, path)
        raise


def load(path: str | os.PathLike) -> Run:
    """Read a run folder's summary.json; frames and arrays are read lazily per model."""
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"{path}: no run folder there")
    summary = path / SUMMARY
    if not summary.is_file():
        raise RunFolderError(f"{path}: incomplete run folder ({SUMMARY} is missing)")
    try:
        document = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{summary}: unreadable ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else None
        raise RunFolderError(f"{summary}: unknown run folder format {found!r} (this rfreport reads {FORMAT})")
    models = tuple(ModelRun(path, entry) for entry in document.get("models", []))
    return Run(path=path, meta=document.get("run", {}), models=models)
