# The unit of work between a framer and the ring: one complete message inside a buffer.

cdef struct MessageSpan:
    Py_ssize_t offset
    Py_ssize_t length
