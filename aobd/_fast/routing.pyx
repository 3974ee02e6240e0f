# cython: language_level=3
"""Routing, compiled: the Cython twin of ``aobd._fast._py_routing`` (the specification).

Same names, results and error messages; see the reference for the semantics. The state lives in C arrays
owned by the Router; the hot calls (``complete``, ``skip``) touch Python objects only to read ``taken`` and to
hand back the two result lists. Propagation uses an explicit FIFO worklist, never recursion.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from libc.limits cimport INT_MAX
from libc.stdlib cimport qsort

__all__ = ["DONE", "PENDING", "READY", "SKIPPED", "Router"]

PENDING, READY, DONE, SKIPPED = 0, 1, 2, 3
_STATUS_NAMES = ("PENDING", "READY", "DONE", "SKIPPED")


cdef extern from "Python.h":
    # Non-limited C API on borrowed pointers, as the list and tuple fast paths in CPython itself use it.
    ctypedef struct PyListObject:
        PyObject** ob_item
        Py_ssize_t allocated
    Py_ssize_t Py_REFCNT(PyObject* o)
    Py_ssize_t Py_SIZE(PyObject* o)
    void Py_SET_SIZE(PyObject* o, Py_ssize_t size)
    void Py_DECREF_PTR "Py_DECREF" (PyObject* o)
    int PyObject_GC_IsTracked(PyObject* o)
    void PyObject_GC_Track(PyObject* o)
    PyObject* PyTuple_GET_ITEM_PTR "PyTuple_GET_ITEM" (PyObject* t, Py_ssize_t i)
    void PyTuple_SET_ITEM_PTR "PyTuple_SET_ITEM" (PyObject* t, Py_ssize_t i, PyObject* o)
    int PyObject_IsTrue(object o) except -1


cdef enum:
    C_PENDING = 0
    C_READY = 1
    C_DONE = 2
    C_SKIPPED = 3
    C_UNRESOLVED = -1
    C_NOT_TAKEN = 0
    C_TAKEN = 1
    # Fan-outs up to this size are sorted by insertion: cheaper than qsort's indirect compares.
    SMALL_SORT = 24
    # Spare capacity of result lists, so that the result cache can refill them without reallocating.
    RESULT_SPARE = 8


cdef class Router:
    """Readiness and dead-path elimination over one run of a compiled, acyclic graph.

    See ``aobd._fast._py_routing.Router`` for the contract; this class behaves identically.
    """

    # C attributes start zeroed (NULL pointers), so __dealloc__ is safe even if __init__ never ran.
    cdef int _n
    cdef int _m
    cdef int _n_open
    cdef bint _started
    cdef bint _busy              # reading a generic `taken`, whose __bool__ may run Python code
    cdef int _max_out            # largest out-degree: size of the _flags scratch buffer
    cdef int* _offsets           # n + 1
    cdef int* _targets           # m
    cdef int* _indegree          # n
    cdef int* _unresolved        # n: in-edges not yet resolved
    cdef int* _n_taken           # n: in-edges resolved as taken
    cdef int* _ready             # n: nodes made READY by the current call
    cdef int* _work              # n: nodes made SKIPPED by the current call, in order; also the worklist
    cdef int _n_ready
    cdef int _n_work
    cdef signed char* _status    # n
    cdef signed char* _edge      # m: -1 unresolved, 0 not taken, 1 taken
    cdef signed char* _flags     # _max_out: taken flags, read before any state changes

    def __dealloc__(self):
        self._free()

    cdef void _free(self) noexcept:
        PyMem_Free(self._offsets)
        PyMem_Free(self._targets)
        PyMem_Free(self._indegree)
        PyMem_Free(self._unresolved)
        PyMem_Free(self._n_taken)
        PyMem_Free(self._ready)
        PyMem_Free(self._work)
        PyMem_Free(self._status)
        PyMem_Free(self._edge)
        PyMem_Free(self._flags)
        self._offsets = self._targets = self._indegree = NULL
        self._unresolved = self._n_taken = self._ready = self._work = NULL
        self._status = self._edge = self._flags = NULL

    def __init__(self, out_offsets, out_targets, indegree):
        """Build a router for a graph with every node PENDING and every edge unresolved.

        Raises:
            ValueError: the arrays do not describe a CSR graph (lengths, offsets, target range, indegrees).
        """
        cdef Py_ssize_t n = len(indegree)
        cdef Py_ssize_t m = len(out_targets)
        cdef Py_ssize_t n_off = len(out_offsets)
        cdef int i, e, t
        cdef int* off
        _check_idle(self)
        self._free()  # __init__ may be called again on a live object
        self._n = self._m = self._n_open = self._max_out = 0
        self._started = False
        if n >= INT_MAX or m >= INT_MAX:
            raise ValueError(f"graph too large: {n} nodes, {m} edges")
        if n_off != n + 1:
            raise ValueError(f"out_offsets has {n_off} entries; expected n_nodes + 1 = {n + 1}")
        self._offsets = <int*>_alloc(n + 1, sizeof(int))
        self._targets = <int*>_alloc(m, sizeof(int))
        self._indegree = <int*>_alloc(n, sizeof(int))
        self._unresolved = <int*>_alloc(n, sizeof(int))
        self._n_taken = <int*>_alloc(n, sizeof(int))
        self._ready = <int*>_alloc(n, sizeof(int))
        self._work = <int*>_alloc(n, sizeof(int))
        self._status = <signed char*>_alloc(n, sizeof(signed char))
        self._edge = <signed char*>_alloc(m, sizeof(signed char))
        _load_ints("out_offsets", out_offsets, self._offsets, n + 1)
        _load_ints("out_targets", out_targets, self._targets, m)
        _load_ints("indegree", indegree, self._indegree, n)

        off = self._offsets
        if off[0] != 0:
            raise ValueError(f"out_offsets[0] is {off[0]}; it must be 0")
        for i in range(n):
            if off[i + 1] < off[i]:
                raise ValueError(
                    f"out_offsets must never decrease, but out_offsets[{i + 1}] = {off[i + 1]}"
                    f" < out_offsets[{i}] = {off[i]}"
                )
            if off[i + 1] - off[i] > self._max_out:
                self._max_out = off[i + 1] - off[i]
        if off[n] != m:
            raise ValueError(f"out_offsets[{n}] is {off[n]}; it must equal len(out_targets) = {m}")
        for i in range(n):
            self._unresolved[i] = 0  # counts in-edges first, checked against indegree below
            self._n_taken[i] = 0
            self._status[i] = C_PENDING
        for e in range(m):
            t = self._targets[e]
            if t < 0 or t >= n:
                raise ValueError(f"out_targets[{e}] = {t} is not a node index (0..{n - 1})")
            self._unresolved[t] += 1
            self._edge[e] = C_UNRESOLVED
        for i in range(n):
            if self._indegree[i] != self._unresolved[i]:
                raise ValueError(
                    f"indegree[{i}] = {self._indegree[i]} but {self._unresolved[i]} edges lead into node {i}"
                )
        self._flags = <signed char*>_alloc(self._max_out, sizeof(signed char))
        # Set last: a router whose __init__ failed has no nodes, so no method can index its arrays.
        self._n = <int>n
        self._m = <int>m
        self._n_open = <int>n

    @property
    def n_nodes(self):
        """Number of nodes in the graph."""
        return self._n

    def start(self):
        """Mark the source nodes (no in-edges) READY and return them in index order; [] once started."""
        cdef int i
        if self._started:
            return []
        self._started = True
        self._n_ready = 0
        for i in range(self._n):
            if self._indegree[i] == 0 and self._status[i] == C_PENDING:
                self._status[i] = C_READY
                self._ready[self._n_ready] = i
                self._n_ready += 1
        return _int_list_from(self._ready, self._n_ready, 0)

    def complete(self, Py_ssize_t node, taken):
        """Mark READY ``node`` DONE and resolve its out-edges; ``taken`` has one truth value per out-edge.

        Returns ``(ready, skipped)``. See ``aobd._fast._py_routing.Router.complete``.
        """
        cdef int first, deg, k
        _check_idle(self)
        _check_node(self, node)
        if self._status[node] != C_READY:
            raise ValueError(
                f"node {node} is {_STATUS_NAMES[self._status[node]]}, not READY: only a ready node can complete"
            )
        first = self._offsets[node]
        deg = self._offsets[node + 1] - first
        _read_taken(self, node, taken, deg)
        self._status[node] = C_DONE
        self._n_open -= 1
        self._n_ready = 0
        self._n_work = 0
        for k in range(deg):
            _resolve(self, first + k, self._flags[k])
        _propagate(self, 0)
        return _result(self)

    def skip(self, Py_ssize_t node):
        """Mark a PENDING or READY node SKIPPED from outside and propagate; ``skipped`` starts with it.

        Returns ``(ready, skipped)``. See ``aobd._fast._py_routing.Router.skip``.
        """
        cdef signed char st
        _check_idle(self)
        _check_node(self, node)
        st = self._status[node]
        if st != C_PENDING and st != C_READY:
            raise ValueError(
                f"node {node} is {_STATUS_NAMES[st]}: only a PENDING or READY node can be skipped"
            )
        self._status[node] = C_SKIPPED
        self._n_open -= 1
        self._n_ready = 0
        self._work[0] = <int>node
        self._n_work = 1
        _propagate(self, 0)
        return _result(self)

    def status(self, Py_ssize_t node):
        """Status code of ``node`` (PENDING, READY, DONE or SKIPPED)."""
        _check_node(self, node)
        return self._status[node]

    def statuses(self):
        """Status code of every node, by index (a copy)."""
        return [self._status[i] for i in range(self._n)]

    def edge_state(self):
        """State of every edge, by edge id: -1 unresolved, 0 not taken, 1 taken (a copy)."""
        return [self._edge[e] for e in range(self._m)]

    def done(self):
        """True when every node is DONE or SKIPPED."""
        return self._n_open == 0

    @classmethod
    def restore(cls, out_offsets, out_targets, indegree, statuses, edge_state):
        """Rebuild a router from recorded node statuses and edge resolutions, then settle it.

        Returns ``(router, ready, skipped)``. See ``aobd._fast._py_routing.Router.restore``.
        """
        cdef Router r = cls(out_offsets, out_targets, indegree)
        cdef int n = r._n
        cdef int m = r._m
        cdef int i, e, s, t, st, v
        cdef Py_ssize_t n_st = len(statuses)
        cdef Py_ssize_t n_es = len(edge_state)
        if n_st != n:
            raise ValueError(f"statuses has {n_st} entries but the graph has {n} nodes")
        if n_es != m:
            raise ValueError(f"edge_state has {n_es} entries but the graph has {m} edges")
        # Staged as C ints, not signed chars, so that an out-of-range code is reported with its value.
        cdef int* st_in = NULL
        cdef int* es_in = NULL
        try:
            st_in = <int*>_alloc(n, sizeof(int))
            es_in = <int*>_alloc(m, sizeof(int))
            _load_ints("statuses", statuses, st_in, n)
            _load_ints("edge_state", edge_state, es_in, m)
            for i in range(n):
                if st_in[i] < C_PENDING or st_in[i] > C_SKIPPED:
                    raise ValueError(f"statuses[{i}] = {st_in[i]} is not a node status (0..3)")
            for e in range(m):
                if es_in[e] < C_UNRESOLVED or es_in[e] > C_TAKEN:
                    raise ValueError(f"edge_state[{e}] = {es_in[e]} is not an edge state (-1, 0 or 1)")
            for s in range(n):
                st = st_in[s]
                for e in range(r._offsets[s], r._offsets[s + 1]):
                    v = es_in[e]
                    if st == C_DONE:
                        if v == C_UNRESOLVED:
                            raise ValueError(
                                f"edge {e} ({s}->{r._targets[e]}) leaves DONE node {s} but is unresolved;"
                                " pass 0 or 1"
                            )
                    elif st == C_SKIPPED:
                        if v == C_TAKEN:
                            raise ValueError(
                                f"edge {e} ({s}->{r._targets[e]}) leaves SKIPPED node {s} but is taken;"
                                " pass 0 or -1"
                            )
                        es_in[e] = C_NOT_TAKEN
                    elif v != C_UNRESOLVED:
                        raise ValueError(
                            f"edge {e} ({s}->{r._targets[e]}) leaves {_STATUS_NAMES[st]} node {s}"
                            " but is resolved; pass -1"
                        )
            r._n_open = 0
            for i in range(n):
                r._status[i] = <signed char>st_in[i]
                if st_in[i] == C_PENDING or st_in[i] == C_READY:
                    r._n_open += 1
            for e in range(m):
                v = es_in[e]
                r._edge[e] = <signed char>v
                if v != C_UNRESOLVED:
                    t = r._targets[e]
                    r._unresolved[t] -= 1
                    if v == C_TAKEN:
                        r._n_taken[t] += 1
        finally:
            PyMem_Free(st_in)
            PyMem_Free(es_in)
        r._started = True

        # Settle: decide every PENDING node whose in-edges are all resolved, then propagate the skips.
        r._n_ready = 0
        r._n_work = 0
        for i in range(n):
            if r._status[i] == C_PENDING and r._unresolved[i] == 0:
                if r._indegree[i] == 0 or r._n_taken[i] > 0:
                    r._status[i] = C_READY
                    r._ready[r._n_ready] = i
                    r._n_ready += 1
                else:
                    r._status[i] = C_SKIPPED
                    r._n_open -= 1
                    r._work[r._n_work] = i
                    r._n_work += 1
        _propagate(r, 0)
        _sort_ints(r._ready, r._n_ready)
        return r, _int_list_from(r._ready, r._n_ready, 0), _int_list_from(r._work, r._n_work, 0)

    def __repr__(self):
        cdef int counts[4]
        cdef int i
        counts[0] = counts[1] = counts[2] = counts[3] = 0
        for i in range(self._n):
            counts[self._status[i]] += 1
        return (
            f"<Router {self._n} nodes: {counts[C_PENDING]} pending, {counts[C_READY]} ready,"
            f" {counts[C_DONE]} done, {counts[C_SKIPPED]} skipped>"
        )


# -- helpers: module-level functions, not cdef methods, so that they inline (a cdef method of a class that
# is not final is called through its vtable) and Router stays subclassable like the reference.

cdef void* _alloc(Py_ssize_t count, size_t size) except NULL:
    # Never ask for 0 bytes: a NULL answer must mean out of memory.
    cdef void* p = PyMem_Malloc((count if count > 0 else 1) * size)
    if p == NULL:
        raise MemoryError()
    return p


cdef int _load_ints(str name, object values, int* dst, Py_ssize_t k) except -1:
    cdef Py_ssize_t i = 0
    try:
        for v in values:
            if i >= k:  # longer than its len() said
                break
            dst[i] = v
            i += 1
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of integers ({exc})") from None
    if i != k:  # never leave C memory uninitialised
        raise ValueError(f"{name} yielded {i} items but its len() is {k}")
    return 0


cdef inline int _check_idle(Router r) except -1:
    if r._busy:
        raise RuntimeError("Router is not reentrant: changed while reading `taken` of an earlier call")
    return 0


cdef inline int _check_node(Router r, Py_ssize_t node) except -1:
    if node < 0 or node >= r._n:
        raise IndexError(f"node {node} is out of range: the graph has {r._n} nodes")
    return 0


cdef inline int _read_taken(Router r, Py_ssize_t node, object taken, int deg) except -1:
    # Every flag lands in _flags before any state changes, so a bad element leaves the router untouched.
    # bytes and lists of bools (what the engine passes) are read directly; anything else, including a list
    # holding other objects, goes through the iterator, because __bool__ may run code that edits the list.
    cdef Py_ssize_t size, k
    cdef const char* buf
    cdef PyObject* item
    if type(taken) is list:
        size = PyList_GET_SIZE(taken)
        if size != deg:
            return _bad_taken_len(node, deg, size)
        for k in range(deg):
            item = PyList_GET_ITEM(taken, k)
            if item == <PyObject*>True:
                r._flags[k] = C_TAKEN
            elif item == <PyObject*>False:
                r._flags[k] = C_NOT_TAKEN
            else:
                return _read_taken_generic(r, node, taken, deg)
        return 0
    if type(taken) is bytes:
        size = PyBytes_GET_SIZE(taken)
        if size != deg:
            return _bad_taken_len(node, deg, size)
        buf = PyBytes_AS_STRING(taken)
        for k in range(deg):
            r._flags[k] = C_TAKEN if buf[k] != 0 else C_NOT_TAKEN
        return 0
    size = len(taken)
    if size != deg:
        return _bad_taken_len(node, deg, size)
    return _read_taken_generic(r, node, taken, deg)


cdef int _read_taken_generic(Router r, Py_ssize_t node, object taken, int deg) except -1:
    cdef Py_ssize_t k = 0
    r._busy = True  # a __bool__ that called back into this router would overwrite _flags
    try:
        for v in taken:
            if k >= deg:
                break
            r._flags[k] = C_TAKEN if PyObject_IsTrue(v) else C_NOT_TAKEN
            k += 1
    finally:
        r._busy = False
    if k != deg:  # the sequence shrank while we read it
        return _bad_taken_len(node, deg, k)
    return 0


cdef int _bad_taken_len(Py_ssize_t node, int deg, Py_ssize_t size) except -1:
    raise ValueError(f"node {node} has {deg} out-edges but taken has {size} entries")


cdef inline void _resolve(Router r, int edge, signed char flag) noexcept:
    cdef int target = r._targets[edge]
    r._edge[edge] = flag
    if flag:
        r._n_taken[target] += 1
    r._unresolved[target] -= 1
    # A node skipped from outside while pending keeps receiving resolutions; it is already decided.
    if r._unresolved[target] == 0 and r._status[target] == C_PENDING:
        # target has an in-edge (this one), so it runs iff one of its in-edges was taken.
        if r._n_taken[target]:
            r._status[target] = C_READY
            r._ready[r._n_ready] = target
            r._n_ready += 1
        else:
            r._status[target] = C_SKIPPED
            r._n_open -= 1
            r._work[r._n_work] = target
            r._n_work += 1


cdef inline void _propagate(Router r, int head) noexcept:
    # _work is the FIFO worklist and the skipped result at once. A node is skipped at most once in the
    # router's life, so its n slots cannot overflow.
    cdef int s, e
    while head < r._n_work:
        s = r._work[head]
        head += 1
        for e in range(r._offsets[s], r._offsets[s + 1]):
            _resolve(r, e, C_NOT_TAKEN)


cdef int _cmp_int(const void* a, const void* b) noexcept nogil:
    cdef int x = (<const int*>a)[0]
    cdef int y = (<const int*>b)[0]
    return (x > y) - (x < y)


cdef inline void _sort_ints(int* a, int k) noexcept nogil:
    cdef int i, j, v
    if k > SMALL_SORT:
        qsort(a, k, sizeof(int), _cmp_int)
        return
    for i in range(1, k):
        v = a[i]
        j = i - 1
        while j >= 0 and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v


cdef list _int_list_from(const int* a, int k, int spare):
    # PyList_New + SET_ITEM rather than appends; `spare` extra slots let the result cache refill it in place.
    cdef list out = PyList_New(k + spare)
    cdef int i
    cdef object v
    # The spare slots are NULL; a size that covers only filled slots keeps every reader away from them.
    Py_SET_SIZE(<PyObject*>out, 0)
    for i in range(k):
        v = a[i]
        Py_INCREF(v)
        PyList_SET_ITEM(out, i, v)
    Py_SET_SIZE(<PyObject*>out, k)
    return out


# The result cache. Two fresh lists and a tuple cost ~45 ns per call, six times the routing itself on W6.
# Like CPython's zip() and dict.items() iterators, complete() and skip() reuse earlier results whose
# reference counts show that nobody else holds them, so that no caller can ever see a result change: a
# tuple once the caller dropped it, and each of its lists once the caller dropped that too. A ring of a few
# results, rather than one, also serves the caller that keeps the last result's lists in locals while it
# makes the next call: the lists from the call before are free by then. Nothing free: fresh objects.
cdef enum:
    RING = 4
cdef PyObject* _ring[RING]  # owned references to result tuples, or NULL
cdef int _ring_next = 0      # the slot a fresh result replaces when the ring is full and all held


cdef inline bint _list_free(PyObject* tup, Py_ssize_t slot) noexcept:
    return Py_REFCNT(PyTuple_GET_ITEM_PTR(tup, slot)) == 1


cdef inline tuple _result(Router r):
    global _ring_next
    cdef int i
    cdef int whole = -1    # a slot whose tuple and lists are all free
    cdef int empty = -1    # a slot with no tuple yet
    cdef int partial = -1  # a slot whose tuple is free but whose lists are held
    cdef PyObject* t
    cdef tuple out
    _sort_ints(r._ready, r._n_ready)
    for i in range(RING):
        t = _ring[i]
        if t == NULL:
            if empty < 0:
                empty = i
        elif Py_REFCNT(t) == 1:
            if _list_free(t, 0) and _list_free(t, 1):
                whole = i
                break
            if partial < 0:
                partial = i
    # A new tuple beats a partial reuse while the ring has room: that is how the ring fills up to serve a
    # caller that keeps the lists of the previous result.
    if whole < 0 and (empty >= 0 or partial < 0):
        out = (_int_list_from(r._ready, r._n_ready, RESULT_SPARE), _int_list_from(r._work, r._n_work, RESULT_SPARE))
        if empty < 0:
            empty = _ring_next
            _ring_next = (_ring_next + 1) % RING
        # A filled slot that was not picked is held elsewhere, so dropping the ring's reference runs no code.
        t = _ring[empty]
        Py_INCREF(out)
        _ring[empty] = <PyObject*>out
        if t != NULL:
            Py_DECREF_PTR(t)
        return out
    # This owned local reference doubles as the reentrancy guard: a nested call sees a count of 2.
    out = <tuple>_ring[whole if whole >= 0 else partial]
    _refill(<PyObject*>out, 0, r._ready, r._n_ready)
    _refill(<PyObject*>out, 1, r._work, r._n_work)
    # The GC untracks tuples that hold only untracked objects. Ours holds lists, but do not rely on it.
    if not PyObject_GC_IsTracked(<PyObject*>out):
        PyObject_GC_Track(<PyObject*>out)
    return out


cdef inline int _refill(PyObject* tup, Py_ssize_t slot, const int* a, int k) except -1:
    # tup is referenced only by the cache and by _result: its slot can be swapped or its list reused.
    cdef PyObject* old = PyTuple_GET_ITEM_PTR(tup, slot)
    cdef PyListObject* lst = <PyListObject*>old
    cdef Py_ssize_t i, size
    cdef list fresh
    cdef object v
    if Py_REFCNT(old) == 1 and lst.allocated >= k:
        size = Py_SIZE(old)
        # A caller may have put anything into the list before dropping it. Dropping an exact int runs
        # no code, so only a list of exact ints is emptied in place.
        for i in range(size):
            if not PyLong_CheckExact(<object>lst.ob_item[i]):
                break
        else:
            Py_SET_SIZE(old, 0)
            for i in range(size):
                Py_DECREF_PTR(lst.ob_item[i])
            for i in range(k):
                v = a[i]
                Py_INCREF(v)
                lst.ob_item[i] = <PyObject*>v
            Py_SET_SIZE(old, k)
            return 0
    fresh = _int_list_from(a, k, RESULT_SPARE)
    Py_INCREF(fresh)
    PyTuple_SET_ITEM_PTR(tup, slot, <PyObject*>fresh)
    Py_DECREF_PTR(old)  # last, as it may run arbitrary code: the tuple is consistent by now
    return 0
