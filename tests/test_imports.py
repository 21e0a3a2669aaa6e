"""Import costs: the command line loads heavy libraries only in the commands that need them."""

from __future__ import annotations

import json
import subprocess
import sys

RENDERING = ("matplotlib", "jinja2")
PROBE = """
import json, sys
import rfreport.cli
cli = sorted(m for m in {watched} if m in sys.modules)
import rfreport.run.pipeline, rfreport.run.executors
inspect = sorted(m for m in {watched} if m in sys.modules)
print(json.dumps({{"cli": cli, "inspect": inspect}}))
"""


def loaded_modules() -> dict[str, list[str]]:
    """Return the watched libraries loaded by `import rfreport.cli` and by inspect's imports, in a fresh process."""
    watched = (*RENDERING, "pandas", "torch")
    done = subprocess.run([sys.executable, "-c", PROBE.format(watched=watched)], capture_output=True, text=True,
                          check=True, timeout=120)
    return json.loads(done.stdout)


def test_cli_and_inspect_imports_load_no_rendering_library():
    found = loaded_modules()
    assert found["cli"] == []                                  # not even pandas or torch for `--help`
    assert not set(RENDERING) & set(found["inspect"])          # inspect computes, it never renders
