"""RFC 6902 conformance: every enabled case of the json-patch-tests suites, under both implementations.

The data is ``../shared/testdata/json-patch-tests.json`` and ``json-patch-spec_tests.json`` (RFC 6902 Appendix
A), from json-patch/json-patch-tests @ 2a928f9, Apache-2.0; see that folder's README. A case passes when the
patch gives ``expected`` under typed JSON equality (``1`` is not ``true``, ``1`` is not ``1.0``), or raises a
PatchError naming the failing operation when the case has ``error``; either way the input is left untouched.
Records marked ``disabled`` upstream are reported as skipped.

Both implementations are imported directly, not through the ``aobd._fast`` chooser. Without a built extension
the compiled cases skip, unless ``AOBD_IMPL=c`` demands it: then they fail.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from aobd._fast import _py_jsonpatch
from aobd.errors import PatchError
from tests.conftest import compiled_twin

TESTDATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata"
# Record counts from the testdata README: a shorter file would otherwise just mean fewer tests.
SUITES = {"json-patch-tests.json": (95, 3), "json-patch-spec_tests.json": (17, 1)}


@pytest.fixture(params=["python", "c"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return _py_jsonpatch if request.param == "python" else compiled_twin("jsonpatch")


def load(suite: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads((TESTDATA / suite).read_text(encoding="utf-8"))
    return records


def cases() -> list[Any]:
    params = []
    for suite in SUITES:
        for index, record in enumerate(load(suite)):
            name = f"{suite.removesuffix('.json')}:{index}"
            marks = []
            if record.get("disabled"):
                why = record.get("comment") or record.get("error") or "no comment"
                marks.append(pytest.mark.skip(reason=f"disabled upstream: {why}"))
            params.append(pytest.param(record, id=name, marks=marks))
    return params


def typed(value: Any) -> Any:
    """``value`` with every scalar tagged by its exact type, so that ``==`` is typed JSON equality."""
    if type(value) is dict:
        return {key: typed(item) for key, item in value.items()}
    if type(value) is list:
        return [typed(item) for item in value]
    return (type(value).__name__, value)


def test_suites_are_complete() -> None:
    for suite, (total, disabled) in SUITES.items():
        records = load(suite)
        assert len(records) == total, suite
        assert sum(1 for r in records if r.get("disabled")) == disabled, suite


@pytest.mark.parametrize("record", cases())
def test_case(impl: ModuleType, record: dict[str, Any]) -> None:
    doc_before = copy.deepcopy(record["doc"])
    patch_before = copy.deepcopy(record["patch"])
    if "error" in record:
        with pytest.raises(PatchError) as info:
            impl.apply_patch(record["doc"], record["patch"])
        # Every upstream error case is about one operation: the error must say which.
        assert isinstance(info.value.op_index, int), str(info.value)
        assert 0 <= info.value.op_index < len(record["patch"])
        assert str(info.value).startswith(f"op {info.value.op_index}")
    else:
        result = impl.apply_patch(record["doc"], record["patch"])
        if "expected" in record:
            assert typed(result) == typed(record["expected"])
    assert typed(record["doc"]) == typed(doc_before), "the input document was mutated"
    assert typed(record["patch"]) == typed(patch_before), "the patch was mutated"
