# The compiled form of Step is an extension type: its lists are C struct fields, read directly by its own methods
# (as machine.pxd does for RunMachine). effects.py stays the only source; this file only declares for Cython.

cdef class Step:
    cdef public object blobs
    cdef public object effects
    cdef public object events

    cpdef extend(self, Step later)
