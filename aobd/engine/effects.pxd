# The compiled forms of Dispatch and Step are extension types: their fields are C struct fields, read directly by
# code that knows their type (as machine.pxd does for RunMachine). effects.py stays the only source; this file only
# declares for Cython.

cdef class Dispatch:
    cdef public object attempt
    cdef public object inputs
    cdef public object node
    cdef public object node_id
    cdef public object timeout_s


cdef class Step:
    cdef public object blobs
    cdef public object effects
    cdef public object events

    cpdef extend(self, Step later)
