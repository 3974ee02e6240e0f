"""The API's cheap screen for bodies canonical JSON might refuse: it must flag every body the exact rule flags."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from aobd.api.app import _may_not_be_canonical

_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def exact(body: bytes) -> bool:
    """The rule as first written: 255 brackets, or a run of 19 ASCII digits."""
    return body.count(b"[") + body.count(b"{") >= 255 or _LONG_DIGITS.search(body) is not None


@given(st.binary(max_size=400))
def test_the_screen_agrees_with_the_rule_on_any_bytes(body: bytes) -> None:
    assert _may_not_be_canonical(body) == exact(body)


@given(st.lists(st.sampled_from([b"1", b"9", b"0", b"a", b"{", b"[", b" ", b"\xd9", b"\x00"]), max_size=300))
def test_the_screen_agrees_with_the_rule_near_the_thresholds(parts: list[bytes]) -> None:
    body = b"".join(parts)
    assert _may_not_be_canonical(body) == exact(body)


def test_long_integers_and_deep_nesting_are_flagged_and_ordinary_bodies_are_not() -> None:
    assert _may_not_be_canonical(b'{"x": 18446744073709551616}')
    assert _may_not_be_canonical(b"[" * 255 + b"]" * 255)
    assert not _may_not_be_canonical(b'{"x": 123456789012345678, "ref": "sha256:0123456789abcdef"}')
    arabic_indic = "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669" * 2  # not JSON numbers
    assert not _may_not_be_canonical(f'{{"x": "{arabic_indic}"}}'.encode())
