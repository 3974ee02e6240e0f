"""Canonical JSON and content refs: the ref is sha256 of the bytes, whether or not it was computed before."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from aobd.model import canonical
from aobd.model.canonical import canonical_json, sha256_ref, version_of


def expected(data: bytes | bytearray) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@given(st.binary(max_size=3000))
def test_a_ref_is_the_sha256_of_the_bytes_the_first_time_and_every_time_after(data: bytes) -> None:
    assert sha256_ref(data) == expected(data)
    assert sha256_ref(data) == expected(data)  # remembered when small: the same answer
    assert sha256_ref(bytearray(data)) == expected(data)


def test_the_remembered_refs_stay_bounded_and_right_past_the_bound() -> None:
    blobs = [f'{{"n":{i}}}'.encode() for i in range(canonical._RECENT_MAX * 2 + 7)]
    for blob in blobs:
        assert sha256_ref(blob) == expected(blob)
        assert len(canonical._RECENT_REFS) <= canonical._RECENT_MAX
    assert all(sha256_ref(blob) == expected(blob) for blob in blobs)
    big = b"x" * (canonical._RECENT_SIZE + 1)
    assert sha256_ref(big) == expected(big) and big not in canonical._RECENT_REFS


def test_a_version_is_the_ref_of_the_canonical_json() -> None:
    document = {"b": [1, 2], "a": {"y": 1, "x": "é"}}
    assert canonical_json(document) == '{"a":{"x":"é","y":1},"b":[1,2]}'.encode()
    assert version_of(document) == expected(canonical_json(document))
