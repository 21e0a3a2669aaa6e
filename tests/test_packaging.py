"""The wheel: it ships every module of rfreport/ and the top-level templates/, and renders a report on its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import GOLD_RUN

ROOT = Path(__file__).parents[1]

RENDER = """
import sys
from pathlib import Path
import rfreport
from rfreport import runfolder
from rfreport.report import render
site, run = Path(sys.argv[1]), Path(sys.argv[2])
assert Path(rfreport.__file__).is_relative_to(site), rfreport.__file__
print(render.render(runfolder.load(run)))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the project's wheel (pip, isolated build) into a temporary folder."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, cwd=out)
    return next(out.glob("rfreport-*.whl"))


def test_wheel_holds_every_module_and_template(wheel):
    """Each .py of rfreport/ and each file of templates/ lands in the wheel at its package path."""
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rfreport").rglob("*.py")}
    templates = {f"rfreport/templates/{p.name}" for p in (ROOT / "templates").iterdir() if p.is_file()}
    assert modules - names == set()
    assert templates - names == set() and "rfreport/templates/report.js" in templates


def test_a_report_renders_from_the_wheel_alone(wheel, tmp_path):
    """Unzip the wheel and render a saved run in a process that cannot see the checkout nor its editable install."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run = shutil.copytree(GOLD_RUN, tmp_path / "run")
    # -S skips site.py, so no .pth file (the editable install's finder) runs; the dependencies' folders are given
    # by hand after the unzipped wheel, and the working directory is outside the checkout.
    dependencies = [p for p in sys.path if p.endswith("site-packages")]
    done = subprocess.run([sys.executable, "-S", "-c", RENDER, str(site), str(run)], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": ":".join([str(site), *dependencies])})
    assert done.returncode == 0, done.stderr
    page = Path(done.stdout.strip())
    assert page == run / "index.html" and "<h1>" in page.read_text()
