"""The run folder: what `rfreport run` leaves on disk, written atomically and read back lazily.

Layout (format 3, rfreport.summary.FORMAT; the entries are documented in docs/summary.md)::

    RUN/summary.json     {"format": 3, "run": {...}, "models": [entry, ...]}   written last
    RUN/log.txt
    RUN/index.html       (report.py)
    RUN/models/<slug>/<frame>.parquet + <frame>.csv, coverage.npy, masks.npz, erf_maps.npz

A run is assembled in a hidden sibling folder (:func:`staged`) and swapped into place only once
everything is written, under a lock on the target, so a crash never leaves a folder that looks
complete and a run killed mid-swap is restored by the next one; only a folder holding nothing but
what rfreport wrote is replaced. :func:`load` checks every entry before anything is read, so a
hostile or damaged folder is refused in one line (docs/runfolder.md). No torch.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cached_property
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rfreport import atomic, audit
from rfreport.errors import OutputError, RunFolderError, Terminated, one_line, reason
from rfreport.positions import axis_names
from rfreport.slugs import is_safe
from rfreport.summary import FORMAT, Summary, finite

logger = logging.getLogger("rfreport")

SUMMARY = "summary.json"
LOG = "log.txt"
POSITION_KEYED = ("masks", "erf_maps")
STAGING_MARK = ".tmp-"       # staging folders are `.<name>.tmp-<random>` beside the run folder
OWNER = "owner"             # in a staging folder: "<host> <pid>" of the run writing it
ASIDE = ".old"              # in a staging folder: the previous run, moved aside during the swap
REPORT = "index.html"
MODELS = "models"
STYLESHEET = "report.css"   # the report's stylesheet, in its assets folder
FILE_KINDS = ("parquet", "csv", "npy", "npz")
ENTRY_KEYS = ("name", "slug", "status", "input_shape")   # every entry holds these; `files` and `output_shape` too


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
        """Return the absolute path of a file the entry lists, or raise if it is missing or leads out of the folder."""
        path = self.root / rel
        if not path.is_file():
            raise RunFolderError(f"{self.root}: model {self.name!r} lists {rel} but the file is missing")
        if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(self.root)):
            raise RunFolderError(f"{self.root}: model {self.name!r} lists {rel}, a link out of the run folder; "
                                 "refusing to read it")
        return path

    def file(self, rel: str) -> Path:
        """Return the path of one of the files the entry lists (RunFolderError if missing or a link out)."""
        if rel not in self.entry.get("files", []):
            raise RunFolderError(f"{self.root}: model {self.name!r} does not list {rel}")
        return self._file(rel)


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


def write_model(staging: Path, output: ModelOutput) -> dict:
    """Write one model's frames (Parquet and CSV) and arrays; return its entry with `files` filled in."""
    rel_dir = Path(MODELS) / output.entry["slug"]
    folder = staging / rel_dir
    folder.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    for name, frame in output.frames.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
        frame.to_csv(folder / f"{name}.csv", index=False)
        files += [(rel_dir / f"{name}.parquet").as_posix(), (rel_dir / f"{name}.csv").as_posix()]
    for name, value in output.arrays.items():
        files.append((rel_dir / _write_array(folder, name, value)).as_posix())
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
    document = finite(json.loads(json.dumps({"format": FORMAT, "run": meta, "models": list(entries)},
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
def staged(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a folder to assemble a run in, named like `path` inside a hidden sibling; swap it into `path` on success.

    The target is locked for the whole block (:func:`rfreport.atomic.locked`: a second run into it
    fails naming the first). `path` must be missing, an empty folder or a folder holding only what
    rfreport wrote (:func:`check_replaceable`); a previous run left aside by a run killed during its
    swap is restored first, and staging folders of dead runs are removed. On any exception
    (KeyboardInterrupt included) the staging folder is removed and `path` is left as it was; an
    OSError (a full disk) becomes OutputError.
    """
    given = Path(path)
    path = check_target(given)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"{given}: cannot create the run folder there ({reason(exc)})") from exc
    with locked(path):
        recover(path)
        check_contents(given, path)
        holder = _new_holder(given, path)
        try:
            staging = holder / path.name
            staging.mkdir()
            yield staging
            with interrupt_deferred(f"the run was written to {given}"):
                _swap(staging, path, holder / ASIDE)
                _discard(holder, path)
        except OSError as exc:
            raise OutputError(f"{given}: cannot write the run ({reason(exc)}{_at(exc)}); "
                              f"{_left(path, holder / ASIDE)}") from exc
        finally:
            _discard(holder, path)


@contextmanager
def interrupt_deferred(done: str) -> Iterator[None]:
    """Hold back Ctrl-C (and SIGTERM) during the block and raise it after, saying what was `done`: while a finished
    run is swapped in and the previous one cleared away (or read back), an interrupt must neither leave the previous
    run aside nor claim that nothing was written. Outside the main thread (no handler can be set there) the block
    runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: caught.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:
        raise (Terminated if signal.SIGTERM in caught else KeyboardInterrupt)(done)


def locked(path: str | os.PathLike) -> AbstractContextManager[None]:
    """Return the lock of a run folder (any name of it): one rfreport process writes a run folder at a time."""
    return atomic.locked(Path(os.path.realpath(path)))


def _new_holder(given: Path, path: Path) -> Path:
    """Create the hidden staging folder beside `path`, with the owner file naming this process."""
    try:
        holder = Path(tempfile.mkdtemp(prefix=f".{path.name}{STAGING_MARK}", dir=path.parent))
        (holder / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{given}: cannot create the run folder there ({reason(exc)})") from exc
    return holder


def _at(exc: OSError) -> str:
    """Return ` at FILE` for an OSError that names its file, else an empty string."""
    return f" at {exc.filename}" if exc.filename else ""


def _left(path: Path, aside: Path) -> str:
    """Say where the previous run is after a failed swap."""
    if aside.is_dir() and not path.exists():
        return f"the previous run is kept in {aside} and the next run into {path} restores it"
    return "the previous run is unchanged" if path.exists() else "nothing was written"


def _swap(staging: Path, path: Path, aside: Path) -> None:
    """Rename the staging folder onto `path`, first moving an existing folder to `aside` (moved back on failure).

    A process killed between the two renames leaves the previous run in `aside` and no `path`:
    :func:`recover` moves it back before the next run into `path`.
    """
    if path.exists():
        os.replace(path, aside)
    try:
        os.replace(staging, path)
    except BaseException:
        if aside.exists():
            os.replace(aside, path)
        raise


def _discard(holder: Path, path: Path) -> None:
    """Remove a staging folder, unless it keeps the only copy of the previous run (then it is left for recover)."""
    if (holder / ASIDE).is_dir() and not path.exists():
        (holder / OWNER).unlink(missing_ok=True)   # no owner: the next run restores it
        return
    shutil.rmtree(holder, ignore_errors=True)


def recover(path: Path) -> list[Path]:
    """Restore a previous run that a killed run left aside, and remove staging folders of dead runs; return them.

    Called with `path`'s lock held, so no live process on this host is writing these folders.
    """
    removed = []
    for holder in sorted(path.parent.glob(f".{glob.escape(path.name)}{STAGING_MARK}*")):
        if not holder.is_dir() or holder.is_symlink() or _owner_alive(holder):
            continue
        if (holder / ASIDE).is_dir() and _vacant(path):
            try:
                os.replace(holder / ASIDE, path)
            except OSError as exc:
                raise OutputError(f"{path}: cannot restore the previous run from {holder / ASIDE} "
                                  f"({reason(exc)}); move it there by hand") from exc
            logger.warning("%s: restored the previous run, left aside by a run killed while replacing it", path)
        shutil.rmtree(holder, ignore_errors=True)
        removed.append(holder)
    return removed


def _vacant(path: Path) -> bool:
    """Tell whether nothing is at `path`, or only an empty folder (which a restored run may replace)."""
    if path.is_symlink() or not path.exists():
        return not path.is_symlink()
    return path.is_dir() and not any(path.iterdir())


def interrupted(path: Path) -> Path | None:
    """Return the previous run a killed run left aside in a staging folder beside a missing `path`, if any."""
    if path.exists():
        return None
    return next((holder / ASIDE for holder in path.parent.glob(f".{glob.escape(path.name)}{STAGING_MARK}*")
                 if (holder / ASIDE).is_dir() and not _owner_alive(holder)), None)


def _run_document(path: Path) -> dict | None:
    """Return the summary.json of a folder if it is an rfreport run folder's (any format version), else None."""
    try:
        document = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(document, dict) and isinstance(document.get("format"), int) and isinstance(
            document.get("models"), list):
        return document
    return None


def check_target(given: Path) -> Path:
    """Return the resolved path a run may be written to, or raise RunFolderError naming `given`.

    Refused: a link, a file, a path below a file, and the current folder or one of its parents
    (compared resolved, so a link in a parent's name does not hide them).
    """
    path = Path(os.path.abspath(given))
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise RunFolderError(f"{given}: exists and is not a folder; refusing to replace it with a run folder")
    above = next((a for a in path.parents if a.exists() or a.is_symlink()), None)
    if above is not None and not above.is_dir():
        raise RunFolderError(f"{given}: cannot create a run folder there ({above} is a file)")
    resolved, cwd = Path(os.path.realpath(path)), Path(os.path.realpath(Path.cwd()))
    if resolved == cwd or resolved in cwd.parents:
        raise RunFolderError(f"{given}: refusing to write a run over the current folder (or one above it); "
                             "choose a new or empty folder")
    return resolved


def check_contents(given: Path, path: Path) -> None:
    """Raise RunFolderError unless `path` is missing, empty, or a run folder holding only what rfreport wrote."""
    try:
        empty = not path.exists() or not any(path.iterdir())
    except OSError as exc:
        raise RunFolderError(f"{given}: cannot read the folder ({reason(exc)})") from exc
    if empty:
        return
    document = _run_document(path)
    if document is None:
        raise RunFolderError(f"{given}: not an rfreport run folder (no {SUMMARY} of a run) and not empty; "
                             "refusing to replace it: choose a new or empty folder")
    stranger = foreign(path, document)
    if stranger is not None:
        raise RunFolderError(f"{given}: holds {stranger}, which rfreport did not write; refusing to replace the "
                             "folder: move it out or choose another folder")


def check_replaceable(path: str | os.PathLike) -> Path:
    """Return `path` resolved if a run may be written there (:func:`check_target`, :func:`check_contents`)."""
    resolved = check_target(Path(path))
    check_contents(Path(path), resolved)
    return resolved


def foreign(root: Path, document: dict) -> str | None:
    """Return the first item (relative path) of a run folder that rfreport did not write, or None.

    rfreport writes summary.json, log.txt, index.html, the `files` of each entry under
    `models/<slug>/`, and a report's assets folder (report.css and `<slug>-*.png` beside it);
    a hidden `*.partial` file is a write that was interrupted. Anything else (a link to a folder,
    an empty folder of one's own) is foreign.
    """
    entries = [entry for entry in document["models"] if isinstance(entry, dict)]
    slugs = {str(entry.get("slug")) for entry in entries}
    ours = {SUMMARY, LOG, REPORT, MODELS, *(f"{MODELS}/{slug}" for slug in slugs),
            *(f for entry in entries for f in entry.get("files") or [] if isinstance(f, str))}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        here = Path(folder).relative_to(root)
        assets = STYLESHEET in files
        links = [d for d in dirs if (Path(folder) / d).is_symlink()]
        for name in sorted(files) + links:
            rel = (here / name).as_posix()
            if not (rel in ours or _interrupted_write(name) or (assets and _asset(name, slugs))):
                return rel
        if not dirs and not files and here.as_posix() not in ours:
            return f"{here.as_posix()}/"
    return None


def _interrupted_write(name: str) -> bool:
    """Tell whether a file name is that of an interrupted write (rfreport.atomic.write_file)."""
    return name.startswith(".") and name.endswith(atomic.PARTIAL)


def _asset(name: str, slugs: set[str]) -> bool:
    """Tell whether a file beside report.css is one the report wrote: the stylesheet or a model's figure."""
    return name == STYLESHEET or (name.endswith(".png") and any(name.startswith(f"{slug}-") for slug in slugs))


def _owner_alive(holder: Path) -> bool:
    """Tell whether the process that created a staging folder may still be writing it.

    No owner file: killed before writing it (staging folders are created under the target's lock),
    or left on purpose holding a previous run to restore.
    """
    try:
        host, pid = (holder / OWNER).read_text(encoding="utf-8").split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def load(path: str | os.PathLike) -> Run:
    """Read a run folder's summary.json and check its entries; frames and arrays are read lazily per model."""
    path = Path(path)
    if not path.is_dir():
        aside = interrupted(Path(os.path.abspath(path)))
        left = f" (a run was killed while replacing it: the previous run is in {aside}; the next run into it " \
               "restores it)" if aside else ""
        raise RunFolderError(f"{path}: no run folder there{left}")
    summary = path / SUMMARY
    if not summary.is_file():
        raise RunFolderError(f"{path}: incomplete run folder ({SUMMARY} is missing)")
    try:
        document = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{summary}: unreadable ({exc})") from exc
    check_format(summary, document)
    check_entries(summary, document["models"])
    models = tuple(ModelRun(path, entry) for entry in document["models"])
    for model in models:
        model.summary  # noqa: B018  (read every summary now, so a bad entry fails here, naming its key)
        for rel in model.entry.get("files", []):   # and every file it lists is there (diff reads no frame)
            model.file(rel)
    meta = document.get("run", {})
    if not isinstance(meta, dict):
        raise RunFolderError(f"{summary}: key 'run' must be an object")
    return Run(path=path, meta=meta, models=models)


def check_entries(summary: Path, entries: list) -> None:
    """Raise RunFolderError naming the file, the entry and the key unless every entry is safe to read and link.

    Checked: name, slug (a plain folder name, unique), status, input_shape and output_shape (integer
    lists), and `files`: each `models/<slug>/<plain file name>` of a known kind, so nothing read
    back can point outside the folder or become a link of another scheme.
    """
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"{summary}: model #{index + 1}"
        if not isinstance(entry, dict):
            raise RunFolderError(f"{where}: not an object")
        where += f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else ""
        problem = _entry_problem(entry) or _audit_problem(entry)
        if problem:
            raise RunFolderError(f"{where}: key {problem}")
        if entry["slug"] in seen:
            raise RunFolderError(f"{where}: key 'slug': {entry['slug']!r} is also the slug of model "
                                 f"#{seen[entry['slug']] + 1}; each model needs its own")
        seen[entry["slug"]] = index


def _entry_problem(entry: dict) -> str | None:
    """Return `'key': what is wrong, found ...` (or `'key' is missing`) for the first bad key of an entry, or None."""
    missing = next((key for key in ENTRY_KEYS if key not in entry), None)
    if missing:
        return f"{missing!r} is missing"
    slug, files = entry["slug"], entry.get("files", [])
    stray = next((f for f in files if not _listed_file(f, str(slug))), None) if isinstance(files, list) else files
    checks = (   # (key, whether it is right, what it must be, the value to show)
        ("name", isinstance(entry["name"], str), "must be a string", entry["name"]),
        ("slug", isinstance(slug, str) and is_safe(slug),
         "must be a plain folder name (letters, digits, '.', '_', '-'; no leading dot)", slug),
        ("status", entry["status"] in ("ok", "failed"), "must be ok or failed", entry["status"]),
        ("input_shape", _shape(entry["input_shape"], 3), "must be a list of at least 3 positive integers",
         entry["input_shape"]),
        ("output_shape", (entry.get("output_shape") is None and entry["status"] != "ok")
         or _shape(entry.get("output_shape"), 1), "must be a list of positive integers", entry.get("output_shape")),
        ("files", stray is None, f"must list files models/<slug>/<name>.<{'|'.join(FILE_KINDS)}> of this model",
         stray),
    )
    return next((f"{key!r}: {message}, found {_shown(value)}" for key, ok, message, value in checks if not ok), None)


def _audit_problem(entry: dict) -> str | None:
    """Return `'audit': what is wrong` when an entry's stored verdicts are not what its own rules (`spec.audit`) give
    on its own values: a verdict flipped or a row removed by hand would otherwise pass `check RUN_DIR`. Levels'
    rows are judged on their level records when the run is made and are taken as stored."""
    rules, stored = (entry.get("spec") or {}).get("audit"), entry.get("audit")
    if not isinstance(rules, dict) or not isinstance(stored, list):
        return None
    try:
        expected = [(row["rule"], row["passed"]) for row in audit.evaluate(rules, entry)]
    except (KeyError, TypeError, ValueError) as exc:
        return f"'spec.audit': rules that cannot be evaluated ({one_line(exc)})"
    given = [(row.get("rule"), row.get("passed")) for row in stored if isinstance(row, dict)
             and " (level " not in str(row.get("rule"))]
    if given == expected:
        return None
    first = next(a or b for a, b in zip_longest(expected, given) if a != b)
    return (f"'audit': the stored verdicts are not what the model's rules give on its stored values (first at "
            f"rule {first[0]!r}); the file was edited: run the configs again")


def _shown(value: Any) -> str:
    """Return a JSON value as short ASCII text for an error message."""
    text = json.dumps(value, ensure_ascii=True)
    return f"{text[:80]}..." if len(text) > 80 else text


def _shape(value: Any, least: int) -> bool:
    """Tell whether a value is a list of at least `least` positive integers (booleans are not integers)."""
    return isinstance(value, list) and len(value) >= least and all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)


def _listed_file(rel: Any, slug: str) -> bool:
    """Tell whether a `files` item is `models/<slug>/<plain name>.<kind>`: relative, inside the folder, no scheme."""
    if not isinstance(rel, str):
        return False
    parts = rel.split("/")
    return (len(parts) == 3 and parts[:2] == [MODELS, slug] and is_safe(parts[2])
            and parts[2].rsplit(".", 1)[-1] in FILE_KINDS)


def assets_folder(root: Path, rel: str | os.PathLike) -> Path:
    """Return the folder of a report's figures and stylesheet: `rel` inside the run folder `root`.

    Refused (RunFolderError): an absolute path, a path with `..`, and a path that a link leads out of `root`.
    """
    given = Path(rel)
    if given.is_absolute() or ".." in given.parts:
        raise RunFolderError(f"--assets-dir {rel}: must be a relative folder inside the run folder (no '..')")
    folder = root / given
    if not Path(os.path.realpath(folder)).is_relative_to(os.path.realpath(root)):
        raise RunFolderError(f"--assets-dir {rel}: a link leads it out of the run folder {root}; "
                             "refusing to write there")
    return folder


def check_format(summary: Path, document: Any) -> None:
    """Raise RunFolderError unless summary.json is of the format this rfreport reads (older: rerun the run)."""
    found = document.get("format") if isinstance(document, dict) else None
    if found == FORMAT and isinstance(document.get("models"), list):
        return
    if isinstance(found, int) and not isinstance(found, bool) and 0 < found < FORMAT:
        raise RunFolderError(f"{summary}: written by run folder format {found}; this rfreport reads format "
                             f"{FORMAT}: rerun it")
    raise RunFolderError(f"{summary}: unknown run folder format {found!r} (this rfreport reads {FORMAT})")
