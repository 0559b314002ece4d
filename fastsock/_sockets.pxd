# The <sys/socket.h> declarations the compiled loops share (Cython ships none for
# sockets): the batched receive and send calls take arrays of mmsghdr; the stream loops
# receive, shut down and measure what the kernel still holds (FIONREAD).

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

    int accept4(int fd, sockaddr* address, socklen_t* length, int flags)
    int getpeername(int fd, sockaddr* address, socklen_t* length)
    ssize_t recv(int fd, void* buffer, size_t length, int flags)
    int setsockopt(int fd, int level, int name, const void* value, socklen_t length)
    int shutdown(int fd, int how)
    int SOL_SOCKET
    int SO_RCVTIMEO
    int SHUT_RD
    int SHUT_RDWR
    int MSG_PEEK
    int SOCK_NONBLOCK
    int SOCK_CLOEXEC


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, int* value)
    unsigned long FIONREAD
