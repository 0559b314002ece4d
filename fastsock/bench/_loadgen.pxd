# The system calls behind the load generator and the C sinks (Cython ships no declarations
# for sockets, epoll or poll), and the module-level helpers its loops share.

from posix.time cimport timespec
from posix.uio cimport iovec

from fastsock._sockets cimport mmsghdr, msghdr, sockaddr, sockaddr_storage, socklen_t


cdef extern from "<sys/socket.h>" nogil:
    enum:
        AF_UNIX
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_DGRAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_TYPE
        SO_ERROR
        SO_DOMAIN
        SO_ACCEPTCONN
        SO_RCVTIMEO
        SHUT_WR
        MSG_DONTWAIT
        MSG_NOSIGNAL
        MSG_MORE
        MSG_TRUNC
        MSG_WAITFORONE

    int c_socket "socket"(int family, int kind, int protocol)
    int bind(int fd, const sockaddr* address, socklen_t length)
    int connect(int fd, const sockaddr* address, socklen_t length)
    ssize_t send(int fd, const void* data, size_t length, int flags)
    ssize_t recv(int fd, void* data, size_t length, int flags)
    int sendmmsg(int fd, mmsghdr* messages, unsigned int count, int flags)
    int recvmmsg(int fd, mmsghdr* messages, unsigned int count, int flags, timespec* timeout)
    int accept4(int fd, sockaddr* address, socklen_t* address_length, int flags)
    int shutdown(int fd, int how)
    int getsockopt(int fd, int level, int name, void* value, socklen_t* value_length)
    int setsockopt(int fd, int level, int name, const void* value, socklen_t value_length)


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        pass

    struct in6_addr:
        pass

    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id

    enum:
        IPPROTO_IP

    unsigned short htons(unsigned short value)
    unsigned int htonl(unsigned int value)


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int family, const char* text, void* address)


cdef extern from "<sys/un.h>" nogil:
    struct sockaddr_un:
        unsigned short sun_family
        char sun_path[108]


cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t:
        void* ptr
        int fd
        unsigned int u32
        unsigned long long u64

    struct epoll_event:
        unsigned int events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLRDHUP
        EPOLLHUP
        EPOLLERR
        EPOLLET
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CTL_MOD

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int max_events, int timeout_ms)


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents

    enum:
        POLLIN
        POLLOUT

    int poll(pollfd* fds, unsigned long nfds, int timeout_ms)


# Seconds on CLOCK_MONOTONIC, the clock every deadline and duration here is measured on.
cdef double monotonic() noexcept nogil

# Milliseconds to wait for an event due at `deadline`, for epoll_wait() and poll(): rounded
# up, so that a wait never returns just before its deadline and spins.
cdef int milliseconds_until(double deadline, double now) noexcept nogil

# Waits up to `timeout_ms` for `events` on `fd`; returns 0 or an errno value.
cdef int wait_for(int fd, short events, int timeout_ms) noexcept nogil

# Raises the OSError subclass that the stdlib raises for `code` (EBADF, ECONNRESET, ...).
cdef int raise_errno(int code) except -1
