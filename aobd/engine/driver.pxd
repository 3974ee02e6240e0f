# The compiled form of Engine is an extension type: its attributes are C struct fields, read directly by its
# own methods instead of through Python's generic attribute lookup (as machine.pxd does for RunMachine).
# driver.py stays the only source; this file only declares the fields for Cython.

from aobd.engine.effects cimport Dispatch
from aobd.engine.machine cimport RunMachine


cdef class Engine:
    cdef public object _agent_jobs
    cdef public object _closed
    cdef public object _dispatched
    cdef public object _durable_refs
    cdef public object _http_allow
    cdef public object _http_client
    cdef public object _inflight
    cdef public object _runs
    cdef public object _services_base
    cdef public object _storing
    cdef public object _timers
    cdef public object _url_guard
    cdef public object admission
    cdef public object cas
    cdef public object clock
    cdef public object draining
    cdef public object executors
    cdef public object fidelity
    cdef public object handler_modules
    cdef public object inline_handlers
    cdef public object inline_policy
    cdef public object ir_cache
    cdef public object listeners
    cdef public object log
    cdef public object max_inflight
    cdef public object rand
    cdef public object record_listeners
    cdef public object start_wait_s
    cdef public object webhooks
    cdef public object workflow_resolver
    cdef public object workspace_policy
    cdef public object writer_id

    # Per attempt, typed: the machine's fields are read as C fields.
    cpdef _context(self, RunMachine machine, Dispatch job)
    cpdef _services(self, RunMachine machine, node_type)
