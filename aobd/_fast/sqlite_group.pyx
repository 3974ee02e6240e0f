# distutils: libraries = sqlite3
"""One group commit of the SQLite event log: the C twin of ``_py_sqlite_group`` (same interface, same outcomes).

Why a twin: the reference's writer thread runs a handful of statements per group through the ``sqlite3``
module, and every statement releases the GIL to step and takes it back from the event loop's thread, which is
busy running the engine; a group's Python (building the parameters) also holds it. Measured on in-process W6 at
64 runs in flight: a group's transaction took 1.3 ms of wall time for 0.7 ms of the writer's CPU. Here the
parameters are read out of the appends once, with the GIL, into C structs; then BEGIN, every statement and
COMMIT (with its fsync) run with the GIL released, and it is taken back once, to build the outcomes.

The SQL is the reference's (imported from it), run one append at a time in queue order, as the reference's
fallback does: prepared statements stepped in C cost about a microsecond each, so the multi-row forms the
reference needs to save Python calls buy nothing here, and each append learns its own conflict directly. If a
statement fails mid-group (the file contradicts itself), the group is rolled back and replayed with a savepoint
per append, so only the culprit fails, as in the reference.

This module links the system libsqlite3, the library Python's own ``sqlite3`` module is linked to: two copies
of SQLite in one process would not see each other's POSIX locks on the same file.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.limits cimport INT_MAX
from libc.stdlib cimport calloc, free
from libc.string cimport strdup, strncpy

import os
import sqlite3

from aobd._fast._py_sqlite_group import (
    ADVANCE_RUN,
    ADVANCE_SEQ,
    INSERT_EVENT,
    INSERT_NEW_RUN,
    SELECT_LAST,
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
    int SQLITE_OPEN_FULLMUTEX
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
    char* error  # on FAILED: strdup'd, freed by commit()


cdef enum GroupStatus:
    GROUP_DONE
    GROUP_RETRY_ISOLATED  # a statement failed mid-group; the transaction was rolled back
    GROUP_FAILED  # BEGIN or COMMIT failed, or SQLite abandoned the transaction; rolled back


cdef enum:  # statement slots of GroupWriter.stmts (anonymous: plain ints, usable as indexes)
    S_BEGIN
    S_COMMIT
    S_ROLLBACK
    S_SAVEPOINT
    S_RELEASE
    S_ROLLBACK_TO
    S_INSERT_EVENT
    S_INSERT_NEW_RUN
    S_ADVANCE_SEQ
    S_ADVANCE_RUN
    S_SELECT_LAST
    N_STMTS


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


cdef class GroupWriter:
    """The writer connection of one SQLite file. Used by one thread at a time (the log's writer thread).

    Args:
        path: the database file; it must exist with its schema (the log creates it before opening a writer).
        pragmas: statements run once on the new connection (``synchronous``, ``busy_timeout``...).
    """

    cdef Db* db
    cdef sqlite3_stmt* stmts[<int>N_STMTS]
    cdef char message[512]
    cdef object _keep  # the encoded SQL, alive while the statements are

    def __init__(self, str path, pragmas):
        cdef bytes encoded = os.fsencode(path)  # as Python's sqlite3 passes a path to SQLite
        cdef const char* filename = encoded
        cdef int rc
        with nogil:
            rc = sqlite3_open_v2(filename, &self.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX, NULL)
        if rc != SQLITE_OK:
            message = sqlite3_errmsg(self.db).decode() if self.db != NULL else f"error code {rc}"
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
                INSERT_EVENT,
                INSERT_NEW_RUN,
                ADVANCE_SEQ,
                ADVANCE_RUN,
                SELECT_LAST,
            ]
            assert len(sql) == N_STMTS
            self._keep = [s.encode() for s in sql]
            for i, text in enumerate(self._keep):
                if sqlite3_prepare_v2(self.db, text, -1, &self.stmts[i], NULL) != SQLITE_OK:
                    raise sqlite3.OperationalError(f"cannot prepare {sql[i]!r}: {sqlite3_errmsg(self.db).decode()}")
        except BaseException:
            self._release()
            raise

    def __dealloc__(self):
        self._release()

    def close(self):
        self._release()

    cdef void _release(self) noexcept:
        cdef int i
        for i in range(N_STMTS):
            if self.stmts[i] != NULL:
                sqlite3_finalize(self.stmts[i])
                self.stmts[i] = NULL
        if self.db != NULL:
            sqlite3_close_v2(self.db)
            self.db = NULL

    cdef _run_once(self, str sql):
        """Run one statement to its end (a pragma's result rows are dropped)."""
        cdef bytes text = sql.encode()
        cdef sqlite3_stmt* stmt = NULL
        cdef int rc = sqlite3_prepare_v2(self.db, text, -1, &stmt, NULL)
        if rc == SQLITE_OK:
            rc = sqlite3_step(stmt)
            while rc == SQLITE_ROW:
                rc = sqlite3_step(stmt)
            sqlite3_finalize(stmt)
        if rc != SQLITE_OK and rc != SQLITE_DONE:
            raise sqlite3.OperationalError(f"{sql!r} failed: {sqlite3_errmsg(self.db).decode()}")

    def commit(self, group):
        """Commit ``group`` in one transaction; the outcome of each append (see ``_py_sqlite_group``)."""
        if self.db == NULL:
            raise sqlite3.ProgrammingError("the group writer is closed")
        cdef Py_ssize_t n = len(group)
        cdef Py_ssize_t n_records = 0
        for item in group:
            n_records += len(item[1])
        cdef Pending* pending = <Pending*>calloc(n if n else 1, sizeof(Pending))
        cdef Record* records = <Record*>calloc(n_records if n_records else 1, sizeof(Record))
        cdef GroupStatus status
        # Objects the structs point into that nothing else holds: copies of data that was not bytes, new runs' rows.
        keep = []
        try:
            if pending == NULL or records == NULL:
                raise MemoryError
            self._read_group(group, pending, records, keep)
            with nogil:
                status = self._transaction(pending, n, False)
                if status == GROUP_RETRY_ISOLATED:
                    status = self._transaction(pending, n, True)
            if status != GROUP_DONE:
                raise sqlite3.OperationalError(self.message.decode(errors="replace"))
            return [_outcome(&pending[i]) for i in range(n)]
        finally:
            if pending != NULL:
                for i in range(n):
                    free(pending[i].error)
            free(pending)
            free(records)

    cdef int _read_group(self, group, Pending* pending, Record* records, list keep) except -1:
        cdef Pending* p
        cdef Record* r
        cdef Py_ssize_t used = 0
        cdef Py_ssize_t i
        for i in range(len(group)):
            item = group[i]
            run_id, recs, index = item[0], item[1], item[2]
            p = &pending[i]
            _text(run_id, &p.run_id)
            p.records = &records[used]
            p.n_records = len(recs)
            for record in recs:
                r = &records[used]
                used += 1
                r.seq = record.seq
                r.ts = record.ts
                _text(record.type, &r.type)
                data = record.data
                if type(data) is not bytes:
                    data = bytes(data)
                    keep.append(data)
                r.data.ptr = PyBytes_AS_STRING(data)
                r.data.size = _sqlite_size(PyBytes_GET_SIZE(data))
            if p.n_records == 0:
                raise ValueError(f"append to run {run_id!r} has no records")
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
        return 0

    cdef GroupStatus _transaction(self, Pending* pending, Py_ssize_t n, bint isolated) noexcept nogil:
        cdef Py_ssize_t i
        cdef int rc = _done(self.stmts[S_BEGIN])
        if rc != SQLITE_OK:
            return self._fail()
        for i in range(n):
            if isolated:
                rc = _done(self.stmts[S_SAVEPOINT])
                if rc != SQLITE_OK:
                    return self._fail()
            rc = self._apply(&pending[i])
            if rc != SQLITE_OK:
                if not isolated:
                    self._rollback()
                    return GROUP_RETRY_ISOLATED
                if sqlite3_get_autocommit(self.db):  # SQLite abandoned the whole transaction (I/O error, disk full)
                    return self._fail()
                pending[i].result = FAILED
                pending[i].error = strdup(sqlite3_errmsg(self.db))
                if _done(self.stmts[S_ROLLBACK_TO]) != SQLITE_OK:
                    return self._fail()
            if isolated and _done(self.stmts[S_RELEASE]) != SQLITE_OK:
                return self._fail()
        if _done(self.stmts[S_COMMIT]) != SQLITE_OK:
            return self._fail()
        return GROUP_DONE

    cdef int _apply(self, Pending* p) noexcept nogil:
        """The expected-seq check, run index write and events of one append; SQLITE_OK or the error code. A
        conflict is an outcome, not an error: it leaves the transaction as it was."""
        cdef Record* first = &p.records[0]
        cdef Record* final = &p.records[p.n_records - 1]
        cdef sqlite3_stmt* stmt
        cdef int rc, i
        p.result = COMMITTED
        if p.kind == NEW_RUN:
            stmt = self.stmts[S_INSERT_NEW_RUN]
            _bind_text(stmt, 1, p.run_id)
            _bind_text(stmt, 2, p.workflow)
            _bind_text(stmt, 3, p.status)
            sqlite3_bind_double(stmt, 4, first.ts)
            sqlite3_bind_double(stmt, 5, final.ts)
            sqlite3_bind_int64(stmt, 6, final.seq)
            _bind_text(stmt, 7, p.parent_run_id)
            _bind_text(stmt, 8, p.workspace)
        elif p.kind == ADVANCE_SEQ_ONLY:
            stmt = self.stmts[S_ADVANCE_SEQ]
            sqlite3_bind_int64(stmt, 1, final.seq)
            sqlite3_bind_double(stmt, 2, final.ts)
            _bind_text(stmt, 3, p.run_id)
            sqlite3_bind_int64(stmt, 4, first.seq - 1)
        else:
            stmt = self.stmts[S_ADVANCE_RUN]
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
        if sqlite3_changes(self.db) != 1:
            p.result = CONFLICT
            stmt = self.stmts[S_SELECT_LAST]
            _bind_text(stmt, 1, p.run_id)
            rc = sqlite3_step(stmt)
            p.last_seq = sqlite3_column_int64(stmt, 0) if rc == SQLITE_ROW else 0
            sqlite3_reset(stmt)
            return SQLITE_OK if rc == SQLITE_ROW or rc == SQLITE_DONE else rc
        stmt = self.stmts[S_INSERT_EVENT]
        for i in range(p.n_records):
            _bind_text(stmt, 1, p.run_id)
            sqlite3_bind_int64(stmt, 2, p.records[i].seq)
            _bind_text(stmt, 3, p.records[i].type)
            sqlite3_bind_double(stmt, 4, p.records[i].ts)
            sqlite3_bind_blob(stmt, 5, p.records[i].data.ptr, p.records[i].data.size, SQLITE_STATIC)
            rc = _done(stmt)
            if rc != SQLITE_OK:
                return rc
        return SQLITE_OK

    cdef GroupStatus _fail(self) noexcept nogil:
        """Keep SQLite's message for the caller and leave no transaction open."""
        strncpy(self.message, sqlite3_errmsg(self.db), sizeof(self.message) - 1)
        self.message[sizeof(self.message) - 1] = 0
        self._rollback()
        return GROUP_FAILED

    cdef void _rollback(self) noexcept nogil:
        if not sqlite3_get_autocommit(self.db):
            # If ROLLBACK fails the transaction is gone anyway; the next BEGIN starts clean.
            _done(self.stmts[S_ROLLBACK])


cdef object _outcome(Pending* p):
    if p.result == COMMITTED:
        return None
    if p.result == CONFLICT:
        return p.last_seq
    return p.error.decode(errors="replace") if p.error != NULL else "unknown error"
