"""The house's import contract, checked on the source and at run time.

Rooms: the stage packages `analysis`, `compute`, `report` and `run`; on top `cli` (the command
line), `compat` (the seed's `NumericRF` API) and `examples` (example models); every other
top-level module (errors, positions, schema, layouts, results, factories, config, runfolder,
audit, diff, the package itself) is a *base* module. The contract:

* torch (and torchvision, timm) is imported only in compute, run, compat and examples;
  jinja2 and matplotlib only in report; ray only in run;
* dependencies point one way: base imports no stage; analysis and compute import only base;
  report imports base and analysis; run imports base, analysis and compute and loads report
  inside a function; compat imports base and compute and loads report's plots inside a function;
  cli sits on top and may load anything;
* no import cycles among module-level imports;
* no private name (`_name`) of one rfreport module is imported or read by another module,
  nor by the benchmarks; a test module takes shared helpers from tests/support.py or
  tests/oracle.py, never from another test module.

Function-level imports count too: a lazy import is allowed only where `LAZY` says so.
Imports under `if TYPE_CHECKING:` count as lazy ones. Anything else must be listed in
`EXCEPTIONS` with its reason.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = "rfreport"
STAGES = ("analysis", "compute", "report", "run")
ON_TOP = ("cli", "compat", "examples")
ROOMS = ("base", *STAGES, *ON_TOP)
TORCH = ("torch", "torchvision", "timm")
RENDERING = ("jinja2", "matplotlib", "mpl_toolkits")

# The rfreport rooms each room may import at module level (its own room always).
MAY_IMPORT: dict[str, set[str]] = {
    "base": {"base"},
    "analysis": {"base"},
    "compute": {"base"},
    "report": {"base", "analysis"},
    "run": {"base", "analysis", "compute"},
    "compat": {"base", "compute"},
    "examples": {"base"},
    "cli": set(ROOMS),
}
# ... and the ones it may load inside a function only (on first use).
LAZY: dict[str, set[str]] = {"run": {"report"}, "compat": {"report"}}
# The rooms that may import each confined third-party library, at any level.
CONFINED: dict[str, set[str]] = {**{lib: {"compute", "run", "compat", "examples"} for lib in TORCH},
                                 **{lib: {"report"} for lib in RENDERING}, "ray": {"run"}}
# (importing module, imported module or library): why the rule cannot hold there. An entry no import needs
# any more fails test_every_exception_is_still_needed, so the list only shrinks.
EXCEPTIONS: dict[tuple[str, str], str] = {}
SHARED_TEST_HELPERS = ("tests.support", "tests.oracle", "tests.conftest")


@dataclass(frozen=True)
class Import:
    """One import statement's target as the importing module sees it."""

    module: str               # the importing module
    target: str               # the imported module, absolute (`from pkg import submodule` names the submodule)
    names: tuple[str, ...]    # the names taken from it (`from target import a, b`); empty for `import target`
    line: int
    lazy: bool                # inside a function, under TYPE_CHECKING or `if __name__ == "__main__"`


def room(module: str) -> str:
    """Return the room of an rfreport module: its stage package, a module on top, or base."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in (*STAGES, *ON_TOP):
        return parts[1]
    return "base"


def _skipped_at_import(test: ast.expr) -> bool:
    """Say whether an `if` test guards code that never runs on import (TYPE_CHECKING, the script entry)."""
    text = ast.unparse(test)
    return text in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or text.replace("'", '"') == '__name__ == "__main__"'


def _eager_nodes(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Yield the import statements that run when the module is imported."""
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, ast.If) and not _skipped_at_import(stmt.test):
            yield from _eager_nodes(stmt.body + stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _eager_nodes(stmt.body + stmt.orelse + stmt.finalbody +
                                    [s for h in stmt.handlers for s in h.body])
        elif isinstance(stmt, (ast.With, ast.ClassDef)):
            yield from _eager_nodes(stmt.body)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """Return the module a `from ... import` names, resolving relative imports."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str, tree: ast.Module, modules: set[str], is_package: bool = False) -> list[Import]:
    """Return every import of a parsed module, each `from pkg import submodule` resolved to the submodule."""
    eager = {id(node) for node in _eager_nodes(tree.body)}
    found = []
    for node in ast.walk(tree):
        lazy = id(node) not in eager
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, (), node.lineno, lazy) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, is_package)
            plain = tuple(a.name for a in node.names if f"{source}.{a.name}" not in modules)
            found += [Import(module, f"{source}.{a.name}", (), node.lineno, lazy)
                      for a in node.names if f"{source}.{a.name}" in modules]
            if plain:
                found.append(Import(module, source, plain, node.lineno, lazy))
    return found


def _private(name: str) -> bool:
    """Say whether a name is private (`_x`, not a dunder)."""
    return name.startswith("_") and not name.endswith("__")


def _bound_names(tree: ast.Module) -> dict[str, str]:
    """Return the local names bound by imports from rfreport, mapped to what they name."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    bound[alias.asname or alias.name.split(".")[0]] = (alias.asname and alias.name) or PACKAGE
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE and not node.level:
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def private_uses(module: str, tree: ast.Module, modules: set[str]) -> list[str]:
    """Return the private rfreport names a module imports from, or reads on, another rfreport module."""
    found = []
    for node in imports(module, tree, modules):
        if node.target.split(".")[0] == PACKAGE and node.target != module:
            found += [f"{module}:{node.line} imports {n} from {node.target}" for n in node.names if _private(n)]
    bound = _bound_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound and bound[root.id] != module:
                found.append(f"{module}:{node.lineno} reads {ast.unparse(node)} ({root.id} is {bound[root.id]})")
    return found


def layer_violations(found: list[Import]) -> list[str]:
    """Return the imports that break the room rules or the confined libraries."""
    bad = []
    for node in found:
        here, top = room(node.module), node.target.split(".")[0]
        if (node.module, node.target) in EXCEPTIONS or (node.module, top) in EXCEPTIONS:
            continue
        if top == PACKAGE:
            there = room(node.target)
            allowed = MAY_IMPORT[here] | {here} | (LAZY.get(here, set()) if node.lazy else set())
            if there not in allowed:
                how = "lazily " if node.lazy else ""
                bad.append(f"{node.module}:{node.line} ({here}) {how}imports {node.target} ({there})")
        elif top in CONFINED and here not in CONFINED[top]:
            bad.append(f"{node.module}:{node.line} ({here}) imports {top}, allowed only in {sorted(CONFINED[top])}")
    return bad


def cycles(found: list[Import]) -> list[list[str]]:
    """Return the import cycles (strongly connected groups of 2+ modules) among module-level imports."""
    graph: dict[str, set[str]] = {}
    for node in found:
        if not node.lazy and node.target.split(".")[0] == PACKAGE and node.target != node.module:
            graph.setdefault(node.module, set()).add(node.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def cross_test_imports(module: str, tree: ast.Module) -> list[str]:
    """Return the imports a test module takes from another test module instead of the shared helpers."""
    found = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
            node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found += [f"{module}:{node.lineno} imports from {name}" for name in names
                  if name.startswith("tests.") and name not in (*SHARED_TEST_HELPERS, module)]
    return found




@dataclass(frozen=True)
class Source:
    """A parsed module of the checked code."""

    module: str
    tree: ast.Module
    is_package: bool


def sources(folder: str) -> list[Source]:
    """Parse every module under a folder of the repository, named as Python imports it."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        found.append(Source(module, ast.parse(path.read_text(), str(path)), is_package))
    return found


def check(package: list[Source], others: list[Source] = ()) -> list[str]:
    """Return every breach of the contract in the package's modules (and private reads in the others)."""
    modules = {s.module for s in package}
    found = [i for s in package for i in imports(s.module, s.tree, modules, s.is_package)]
    return [*layer_violations(found), *(" -> ".join(group) + " (cycle)" for group in cycles(found)),
            *(use for s in [*package, *others] for use in private_uses(s.module, s.tree, modules))]


def parsed(modules: Mapping[str, str]) -> list[Source]:
    """Parse source texts given by module name."""
    return [Source(name, ast.parse(text), False) for name, text in modules.items()]


# ---------------------------------------------------------------------------------------------------------------
# The contract on the real code


def test_the_package_keeps_the_import_contract():
    found = check(sources(PACKAGE), sources("benchmarks"))
    assert not found, "\n".join(["", *found])


def test_test_modules_take_shared_helpers_from_support_modules():
    found = [use for s in sources("tests") for use in cross_test_imports(s.module, s.tree)]
    assert not found, "\n".join(["", *found])


def test_every_exception_is_still_needed():
    found = [i for s in sources(PACKAGE) for i in imports(s.module, s.tree, {s.module for s in sources(PACKAGE)})]
    used = {(i.module, i.target) for i in found} | {(i.module, i.target.split(".")[0]) for i in found}
    assert set(EXCEPTIONS) <= used


def modules_in(rooms: tuple[str, ...]) -> list[str]:
    """Return the rfreport modules of the given rooms."""
    return [s.module for s in sources(PACKAGE) if room(s.module) in rooms]


IMPORT_ALL = """
import importlib, json, sys
for lib in {blocked}:
    sys.modules[lib] = None
failed = {{}}
for module in {modules}:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        failed[module] = str(exc)
print(json.dumps(failed))
"""


def import_failures(modules: list[str], blocked: tuple[str, ...]) -> dict[str, str]:
    """Import the modules in a fresh process where the blocked libraries cannot load; return the failures."""
    code = IMPORT_ALL.format(blocked=blocked, modules=modules)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                          cwd=ROOT)
    return json.loads(done.stdout)


def test_torch_free_rooms_import_without_torch_and_pure_ones_without_rendering():
    """Catches transitive imports the source check cannot see (a base module importing a torch module, say)."""
    assert import_failures(modules_in(("base", "analysis", "report")), (*TORCH, "ray")) == {}
    assert import_failures(modules_in(("base", "analysis")), (*TORCH, *RENDERING, "ray")) == {}


# ---------------------------------------------------------------------------------------------------------------
# The checker can fail: planted breaches


@pytest.mark.parametrize(("modules", "expected"), [
    ({"rfreport.analysis.bad": "import torch\n"}, "rfreport.analysis.bad:1 (analysis) imports torch"),
    ({"rfreport.analysis.bad": "def f():\n    from torch import nn\n"}, "(analysis) imports torch"),
    ({"rfreport.positions": "import matplotlib.pyplot\n"}, "(base) imports matplotlib"),
    ({"rfreport.compute.bad": "from jinja2 import Environment\n"}, "(compute) imports jinja2"),
    ({"rfreport.audit": "def f():\n    from rfreport.compute.engine import MODES\n",
      "rfreport.compute.engine": ""}, "rfreport.audit:2 (base) lazily imports rfreport.compute.engine"),
    ({"rfreport.run.pipeline": "from rfreport.report import render\n", "rfreport.report.render": ""},
     "(run) imports rfreport.report.render (report)"),
    ({"rfreport.report.render": "from rfreport.compute import sweep\n", "rfreport.compute.sweep": ""},
     "(report) imports rfreport.compute.sweep (compute)"),
    ({"rfreport.analysis.geometry": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from rfreport.compute.engine import Engine\n",
      "rfreport.compute.engine": ""}, "(analysis) lazily imports rfreport.compute.engine"),
    ({"rfreport.compute.a": "from rfreport.compute import b\n",
      "rfreport.compute.b": "from rfreport.compute.a import X\n"},
     "rfreport.compute.a -> rfreport.compute.b (cycle)"),
    ({"rfreport.compute.sweep": "from rfreport.compute.dense import _Accumulator\n",
      "rfreport.compute.dense": ""},
     "rfreport.compute.sweep:1 imports _Accumulator from rfreport.compute.dense"),
    ({"rfreport.compute.sweep": "from rfreport.compute import engine\nengine._forward_hooks()\n",
      "rfreport.compute.engine": ""}, "reads engine._forward_hooks"),
    ({"rfreport.compute.sweep": "from rfreport.compute.engine import Engine\nEngine._forward\n",
      "rfreport.compute.engine": ""}, "reads Engine._forward (Engine is rfreport.compute.engine.Engine)"),
    ({"rfreport.compute.sweep": "import rfreport.compute.engine\nrfreport.compute.engine._x\n",
      "rfreport.compute.engine": ""}, "reads rfreport.compute.engine._x"),
])
def test_the_checker_finds_a_planted_breach(modules, expected):
    found = check(parsed(modules))
    assert any(expected in line for line in found), found


def test_the_checker_finds_a_private_read_in_a_benchmark():
    bench = parsed({"bench_sweep": "from rfreport.compute.engine import Engine\nEngine._working_model(None)\n"})
    assert check(parsed({"rfreport.compute.engine": ""}), bench) == [
        "bench_sweep:2 reads Engine._working_model (Engine is rfreport.compute.engine.Engine)"]


@pytest.mark.parametrize("text", [
    "import numpy\nimport pandas\nfrom rfreport.positions import axis_names\n",
    "def f():\n    import torch\n",                                      # a lazy torch import in compute is fine
    "from rfreport import __version__\nfrom rfreport.compute import engine\nengine.MODES\nself._x = 1\n",
    "if __name__ == '__main__':\n    from rfreport.compute import sweep\n",
])
def test_the_checker_accepts_what_the_contract_allows(text):
    modules = {"rfreport.compute.sweep": text, "rfreport.compute.engine": "", "rfreport.positions": ""}
    assert check(parsed(modules)) == []


def test_the_checker_finds_a_test_importing_another_test_module():
    tree = ast.parse("from tests.test_report import GOLD_RUN\nfrom tests.support import run\nimport tests.test_cli\n")
    assert cross_test_imports("tests.test_diff", tree) == ["tests.test_diff:1 imports from tests.test_report",
                                                           "tests.test_diff:3 imports from tests.test_cli"]


def test_the_runtime_check_sees_a_transitive_torch_import():
    assert "rfreport.compute.engine" in import_failures(["rfreport.compute.engine"], TORCH)


def test_columns_doc_is_generated_from_the_schemas():
    from rfreport import schema

    schema.load_all()
    assert ROOT.joinpath("docs", "columns.md").read_text() == schema.markdown()


def test_rooms_map_modules():
    assert [room(m) for m in ("rfreport", "rfreport.config", "rfreport.compute.engine", "rfreport.cli",
                              "rfreport.report.render", "rfreport.templates")] == [
        "base", "base", "compute", "cli", "report", "base"]


def test_mapping_rules_name_known_rooms():
    rules: Mapping[str, set[str]] = {**MAY_IMPORT, **LAZY}
    assert set(rules) <= set(ROOMS) and set().union(*rules.values(), *CONFINED.values()) <= set(ROOMS)
