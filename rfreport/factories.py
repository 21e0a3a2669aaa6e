"""Model factories: import the callable a config names (`package.module:callable` or `path/to/file.py:callable`).

Torch-free, so the config validates factories without the compute stage; calling the factory
(building the model) is the compute stage's job (`rfreport.compute.models.build`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from rfreport.errors import PASS_THROUGH, ModelLoadError, one_line


def _import_file(path: Path) -> ModuleType:
    """Import a Python file as a module once per process, under a name derived from its path."""
    name = "_rfreport_factory_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise ModelLoadError(f"factory file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {str(path)!r} (not a Python source file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except PASS_THROUGH:
        del sys.modules[name]
        raise
    except BaseException as exc:  # the user's file may raise anything while it is imported, sys.exit() included
        del sys.modules[name]
        raise ModelLoadError(f"cannot import {str(path)!r} ({one_line(exc)}){_sibling_hint(exc, path)}") from exc
    return module


def _sibling_hint(exc: BaseException, path: Path) -> str:
    """Say how to reach a module that lies beside a factory file, when importing it by name is what failed.

    A file named by path is not a script: its folder is not on the import path (putting it there would let two
    configs' `blocks.py` in different folders shadow each other unseen in one process).
    """
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    root = (missing or "").partition(".")[0]
    if not root or not ((path.parent / f"{root}.py").is_file() or (path.parent / root).is_dir()):
        return ""
    return (f"; {root!r} lies beside it, but a factory file's folder is not on the import path: set "
            f"PYTHONPATH={path.parent} or name the factory as a module (package.module:callable)")


def _import_module(name: str) -> ModuleType:
    """Import a module by dotted name."""
    try:
        return importlib.import_module(name)
    except PASS_THROUGH:
        raise
    except BaseException as exc:  # a module may fail on import with anything, not only ImportError (sys.exit too)
        raise ModelLoadError(f"cannot import module {name!r} ({one_line(exc)})") from exc


def import_factory(factory: str) -> Callable[..., Any]:
    """Import the callable named by `package.module:callable` or `path/to/file.py:callable`, without calling it."""
    target, _, attr = factory.rpartition(":")
    if not target or not attr:
        raise ModelLoadError(f"factory {factory!r} must be 'package.module:callable' or 'path/to/file.py:callable'")
    obj: Any = _import_file(Path(target).resolve()) if target.endswith(".py") else _import_module(target)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"{target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"{factory} is a {type(obj).__name__}, not a callable")
    return obj
