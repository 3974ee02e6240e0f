"""RFC 6902 JSON Patch and RFC 6901 JSON Pointer: the pure-Python reference.

This module is the specification. ``jsonpatch.pyx`` is its Cython twin: same names, same results, same error
messages (``tests/unit/test_jsonpatch.py`` runs both side by side on random documents and patches). Callers
import from :mod:`aobd._fast`, which picks one of the two once, at import.

What the implementation promises beyond the RFCs' text:

* Documents are plain JSON values: ``dict``, ``list``, ``str``, ``int``, ``float``, ``bool`` and ``None``.
  Containers are recognised by exact type, so a ``dict`` subclass is opaque here, as it would be to JSON.
* :func:`apply_patch` never mutates its inputs. It copies containers on write along the paths the operations
  touch and edits only those copies in place; everything else is shared with the input. "copy" duplicates
  its subtree deeply, so the result never aliases one part of itself in another.
* "test" uses typed JSON equality: ``True != 1`` and ``1 != 1.0``; object member order does not matter, array
  order does.
* Operation values must be JSON (``str`` member names, finite floats) nesting at most :data:`MAX_DEPTH`
  levels, and "copy" refuses deeper subtrees: RFC 8259 lets implementations bound nesting, and the bound keeps
  every recursive helper here (and the C stack of the twin) safe from hostile input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from aobd.errors import PatchError, PointerError

__all__ = ["MAX_DEPTH", "apply_patch", "parse_pointer", "resolve_pointer"]

#: Deepest container nesting accepted in an operation's value or in a subtree that "copy" duplicates.
#: 500 keeps the recursive helpers far below CPython's default recursion limit (1000) wherever they run.
MAX_DEPTH: Final = 500

_OPS: Final = ("add", "remove", "replace", "move", "copy", "test")
_OPS_LIST: Final = ", ".join(_OPS)
_MISSING: Final[Any] = object()
_KINDS: Final[dict[type, str]] = {
    dict: "object",
    list: "array",
    str: "string",
    int: "integer",
    float: "float",
    bool: "boolean",
    type(None): "null",
}


class _Malformed(Exception):
    """A pointer breaks RFC 6901 syntax; ``reason`` says how. Internal: callers add context and re-raise."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unresolved(Exception):
    """A pointer token names nothing; ``reason`` says which, where and why. Internal, like _Malformed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _TooDeep(Exception):
    """A subtree to duplicate nests deeper than MAX_DEPTH."""


# ---------------------------------------------------------------------------------------------------------
# RFC 6901 JSON Pointer


def parse_pointer(pointer: str) -> list[str]:
    """Split an RFC 6901 JSON Pointer into its unescaped reference tokens.

    Args:
        pointer: ``""`` (the whole document) or ``/``-separated tokens, with ``~1`` standing for ``/`` and
            ``~0`` for ``~``.

    Returns:
        The tokens: ``"/a~1b/~01"`` gives ``["a/b", "~1"]``, ``""`` gives ``[]`` and ``"/"`` gives ``[""]``.

    Raises:
        PointerError: ``pointer`` is not a string, does not start with ``/``, or has a ``~`` not followed by
            ``0`` or ``1``.
    """
    if type(pointer) is not str:
        raise PointerError(f"a JSON pointer must be a string, got {_kind(pointer)}")
    try:
        return _parse(pointer)
    except _Malformed as exc:
        raise PointerError(f"invalid JSON pointer {pointer!r}: {exc.reason}", path=pointer) from None


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """Return the value ``pointer`` names in ``doc`` (the value itself, not a copy).

    Args:
        doc: A JSON value.
        pointer: An RFC 6901 pointer. Array tokens must be ``0`` or ASCII digits without a leading zero,
            below the array's length; ``-`` names no element, so it never resolves.

    Returns:
        The value at ``pointer``; ``doc`` itself for ``""``.

    Raises:
        PointerError: the pointer is malformed or does not resolve; the message names the failing token and
            the location of the container it was looked up in.
    """
    tokens = parse_pointer(pointer)
    try:
        return _get(doc, tokens)
    except _Unresolved as exc:
        raise PointerError(f"pointer {pointer!r} does not resolve: {exc.reason}", path=pointer) from None


def _parse(pointer: str) -> list[str]:
    if not pointer:
        return []
    if pointer[0] != "/":
        raise _Malformed("it must be empty or start with '/'")
    tokens = pointer[1:].split("/")
    if "~" not in pointer:
        return tokens
    at = pointer.find("~")
    while at != -1:
        escaped = pointer[at + 1 : at + 2]
        if escaped != "0" and escaped != "1":
            raise _Malformed(f"'~' at offset {at} must be followed by '0' (for '~') or '1' (for '/')")
        at = pointer.find("~", at + 2)
    # "~1" is decoded before "~0" (RFC 6901 section 4), so "~01" becomes "~1" and not "/".
    return [token.replace("~1", "/").replace("~0", "~") for token in tokens]


def _format_pointer(tokens: Sequence[str]) -> str:
    return "".join("/" + token.replace("~", "~0").replace("/", "~1") for token in tokens)


def _at(tokens: Sequence[str], k: int) -> str:
    """Where the container looked up with ``tokens[k]`` sits, for messages."""
    return " at the root" if k == 0 else f" at {_format_pointer(tokens[:k])!r}"


def _kind(value: Any) -> str:
    """The JSON name of a value's type; "Python <type>" for what JSON cannot hold (never confused with these)."""
    return _KINDS.get(type(value)) or f"Python {type(value).__qualname__}"


def _a_kind(value: Any) -> str:
    kind = _kind(value)
    if kind == "null":
        return kind
    return ("an " if kind[0] in "aeio" else "a ") + kind


def _index(array: list[Any], tokens: Sequence[str], k: int, appending: bool) -> int:
    """The array index that ``tokens[k]`` names; ``appending`` also admits ``len(array)`` and ``-`` (add)."""
    token = tokens[k]
    n = len(array)
    if token.isdigit() and token.isascii() and (token[0] != "0" or len(token) == 1):
        # More than 18 digits cannot index a real array, and int() refuses strings over 4300 digits.
        if len(token) <= 18:
            index = int(token)
            if index < n or (appending and index == n):
                return index
        hint = f" (0 to {n}, or '-' to append)" if appending else ""
        raise _Unresolved(f"index {token} out of range for array of length {n}{_at(tokens, k)}{hint}")
    if token == "-":
        if appending:
            return n
        raise _Unresolved(
            f"'-' names the end of the array{_at(tokens, k)}, not an element (only add, move and copy "
            "targets may use it)"
        )
    raise _Unresolved(f"{token!r} is not a valid index for the array{_at(tokens, k)}: {_index_rule(token)}")


def _index_rule(token: str) -> str:
    negative = token[:1] == "-"
    digits = token[1:] if negative else token
    if digits.isdigit() and digits.isascii():
        return "negative indices are not allowed" if negative else "leading zeros are not allowed"
    return "an index is '0' or decimal digits without a leading zero"


def _key(node: Any, tokens: Sequence[str], k: int) -> Any:
    """The dict key or list index under which ``tokens[k]`` names an existing child of ``node``."""
    token = tokens[k]
    kind = type(node)
    if kind is dict:
        if token in node:
            return token
        raise _Unresolved(f"no member {token!r} in the object{_at(tokens, k)}")
    if kind is list:
        return _index(node, tokens, k, False)
    raise _Unresolved(f"cannot look up {token!r} in {_a_kind(node)}{_at(tokens, k)}")


def _get(doc: Any, tokens: Sequence[str]) -> Any:
    node = doc
    for k in range(len(tokens)):
        node = node[_key(node, tokens, k)]
    return node


# ---------------------------------------------------------------------------------------------------------
# RFC 6902 JSON Patch


def apply_patch(doc: Any, ops: Sequence[Mapping[str, Any]]) -> Any:
    """Apply an RFC 6902 JSON Patch and return the patched document; ``doc`` is left untouched.

    Operations run in order, each on the result of the previous one. The returned document is a new
    top-level container; parts of ``doc`` (and operation values) that no operation changed are shared with
    it rather than copied, so treat both as immutable once patched.

    Args:
        doc: A JSON value (``dict``, ``list``, ``str``, ``int``, ``float``, ``bool`` or ``None``).
        ops: The operations, each a mapping with ``op`` and ``path``, plus ``value`` (add, replace, test) or
            ``from`` (move, copy); other members are ignored, as RFC 6902 requires.

    Returns:
        The patched document.

    Raises:
        PatchError: An operation is malformed (not an object, unknown ``op``, missing or ill-typed ``path``,
            ``from`` or ``value``), a test failed, a move targets a child of its source, or the patch tries to
            remove the whole document. ``op_index`` is the failing operation's position and ``path`` the JSON
            pointer at fault (the ``from`` pointer when the source was the problem); the message says what
            and where, e.g. ``op 2 (remove): path '/nodes/7' does not exist: index 7 out of range for array of
            length 3 at '/nodes'``. The whole patch fails: nothing is returned and nothing was changed.
        PointerError: (a PatchError) a ``path`` or ``from`` is malformed or does not resolve.
    """
    state = _Doc(doc)
    for i, op in enumerate(_operations(ops)):
        _apply_op(state, i, op)
    # Even an empty or test-only patch hands back a container the caller may edit without touching ``doc``.
    return state.own(state.root)


def _operations(ops: Any) -> Sequence[Any]:
    if type(ops) is list or type(ops) is tuple:
        return ops
    if isinstance(ops, (str, bytes, bytearray)) or not isinstance(ops, Sequence):
        raise PatchError(f"a patch must be an array of operations, got {_kind(ops)}")
    return ops


class _Doc:
    """The document being patched, copied on write.

    ``owned`` holds every container this call created (the shallow copies made along touched paths), keyed
    by id(); only those are ever edited in place. It maps to the objects themselves, not just their ids, so
    that no id can be freed and reused by another object while the patch runs.
    """

    __slots__ = ("owned", "root")

    def __init__(self, root: Any) -> None:
        self.root = root
        self.owned: dict[int, Any] = {}

    def own(self, node: Any) -> Any:
        """``node`` if this call created it, else a registered shallow copy (scalars come back as is)."""
        kind = type(node)
        if (kind is not dict and kind is not list) or id(node) in self.owned:
            return node
        copy = node.copy()
        self.owned[id(copy)] = copy
        return copy

    def parent(self, tokens: Sequence[str]) -> Any:
        """The owned container that holds (or will hold) ``tokens[-1]``, copying the containers above it."""
        node = self.root = self.own(self.root)
        for k in range(len(tokens) - 1):
            key = _key(node, tokens, k)
            child = node[key]
            owned = self.own(child)
            if owned is not child:
                node[key] = owned
            node = owned
        return node

    def get(self, tokens: Sequence[str]) -> Any:
        return _get(self.root, tokens)

    def add(self, tokens: Sequence[str], value: Any) -> None:
        if not tokens:
            self.root = value
            return
        parent = self.parent(tokens)
        k = len(tokens) - 1
        kind = type(parent)
        if kind is dict:
            parent[tokens[k]] = value
        elif kind is list:
            parent.insert(_index(parent, tokens, k, True), value)
        else:
            raise _Unresolved(f"cannot add member {tokens[k]!r} to {_a_kind(parent)}{_at(tokens, k)}")

    def remove(self, tokens: Sequence[str]) -> Any:
        """Remove and return the value at non-empty ``tokens``."""
        parent = self.parent(tokens)
        key = _key(parent, tokens, len(tokens) - 1)
        return parent.pop(key)

    def replace(self, tokens: Sequence[str], value: Any) -> None:
        if not tokens:
            self.root = value
            return
        parent = self.parent(tokens)
        key = _key(parent, tokens, len(tokens) - 1)
        parent[key] = value


def _apply_op(state: _Doc, i: int, op: Any) -> None:
    if type(op) is not dict and not isinstance(op, Mapping):
        raise PatchError(f"op {i}: an operation must be an object, got {_kind(op)}", op_index=i)
    name = op.get("op", _MISSING)
    if type(name) is not str or name not in _OPS:
        raise PatchError(_bad_op_message(i, name), op_index=i)
    path = _pointer_member(op, "path", i, name)
    tokens = _parse_member(path, "path", i, name)
    source = ""
    reading_source = False  # which pointer a failed lookup belongs to, for the message and the error's path
    try:
        if name == "add":
            state.add(tokens, _value_member(op, i, name, path))
        elif name == "remove":
            if not tokens:
                raise PatchError(f"op {i} (remove): cannot remove the whole document (path '')", op_index=i, path="")
            state.remove(tokens)
        elif name == "replace":
            state.replace(tokens, _value_member(op, i, name, path))
        elif name == "test":
            value = _value_member(op, i, name, path)
            actual = state.get(tokens)
            if not _json_equal(actual, value):
                raise PatchError(_test_failure(i, path, tokens, actual, value), op_index=i, path=path)
        else:  # move, copy
            source = _pointer_member(op, "from", i, name)
            source_tokens = _parse_member(source, "from", i, name)
            reading_source = True
            if name == "copy":
                try:
                    value = _deepcopy(state.get(source_tokens), 0)
                except _TooDeep:
                    raise PatchError(
                        f"op {i} (copy): from {source!r} nests deeper than {MAX_DEPTH} levels",
                        op_index=i,
                        path=source,
                    ) from None
                reading_source = False
                state.add(tokens, value)
            elif source_tokens == tokens:
                state.get(source_tokens)  # a move onto itself changes nothing, but its source must exist
            elif len(source_tokens) < len(tokens) and tokens[: len(source_tokens)] == source_tokens:
                raise PatchError(
                    f"op {i} (move): cannot move {source!r} into its own child {path!r}",
                    op_index=i,
                    path=path,
                )
            else:
                value = state.remove(source_tokens)
                reading_source = False
                state.add(tokens, value)
    except _Unresolved as exc:
        pointer = source if reading_source else path
        raise PointerError(
            _unresolved_message(i, name, reading_source, pointer, exc.reason), op_index=i, path=pointer
        ) from None


def _bad_op_message(i: int, name: Any) -> str:
    if name is _MISSING:
        return f"op {i}: missing member 'op' (one of {_OPS_LIST})"
    if type(name) is not str:
        return f"op {i}: member 'op' must be a string, got {_kind(name)}"
    return f"op {i}: unknown op {name!r} (expected one of {_OPS_LIST})"


def _pointer_member(op: Any, member: str, i: int, name: str) -> str:
    pointer = op.get(member, _MISSING)
    if type(pointer) is str:
        return pointer
    if pointer is _MISSING:
        raise PatchError(f"op {i} ({name}): missing member {member!r}", op_index=i)
    raise PatchError(
        f"op {i} ({name}): member {member!r} must be a string (a JSON pointer), got {_kind(pointer)}",
        op_index=i,
    )


def _parse_member(pointer: str, member: str, i: int, name: str) -> list[str]:
    try:
        return _parse(pointer)
    except _Malformed as exc:
        raise PointerError(
            f"op {i} ({name}): {member} {pointer!r} is not a valid JSON pointer: {exc.reason}",
            op_index=i,
            path=pointer,
        ) from None


def _value_member(op: Any, i: int, name: str, path: str) -> Any:
    value = op.get("value", _MISSING)
    if value is _MISSING:
        raise PatchError(f"op {i} ({name}): missing member 'value'", op_index=i, path=path)
    problem = _check_value(value, 0)
    if problem is not None:
        reason = problem.pop(0)
        where = f" (at {_format_pointer(problem[::-1])!r} within the value)" if problem else ""
        raise PatchError(f"op {i} ({name}): 'value' is not JSON: {reason}{where}", op_index=i, path=path)
    return value


def _unresolved_message(i: int, name: str, reading_source: bool, pointer: str, reason: str) -> str:
    if reading_source:
        return f"op {i} ({name}): from {pointer!r} does not exist: {reason}"
    if name == "add":
        return f"op {i} (add): cannot add at path {pointer!r}: {reason}"
    if name == "move" or name == "copy":
        return f"op {i} ({name}): cannot {name} to path {pointer!r}: {reason}"
    return f"op {i} ({name}): path {pointer!r} does not exist: {reason}"


# ---------------------------------------------------------------------------------------------------------
# JSON values: validation, typed equality, deep copy. Each recursion is bounded by MAX_DEPTH (directly, or
# through the validated operation value it walks alongside). No comprehensions or all(): they would add a
# frame per level and halve the depth reachable before RecursionError.


def _check_value(value: Any, depth: int) -> list[Any] | None:
    """None if ``value`` is JSON nesting at most MAX_DEPTH - depth levels, else [reason, *tokens reversed]."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return None
    if kind is float:
        return None if math.isfinite(value) else [f"{value!r} is not a JSON number"]
    if kind is dict or kind is list:
        if depth == MAX_DEPTH:
            return [f"it nests deeper than {MAX_DEPTH} levels"]
        if kind is dict:
            for key, item in value.items():
                if type(key) is not str:
                    return [f"member name {key!r} is {_a_kind(key)}, not a string"]
                problem = _check_value(item, depth + 1)
                if problem is not None:
                    problem.append(key)
                    return problem
        else:
            for index, item in enumerate(value):
                problem = _check_value(item, depth + 1)
                if problem is not None:
                    problem.append(str(index))
                    return problem
        return None
    return [f"{_kind(value)} values are not JSON (use dict, list, str, int, float, bool or None)"]


def _json_equal(a: Any, b: Any) -> bool:
    """Typed JSON equality: same Python type at every level (so True != 1 != 1.0), members in any order."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        if len(a) != len(b):
            return False
        for key, item in a.items():
            other = b.get(key, _MISSING)
            if other is _MISSING or not _json_equal(item, other):
                return False
        return True
    if kind is list:
        if len(a) != len(b):
            return False
        for item, other in zip(a, b):  # noqa: SIM110 (see above)
            if not _json_equal(item, other):
                return False
        return True
    return a == b


def _deepcopy(value: Any, depth: int) -> Any:
    kind = type(value)
    if kind is dict:
        if depth == MAX_DEPTH:
            raise _TooDeep
        copy = {}
        for key, item in value.items():
            copy[key] = _deepcopy(item, depth + 1)
        return copy
    if kind is list:
        if depth == MAX_DEPTH:
            raise _TooDeep
        items = []
        for item in value:
            items.append(_deepcopy(item, depth + 1))
        return items
    return value  # immutable scalars (and opaque non-JSON objects) are shared


def _test_failure(i: int, path: str, tokens: list[str], actual: Any, expected: Any) -> str:
    where, detail = _difference(actual, expected)
    at = f" at {_format_pointer(tokens + where)!r}" if where else ""
    return f"op {i} (test): path {path!r} does not match the expected value{at}: {detail}"


def _difference(found: Any, expected: Any) -> tuple[list[str], str]:
    """The first place where ``found`` and ``expected`` differ (relative tokens) and how; they must differ."""
    kind = type(found)
    if kind is not type(expected):
        return [], f"found {_show(found)} ({_kind(found)}), expected {_show(expected)} ({_kind(expected)})"
    if kind is dict:
        for key in expected:
            if key not in found:
                return [], f"member {key!r} is missing"
        for key in found:
            if key not in expected:
                return [], f"unexpected member {key!r}"
        for key, item in expected.items():
            if not _json_equal(found[key], item):
                where, detail = _difference(found[key], item)
                return [key, *where], detail
    elif kind is list:
        if len(found) != len(expected):
            return [], f"found an array of length {len(found)}, expected length {len(expected)}"
        for index, item in enumerate(expected):
            if not _json_equal(found[index], item):
                where, detail = _difference(found[index], item)
                return [str(index), *where], detail
    return [], f"found {_show(found)}, expected {_show(expected)}"


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):  # non-str keys of odd types, circular containers
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
