"""The stages after the sweep never import torch: the report can be rebuilt from a saved run anywhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = ["rfreport.analysis.frames", "rfreport.analysis.geometry", "rfreport.audit", "rfreport.diff",
              "rfreport.runfolder", "rfreport.results", "rfreport.config", "rfreport.factories",
              "rfreport.report.plots", "rfreport.report.render", "rfreport.schema", "rfreport.positions",
              "rfreport.summary", "rfreport.options"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_stage_imports_without_torch(module):
    code = f"import sys; sys.modules['torch'] = None; import {module}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]


def test_columns_doc_is_generated_from_the_schemas():
    from pathlib import Path

    from rfreport import schema

    schema.load_all()
    assert Path(__file__).parents[1].joinpath("docs", "columns.md").read_text() == schema.markdown()


def test_summary_doc_is_generated_from_the_dataclass():
    from pathlib import Path

    from rfreport import summary

    assert Path(__file__).parents[1].joinpath("docs", "summary.md").read_text() == summary.markdown()
