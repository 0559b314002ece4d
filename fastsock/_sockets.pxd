# The <sys/socket.h> types the compiled loops share (Cython ships no declarations for
# sockets): the batched receive and send calls take arrays of mmsghdr.

from posix.uio cimport iovec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct sockaddr:
        pass

    struct sockaddr_storage:
        pass

    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
