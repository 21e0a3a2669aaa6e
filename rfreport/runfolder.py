"""The run folder: what `rfreport run` leaves on disk, written atomically and read back lazily.

Layout (format 3, rfreport.summary.FORMAT; the entries are documented in docs/summary.md)::

    RUN/summary.json     {"format": 3, "run": {...}, "models": [entry, ...]}   written last
    RUN/log.txt
    RUN/index.html       (report.py)
    RUN/models/<slug>/<frame>.parquet + <frame>.csv, coverage.npy, masks.npz, erf_maps.npz

A run is assembled in a hidden sibling folder (:func:`staged`) and renamed into place only
once everything is written, so a crash never leaves a folder that looks complete. No torch.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rfreport.errors import RunFolderError, one_line
from rfreport.positions import axis_names
from rfreport.summary import FORMAT, Summary

SUMMARY = "summary.json"
LOG = "log.txt"
POSITION_KEYED = ("masks", "erf_maps")
STAGING_MARK = ".tmp-"       # staging folders are `.<name>.tmp-<random>` beside the run folder
OWNER = "owner"             # in a staging folder: "<host> <pid>" of the run writing it
ORPHAN_AGE_S = 60           # a staging folder without an owner file older than this is a leftover


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
    def summary(self) -> Summary | None:
        """Read the entry's summary keys (None when the job failed); RunFolderError names a bad key."""
        if not self.ok:
            return None
        try:
            return Summary.from_json(self.entry)
        except RunFolderError as exc:
            raise RunFolderError(f"{self.root / SUMMARY}: {exc}") from None

    @cached_property
    def frames(self) -> dict[str, pd.DataFrame]:
        """Read every Parquet frame of this model, keyed by frame name (positions, geometry, ...)."""
        return {Path(rel).stem: self._read(rel, pd.read_parquet)
                for rel in self.entry.get("files", []) if rel.endswith(".parquet")}

    @cached_property
    def arrays(self) -> dict[str, Any]:
        """Read coverage (ndarray) and the position-keyed masks and erf_maps ({position: ndarray})."""
        arrays: dict[str, Any] = {}
        for rel in self.entry.get("files", []):
            stem = Path(rel).stem
            if rel.endswith(".npy"):
                arrays[stem] = self._read(rel, np.load)
            elif rel.endswith(".npz"):
                arrays[stem] = self._read(rel, _read_npz)
        return arrays

    def _read(self, rel: str, reader: Callable[[Path], Any]) -> Any:
        """Read a listed file with `reader`, turning any failure into one line naming the file."""
        path = self._file(rel)
        try:
            return reader(path)
        except RunFolderError:
            raise
        except Exception as exc:  # pyarrow, numpy and zipfile raise many types for a damaged file
            raise RunFolderError(f"{path}: unreadable (model {self.name!r}; {one_line(exc)}); "
                                 "rerun the model or restore the file") from exc

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


def _read_npz(path: Path) -> dict[tuple[int, ...], np.ndarray]:
    """Read a position-keyed .npz archive into {position: ndarray}."""
    with np.load(path) as archive:
        return {parse_position_key(key): archive[key] for key in archive.files}


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

    `path` must be missing, an empty folder or an rfreport run folder (:func:`check_replaceable`);
    leftover staging folders of killed runs at that location are removed first. On any exception
    (KeyboardInterrupt included) the staging folder is removed and an existing `path` is left
    untouched; an old run is moved aside only once the new one is complete.
    """
    path = check_replaceable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(path)
        holder = Path(tempfile.mkdtemp(prefix=f".{path.name}{STAGING_MARK}", dir=path.parent))
    except OSError as exc:
        raise RunFolderError(f"{path}: cannot create the run folder there ({exc.strerror or exc})") from exc
    try:
        (holder / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
        staging = holder / path.name
        staging.mkdir()
        yield staging
        _replace(staging, path, holder / ".old")
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def is_run_folder(path: Path) -> bool:
    """Tell whether a folder holds an rfreport summary.json (any format version), i.e. can be replaced."""
    try:
        document = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(document, dict) and isinstance(document.get("format"), int) and isinstance(
        document.get("models"), list)


def check_replaceable(path: str | os.PathLike) -> Path:
    """Return `path` made absolute if a run may be written there, else raise RunFolderError naming it.

    Allowed: a missing path, an empty folder, or an rfreport run folder. Refused: a file, a link,
    a folder holding anything else, and the current folder or one of its parents.
    """
    given = Path(path)
    path = Path(os.path.abspath(given))
    cwd = Path.cwd()
    if path == cwd or path in cwd.parents:
        raise RunFolderError(f"{given}: refusing to write a run over the current folder (or one above it); "
                             "choose a new or empty folder")
    above = next((a for a in path.parents if a.exists() or a.is_symlink()), None)
    if above is not None and not above.is_dir():
        raise RunFolderError(f"{given}: cannot create a run folder there ({above} is a file)")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise RunFolderError(f"{given}: exists and is not a folder; refusing to replace it with a run folder")
    try:
        empty = path.is_dir() and not any(path.iterdir())
    except OSError as exc:
        raise RunFolderError(f"{given}: cannot read the folder ({exc.strerror or exc})") from exc
    if path.is_dir() and not empty and not is_run_folder(path):
        raise RunFolderError(f"{given}: not an rfreport run folder (no {SUMMARY} of a run) and not empty; "
                             "refusing to replace it: choose a new or empty folder")
    return path


def clean_leftovers(path: Path) -> list[Path]:
    """Remove staging folders of earlier runs into `path` whose process is gone (killed runs); return them."""
    removed = []
    for holder in path.parent.glob(f".{glob.escape(path.name)}{STAGING_MARK}*"):
        if holder.is_dir() and not holder.is_symlink() and not _owner_alive(holder):
            shutil.rmtree(holder, ignore_errors=True)
            removed.append(holder)
    return removed


def _owner_alive(holder: Path) -> bool:
    """Tell whether the process that created a staging folder may still be writing it."""
    try:
        host, pid = (holder / OWNER).read_text(encoding="utf-8").split()
    except (OSError, ValueError):
        # no owner file yet: a run that is just starting, unless the folder is old
        try:
            return time.time() - holder.stat().st_mtime < ORPHAN_AGE_S
        except OSError:
            return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


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
    check_format(summary, document)
    models = tuple(ModelRun(path, entry) for entry in document.get("models", []))
    for model in models:
        model.summary  # noqa: B018  (read every summary now, so a bad entry fails here, naming its key)
    return Run(path=path, meta=document.get("run", {}), models=models)


def check_format(summary: Path, document: Any) -> None:
    """Raise RunFolderError unless summary.json is of the format this rfreport reads (older: rerun the run)."""
    found = document.get("format") if isinstance(document, dict) else None
    if found == FORMAT and isinstance(document.get("models"), list):
        return
    if isinstance(found, int) and not isinstance(found, bool) and 0 < found < FORMAT:
        raise RunFolderError(f"{summary}: written by run folder format {found}; this rfreport reads format "
                             f"{FORMAT}: rerun it")
    raise RunFolderError(f"{summary}: unknown run folder format {found!r} (this rfreport reads {FORMAT})")
