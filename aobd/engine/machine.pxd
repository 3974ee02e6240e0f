# The compiled form of RunMachine is an extension type: its attributes are C struct fields, read directly by
# its own methods instead of through Python's generic attribute lookup (see machine.py's __slots__ comment and
# docs/performance.md). machine.py stays the only source; this file only declares the fields for Cython.

cimport cython

from aobd.engine.effects cimport Step


cdef class NodeRun:
    cdef public object attempts
    cdef public object decision
    cdef public object error
    cdef public object escalated
    cdef public object finished_at
    cdef public object inputs_ref
    cdef public object output
    cdef public object output_ref
    cdef public object requested_at
    cdef public object reused_from
    cdef public object started_at
    cdef public object status
    cdef public object ticket
    cdef public object usage
    cdef public object wake_at


cdef class RunMachine:
    cdef public object _blobs
    cdef public object _last_patch_routing
    cdef public object _routed
    cdef public object agent_depth
    cdef public object base_doc
    cdef public object base_version
    cdef public object context
    cdef public object created
    cdef public object created_at
    cdef public object doc
    cdef public object error
    cdef public object events_seen
    cdef public object fidelity
    cdef public object inputs
    cdef public object ir
    cdef public object ir_cache
    cdef public object nodes
    cdef public object outputs
    cdef public object patches
    cdef public object router
    cdef public object run_id
    cdef public object seq
    cdef public object spawned_nodes
    cdef public object status
    cdef public object updated_at
    cdef public object version
    cdef public object workflow_name
    cdef public object workspace
    cdef public object writer

    # The methods a node's start and completion call on the machine itself: compiled as direct C calls from the
    # machine's own methods (still ordinary methods to Python callers).
    cpdef apply(self, event)
    # A node's three events: called by apply directly, their NodeRun typed.
    @cython.locals(node=NodeRun)
    cpdef _on_scheduled(self, e)
    @cython.locals(node=NodeRun)
    cpdef _on_started(self, e)
    @cython.locals(node=NodeRun)
    cpdef _on_completed(self, e)
    cpdef _route_done(self, node_id)
    cpdef _edge_taken(self, edge)
    cpdef _type_of(self, node_id)
    cpdef _emit(self, Step step, event)
    cpdef _schedule(self, Step step, ready, now)
    cpdef _emit_skips(self, Step step, skipped, now)
    cpdef _after_routing(self, Step step, routed, now)
    @cython.locals(node=NodeRun)
    cpdef _start_attempt(self, Step step, node_id, attempt, now)
    cpdef _resolve_inputs(self, idx)
    @cython.locals(node=NodeRun)
    cpdef _node_summaries(self)
    # Called by the driver for every step.
    @cython.locals(node=NodeRun)
    cpdef public_status(self)
    cpdef _maybe_finish(self, Step step, now)
    cpdef _complete_internal(self, Step step, node_id, output, now)
