"""Run-folder names of jobs: file-safe, short, and distinct for distinct long names (rfreport.slugs)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rfreport.slugs import NAME_CHARS, SLUG_CHARS, is_safe, slugify


def test_slugs_replace_unsafe_characters():
    assert slugify("resnet50", (1, 3, 224, 224)) == "resnet50-224x224"
    assert slugify("a/b c:d", (1, 1, 16)) == "a_b_c_d-16"
    assert slugify("..", (1, 1, 4, 4, 4)) == "model-4x4x4"


@given(st.text(max_size=400), st.lists(st.integers(1, 10**6), min_size=1, max_size=3))
def test_every_slug_is_a_safe_short_folder_name(name, spatial):
    slug = slugify(name, (1, 1, *spatial))
    assert is_safe(slug) and len(slug) <= SLUG_CHARS


@given(st.text(alphabet="ab", min_size=NAME_CHARS + 1, max_size=300), st.text(alphabet="ab", min_size=1, max_size=5))
def test_long_names_that_differ_only_past_the_cut_get_different_slugs(stem, tail):
    assert slugify(stem + "a" + tail, (1, 1, 8)) != slugify(stem + "b" + tail, (1, 1, 8))


def test_unsafe_slugs_read_back_are_recognised():
    assert not any(is_safe(s) for s in ("", ".", "..", "../x", "a/b", ".hidden", "x" * (SLUG_CHARS + 1), "a\\b"))
