"""docs/config.md's audit rule examples, run: every rule has a model that passes it and one that fails it."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from rfreport.cli import cli
from rfreport.config import AUDIT_RULES

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def examples() -> dict[str, str]:
    """Return the TOML blocks of docs/config.md that start with `# example: RULE`, by rule."""
    blocks = re.findall(r"```toml\n(# example: (\w+)\n.*?)```", DOC.read_text(), flags=re.S)
    return {rule: text for text, rule in blocks}


def test_every_rule_has_exactly_one_example_with_a_pass_and_a_fail():
    found = examples()
    assert sorted(found) == sorted(AUDIT_RULES)
    for rule, text in found.items():
        models = tomllib.loads(text)["model"]
        assert [m["name"] for m in models] == [f"{rule}-passes", f"{rule}-fails"]
        assert all(list(m["audit"]) == [rule] for m in models)


def test_every_rule_is_listed_in_the_rules_table():
    table = DOC.read_text().split("### `[model.audit]` rules")[1].split("### Rule examples")[0]
    assert re.findall(r"^\| `(\w+)` \|", table, flags=re.M)[:len(AUDIT_RULES)] == list(AUDIT_RULES)


@pytest.mark.parametrize("rule", sorted(AUDIT_RULES))
def test_the_example_passes_and_fails_as_documented(rule, tmp_path):
    path = tmp_path / f"{rule}.toml"
    path.write_text(examples()[rule])
    done = CliRunner().invoke(cli, ["check", str(path), "--json", "-q"])
    assert done.exit_code == 1, done.output
    verdicts = {m["name"]: m for m in json.loads(done.stdout)["models"]}
    assert verdicts[f"{rule}-passes"]["passed"], verdicts[f"{rule}-passes"]
    failed = verdicts[f"{rule}-fails"]
    assert failed["status"] == "ok" and not failed["passed"], failed
    assert [row["rule"] for row in failed["audit"]] == [rule]
