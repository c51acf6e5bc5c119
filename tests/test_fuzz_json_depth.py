"""json_depth (the limit on nesting, issue 11 class 2) against a reference
that walks the parsed value: Hypothesis builds JSON with brackets, quotes and
backslashes inside strings, where a byte scan could miscount. Fast."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.validation import json_depth

# Strings full of what could fool a scan: brackets, quotes, backslashes.
TRICKY = st.text(alphabet=st.sampled_from('[]{}"\\ a\n\u00e9\U0001f600'), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TRICKY
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY, inner, max_size=4),
    max_leaves=25,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@settings(max_examples=150, deadline=None)
@given(VALUES, st.booleans())
def test_json_depth_is_the_nesting_of_the_value(value: Any, ascii_only: bool) -> None:
    for indent in (None, 1):
        body = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
        assert json_depth(body) == depth(value)
