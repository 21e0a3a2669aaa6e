"""Make invisible control characters visible before text reaches a page or a terminal.

A model name read from a config or a run folder may hold bidirectional controls (U+202A-U+202E,
U+2066-U+2069, the marks U+200E, U+200F, U+061C) that reorder what a reader sees, or C0/C1
control characters (an ANSI escape) that rewrite a terminal line. They are shown as `\\u202e`
escapes instead. Pure Python.
"""

from __future__ import annotations

import re

HIDDEN = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """Return `text` with bidi controls and control characters (tab and newline kept) written as `\\u` and four
    hex digits."""
    return HIDDEN.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
