"""JSON Patch (RFC 6902) and JSON Pointer (RFC 6901), under both implementations.

Every case runs against the pure-Python reference and the compiled twin, imported directly (not through the
``aobd._fast`` chooser); a differential property test then feeds both the same random documents and patches,
valid and broken, and requires the same result or the same error (class, op index, path and message).
Without a built extension the compiled cases skip, unless ``AOBD_IMPL=c`` demands it: then they fail.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Sequence
from types import MappingProxyType, ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aobd._fast import _py_jsonpatch
from aobd.errors import PatchError, PointerError
from tests.conftest import compiled_twin


@pytest.fixture(params=["python", "c"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return _py_jsonpatch if request.param == "python" else compiled_twin("jsonpatch")


def typed(value: Any) -> Any:
    """``value`` with every scalar tagged by its exact type, so that ``==`` is typed JSON equality."""
    if type(value) is dict:
        return {key: typed(item) for key, item in value.items()}
    if type(value) is list:
        return [typed(item) for item in value]
    return (type(value).__name__, value)


def fails(impl: ModuleType, doc: Any, ops: Any) -> PatchError:
    """The PatchError ``apply_patch`` raises; the input must come out of it untouched."""
    # JSON text is a typed snapshot (1, 1.0 and true differ) that copes with MAX_DEPTH nesting, which
    # copy.deepcopy's Python recursion does not.
    before = json.dumps(doc)
    with pytest.raises(PatchError) as info:
        impl.apply_patch(doc, ops)
    assert json.dumps(doc) == before
    return info.value


def nested(depth: int) -> Any:
    """``depth`` lists nested in one another (built without recursion)."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


WORKFLOW: dict[str, Any] = {
    "name": "w",
    "nodes": [
        {"id": "a", "type": "function", "config": {"handler": "h:a"}},
        {"id": "b", "type": "agent", "config": {"prompt": "p", "temperature": 0.5}},
        {"id": "c", "type": "join"},
    ],
    "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
    "policy": {"max_patches": 10},
}


# ---------------------------------------------------------------------------------------------------------
# JSON Pointer


@pytest.mark.parametrize(
    ("pointer", "tokens"),
    [
        ("", []),
        ("/", [""]),
        ("//", ["", ""]),
        ("/a/b", ["a", "b"]),
        ("/a~1b", ["a/b"]),
        ("/m~0n", ["m~n"]),
        ("/~01", ["~1"]),  # ~1 is decoded first: "~01" is "~" then "1", never "/"
        ("/~10", ["/0"]),
        ("/~0~1~0", ["~/~"]),
        ('/ /%/\\/"', [" ", "%", "\\", '"']),
        ("/é/日本/🙂", ["é", "日本", "🙂"]),
        ("/-/0/01", ["-", "0", "01"]),  # syntax only: what a token means depends on the container
    ],
)
def test_parse_pointer(impl: ModuleType, pointer: str, tokens: list[str]) -> None:
    assert impl.parse_pointer(pointer) == tokens


@pytest.mark.parametrize(
    ("pointer", "fragment"),
    [
        ("a", "must be empty or start with '/'"),
        ("#/a", "must be empty or start with '/'"),
        ("~1", "must be empty or start with '/'"),
        ("/~", "'~' at offset 1 must be followed by '0'"),
        ("/a~", "'~' at offset 2"),
        ("/~2", "'~' at offset 1"),
        ("/~0/~x", "'~' at offset 4"),
        ("/~01/~", "'~' at offset 5"),
    ],
)
def test_parse_pointer_rejects_bad_syntax(impl: ModuleType, pointer: str, fragment: str) -> None:
    with pytest.raises(PointerError) as info:
        impl.parse_pointer(pointer)
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"invalid JSON pointer {pointer!r}")
    assert info.value.path == pointer
    assert isinstance(info.value, PatchError)


@pytest.mark.parametrize("pointer", [None, 1, b"/a", ["a"]])
def test_parse_pointer_rejects_non_strings(impl: ModuleType, pointer: Any) -> None:
    with pytest.raises(PointerError, match="must be a string"):
        impl.parse_pointer(pointer)


def test_resolve_pointer(impl: ModuleType) -> None:
    doc = {"a": [1, {"b/c": {"~": None}}], "": {"": 2}, "0": "zero", "-": "dash"}
    assert impl.resolve_pointer(doc, "") is doc
    assert impl.resolve_pointer(doc, "/a/1/b~1c/~0") is None
    assert impl.resolve_pointer(doc, "/a/1") is doc["a"][1]  # the value itself, not a copy
    assert impl.resolve_pointer(doc, "/") == {"": 2}
    assert impl.resolve_pointer(doc, "//") == 2
    assert impl.resolve_pointer(doc, "/0") == "zero"  # "0" is a plain member name on objects
    assert impl.resolve_pointer(doc, "/-") == "dash"  # and so is "-"
    assert impl.resolve_pointer([[1, 2]], "/0/1") == 2


@pytest.mark.parametrize(
    ("pointer", "reason"),
    [
        ("/x", "no member 'x' in the object at the root"),
        (
            "/a/x",
            "'x' is not a valid index for the array at '/a'",
        ),
        ("/a/2", "index 2 out of range for array of length 2 at '/a'"),
        ("/a/-", "'-' names the end of the array at '/a', not an element"),
        ("/a/01", "leading zeros are not allowed"),
        ("/a/00", "leading zeros are not allowed"),
        ("/a/-1", "negative indices are not allowed"),
        ("/a/1e0", "an index is '0' or decimal digits without a leading zero"),
        ("/a/+1", "decimal digits"),
        ("/a/ 1", "decimal digits"),
        ("/a/1 ", "decimal digits"),
        ("/a/", "'' is not a valid index"),
        ("/a/\u0661", "decimal digits"),  # ARABIC-INDIC DIGIT ONE: str.isdigit() says yes, RFC 6901 no
        ("/a/\u00b2", "decimal digits"),  # SUPERSCRIPT TWO, likewise
        ("/a/99999999999999999999", "index 99999999999999999999 out of range for array of length 2"),
        ("/a/0/x", "cannot look up 'x' in an integer at '/a/0'"),
        ("/s/0", "cannot look up '0' in a string at '/s'"),
        ("/n/x", "cannot look up 'x' in null at '/n'"),
    ],
)
def test_resolve_pointer_failures(impl: ModuleType, pointer: str, reason: str) -> None:
    doc = {"a": [1, 2], "s": "text", "n": None}
    with pytest.raises(PointerError) as info:
        impl.resolve_pointer(doc, pointer)
    assert str(info.value).startswith(f"pointer {pointer!r} does not resolve: ")
    assert reason in str(info.value)
    assert info.value.path == pointer
    assert info.value.op_index is None


# ---------------------------------------------------------------------------------------------------------
# JSON Patch: the operations


def test_add_member_and_array_positions(impl: ModuleType) -> None:
    doc = {"a": [1, 2]}
    assert impl.apply_patch(doc, [{"op": "add", "path": "/b", "value": 3}]) == {"a": [1, 2], "b": 3}
    assert impl.apply_patch(doc, [{"op": "add", "path": "/a/0", "value": 0}]) == {"a": [0, 1, 2]}
    assert impl.apply_patch(doc, [{"op": "add", "path": "/a/1", "value": 9}]) == {"a": [1, 9, 2]}
    assert impl.apply_patch(doc, [{"op": "add", "path": "/a/2", "value": 3}]) == {"a": [1, 2, 3]}
    assert impl.apply_patch(doc, [{"op": "add", "path": "/a/-", "value": 3}]) == {"a": [1, 2, 3]}
    # "-" only means "append" on arrays; on an object it is a member name like any other.
    assert impl.apply_patch(doc, [{"op": "add", "path": "/-", "value": 3}]) == {"a": [1, 2], "-": 3}
    # An array value is inserted as one element, not spliced in.
    assert impl.apply_patch(doc, [{"op": "add", "path": "/a/-", "value": [3, 4]}]) == {"a": [1, 2, [3, 4]]}


def test_add_appends_repeatedly_and_replaces_existing_members(impl: ModuleType) -> None:
    ops = [{"op": "add", "path": "/a/-", "value": i} for i in range(3)]
    ops.append({"op": "add", "path": "/k", "value": "new"})
    assert impl.apply_patch({"a": [], "k": "old"}, ops) == {"a": [0, 1, 2], "k": "new"}


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/a/3", "index 3 out of range for array of length 2 at '/a' (0 to 2, or '-' to append)"),
        ("/a/01", "'01' is not a valid index for the array at '/a': leading zeros are not allowed"),
        ("/a/-1", "'-1' is not a valid index for the array at '/a': negative indices are not allowed"),
        ("/a/x", "'x' is not a valid index for the array at '/a': an index is '0' or decimal digits without a"),
        ("/x/y", "no member 'x' in the object at the root"),
        ("/s/y", "cannot add member 'y' to a string at '/s'"),
        ("/a/0/y", "cannot add member 'y' to an integer at '/a/0'"),
    ],
)
def test_add_failures(impl: ModuleType, path: str, reason: str) -> None:
    error = fails(impl, {"a": [1, 2], "s": "t"}, [{"op": "add", "path": path, "value": 0}])
    assert type(error) is PointerError
    assert str(error).startswith(f"op 0 (add): cannot add at path {path!r}: {reason}")
    assert (error.op_index, error.path) == (0, path)


def test_remove(impl: ModuleType) -> None:
    doc = {"a": [1, 2, 3], "b": {"c": None}}
    assert impl.apply_patch(doc, [{"op": "remove", "path": "/a/0"}]) == {"a": [2, 3], "b": {"c": None}}
    assert impl.apply_patch(doc, [{"op": "remove", "path": "/b/c"}]) == {"a": [1, 2, 3], "b": {}}
    assert impl.apply_patch(doc, [{"op": "remove", "path": "/a"}]) == {"b": {"c": None}}


def test_error_names_op_index_and_path(impl: ModuleType) -> None:
    ops = [
        {"op": "test", "path": "/name", "value": "w"},
        {"op": "add", "path": "/policy/max_spawned_nodes", "value": 3},
        {"op": "remove", "path": "/nodes/7"},
    ]
    error = fails(impl, WORKFLOW, ops)
    assert type(error) is PointerError
    assert (error.op_index, error.path) == (2, "/nodes/7")
    assert str(error) == (
        "op 2 (remove): path '/nodes/7' does not exist: index 7 out of range for array of length 3 at '/nodes'"
    )
    assert error.to_dict()["details"] == [{"op_index": 2, "path": "/nodes/7"}]


def test_remove_refuses_the_root_and_the_end_marker(impl: ModuleType) -> None:
    error = fails(impl, {"a": 1}, [{"op": "remove", "path": ""}])
    assert type(error) is PatchError
    assert (error.op_index, error.path) == (0, "")
    assert "cannot remove the whole document" in str(error)
    error = fails(impl, {"a": [1]}, [{"op": "remove", "path": "/a/-"}])
    assert "'-' names the end of the array at '/a', not an element" in str(error)


def test_replace(impl: ModuleType) -> None:
    assert impl.apply_patch({"a": [1, 2]}, [{"op": "replace", "path": "/a/1", "value": None}]) == {"a": [1, None]}
    assert impl.apply_patch({"a": 1}, [{"op": "replace", "path": "", "value": [1]}]) == [1]
    assert impl.apply_patch("scalar", [{"op": "replace", "path": "", "value": 2}]) == 2
    error = fails(impl, {"a": 1}, [{"op": "replace", "path": "/b", "value": 2}])
    assert str(error) == "op 0 (replace): path '/b' does not exist: no member 'b' in the object at the root"
    error = fails(impl, {"a": [1]}, [{"op": "replace", "path": "/a/1", "value": 2}])
    assert "index 1 out of range for array of length 1 at '/a'" in str(error)
    assert "append" not in str(error)  # the hint belongs to add only


def test_add_to_root_replaces_the_document(impl: ModuleType) -> None:
    assert impl.apply_patch({"a": 1}, [{"op": "add", "path": "", "value": {"b": 2}}]) == {"b": 2}
    assert impl.apply_patch([], [{"op": "add", "path": "", "value": "x"}]) == "x"


def test_move(impl: ModuleType) -> None:
    doc = {"foo": ["all", "grass", "cows", "eat"], "x": {"y": 1}}
    # RFC 6902 A.7: the target index is read after the removal.
    moved = impl.apply_patch(doc, [{"op": "move", "from": "/foo/1", "path": "/foo/3"}])
    assert moved["foo"] == ["all", "cows", "eat", "grass"]
    moved = impl.apply_patch(doc, [{"op": "move", "from": "/x/y", "path": "/foo/0"}])
    assert moved == {"foo": [1, "all", "grass", "cows", "eat"], "x": {}}
    moved = impl.apply_patch(doc, [{"op": "move", "from": "/x", "path": "/z"}])
    assert moved == {"foo": doc["foo"], "z": {"y": 1}}
    assert moved["z"] is doc["x"]  # a move relocates the value; it is shared with the input, never edited


def test_move_to_the_same_place_is_a_no_op_but_the_source_must_exist(impl: ModuleType) -> None:
    doc = {"a": {"b": 1}}
    assert impl.apply_patch(doc, [{"op": "move", "from": "/a", "path": "/a"}]) == doc
    assert impl.apply_patch(doc, [{"op": "move", "from": "", "path": ""}]) == doc
    error = fails(impl, doc, [{"op": "move", "from": "/x", "path": "/x"}])
    assert (error.op_index, error.path) == (0, "/x")
    assert str(error) == "op 0 (move): from '/x' does not exist: no member 'x' in the object at the root"


@pytest.mark.parametrize(("source", "path"), [("/a", "/a/b"), ("/a", "/a/b/c"), ("", "/a"), ("/l", "/l/-")])
def test_move_into_own_child_is_refused(impl: ModuleType, source: str, path: str) -> None:
    error = fails(impl, {"a": {"b": {}}, "l": []}, [{"op": "move", "from": source, "path": path}])
    assert type(error) is PatchError
    assert str(error) == f"op 0 (move): cannot move {source!r} into its own child {path!r}"
    assert (error.op_index, error.path) == (0, path)


def test_move_to_a_sibling_with_a_common_prefix_is_fine(impl: ModuleType) -> None:
    # "/ab" starts with the characters of "/a" but is not its child: prefixes compare by token.
    assert impl.apply_patch({"a": 1}, [{"op": "move", "from": "/a", "path": "/ab"}]) == {"ab": 1}


def test_move_and_copy_failures_name_the_right_pointer(impl: ModuleType) -> None:
    error = fails(impl, {"a": 1}, [{"op": "copy", "from": "/a", "path": "/x/y"}])
    assert str(error) == "op 0 (copy): cannot copy to path '/x/y': no member 'x' in the object at the root"
    assert error.path == "/x/y"
    error = fails(impl, {"a": [1]}, [{"op": "move", "from": "/a/5", "path": "/b"}])
    assert str(error).startswith("op 0 (move): from '/a/5' does not exist: index 5 out of range")
    assert error.path == "/a/5"


def test_copy_is_a_deep_copy(impl: ModuleType) -> None:
    doc = {"src": {"deep": {"list": [1, {"x": 2}]}}}
    result = impl.apply_patch(doc, [{"op": "copy", "from": "/src", "path": "/dst"}])
    assert result["dst"] == doc["src"]
    assert result["dst"] is not result["src"]
    assert result["dst"]["deep"] is not result["src"]["deep"]
    assert result["dst"]["deep"]["list"][1] is not result["src"]["deep"]["list"][1]
    result["dst"]["deep"]["list"][1]["x"] = "changed"
    assert result["src"]["deep"]["list"][1]["x"] == 2
    assert doc == {"src": {"deep": {"list": [1, {"x": 2}]}}}


def test_copy_then_edit_either_side(impl: ModuleType) -> None:
    doc = {"a": {"b": [1]}}
    ops = [
        {"op": "copy", "from": "/a", "path": "/c"},
        {"op": "add", "path": "/c/b/-", "value": 2},
        {"op": "add", "path": "/a/b/0", "value": 0},
    ]
    assert impl.apply_patch(doc, ops) == {"a": {"b": [0, 1]}, "c": {"b": [1, 2]}}
    assert doc == {"a": {"b": [1]}}


def test_copy_into_own_child_is_allowed(impl: ModuleType) -> None:
    # Unlike move, copying a value into itself is well defined: the copy is taken first.
    assert impl.apply_patch({"a": {"b": 1}}, [{"op": "copy", "from": "/a", "path": "/a/c"}]) == {
        "a": {"b": 1, "c": {"b": 1}}
    }


@pytest.mark.parametrize(
    ("actual", "expected"),
    [
        (1, True),
        (True, 1),
        (0, False),
        (1, 1.0),
        (1.0, 1),
        (None, 0),
        (None, False),
        ("1", 1),
        ("", None),
        ([1, 2], [2, 1]),
        ([1], [True]),
        ({"a": [1]}, {"a": [1.0]}),
        ({"a": {"b": True}}, {"a": {"b": 1}}),
        ({"a": 1}, {"a": 1, "b": 2}),
        ({"a": 1, "b": 2}, {"a": 1}),
        ({"a": 1}, {"b": 1}),
        ([], {}),
        ("\u00e9", "e\u0301"),  # é precomposed vs e + combining accent: no Unicode normalisation
    ],
)
def test_test_op_uses_typed_json_equality(impl: ModuleType, actual: Any, expected: Any) -> None:
    error = fails(impl, {"v": actual}, [{"op": "test", "path": "/v", "value": expected}])
    assert type(error) is PatchError
    assert (error.op_index, error.path) == (0, "/v")
    assert str(error).startswith("op 0 (test): path '/v' does not match the expected value")


@pytest.mark.parametrize(
    ("actual", "expected"),
    [
        (1, 1),
        (1.5, 1.5),
        (-0.0, 0.0),
        (True, True),
        (None, None),
        ({"a": 1, "b": [1, {"c": None}]}, {"b": [1, {"c": None}], "a": 1}),
        ([], []),
        ({}, {}),
    ],
)
def test_test_op_passes_on_equal_values(impl: ModuleType, actual: Any, expected: Any) -> None:
    doc = {"v": actual}
    assert impl.apply_patch(doc, [{"op": "test", "path": "/v", "value": expected}]) == doc


def test_test_failure_points_at_the_difference(impl: ModuleType) -> None:
    doc = {"n": {"cfg": {"retries": [1, 2, 3], "on": True}}}
    error = fails(impl, doc, [{"op": "test", "path": "/n", "value": {"cfg": {"retries": [1, 2.0, 3], "on": True}}}])
    assert str(error) == (
        "op 0 (test): path '/n' does not match the expected value at '/n/cfg/retries/1': "
        "found 2 (integer), expected 2.0 (float)"
    )
    error = fails(impl, doc, [{"op": "test", "path": "/n/cfg", "value": {"retries": [1, 2, 3]}}])
    assert str(error) == "op 0 (test): path '/n/cfg' does not match the expected value: unexpected member 'on'"
    error = fails(impl, doc, [{"op": "test", "path": "", "value": {"n": {"cfg": {"on": True}}, "m": 1}}])
    assert str(error).endswith("path '' does not match the expected value: member 'm' is missing")
    error = fails(impl, doc, [{"op": "test", "path": "", "value": {"n": {"cfg": {"on": True}}}}])
    assert str(error).endswith("value at '/n/cfg': unexpected member 'retries'")
    error = fails(impl, doc, [{"op": "test", "path": "/n/cfg/retries", "value": [1]}])
    assert str(error).endswith("found an array of length 3, expected length 1")
    error = fails(impl, {"s": "x" * 100}, [{"op": "test", "path": "/s", "value": "y"}])
    assert str(error).endswith('xxx..., expected "y"') and len(str(error)) < 200  # long values are cut short


def test_test_of_the_whole_document(impl: ModuleType) -> None:
    assert impl.apply_patch({"a": 1}, [{"op": "test", "path": "", "value": {"a": 1}}]) == {"a": 1}
    fails(impl, {"a": 1}, [{"op": "test", "path": "", "value": {"a": True}}])


# ---------------------------------------------------------------------------------------------------------
# JSON Patch: malformed patches


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ([], "op 0: an operation must be an object, got array"),
        ("add", "op 0: an operation must be an object, got string"),
        ({"path": "/a"}, "op 0: missing member 'op' (one of add, remove, replace, move, copy, test)"),
        ({"op": None, "path": "/a"}, "op 0: member 'op' must be a string, got null"),
        ({"op": "ADD", "path": "/a", "value": 1}, "op 0: unknown op 'ADD' (expected one of add, remove,"),
        ({"op": "add", "value": 1}, "op 0 (add): missing member 'path'"),
        (
            {"op": "add", "path": None, "value": 1},
            "op 0 (add): member 'path' must be a string (a JSON pointer), ",
        ),
        ({"op": "remove", "path": ["a"]}, "op 0 (remove): member 'path' must be a string (a JSON pointer), got"),
        (
            {"op": "add", "path": "a", "value": 1},
            "op 0 (add): path 'a' is not a valid JSON pointer: it must be",
        ),
        ({"op": "add", "path": "/~2", "value": 1}, "op 0 (add): path '/~2' is not a valid JSON pointer: '~' at"),
        ({"op": "add", "path": "/a"}, "op 0 (add): missing member 'value'"),
        ({"op": "replace", "path": "/a"}, "op 0 (replace): missing member 'value'"),
        ({"op": "test", "path": "/a"}, "op 0 (test): missing member 'value'"),
        ({"op": "move", "path": "/a"}, "op 0 (move): missing member 'from'"),
        ({"op": "copy", "path": "/a", "from": 1}, "op 0 (copy): member 'from' must be a string"),
        ({"op": "copy", "path": "/b", "from": "a"}, "op 0 (copy): from 'a' is not a valid JSON pointer"),
    ],
)
def test_malformed_operations(impl: ModuleType, op: Any, message: str) -> None:
    error = fails(impl, {"a": 1}, [op])
    assert str(error).startswith(message)
    assert error.op_index == 0


@pytest.mark.parametrize("ops", [{"op": "add", "path": "/a", "value": 1}, "[]", b"[]", None, 3])
def test_patch_must_be_a_sequence(impl: ModuleType, ops: Any) -> None:
    error = fails(impl, {}, ops)
    assert str(error).startswith("a patch must be an array of operations, got ")
    assert (error.op_index, error.path) == (None, None)


def test_spurious_members_are_ignored_and_null_values_are_values(impl: ModuleType) -> None:
    ops = [{"op": "add", "path": "/a", "value": None, "from": 7, "xyz": [1]}]
    assert impl.apply_patch({}, ops) == {"a": None}


def test_any_mapping_and_sequence_will_do(impl: ModuleType) -> None:
    ops = (MappingProxyType({"op": "add", "path": "/a", "value": 1}),)
    assert impl.apply_patch({}, ops) == {"a": 1}

    class Ops(Sequence[Any]):
        def __init__(self, *items: Any) -> None:
            self.items = items

        def __getitem__(self, index: Any) -> Any:
            return self.items[index]

        def __len__(self) -> int:
            return len(self.items)

    assert impl.apply_patch({}, Ops({"op": "add", "path": "/b", "value": 2})) == {"b": 2}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1, 2}, "'value' is not JSON: Python set values are not JSON"),
        ((1, 2), "'value' is not JSON: Python tuple values are not JSON"),
        (b"x", "'value' is not JSON: Python bytes values are not JSON"),
        (math.nan, "'value' is not JSON: nan is not a JSON number"),
        ({"a": [1, math.inf]}, "'value' is not JSON: inf is not a JSON number (at '/a/1' within the value)"),
        ({"a": {1: "x"}}, "'value' is not JSON: member name 1 is an integer, not a string (at '/a' within"),
        (
            {"a/b": [object()]},
            "'value' is not JSON: Python object values are not JSON (use dict, list, str, int, float, bool or "
            "None) (at '/a~1b/0' within the value)",
        ),
    ],
)
def test_values_must_be_json(impl: ModuleType, value: Any, message: str) -> None:
    for op in ("add", "replace", "test"):
        error = fails(impl, {"v": 1}, [{"op": op, "path": "/v", "value": value}])
        assert type(error) is PatchError
        assert str(error).startswith(f"op 0 ({op}): {message}")
        assert (error.op_index, error.path) == (0, "/v")


def test_nesting_is_bounded(impl: ModuleType) -> None:
    limit = impl.MAX_DEPTH
    deep = nested(limit)
    assert impl.apply_patch({}, [{"op": "add", "path": "/v", "value": deep}]) == {"v": deep}
    assert impl.apply_patch({"v": deep}, [{"op": "test", "path": "/v", "value": deep}])
    error = fails(impl, {}, [{"op": "add", "path": "/v", "value": nested(limit + 1)}])
    assert f"it nests deeper than {limit} levels" in str(error)
    # A self-referencing value is caught by the same bound instead of recursing forever.
    loop: list[Any] = []
    loop.append(loop)
    fails(impl, {}, [{"op": "add", "path": "/v", "value": loop}])
    # Copying a subtree that was already too deep is refused; moving it is fine (nothing is duplicated).
    doc = {"v": nested(limit + 1)}
    error = fails(impl, doc, [{"op": "copy", "from": "/v", "path": "/w"}])
    assert str(error) == f"op 0 (copy): from '/v' nests deeper than {limit} levels"
    assert impl.apply_patch(doc, [{"op": "move", "from": "/v", "path": "/w"}])["w"] is doc["v"]


# ---------------------------------------------------------------------------------------------------------
# JSON Patch: the input is never touched, the result is new, failures are atomic


def test_input_is_never_mutated(impl: ModuleType) -> None:
    doc = copy.deepcopy(WORKFLOW)
    before = copy.deepcopy(doc)
    inner = [doc["nodes"], doc["nodes"][1], doc["nodes"][1]["config"], doc["edges"], doc["policy"]]
    value = {"id": "d", "type": "function", "config": {"handler": "h:d"}}
    ops = [
        {"op": "add", "path": "/nodes/-", "value": value},
        {"op": "add", "path": "/nodes/3/config/ms", "value": 5},  # edits the value added just before
        {"op": "replace", "path": "/nodes/1/config/prompt", "value": "q"},
        {"op": "remove", "path": "/nodes/2"},
        {"op": "move", "from": "/edges/0", "path": "/edges/-"},
        {"op": "copy", "from": "/policy", "path": "/policy_copy"},
        {"op": "add", "path": "/policy_copy/max_patches", "value": 1},
        {"op": "test", "path": "/policy/max_patches", "value": 10},
    ]
    ops_before = copy.deepcopy(ops)
    result = impl.apply_patch(doc, ops)
    assert typed(doc) == typed(before)
    assert all(a is b for a, b in zip(inner, [doc["nodes"], doc["nodes"][1], doc["nodes"][1]["config"]]))
    assert typed(ops) == typed(ops_before)
    assert value == {"id": "d", "type": "function", "config": {"handler": "h:d"}}
    assert result["nodes"][2] == {"id": "d", "type": "function", "config": {"handler": "h:d", "ms": 5}}
    assert result["nodes"][1]["config"] == {"prompt": "q", "temperature": 0.5}
    assert result["edges"] == [{"from": "b", "to": "c"}, {"from": "a", "to": "b"}]
    assert result["policy_copy"] == {"max_patches": 1}
    assert result["policy"] == {"max_patches": 10}


def test_untouched_parts_are_shared_and_the_result_is_a_new_container(impl: ModuleType) -> None:
    doc = copy.deepcopy(WORKFLOW)
    result = impl.apply_patch(doc, [{"op": "replace", "path": "/nodes/1/config/prompt", "value": "q"}])
    assert result is not doc and result["nodes"] is not doc["nodes"]
    assert result["nodes"][1] is not doc["nodes"][1]
    assert result["nodes"][0] is doc["nodes"][0]  # copy-on-write: only the touched path is copied
    assert result["edges"] is doc["edges"]
    for ops in ([], [{"op": "test", "path": "/name", "value": "w"}]):
        same = impl.apply_patch(doc, ops)
        assert same == doc and same is not doc


def test_failures_are_atomic(impl: ModuleType) -> None:
    doc = copy.deepcopy(WORKFLOW)
    before = copy.deepcopy(doc)
    ops = [
        {"op": "add", "path": "/nodes/-", "value": {"id": "d", "type": "join"}},
        {"op": "remove", "path": "/edges/0"},
        {"op": "replace", "path": "/policy/max_patches", "value": 0},
        {"op": "test", "path": "/nodes/0/id", "value": "not-a"},
    ]
    error = fails(impl, doc, ops)
    assert (error.op_index, error.path) == (3, "/nodes/0/id")
    assert typed(doc) == typed(before)


def test_later_ops_see_earlier_ones(impl: ModuleType) -> None:
    ops = [
        {"op": "add", "path": "/a", "value": {}},
        {"op": "add", "path": "/a/b", "value": [1]},
        {"op": "copy", "from": "/a/b", "path": "/a/c"},
        {"op": "add", "path": "/a/c/-", "value": 2},
        {"op": "move", "from": "/a/c", "path": "/d"},
        {"op": "test", "path": "/d", "value": [1, 2]},
        {"op": "remove", "path": "/a/b/0"},
        {"op": "test", "path": "/a", "value": {"b": []}},
    ]
    assert impl.apply_patch({}, ops) == {"a": {"b": []}, "d": [1, 2]}


# ---------------------------------------------------------------------------------------------------------
# Differential: the twin against the reference, on random documents and patches
#
# Patches are mostly plausible (operations drawn against the document as the earlier operations left it,
# so that long patches succeed often), and about half of them carry one deliberately broken operation.

KEYS = st.sampled_from(["a", "b", "0", "1", "-", "", "a/b", "m~n", "~1", "\u00e9"])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-2, max_value=2)
    | st.sampled_from([0.0, 1.0, -0.0, 2.5, 1e300])
    | st.text(alphabet="ab~/", max_size=3)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=16,
)
TRICKY_TOKENS = ["-", "0", "01", "00", "-1", "1e0", "+1", " 1", "", "99999999999999999999", "x", "\u0661"]
BAD_POINTERS: list[Any] = ["a", "/~2", "/a~", "#/a", None, 5, ["/a"]]
NOT_JSON: list[Any] = [{1, 2}, (1,), math.nan, {"k": [math.inf]}, {1: "x"}, object()]
OP_NAMES = ["add", "remove", "replace", "move", "copy", "test"]


def escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def locations(doc: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (pointer, value) in ``doc``, the root included."""
    found = [(prefix, doc)]
    if type(doc) is dict:
        for key, item in doc.items():
            found += locations(item, f"{prefix}/{escape(key)}")
    elif type(doc) is list:
        for index, item in enumerate(doc):
            found += locations(item, f"{prefix}/{index}")
    return found


def twin(value: Any) -> Any:
    """A value equal under Python's == but not under typed JSON equality, where one exists."""
    if type(value) is bool:
        return int(value)
    if type(value) is int:
        return float(value)
    if type(value) is list and value:
        return [*value[:-1], twin(value[-1])]
    if type(value) is dict and value:
        key = next(iter(value))
        return {**value, key: twin(value[key])}
    return value


@st.composite
def plausible_operation(draw: st.DrawFn, doc: Any) -> dict[str, Any]:
    places = locations(doc)
    inner = [place for place in places if place[0]] or places
    containers = [place for place in places if type(place[1]) in (dict, list)]

    def existing() -> str:
        pointer: str = draw(st.sampled_from(inner))[0]
        return pointer

    def target() -> str:
        if not containers or draw(st.integers(0, 29)) == 0:
            return ""
        pointer, container = draw(st.sampled_from(containers))
        if type(container) is dict:
            token = draw(KEYS)
        else:
            token = draw(st.sampled_from(["-", *map(str, range(len(container) + 1))]))
        return f"{pointer}/{escape(token)}"

    name = draw(st.sampled_from(OP_NAMES))
    if name == "add":
        return {"op": name, "path": target(), "value": draw(JSON)}
    if name == "remove":
        return {"op": name, "path": existing()}
    if name == "replace":
        return {"op": name, "path": existing(), "value": draw(JSON)}
    if name == "test":
        pointer, value = draw(st.sampled_from(places))
        roll = draw(st.integers(0, 9))
        expected = copy.deepcopy(value) if roll < 7 else twin(value) if roll < 9 else draw(JSON)
        return {"op": name, "path": pointer, "value": expected}
    return {"op": name, "from": existing(), "path": target()}


@st.composite
def broken_operation(draw: st.DrawFn, doc: Any) -> Any:
    op: dict[str, Any] = draw(plausible_operation(doc))
    # Hypothesis favours the low end of a range: the subtle flaws (pointers that almost resolve) come first.
    flaw = draw(st.integers(0, 10))
    if flaw in (0, 1):
        pointer = draw(st.sampled_from(locations(doc)))[0]
        op["path" if flaw == 0 else "from"] = f"{pointer}/{escape(draw(st.sampled_from(TRICKY_TOKENS)))}"
    elif flaw == 2:
        op["op"] = draw(st.sampled_from(OP_NAMES))  # members that belong to another op
    elif flaw == 3:
        op["value"] = draw(st.sampled_from(NOT_JSON))
    elif flaw in (4, 5):
        op["path" if flaw == 4 else "from"] = draw(st.sampled_from(BAD_POINTERS))
    elif flaw == 6:
        op.pop("value", None)
        op.pop("from", None)
    elif flaw == 7:
        op.pop("path")
    elif flaw == 8:
        op["op"] = draw(st.sampled_from(["bogus", "ADD", "", None, 1]))
    elif flaw == 9:
        op.pop("op")
    else:
        return draw(st.sampled_from([[], "add", None, 1]))
    return op


@st.composite
def patches(draw: st.DrawFn, doc: Any) -> list[Any]:
    n = draw(st.integers(1, 6))
    broken_at = draw(st.integers(0, n - 1)) if draw(st.booleans()) else -1
    ops: list[Any] = []
    current = doc
    for index in range(n):
        op = draw(broken_operation(current) if index == broken_at else plausible_operation(current))
        ops.append(op)
        # Later operations are drawn against the last state that existed.
        with contextlib.suppress(PatchError):
            current = _py_jsonpatch.apply_patch(current, [op])
    return ops


def outcome(impl: ModuleType, doc: Any, patch: Any) -> tuple[Any, ...]:
    try:
        return ("ok", typed(impl.apply_patch(doc, patch)))
    except PatchError as exc:
        return ("error", type(exc).__name__, exc.op_index, exc.path, str(exc))


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_twin_matches_reference(data: st.DataObject) -> None:
    c_jsonpatch = compiled_twin("jsonpatch")
    doc = data.draw(JSON, label="doc")
    patch = data.draw(patches(doc), label="patch")
    before = json.dumps(doc)
    reference = outcome(_py_jsonpatch, doc, patch)
    assert json.dumps(doc) == before, "the reference mutated its input"
    assert outcome(c_jsonpatch, doc, patch) == reference
    assert json.dumps(doc) == before, "the twin mutated its input"


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_twin_matches_reference_on_pointers(data: st.DataObject) -> None:
    c_jsonpatch = compiled_twin("jsonpatch")
    doc = data.draw(JSON, label="doc")
    places = [pointer for pointer, _ in locations(doc)]
    pointer = data.draw(
        st.sampled_from(places)
        | st.builds(lambda p, t: f"{p}/{escape(t)}", st.sampled_from(places), st.sampled_from(TRICKY_TOKENS))
        | st.text(alphabet="/~01a-", max_size=6),
        label="pointer",
    )

    def resolved(impl: ModuleType) -> tuple[Any, ...]:
        try:
            return ("ok", impl.parse_pointer(pointer), typed(impl.resolve_pointer(doc, pointer)))
        except PointerError as exc:
            return ("error", exc.op_index, exc.path, str(exc))

    assert resolved(c_jsonpatch) == resolved(_py_jsonpatch)
