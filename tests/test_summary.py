"""The Summary contract: exact JSON round trips, the one reader's checks, and old run folders refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from rfreport import audit, diff, runfolder, summary
from rfreport.cli import cli
from rfreport.errors import RunFolderError
from rfreport.options import Distribution, values
from rfreport.summary import FORMAT, Summary

GOLD_RUN = Path(__file__).parent / "gold" / "run"
FINITE = st.floats(allow_nan=False, allow_infinity=False)
JSON_LEAF = st.none() | st.booleans() | st.integers() | FINITE | st.text(max_size=8)
JSON_RECORD = st.dictionaries(st.text(max_size=6), st.recursive(
    JSON_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8), max_size=4)


def value_of(kind: str) -> st.SearchStrategy:
    """Return JSON values of a documented kind (the `type` column of docs/summary.md)."""
    if kind.endswith(" or null"):
        return st.none() | value_of(kind.removesuffix(" or null"))
    if kind.startswith("list of "):
        return st.lists(value_of(kind.removeprefix("list of ").removesuffix(", one per axis")), max_size=3)
    if kind.startswith("object {lo, hi}"):
        return st.builds(lambda lo, hi: {"lo": lo, "hi": hi}, st.lists(st.integers(), max_size=3),
                         st.lists(st.integers(), max_size=3))
    leaves = {"integer": st.integers(), "number": FINITE, "boolean": st.booleans(), "string": st.text(max_size=8),
              "object": JSON_RECORD}
    return leaves[kind]


def rows(erf: bool, pyramid: bool) -> list[tuple[str, str, str]]:
    """Return the documented (key, type, meaning) rows of a summary with or without its optional groups."""
    skip = set() if erf else {k for k in summary.json_keys() if k.startswith("erf_")}
    skip |= set() if pyramid else {"levels", "anchors_fit", "anchor_min_share"}
    return [row for row in summary.rows() if row[0] not in skip]


@st.composite
def entries(draw) -> dict:
    """Draw a summary.json entry: every documented key with a value of its kind, optional groups or not."""
    erf, pyramid = draw(st.booleans()), draw(st.booleans())
    entry = {"name": draw(st.text(max_size=8)), "status": "ok"}
    for key, kind, _ in rows(erf, pyramid):
        if key == "levels":
            strategy = st.lists(st.fixed_dictionaries({k: value_of(t) for k, t, _ in summary.rows(summary.Level)}),
                                max_size=2)
        elif key == "erf_distribution":
            strategy = st.sampled_from(values(Distribution))
        else:
            strategy = value_of(kind)
        entry[key] = draw(strategy)
    return entry


@settings(max_examples=200, deadline=None)
@given(entries())
def test_summary_json_summary_round_trip_is_exact(entry):
    first = Summary.from_json(entry)
    text = json.dumps(first.to_json(), allow_nan=False)
    assert Summary.from_json(json.loads(text)) == first
    assert json.loads(text) == first.to_json()
    assert (first.erf is None) == ("erf_samples" not in entry) and (first.pyramid is None) == ("levels" not in entry)


def test_pinned_run_entries_read_back_to_the_same_json():
    for model in runfolder.load(GOLD_RUN).models:
        if model.ok:
            written = model.summary.to_json()
            assert written == {k: model.entry[k] for k in written}
            assert [k for k in model.entry if k in set(summary.json_keys())] == list(written)   # same keys, same order
        else:
            assert model.summary is None


def test_an_undeclared_value_is_refused_when_built():
    entry = runfolder.load(GOLD_RUN).models[0].entry
    values = {k: entry[k] for k in summary.json_keys() if k in entry}
    assert summary.build(Summary, values) == Summary.from_json(entry)
    with pytest.raises(ValueError, match=r"unknown key.*'new_figure'"):
        summary.build(Summary, values | {"new_figure": 1})


def test_typed_fields():
    dilated = runfolder.load(GOLD_RUN).models[0].summary
    assert dilated.arch_rf_size == (13, 13) and dilated.stride == (1.0, 1.0) and dilated.global_context is False
    assert dilated.valid_region == summary.ValidRegion(lo=(6, 6), hi=(9, 13))
    assert dilated.erf.distribution is Distribution.NORMAL and dilated.erf.rf_size == (13, 13)
    assert dilated.pyramid is None and dilated.exact


@pytest.mark.parametrize(("edit", "message"), [
    (lambda e: e.pop("min_fill"), "key 'min_fill' is missing"),
    (lambda e: e.update(arch_rf_size="13"), "key 'arch_rf_size': expected a list, found '13'"),
    (lambda e: e.update(positions=True), "key 'positions': expected integer, found True"),
    (lambda e: e.update(valid_region={"lo": [1]}), "key 'valid_region': expected an object {lo, hi}"),
    (lambda e: e.update(erf_distribution="gaussian"), "key 'erf_distribution': 'gaussian' is not a valid"),
])
def test_a_bad_summary_key_is_named(edit, message):
    entry = dict(runfolder.load(GOLD_RUN).models[0].entry)
    edit(entry)
    with pytest.raises(RunFolderError, match=r"^summary of model 'dilated': ") as caught:
        Summary.from_json(entry)
    assert message in str(caught.value)


def copy_run(tmp_path: Path, name: str, edit=None) -> Path:
    """Copy the pinned run folder, editing its summary.json document."""
    path = tmp_path / name
    shutil.copytree(GOLD_RUN, path)
    document = json.loads((path / runfolder.SUMMARY).read_text())
    if edit:
        edit(document)
    (path / runfolder.SUMMARY).write_text(json.dumps(document))
    return path


def test_a_damaged_entry_fails_on_load_naming_file_model_and_key(tmp_path):
    path = copy_run(tmp_path, "run", lambda d: d["models"][2].pop("holes"))
    with pytest.raises(RunFolderError) as caught:
        runfolder.load(path)
    assert str(caught.value) == f"{path / runfolder.SUMMARY}: summary of model 'volume': key 'holes' is missing"


@pytest.mark.parametrize("command", ["report", "diff", "check"])
def test_an_older_run_folder_is_refused_in_one_line(tmp_path, command):
    old = copy_run(tmp_path, "old", lambda d: d.update(format=1))
    args = {"report": ["report", old], "diff": ["diff", copy_run(tmp_path, "new"), old], "check": ["check", old]}
    done = CliRunner().invoke(cli, [str(a) for a in args[command]])
    assert done.exit_code in (1, 2) and not isinstance(done.exception, RunFolderError | KeyError | TypeError)
    lines = done.output.strip().splitlines()
    assert lines == [f"Error: {old / runfolder.SUMMARY}: written by run folder format 1; this rfreport reads "
                     f"format {FORMAT}: rerun it"]


def test_an_unknown_format_is_refused(tmp_path):
    path = copy_run(tmp_path, "run", lambda d: d.update(format=FORMAT + 1))
    with pytest.raises(RunFolderError, match=f"unknown run folder format {FORMAT + 1}"):
        runfolder.load(path)


def test_audit_rules_and_diff_fields_read_documented_keys():
    documented = set(summary.json_keys())
    entry_keys = {"status", "output_shape"}
    assert {check.key for check in audit.CHECKS.values()} <= documented
    assert set(diff.FIELDS) <= documented | entry_keys


def test_option_members_are_their_strings_in_json():
    from rfreport.options import Mode

    assert json.dumps({"mode": Mode.GRADIENT}) == '{"mode": "gradient"}' and f"{Mode.STRUCTURAL}" == "structural"
    assert values(Mode) == ("structural", "gradient")
