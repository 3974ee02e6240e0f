# distutils: libraries = sqlite3
"""The SQLite event log's writer: the C twin of ``_py_sqlite_group`` (same interface, same outcomes).

Why a twin: the reference's writer thread runs a handful of statements per group through the ``sqlite3``
module, and every statement releases the GIL to step and takes it back from the event loop's thread, which is
busy running the engine; a group's Python (building the parameters) also holds it. Measured on in-process W6 at
64 runs in flight: a group's transaction took 1.3 ms of wall time for 0.7 ms of the writer's CPU.

Here :meth:`GroupWriter.submit` reads an append's parameters into C structs at once, on the caller's thread
(with the GIL), and queues them. The writer thread is a plain C thread that never takes the GIL: it takes
whatever is queued, runs the writers' ``flock``, BEGIN, every statement, COMMIT (with its fsync) and the
periodic checkpoint in C, and writes an eventfd when a group is done; :meth:`~GroupWriter.collect`, on the
event loop, turns the results into outcomes. A Python writer thread needs the GIL back after every commit (and
around each blocking call), and the loop's thread, busy with the engine, hands it over only at its switch
interval: measured, that wait was 0.97 ms of a 1.7 ms commit cycle (docs/performance.md).

The SQL is the reference's (imported from it), run one append at a time in queue order, as the reference's
fallback does: prepared statements stepped in C cost about a microsecond each, so the multi-row forms the
reference needs to save Python calls buy nothing here, and each append learns its own conflict directly. If a
statement fails mid-group (the file contradicts itself), the group is rolled back and replayed with a savepoint
per append, so only the culprit fails, as in the reference.

This module links the system libsqlite3, the library Python's own ``sqlite3`` module is linked to: two copies
of SQLite in one process would not see each other's POSIX locks on the same file.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_DECREF, Py_INCREF, Py_XDECREF
from libc.errno cimport EINTR, errno
from libc.limits cimport INT_MAX
from libc.stdint cimport uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free
from libc.string cimport strdup, strerror, strncpy
from posix.signal cimport SIG_BLOCK, sigfillset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.types cimport sigset_t

import os
import sqlite3

from aobd._fast._py_sqlite_group import (
    ADVANCE_RUN,
    ADVANCE_SEQ,
    EVENT_ROWS_MAX,
    INSERT_NEW_RUN,
    SELECT_LAST,
    GroupDone,
    insert_events_sql,
    leaves_index,
    new_run_row,
)


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL


cdef extern from "sqlite3.h" nogil:
    ctypedef struct Db "sqlite3"  # named apart from the Python module sqlite3
    ctypedef struct sqlite3_stmt
    ctypedef long long sqlite3_int64
    ctypedef void (*sqlite3_destructor_type)(void*)
    sqlite3_destructor_type SQLITE_STATIC
    int SQLITE_OK
    int SQLITE_ROW
    int SQLITE_DONE
    int SQLITE_OPEN_READWRITE
    int SQLITE_OPEN_NOMUTEX
    int sqlite3_open_v2(const char* filename, Db** db, int flags, const char* vfs)
    int sqlite3_close_v2(Db* db)
    int sqlite3_busy_timeout(Db* db, int ms)
    int sqlite3_prepare_v2(Db* db, const char* sql, int nbyte, sqlite3_stmt** stmt, const char** tail)
    int sqlite3_finalize(sqlite3_stmt* stmt)
    int sqlite3_step(sqlite3_stmt* stmt)
    int sqlite3_reset(sqlite3_stmt* stmt)
    int sqlite3_bind_text(sqlite3_stmt* stmt, int i, const char* text, int n, sqlite3_destructor_type d)
    int sqlite3_bind_blob(sqlite3_stmt* stmt, int i, const void* data, int n, sqlite3_destructor_type d)
    int sqlite3_bind_int64(sqlite3_stmt* stmt, int i, sqlite3_int64 value)
    int sqlite3_bind_double(sqlite3_stmt* stmt, int i, double value)
    int sqlite3_bind_null(sqlite3_stmt* stmt, int i)
    sqlite3_int64 sqlite3_column_int64(sqlite3_stmt* stmt, int i)
    int sqlite3_changes(Db* db)
    int sqlite3_get_autocommit(Db* db)
    const char* sqlite3_errmsg(Db* db)
    int SQLITE_CHECKPOINT_PASSIVE
    int sqlite3_wal_checkpoint_v2(Db* db, const char* schema, int mode, int* log, int* checkpointed)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef unsigned long pthread_t
    ctypedef void* (*start_routine)(void*) noexcept nogil
    int pthread_mutex_init(pthread_mutex_t* mutex, const void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)
    int pthread_cond_init(pthread_cond_t* cond, const void* attr)
    int pthread_cond_destroy(pthread_cond_t* cond)
    int pthread_cond_wait(pthread_cond_t* cond, pthread_mutex_t* mutex)
    int pthread_cond_signal(pthread_cond_t* cond)
    int pthread_create(pthread_t* thread, const void* attr, start_routine start, void* arg)
    int pthread_join(pthread_t thread, void** result)


cdef extern from "<signal.h>" nogil:
    int pthread_sigmask(int how, const sigset_t* set, sigset_t* old)


cdef extern from "<sys/eventfd.h>" nogil:
    int EFD_NONBLOCK
    int EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)
    int eventfd_read(int fd, uint64_t* value)
    int eventfd_write(int fd, uint64_t value)


cdef extern from "<sys/file.h>" nogil:
    int LOCK_EX
    int LOCK_UN
    int flock(int fd, int operation)


cdef extern from "<unistd.h>" nogil:
    int close(int fd)


cdef struct Text:
    const char* ptr  # NULL: SQL NULL
    int size


cdef struct Record:
    sqlite3_int64 seq
    double ts
    Text type
    Text data


cdef enum Kind:
    NEW_RUN  # first append of a run: insert its runs row
    ADVANCE_SEQ_ONLY  # leaves the indexed columns alone
    ADVANCE_INDEXED  # sets some of workflow, status, parent_run_id, workspace


cdef enum Result:
    COMMITTED
    CONFLICT
    FAILED


cdef struct Pending:
    Text run_id
    Kind kind
    # The runs row of a new run (defaults filled in), or the index fields of an advance (NULL: unchanged).
    Text workflow
    Text status
    Text parent_run_id
    Text workspace
    Record* records
    int n_records
    Result result
    sqlite3_int64 last_seq  # on CONFLICT
    char* error  # on FAILED: strdup'd, freed with the node


cdef enum GroupStatus:
    GROUP_DONE
    GROUP_RETRY_ISOLATED  # a statement failed mid-group; the transaction was rolled back
    GROUP_FAILED  # BEGIN or COMMIT failed, or SQLite abandoned the transaction; rolled back


cdef enum:  # statement slots of Conn.stmts (anonymous: plain ints, usable as indexes)
    S_BEGIN
    S_COMMIT
    S_ROLLBACK
    S_SAVEPOINT
    S_RELEASE
    S_ROLLBACK_TO
    S_INSERT_NEW_RUN
    S_ADVANCE_SEQ
    S_ADVANCE_RUN
    S_SELECT_LAST
    S_INSERT_EVENTS  # the events insert of 1 row; that of k rows is S_INSERT_EVENTS + k - 1 (k <= EVENT_ROWS)
    S_INSERT_EVENTS_2
    S_INSERT_EVENTS_3
    S_INSERT_EVENTS_4
    S_INSERT_EVENTS_5
    S_INSERT_EVENTS_6
    S_INSERT_EVENTS_7
    S_INSERT_EVENTS_8
    N_STMTS


cdef enum:
    EVENT_ROWS = 8  # the reference's EVENT_ROWS_MAX (checked when a writer opens)


cdef struct Conn:
    Db* db
    sqlite3_stmt* stmts[<int>N_STMTS]
    char message[512]  # why the last group failed


# One append, allocated with its records after it; linked in the queue, then in its group.
cdef struct Node:
    Pending p
    PyObject* keep  # a list: the append and the copies the pointers point into (NULL for commit()'s nodes)
    Node* next  # the next append of the queue, or of the group
    # Set on a group's first node by the writer thread when the group is done:
    Node* next_group
    Py_ssize_t group_size
    bint group_failed
    char* group_error  # strdup'd
    double group_seconds


# The writer thread's state. Only the queue, the done list and the counters are shared; ``mu`` guards them. The
# thread touches no Python object, so it never needs the GIL.
cdef struct Pump:
    Conn* conn
    pthread_mutex_t mu
    pthread_cond_t cv
    Node* head  # the queue
    Node* tail
    Node* done_head  # groups done, linked by next_group
    Node* done_tail
    bint stopping
    int wakeup  # eventfd: written once per group done
    int lock_fd  # the writers' flock (-1: none)
    Py_ssize_t max_batch
    long checkpoint_every
    long checkpoints


cdef int _text(object value, Text* out) except -1:
    cdef Py_ssize_t size = 0
    if value is None:
        out.ptr = NULL
        out.size = 0
    else:
        out.ptr = PyUnicode_AsUTF8AndSize(value, &size)
        out.size = _sqlite_size(size)
    return 0


cdef int _sqlite_size(Py_ssize_t size) except -1:
    """A length as SQLite's bind functions take it (an int), refused rather than truncated."""
    if size > INT_MAX:
        raise OverflowError(f"a value of {size} bytes is larger than SQLite can bind")
    return <int>size


cdef inline int _bind_text(sqlite3_stmt* stmt, int i, Text text) noexcept nogil:
    if text.ptr == NULL:
        return sqlite3_bind_null(stmt, i)
    return sqlite3_bind_text(stmt, i, text.ptr, text.size, SQLITE_STATIC)


cdef inline int _done(sqlite3_stmt* stmt) noexcept nogil:
    """Step a statement that returns no row and reset it; SQLITE_OK or the error code."""
    cdef int rc = sqlite3_step(stmt)
    sqlite3_reset(stmt)
    return SQLITE_OK if rc == SQLITE_DONE or rc == SQLITE_ROW else rc


cdef Node* _new_node(object append, list keep) except NULL:
    """An append's parameters read into a new node (with the GIL); ``keep`` receives the objects the node's
    pointers point into that the append itself does not hold."""
    run_id, recs, index = append[0], append[1], append[2]
    cdef Py_ssize_t n_records = len(recs)
    if n_records == 0:
        raise ValueError(f"append to run {run_id!r} has no records")
    cdef Node* node = <Node*>calloc(1, sizeof(Node) + n_records * sizeof(Record))
    if node == NULL:
        raise MemoryError
    cdef Pending* p = &node.p
    cdef Record* r
    cdef Py_ssize_t i = 0
    try:
        _text(run_id, &p.run_id)
        p.records = <Record*>(node + 1)
        p.n_records = <int>n_records
        for record in recs:
            r = &p.records[i]
            i += 1
            r.seq = record.seq
            r.ts = record.ts
            _text(record.type, &r.type)
            data = record.data
            if type(data) is not bytes:
                data = bytes(data)
                keep.append(data)
            r.data.ptr = PyBytes_AS_STRING(data)
            r.data.size = _sqlite_size(PyBytes_GET_SIZE(data))
        if p.records[0].seq == 1:
            p.kind = NEW_RUN
            # The reference's row, defaults filled in (columns as in RUN_COLUMNS).
            row = new_run_row(run_id, recs, index)
            keep.append(row)
            _text(row[1], &p.workflow)
            _text(row[2], &p.status)
            _text(row[6], &p.parent_run_id)
            _text(row[7], &p.workspace)
        elif leaves_index(index):
            p.kind = ADVANCE_SEQ_ONLY
        else:
            p.kind = ADVANCE_INDEXED
            _text(index.workflow, &p.workflow)
            _text(index.status, &p.status)
            _text(index.parent_run_id, &p.parent_run_id)
            _text(index.workspace, &p.workspace)
    except BaseException:
        free(node)
        raise
    return node


cdef void _free_nodes(Node* node) noexcept:
    """Free a chain of nodes (linked by ``next``), dropping what they keep alive; needs the GIL."""
    cdef Node* following
    while node != NULL:
        following = node.next
        free(node.p.error)
        free(node.group_error)
        Py_XDECREF(node.keep)
        free(node)
        node = following


cdef object _outcome(Pending* p):
    if p.result == COMMITTED:
        return None
    if p.result == CONFLICT:
        return p.last_seq
    return p.error.decode(errors="replace") if p.error != NULL else "unknown error"


# -- one group, on a connection, without the GIL ----------------------------------------------------------------

cdef GroupStatus _group(Conn* conn, Node* first) noexcept nogil:
    """Commit the group starting at ``first``; a statement failing mid-group makes it replay isolated."""
    cdef GroupStatus status = _transaction(conn, first, False)
    if status == GROUP_RETRY_ISOLATED:
        status = _transaction(conn, first, True)
    return status


cdef GroupStatus _transaction(Conn* conn, Node* first, bint isolated) noexcept nogil:
    cdef Node* node = first
    cdef Pending* p
    cdef int rc = _done(conn.stmts[S_BEGIN])
    if rc != SQLITE_OK:
        return _fail(conn)
    while node != NULL:
        p = &node.p
        node = node.next
        if isolated:
            rc = _done(conn.stmts[S_SAVEPOINT])
            if rc != SQLITE_OK:
                return _fail(conn)
        rc = _apply(conn, p)
        if rc != SQLITE_OK:
            if not isolated:
                _rollback(conn)
                return GROUP_RETRY_ISOLATED
            if sqlite3_get_autocommit(conn.db):  # SQLite abandoned the whole transaction (I/O error, disk full)
                return _fail(conn)
            p.result = FAILED
            free(p.error)
            p.error = strdup(sqlite3_errmsg(conn.db))
            if _done(conn.stmts[S_ROLLBACK_TO]) != SQLITE_OK:
                return _fail(conn)
        if isolated and _done(conn.stmts[S_RELEASE]) != SQLITE_OK:
            return _fail(conn)
    if _done(conn.stmts[S_COMMIT]) != SQLITE_OK:
        return _fail(conn)
    return GROUP_DONE


cdef int _apply(Conn* conn, Pending* p) noexcept nogil:
    """The expected-seq check, run index write and events of one append; SQLITE_OK or the error code. A
    conflict is an outcome, not an error: it leaves the transaction as it was."""
    cdef Record* first = &p.records[0]
    cdef Record* final = &p.records[p.n_records - 1]
    cdef sqlite3_stmt* stmt
    cdef int rc, i
    p.result = COMMITTED
    if p.kind == NEW_RUN:
        stmt = conn.stmts[S_INSERT_NEW_RUN]
        _bind_text(stmt, 1, p.run_id)
        _bind_text(stmt, 2, p.workflow)
        _bind_text(stmt, 3, p.status)
        sqlite3_bind_double(stmt, 4, first.ts)
        sqlite3_bind_double(stmt, 5, final.ts)
        sqlite3_bind_int64(stmt, 6, final.seq)
        _bind_text(stmt, 7, p.parent_run_id)
        _bind_text(stmt, 8, p.workspace)
    elif p.kind == ADVANCE_SEQ_ONLY:
        stmt = conn.stmts[S_ADVANCE_SEQ]
        sqlite3_bind_int64(stmt, 1, final.seq)
        sqlite3_bind_double(stmt, 2, final.ts)
        _bind_text(stmt, 3, p.run_id)
        sqlite3_bind_int64(stmt, 4, first.seq - 1)
    else:
        stmt = conn.stmts[S_ADVANCE_RUN]
        sqlite3_bind_int64(stmt, 1, final.seq)
        sqlite3_bind_double(stmt, 2, final.ts)
        _bind_text(stmt, 3, p.workflow)
        _bind_text(stmt, 4, p.status)
        _bind_text(stmt, 5, p.parent_run_id)
        _bind_text(stmt, 6, p.workspace)
        _bind_text(stmt, 7, p.run_id)
        sqlite3_bind_int64(stmt, 8, first.seq - 1)
    rc = _done(stmt)
    if rc != SQLITE_OK:
        return rc
    if sqlite3_changes(conn.db) != 1:
        p.result = CONFLICT
        stmt = conn.stmts[S_SELECT_LAST]
        _bind_text(stmt, 1, p.run_id)
        rc = sqlite3_step(stmt)
        p.last_seq = sqlite3_column_int64(stmt, 0) if rc == SQLITE_ROW else 0
        sqlite3_reset(stmt)
        return SQLITE_OK if rc == SQLITE_ROW or rc == SQLITE_DONE else rc
    # An append's events in as few statements as there are chunks of EVENT_ROWS_MAX: a statement's step and reset
    # (its registers cleared, its cursors closed) cost more than inserting its rows.
    cdef int j, k, col
    cdef Record* r
    i = 0
    while i < p.n_records:
        k = p.n_records - i
        if k > EVENT_ROWS:
            k = EVENT_ROWS
        stmt = conn.stmts[S_INSERT_EVENTS + k - 1]
        for j in range(k):
            r = &p.records[i + j]
            col = 5 * j
            _bind_text(stmt, col + 1, p.run_id)
            sqlite3_bind_int64(stmt, col + 2, r.seq)
            _bind_text(stmt, col + 3, r.type)
            sqlite3_bind_double(stmt, col + 4, r.ts)
            sqlite3_bind_blob(stmt, col + 5, r.data.ptr, r.data.size, SQLITE_STATIC)
        rc = _done(stmt)
        if rc != SQLITE_OK:
            return rc
        i += k
    return SQLITE_OK


cdef GroupStatus _fail(Conn* conn) noexcept nogil:
    """Keep SQLite's message for the caller and leave no transaction open."""
    strncpy(conn.message, sqlite3_errmsg(conn.db), sizeof(conn.message) - 1)
    conn.message[sizeof(conn.message) - 1] = 0
    _rollback(conn)
    return GROUP_FAILED


cdef void _rollback(Conn* conn) noexcept nogil:
    if not sqlite3_get_autocommit(conn.db):
        # If ROLLBACK fails the transaction is gone anyway; the next BEGIN starts clean.
        _done(conn.stmts[S_ROLLBACK])


# -- the writer thread ------------------------------------------------------------------------------------------

cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int _flock(int fd, int operation) noexcept nogil:
    """flock, retried on EINTR; 0 or -1 (errno set). Nothing to do without a lock file (fd -1)."""
    if fd < 0:
        return 0
    while flock(fd, operation) != 0:
        if errno != EINTR:
            return -1
    return 0


cdef void* _writer_main(void* arg) noexcept nogil:
    cdef Pump* pump = <Pump*>arg
    cdef Conn* conn = pump.conn
    cdef sigset_t every_signal
    cdef Node* first
    cdef Node* last
    cdef Node* node
    cdef Py_ssize_t n
    cdef long since_checkpoint = 0
    cdef GroupStatus status
    cdef double started
    # Signals go to the interpreter's threads; this one would only see its syscalls interrupted.
    sigfillset(&every_signal)
    pthread_sigmask(SIG_BLOCK, &every_signal, NULL)
    while True:
        pthread_mutex_lock(&pump.mu)
        while pump.head == NULL and not pump.stopping:
            pthread_cond_wait(&pump.cv, &pump.mu)
        if pump.head == NULL:  # stopping, and everything queued is committed
            pthread_mutex_unlock(&pump.mu)
            return NULL
        # Everything queued while the previous group was committing goes into this one (up to max_batch).
        first = last = pump.head
        n = 1
        while last.next != NULL and n < pump.max_batch:
            last = last.next
            n += 1
        pump.head = last.next
        if pump.head == NULL:
            pump.tail = NULL
        last.next = NULL
        pthread_mutex_unlock(&pump.mu)

        started = _now()
        if _flock(pump.lock_fd, LOCK_EX) != 0:
            snprintf(conn.message, sizeof(conn.message), "cannot take the writers' lock: %s", strerror(errno))
            status = GROUP_FAILED
        else:
            status = _group(conn, first)
            _flock(pump.lock_fd, LOCK_UN)
        first.group_seconds = _now() - started
        first.group_size = n
        first.group_failed = status != GROUP_DONE
        if first.group_failed:
            first.group_error = strdup(conn.message)
        else:
            node = first
            while node != NULL:
                if node.p.result == COMMITTED:
                    since_checkpoint += 1
                node = node.next

        pthread_mutex_lock(&pump.mu)
        if pump.done_tail == NULL:
            pump.done_head = first
        else:
            pump.done_tail.next_group = first
        pump.done_tail = first
        pthread_mutex_unlock(&pump.mu)
        eventfd_write(pump.wakeup, 1)

        # After the group's outcomes are out, not inside its COMMIT. PASSIVE never waits for readers; if it
        # fails (another process checkpointing), the WAL just grows until the next one.
        if since_checkpoint >= pump.checkpoint_every:
            since_checkpoint = 0
            if sqlite3_wal_checkpoint_v2(conn.db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL) == SQLITE_OK:
                pthread_mutex_lock(&pump.mu)
                pump.checkpoints += 1
                pthread_mutex_unlock(&pump.mu)


cdef class GroupWriter:
    """The writer connection of one SQLite file, and the thread that commits on it once started.

    Used by one thread at a time: the caller of :meth:`commit`, or, after :meth:`start`, the writer's own thread
    (then :meth:`submit`, :meth:`collect` and :meth:`stop` may be called from any one thread).

    Args:
        path: the database file; it must exist with its schema (the log creates it before opening a writer).
        pragmas: statements run once on the new connection (``synchronous``, ``busy_timeout``...).
    """

    cdef Conn conn
    cdef Pump pump
    cdef pthread_t thread
    cdef bint started  # the thread runs (until stop() joins it)
    cdef bint stopped  # stop() was called: no start, no submit
    cdef bint synchronized  # the mutex and condition are initialized
    cdef object _keep  # the encoded SQL, alive while the statements are

    def __init__(self, str path, pragmas):
        cdef bytes encoded = os.fsencode(path)  # as Python's sqlite3 passes a path to SQLite
        cdef const char* filename = encoded
        cdef int rc
        self.pump.wakeup = -1
        # NOMUTEX: the connection is only ever used by one thread at a time (the class's contract: the caller of
        # commit(), or the writer thread once started), so SQLite's per-connection mutex guarded nothing; taking
        # and releasing it around every call was 4% of the writer's instructions.
        with nogil:
            rc = sqlite3_open_v2(filename, &self.conn.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL)
        if rc != SQLITE_OK:
            message = sqlite3_errmsg(self.conn.db).decode() if self.conn.db != NULL else f"error code {rc}"
            self._release()
            raise sqlite3.OperationalError(f"cannot open {path}: {message}")
        try:
            for pragma in pragmas:
                self._run_once(pragma)
            sql = [
                "BEGIN IMMEDIATE",
                "COMMIT",
                "ROLLBACK",
                "SAVEPOINT append",
                "RELEASE append",
                "ROLLBACK TO append",
                INSERT_NEW_RUN,
                ADVANCE_SEQ,
                ADVANCE_RUN,
                SELECT_LAST,
                *(insert_events_sql(rows) for rows in range(1, EVENT_ROWS_MAX + 1)),
            ]
            assert EVENT_ROWS_MAX == EVENT_ROWS and len(sql) == N_STMTS
            self._keep = [s.encode() for s in sql]
            for i, text in enumerate(self._keep):
                if sqlite3_prepare_v2(self.conn.db, text, -1, &self.conn.stmts[i], NULL) != SQLITE_OK:
                    raise sqlite3.OperationalError(
                        f"cannot prepare {sql[i]!r}: {sqlite3_errmsg(self.conn.db).decode()}"
                    )
        except BaseException:
            self._release()
            raise

    def __dealloc__(self):
        self._stop_thread()
        self._release()

    def close(self):
        """Stop the thread if it runs (see :meth:`stop`) and close the connection and the eventfd."""
        self.stop()
        self._release()

    cdef void _release(self) noexcept:
        cdef int i
        # Groups nobody collected: their appends' callers are gone (the log collects before it closes).
        _free_groups(self.pump.done_head)
        self.pump.done_head = self.pump.done_tail = NULL
        _free_nodes(self.pump.head)
        self.pump.head = self.pump.tail = NULL
        if self.synchronized:
            pthread_mutex_destroy(&self.pump.mu)
            pthread_cond_destroy(&self.pump.cv)
            self.synchronized = False
        if self.pump.wakeup >= 0:
            close(self.pump.wakeup)
            self.pump.wakeup = -1
        for i in range(N_STMTS):
            if self.conn.stmts[i] != NULL:
                sqlite3_finalize(self.conn.stmts[i])
                self.conn.stmts[i] = NULL
        if self.conn.db != NULL:
            sqlite3_close_v2(self.conn.db)
            self.conn.db = NULL

    cdef _run_once(self, str sql):
        """Run one statement to its end (a pragma's result rows are dropped)."""
        cdef bytes text = sql.encode()
        cdef sqlite3_stmt* stmt = NULL
        cdef int rc = sqlite3_prepare_v2(self.conn.db, text, -1, &stmt, NULL)
        if rc == SQLITE_OK:
            rc = sqlite3_step(stmt)
            while rc == SQLITE_ROW:
                rc = sqlite3_step(stmt)
            sqlite3_finalize(stmt)
        if rc != SQLITE_OK and rc != SQLITE_DONE:
            raise sqlite3.OperationalError(f"{sql!r} failed: {sqlite3_errmsg(self.conn.db).decode()}")

    # -- one group on the caller's thread ----------------------------------------------------------------------

    def commit(self, group):
        """Commit ``group`` in one transaction; the outcome of each append (see ``_py_sqlite_group``)."""
        if self.conn.db == NULL:
            raise sqlite3.ProgrammingError("the group writer is closed")
        if self.started:
            raise sqlite3.ProgrammingError("the group writer's thread owns the connection")
        cdef Node* first = NULL
        cdef Node* last = NULL
        cdef Node* node
        cdef GroupStatus status
        keep = []
        try:
            for append in group:
                node = _new_node(append, keep)
                if last == NULL:
                    first = node
                else:
                    last.next = node
                last = node
            if first == NULL:
                return []
            with nogil:
                status = _group(&self.conn, first)
            if status != GROUP_DONE:
                raise sqlite3.OperationalError(self.conn.message.decode(errors="replace"))
            outcomes = []
            node = first
            while node != NULL:
                outcomes.append(_outcome(&node.p))
                node = node.next
            return outcomes
        finally:
            _free_nodes(first)

    # -- the writer thread -------------------------------------------------------------------------------------

    def start(self, int lock_fd, Py_ssize_t max_batch, long checkpoint_every):
        """Start the writer thread (a C thread that never takes the GIL); returns the eventfd to watch. Arguments
        and behaviour as in the reference (``_py_sqlite_group.GroupWriter.start``)."""
        if self.conn.db == NULL:
            raise sqlite3.ProgrammingError("the group writer is closed")
        if self.started or self.stopped:
            raise sqlite3.ProgrammingError("the group writer was started already")
        if max_batch < 1 or checkpoint_every < 1:
            raise ValueError("max_batch and checkpoint_every must be at least 1")
        self.pump.wakeup = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.pump.wakeup < 0:
            raise OSError(errno, strerror(errno).decode())
        pthread_mutex_init(&self.pump.mu, NULL)
        pthread_cond_init(&self.pump.cv, NULL)
        self.synchronized = True
        self.pump.conn = &self.conn
        self.pump.lock_fd = lock_fd
        self.pump.max_batch = max_batch
        self.pump.checkpoint_every = checkpoint_every
        cdef int rc = pthread_create(&self.thread, NULL, _writer_main, &self.pump)
        if rc != 0:
            raise OSError(rc, f"cannot start the writer thread: {strerror(rc).decode()}")
        self.started = True
        return self.pump.wakeup

    def submit(self, append):
        """Queue ``append`` for the next group; :meth:`collect` returns it, with its outcome, once committed."""
        if not self.started or self.stopped:
            raise sqlite3.ProgrammingError("the group writer is not running")
        keep = [append]
        cdef Node* node = _new_node(append, keep)
        node.keep = <PyObject*>keep
        Py_INCREF(keep)
        # The thread holds the mutex only to move list heads, and never needs the GIL: taking it here is brief.
        pthread_mutex_lock(&self.pump.mu)
        if self.pump.tail == NULL:
            self.pump.head = node
        else:
            self.pump.tail.next = node
        self.pump.tail = node
        pthread_cond_signal(&self.pump.cv)
        pthread_mutex_unlock(&self.pump.mu)

    def collect(self):
        """The groups done since the last call (``GroupDone``), in commit order (empty if none)."""
        if not self.synchronized:
            return []
        cdef uint64_t count
        # Read the eventfd before taking the groups: a group finished in between is taken now and leaves the
        # eventfd readable once more, which costs an empty collect, never a lost wake-up.
        eventfd_read(self.pump.wakeup, &count)
        pthread_mutex_lock(&self.pump.mu)
        cdef Node* group = self.pump.done_head
        self.pump.done_head = self.pump.done_tail = NULL
        pthread_mutex_unlock(&self.pump.mu)
        cdef Node* following
        done = []
        try:
            while group != NULL:
                following = group.next_group
                done.append(_group_done(group))
                group = following
        finally:
            _free_groups(group)  # only if building one failed (MemoryError): those outcomes are lost
        return done

    @property
    def checkpoints(self):
        """WAL checkpoints the thread has run (one per ``checkpoint_every`` committed appends)."""
        if not self.synchronized:
            return 0
        pthread_mutex_lock(&self.pump.mu)
        cdef long count = self.pump.checkpoints
        pthread_mutex_unlock(&self.pump.mu)
        return count

    def stop(self):
        """Commit what is queued and stop the thread (blocks until it has); :meth:`collect` returns the rest."""
        self.stopped = True
        self._stop_thread()

    cdef void _stop_thread(self) noexcept:
        if not self.started:
            return
        pthread_mutex_lock(&self.pump.mu)
        self.pump.stopping = True
        pthread_cond_signal(&self.pump.cv)
        pthread_mutex_unlock(&self.pump.mu)
        with nogil:
            pthread_join(self.thread, NULL)
        self.started = False


cdef object _group_done(Node* first):
    """A done group as ``GroupDone``; frees its nodes."""
    appends = []
    outcomes = None if first.group_failed else []
    error = None
    if first.group_failed:
        error = first.group_error.decode(errors="replace") if first.group_error != NULL else "unknown error"
    seconds = first.group_seconds
    cdef Node* node = first
    try:
        while node != NULL:
            appends.append((<list>node.keep)[0])
            if outcomes is not None:
                outcomes.append(_outcome(&node.p))
            node = node.next
    finally:
        _free_nodes(first)
    return GroupDone(appends, outcomes, error, seconds)


cdef void _free_groups(Node* group) noexcept:
    cdef Node* following
    while group != NULL:
        following = group.next_group
        _free_nodes(group)
        group = following
