# cython: language_level=3
"""JSON Patch and JSON Pointer, compiled: the Cython twin of ``aobd._fast._py_jsonpatch`` (the specification).

Same names, results and error messages; see the reference for the semantics. Where the twin departs from the
reference's shape it is for speed, never for behaviour:

* walks read children with borrowed ``PyDict_GetItemWithError`` lookups and C-parsed array indices, instead
  of a membership test, a second lookup and ``int(token)``;
* the set of owned containers is an open-addressing table of addresses, not a dict of ``id()`` ints (that
  dict's int boxing and hashing was about 4% of the benchmark patch); and a container copied during a walk
  has no owned children yet, so the rest of that walk copies without consulting the table at all;
* pointers are split by reading code points, not with ``str.split``;
* copies start from ``PyDict_Copy``/list slices (one allocation, no per-item Python work) and only nested
  containers are then replaced.

Error paths are plain Python copied from the reference, since their text is part of the compared behaviour.
"""

import json
from collections.abc import Mapping, Sequence

from cpython.dict cimport PyDict_Contains, PyDict_Copy, PyDict_GetItemWithError, PyDict_Next, PyDict_SetItem
from cpython.list cimport PyList_Append, PyList_GET_SIZE, PyList_Insert, PyList_New, PyList_SET_ITEM
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.unicode cimport (
    PyUnicode_DATA,
    PyUnicode_GET_LENGTH,
    PyUnicode_KIND,
    PyUnicode_READ,
    PyUnicode_Substring,
)
from libc.math cimport isfinite
from libc.stdint cimport uintptr_t

from aobd.errors import PatchError, PointerError

__all__ = ["MAX_DEPTH", "apply_patch", "parse_pointer", "resolve_pointer"]

cdef enum:
    C_MAX_DEPTH = 500
    # Longest index token parsed as a number: 18 digits always fit a signed 64-bit Py_ssize_t, and no real
    # array is longer than 10**18.
    MAX_INDEX_DIGITS = 18
    OP_ADD = 0
    OP_REMOVE = 1
    OP_REPLACE = 2
    OP_MOVE = 3
    OP_COPY = 4
    OP_TEST = 5
    # Initial slots of the owned-container table; most patches own fewer than 8 containers.
    OWNED_INITIAL_SLOTS = 16

MAX_DEPTH = C_MAX_DEPTH

_OPS = ("add", "remove", "replace", "move", "copy", "test")
_OPS_LIST = ", ".join(_OPS)
cdef object _MISSING = object()
_KINDS = {
    dict: "object",
    list: "array",
    str: "string",
    int: "integer",
    float: "float",
    bool: "boolean",
    type(None): "null",
}


class _Malformed(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class _Unresolved(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class _TooDeep(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------
# RFC 6901 JSON Pointer


def parse_pointer(pointer):
    """Split an RFC 6901 JSON Pointer into its unescaped reference tokens (see ``_py_jsonpatch``)."""
    if type(pointer) is not str:
        raise PointerError(f"a JSON pointer must be a string, got {_kind(pointer)}")
    try:
        return _parse(pointer)
    except _Malformed as exc:
        raise PointerError(f"invalid JSON pointer {pointer!r}: {exc.reason}", path=pointer) from None


def resolve_pointer(doc, pointer):
    """Return the value ``pointer`` names in ``doc``; PointerError when it does not resolve."""
    cdef list tokens = parse_pointer(pointer)
    try:
        return _get(doc, tokens)
    except _Unresolved as exc:
        raise PointerError(f"pointer {pointer!r} does not resolve: {exc.reason}", path=pointer) from None


cdef list _parse(str pointer):
    """The reference's ``_parse`` as two C passes over the code points: count and validate, then cut.

    Measured with callgrind on ``perf.bench_patch``: ``str.split`` and dropping its leading ``""`` took 6.7k
    of the 28k instructions of a patch; this takes 5.2k, most of it the token strings themselves.
    """
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(pointer)
    cdef unsigned int kind
    cdef void* data
    cdef Py_ssize_t j, start, slot
    cdef Py_ssize_t count = 1
    cdef Py_UCS4 ch, escaped_ch
    cdef bint escaped = False
    cdef list tokens
    if n == 0:
        return []
    kind = PyUnicode_KIND(pointer)
    data = PyUnicode_DATA(pointer)
    if PyUnicode_READ(kind, data, 0) != 47:  # "/"
        raise _Malformed("it must be empty or start with '/'")
    for j in range(1, n):
        ch = PyUnicode_READ(kind, data, j)
        if ch == 47:
            count += 1
        elif ch == 126:  # "~": a valid escape's "0" or "1" is never another "~", so no skipping is needed
            escaped_ch = PyUnicode_READ(kind, data, j + 1) if j + 1 < n else 0
            if escaped_ch != 48 and escaped_ch != 49:
                raise _Malformed(f"'~' at offset {j} must be followed by '0' (for '~') or '1' (for '/')")
            escaped = True
    tokens = PyList_New(count)
    start = 1
    slot = 0
    for j in range(1, n + 1):
        if j == n or PyUnicode_READ(kind, data, j) == 47:
            token = PyUnicode_Substring(pointer, start, j)
            if escaped:
                # "~1" is decoded before "~0" (RFC 6901 section 4), so "~01" becomes "~1" and not "/".
                token = token.replace("~1", "/").replace("~0", "~")
            Py_INCREF(token)  # PyList_SET_ITEM steals a reference
            PyList_SET_ITEM(tokens, slot, token)
            slot += 1
            start = j + 1
    return tokens


cdef Py_ssize_t _index(list array, list tokens, Py_ssize_t k, bint appending) except -1:
    """The array index ``tokens[k]`` names; ``appending`` also admits ``len(array)`` and ``-`` (add)."""
    cdef str token = tokens[k]
    cdef Py_ssize_t n = PyList_GET_SIZE(array)
    cdef Py_ssize_t length = len(token)
    cdef Py_ssize_t index = 0
    cdef Py_ssize_t j
    cdef Py_UCS4 ch
    cdef bint digits = length > 0
    # ASCII digits only, as in the reference (str.isdigit() alone would admit "²" and "٣").
    for j in range(length):
        ch = token[j]
        if <Py_ssize_t>ch < 48 or <Py_ssize_t>ch > 57:
            digits = False
            break
        if j < MAX_INDEX_DIGITS:
            index = index * 10 + (<Py_ssize_t>ch - 48)
    if digits and (length == 1 or token[0] != u"0"):
        if length <= MAX_INDEX_DIGITS and (index < n or (appending and index == n)):
            return index
        raise _out_of_range(token, n, tokens, k, appending)
    if length == 1 and token[0] == u"-":
        if appending:
            return n
        raise _Unresolved(
            f"'-' names the end of the array{_at(tokens, k)}, not an element (only add, move and copy "
            "targets may use it)"
        )
    raise _Unresolved(f"{token!r} is not a valid index for the array{_at(tokens, k)}: {_index_rule(token)}")


cdef object _get(object doc, list tokens):
    cdef Py_ssize_t k
    cdef object node = doc
    cdef PyObject* found
    for k in range(PyList_GET_SIZE(tokens)):
        if type(node) is dict:
            found = PyDict_GetItemWithError(node, tokens[k])
            if found is NULL:
                raise _no_member(tokens, k)
            node = <object>found
        elif type(node) is list:
            node = (<list>node)[_index(<list>node, tokens, k, False)]
        else:
            raise _cannot_look_up(node, tokens, k)
    return node


# ---------------------------------------------------------------------------------------------------------
# RFC 6902 JSON Patch


def apply_patch(doc, ops):
    """Apply an RFC 6902 JSON Patch and return the patched document; ``doc`` is left untouched.

    See ``aobd._fast._py_jsonpatch.apply_patch`` for the full contract (PatchError with ``op_index`` and
    ``path`` on any failure; nothing returned and nothing changed then).
    """
    cdef _Doc state = _Doc.__new__(_Doc)
    cdef Py_ssize_t i
    state.root = doc
    state.keep = []
    ops = _operations(ops)
    if type(ops) is list or type(ops) is tuple:
        for i in range(len(ops)):
            _apply_op(state, i, ops[i])
    else:
        for i, op in enumerate(ops):
            _apply_op(state, i, op)
    # Even an empty or test-only patch hands back a container the caller may edit without touching ``doc``.
    return state.own(state.root)


cdef object _operations(object ops):
    if type(ops) is list or type(ops) is tuple:
        return ops
    if isinstance(ops, (str, bytes, bytearray)) or not isinstance(ops, Sequence):
        raise PatchError(f"a patch must be an array of operations, got {_kind(ops)}")
    return ops


cdef inline size_t _slot_of(PyObject* p, size_t mask):
    # Objects are 16-byte aligned: the low 4 bits carry nothing.
    return ((<uintptr_t>p) >> 4) & mask


cdef class _Doc:
    """The document being patched, copied on write (see the reference's ``_Doc``).

    ``keep`` lists the owned containers (holding them keeps their addresses unique while the patch runs);
    ``slots`` is a linear-probing set of the same addresses, at most half full.
    """

    cdef object root
    cdef list keep
    cdef PyObject** slots
    cdef size_t mask

    def __dealloc__(self):
        PyMem_Free(self.slots)

    cdef bint owns(self, object node) noexcept:
        cdef size_t at
        cdef PyObject* p
        if self.slots is NULL:
            return False
        at = _slot_of(<PyObject*>node, self.mask)
        while True:
            p = self.slots[at]
            if p is NULL:
                return False
            if p is <PyObject*>node:
                return True
            at = (at + 1) & self.mask

    cdef int register(self, object node) except -1:
        cdef size_t n_slots
        cdef PyObject** slots
        PyList_Append(self.keep, node)
        n_slots = self.mask + 1 if self.slots is not NULL else 0
        if <size_t>PyList_GET_SIZE(self.keep) * 2 > n_slots:
            n_slots = n_slots * 2 if n_slots else OWNED_INITIAL_SLOTS
            slots = <PyObject**>PyMem_Calloc(n_slots, sizeof(PyObject*))
            if slots is NULL:
                raise MemoryError()
            PyMem_Free(self.slots)
            self.slots = slots
            self.mask = n_slots - 1
            for item in self.keep:
                self.insert(<PyObject*>item)
        else:
            self.insert(<PyObject*>node)
        return 0

    cdef void insert(self, PyObject* p) noexcept:
        cdef size_t at = _slot_of(p, self.mask)
        while self.slots[at] is not NULL:
            at = (at + 1) & self.mask
        self.slots[at] = p

    cdef object copy_of(self, object node):
        """A registered shallow copy of a container that is known not to be owned; scalars as they are."""
        cdef object copy
        if type(node) is dict:
            copy = PyDict_Copy(node)
        elif type(node) is list:
            copy = (<list>node)[:]
        else:
            return node
        self.register(copy)
        return copy

    cdef object own(self, object node):
        if (type(node) is dict or type(node) is list) and self.owns(node):
            return node
        return self.copy_of(node)

    cdef object parent(self, list tokens):
        """The owned container that holds (or will hold) ``tokens[-1]``, copying the containers above it."""
        cdef Py_ssize_t k, index
        cdef object node, child, copy, token
        cdef PyObject* found
        cdef bint fresh
        node = self.root
        copy = self.own(node)
        # A container copied by this walk only has children shared with the input: none can be owned yet.
        fresh = copy is not node
        node = self.root = copy
        for k in range(PyList_GET_SIZE(tokens) - 1):
            token = tokens[k]
            if type(node) is dict:
                found = PyDict_GetItemWithError(node, token)
                if found is NULL:
                    raise _no_member(tokens, k)
                child = <object>found
                copy = self.copy_of(child) if fresh else self.own(child)
                if copy is not child:
                    PyDict_SetItem(node, token, copy)
            elif type(node) is list:
                index = _index(<list>node, tokens, k, False)
                child = (<list>node)[index]
                copy = self.copy_of(child) if fresh else self.own(child)
                if copy is not child:
                    (<list>node)[index] = copy
            else:
                raise _cannot_look_up(node, tokens, k)
            fresh = copy is not child
            node = copy
        return node

    cdef int add(self, list tokens, object value) except -1:
        cdef Py_ssize_t k = PyList_GET_SIZE(tokens) - 1
        cdef Py_ssize_t index
        cdef object parent
        if k < 0:
            self.root = value
            return 0
        parent = self.parent(tokens)
        if type(parent) is dict:
            PyDict_SetItem(parent, tokens[k], value)
        elif type(parent) is list:
            index = _index(<list>parent, tokens, k, True)
            if index == PyList_GET_SIZE(parent):
                PyList_Append(parent, value)
            else:
                PyList_Insert(parent, index, value)
        else:
            raise _Unresolved(f"cannot add member {tokens[k]!r} to {_a_kind(parent)}{_at(tokens, k)}")
        return 0

    cdef object remove(self, list tokens):
        """Remove and return the value at non-empty ``tokens``."""
        cdef Py_ssize_t k = PyList_GET_SIZE(tokens) - 1
        cdef object parent = self.parent(tokens)
        cdef object value
        if type(parent) is dict:
            value = (<dict>parent).pop(tokens[k], _MISSING)
            if value is _MISSING:
                raise _no_member(tokens, k)
            return value
        if type(parent) is list:
            return (<list>parent).pop(_index(<list>parent, tokens, k, False))
        raise _cannot_look_up(parent, tokens, k)

    cdef int replace(self, list tokens, object value) except -1:
        cdef Py_ssize_t k = PyList_GET_SIZE(tokens) - 1
        cdef object parent
        if k < 0:
            self.root = value
            return 0
        parent = self.parent(tokens)
        if type(parent) is dict:
            if not PyDict_Contains(parent, tokens[k]):
                raise _no_member(tokens, k)
            PyDict_SetItem(parent, tokens[k], value)
        elif type(parent) is list:
            (<list>parent)[_index(<list>parent, tokens, k, False)] = value
        else:
            raise _cannot_look_up(parent, tokens, k)
        return 0


cdef inline object _member(object op, str name, bint is_dict):
    cdef PyObject* found
    if is_dict:
        found = PyDict_GetItemWithError(op, name)
        return _MISSING if found is NULL else <object>found
    return op.get(name, _MISSING)


cdef int _apply_op(_Doc state, Py_ssize_t i, object op) except -1:
    cdef bint is_dict = type(op) is dict
    cdef int code
    cdef list tokens, source_tokens
    cdef str path, source
    cdef bint reading_source = False  # which pointer a failed lookup belongs to, for the message and path
    cdef Py_ssize_t n_source
    if not is_dict and not isinstance(op, Mapping):
        raise PatchError(f"op {i}: an operation must be an object, got {_kind(op)}", op_index=i)
    name = _member(op, "op", is_dict)
    if type(name) is not str:
        raise PatchError(_bad_op_message(i, name), op_index=i)
    if name == "add":
        code = OP_ADD
    elif name == "replace":
        code = OP_REPLACE
    elif name == "test":
        code = OP_TEST
    elif name == "remove":
        code = OP_REMOVE
    elif name == "move":
        code = OP_MOVE
    elif name == "copy":
        code = OP_COPY
    else:
        raise PatchError(_bad_op_message(i, name), op_index=i)
    path = _pointer_member(op, "path", i, name, is_dict)
    tokens = _parse_member(path, "path", i, name)
    source = ""
    try:
        if code == OP_ADD:
            state.add(tokens, _value_member(op, i, name, path, is_dict))
        elif code == OP_REMOVE:
            if PyList_GET_SIZE(tokens) == 0:
                raise PatchError(
                    f"op {i} (remove): cannot remove the whole document (path '')", op_index=i, path=""
                )
            state.remove(tokens)
        elif code == OP_REPLACE:
            state.replace(tokens, _value_member(op, i, name, path, is_dict))
        elif code == OP_TEST:
            value = _value_member(op, i, name, path, is_dict)
            actual = _get(state.root, tokens)
            if not _json_equal(actual, value):
                raise PatchError(_test_failure(i, path, tokens, actual, value), op_index=i, path=path)
        else:
            source = _pointer_member(op, "from", i, name, is_dict)
            source_tokens = _parse_member(source, "from", i, name)
            reading_source = True
            if code == OP_COPY:
                try:
                    value = _deepcopy(_get(state.root, source_tokens), 0)
                except _TooDeep:
                    raise PatchError(
                        f"op {i} (copy): from {source!r} nests deeper than {C_MAX_DEPTH} levels",
                        op_index=i,
                        path=source,
                    ) from None
                reading_source = False
                state.add(tokens, value)
                return 0
            n_source = PyList_GET_SIZE(source_tokens)
            if source_tokens == tokens:
                _get(state.root, source_tokens)  # a move onto itself changes nothing; its source must exist
            elif n_source < PyList_GET_SIZE(tokens) and tokens[:n_source] == source_tokens:
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
    return 0


cdef str _pointer_member(object op, str member, Py_ssize_t i, str name, bint is_dict):
    pointer = _member(op, member, is_dict)
    if type(pointer) is str:
        return pointer
    if pointer is _MISSING:
        raise PatchError(f"op {i} ({name}): missing member {member!r}", op_index=i)
    raise PatchError(
        f"op {i} ({name}): member {member!r} must be a string (a JSON pointer), got {_kind(pointer)}",
        op_index=i,
    )


cdef list _parse_member(str pointer, str member, Py_ssize_t i, str name):
    try:
        return _parse(pointer)
    except _Malformed as exc:
        raise PointerError(
            f"op {i} ({name}): {member} {pointer!r} is not a valid JSON pointer: {exc.reason}",
            op_index=i,
            path=pointer,
        ) from None


cdef object _value_member(object op, Py_ssize_t i, str name, str path, bint is_dict):
    value = _member(op, "value", is_dict)
    if value is _MISSING:
        raise PatchError(f"op {i} ({name}): missing member 'value'", op_index=i, path=path)
    problem = _check_value(value, 0)
    if problem is not None:
        reason = problem.pop(0)
        where = f" (at {_format_pointer(problem[::-1])!r} within the value)" if problem else ""
        raise PatchError(f"op {i} ({name}): 'value' is not JSON: {reason}{where}", op_index=i, path=path)
    return value


# ---------------------------------------------------------------------------------------------------------
# JSON values: validation, typed equality, deep copy. C recursion, bounded by C_MAX_DEPTH (directly, or
# through the validated operation value it walks alongside), so hostile nesting cannot exhaust the C stack.


cdef inline bint _is_scalar(object value) noexcept:
    """str, int, bool or None: the JSON leaves that need no further look (float is checked for finiteness)."""
    return type(value) is str or type(value) is int or type(value) is bool or value is None


cdef object _check_value(object value, int depth):
    """None if ``value`` is JSON nesting at most MAX_DEPTH - depth levels, else [reason, *tokens reversed]."""
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t index
    cdef PyObject* key = NULL  # filled by PyDict_Next
    cdef PyObject* item = NULL
    cdef list problem
    if _is_scalar(value):
        return None
    if type(value) is float:
        return None if isfinite(<double>value) else [f"{value!r} is not a JSON number"]
    if type(value) is dict:
        if depth == C_MAX_DEPTH:
            return [f"it nests deeper than {C_MAX_DEPTH} levels"]
        # Borrowed references straight from PyDict_Next: nothing here mutates the dict.
        while PyDict_Next(value, &pos, &key, &item):
            if type(<object>key) is not str:
                return [f"member name {<object>key!r} is {_a_kind(<object>key)}, not a string"]
            if not _is_scalar(<object>item):
                problem = _check_value(<object>item, depth + 1)
                if problem is not None:
                    problem.append(<object>key)
                    return problem
        return None
    if type(value) is list:
        if depth == C_MAX_DEPTH:
            return [f"it nests deeper than {C_MAX_DEPTH} levels"]
        for index in range(PyList_GET_SIZE(value)):
            if not _is_scalar((<list>value)[index]):
                problem = _check_value((<list>value)[index], depth + 1)
                if problem is not None:
                    problem.append(str(index))
                    return problem
        return None
    return [f"{_kind(value)} values are not JSON (use dict, list, str, int, float, bool or None)"]


cdef bint _json_equal(object a, object b) except -1:
    """Typed JSON equality: same Python type at every level (so True != 1 != 1.0), members in any order."""
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t j, n
    cdef PyObject* key = NULL  # filled by PyDict_Next
    cdef PyObject* item = NULL
    cdef PyObject* other
    if type(a) is not type(b):
        return False
    if type(a) is str:
        return <str>a == <str>b
    if type(a) is dict:
        if len(<dict>a) != len(<dict>b):
            return False
        while PyDict_Next(a, &pos, &key, &item):
            other = PyDict_GetItemWithError(b, <object>key)
            if other is NULL or not _json_equal(<object>item, <object>other):
                return False
        return True
    if type(a) is list:
        n = PyList_GET_SIZE(a)
        if n != PyList_GET_SIZE(b):
            return False
        for j in range(n):
            if not _json_equal((<list>a)[j], (<list>b)[j]):
                return False
        return True
    return a == b


cdef object _deepcopy(object value, int depth):
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t j
    cdef PyObject* key = NULL  # filled by PyDict_Next
    cdef PyObject* item = NULL
    cdef object copy
    if type(value) is dict:
        if depth == C_MAX_DEPTH:
            raise _TooDeep()
        # Clone the table in one go, then replace the nested containers: scalars cost nothing more.
        copy = PyDict_Copy(value)
        while PyDict_Next(value, &pos, &key, &item):
            if type(<object>item) is dict or type(<object>item) is list:
                PyDict_SetItem(copy, <object>key, _deepcopy(<object>item, depth + 1))
        return copy
    if type(value) is list:
        if depth == C_MAX_DEPTH:
            raise _TooDeep()
        copy = (<list>value)[:]
        for j in range(PyList_GET_SIZE(copy)):
            child = (<list>copy)[j]
            if type(child) is dict or type(child) is list:
                (<list>copy)[j] = _deepcopy(child, depth + 1)
        return copy
    return value  # immutable scalars (and opaque non-JSON objects) are shared


# ---------------------------------------------------------------------------------------------------------
# Error paths: copied from the reference, word for word.


cdef object _no_member(list tokens, Py_ssize_t k):
    return _Unresolved(f"no member {tokens[k]!r} in the object{_at(tokens, k)}")


cdef object _cannot_look_up(object node, list tokens, Py_ssize_t k):
    return _Unresolved(f"cannot look up {tokens[k]!r} in {_a_kind(node)}{_at(tokens, k)}")


cdef object _out_of_range(str token, Py_ssize_t n, list tokens, Py_ssize_t k, bint appending):
    hint = f" (0 to {n}, or '-' to append)" if appending else ""
    return _Unresolved(f"index {token} out of range for array of length {n}{_at(tokens, k)}{hint}")


def _format_pointer(tokens):
    return "".join(["/" + token.replace("~", "~0").replace("/", "~1") for token in tokens])


def _at(tokens, k):
    """Where the container looked up with ``tokens[k]`` sits, for messages."""
    return " at the root" if k == 0 else f" at {_format_pointer(tokens[:k])!r}"


def _kind(value):
    return _KINDS.get(type(value)) or f"Python {type(value).__qualname__}"


def _a_kind(value):
    kind = _kind(value)
    if kind == "null":
        return kind
    return ("an " if kind[0] in "aeio" else "a ") + kind


def _index_rule(token):
    negative = token[:1] == "-"
    digits = token[1:] if negative else token
    if digits.isdigit() and digits.isascii():
        return "negative indices are not allowed" if negative else "leading zeros are not allowed"
    return "an index is '0' or decimal digits without a leading zero"


def _bad_op_message(i, name):
    if name is _MISSING:
        return f"op {i}: missing member 'op' (one of {_OPS_LIST})"
    if type(name) is not str:
        return f"op {i}: member 'op' must be a string, got {_kind(name)}"
    return f"op {i}: unknown op {name!r} (expected one of {_OPS_LIST})"


def _unresolved_message(i, name, reading_source, pointer, reason):
    if reading_source:
        return f"op {i} ({name}): from {pointer!r} does not exist: {reason}"
    if name == "add":
        return f"op {i} (add): cannot add at path {pointer!r}: {reason}"
    if name == "move" or name == "copy":
        return f"op {i} ({name}): cannot {name} to path {pointer!r}: {reason}"
    return f"op {i} ({name}): path {pointer!r} does not exist: {reason}"


def _test_failure(i, path, tokens, actual, expected):
    where, detail = _difference(actual, expected)
    at = f" at {_format_pointer(tokens + where)!r}" if where else ""
    return f"op {i} (test): path {path!r} does not match the expected value{at}: {detail}"


def _difference(found, expected):
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


def _show(value):
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):  # non-str keys of odd types, circular containers
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
