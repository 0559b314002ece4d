# The one native layer under every compiled module (fastsock/ and fastsock/bench/): the
# clocks, the atomics, the errno mapping, and the system calls Cython ships no
# declarations for (sockets, epoll, poll, eventfd, pthread mutexes).  Each is declared here
# and nowhere else.  fastsock's own C lives in real headers under fastsock/include/, declared
# below: setup.py builds every module with -Wall -Wextra, and .ci/run compiles each header
# alone with warnings as errors.

from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport strerror
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec, timeval
from posix.uio cimport iovec


# -- fastsock/include/ --------------------------------------------------------------------

cdef extern from "fastsock_atomic.h" nogil:
    void fastsock_counter_add(uint64_t* counter, uint64_t amount) noexcept
    uint64_t fastsock_counter_add_fetch(uint64_t* counter, uint64_t amount) noexcept
    uint64_t fastsock_counter_load(const uint64_t* counter) noexcept
    void fastsock_counter_add_release(uint64_t* counter, uint64_t amount) noexcept
    uint64_t fastsock_counter_load_acquire(const uint64_t* counter) noexcept
    void fastsock_counter_store(uint64_t* counter, uint64_t value) noexcept
    void fastsock_word_add(uint32_t* word, uint32_t amount) noexcept
    void fastsock_word_sub(uint32_t* word, uint32_t amount) noexcept
    uint32_t fastsock_word_load(const uint32_t* word) noexcept
    void fastsock_word_store(uint32_t* word, uint32_t value) noexcept
    void fastsock_word_publish(uint32_t* word, uint32_t value) noexcept


cdef extern from "fastsock_sync.h" nogil:
    int fastsock_ring_mutex_init(pthread_mutex_t* mutex) noexcept
    void fastsock_ring_mutex_consistent(pthread_mutex_t* mutex) noexcept
    void fastsock_futex_wait(uint32_t* word, uint32_t seen, double seconds) noexcept
    void fastsock_futex_wake(uint32_t* word, int count) noexcept
    void fastsock_map_pages(const char* start, size_t length, size_t stride) noexcept


cdef extern from "fastsock_scan.h" nogil:
    bint FASTSOCK_BLOCK_SCAN
    uint64_t fastsock_block_hits(const char* block, char byte) noexcept
    int count_trailing_zeros "__builtin_ctzll"(unsigned long long bits) noexcept


cdef extern from "fastsock_datagram.h" nogil:
    int fastsock_receive_datagrams(int fd, mmsghdr* messages, unsigned int count,
                                   bint wait) noexcept
    int fastsock_read_drops(int fd, uint32_t* drops) noexcept


cdef extern from "fastsock_udp_segment.h" nogil:
    enum:
        IP_BIND_ADDRESS_NO_PORT
    size_t fastsock_segment_control_bytes() noexcept
    void fastsock_attach_segment_size(msghdr* header, char* control, uint16_t size) noexcept


# -- The system ---------------------------------------------------------------------------

cdef extern from "<errno.h>" nogil:
    # Not an enum: equal to EAGAIN on Linux, not everywhere, so it must never become a case
    # of the same switch.
    const int EWOULDBLOCK
    enum:
        EOWNERDEAD


cdef extern from "<string.h>" nogil:
    # A GNU extension (Python.h defines _GNU_SOURCE) that searches in linear time.
    void* memmem(const void* haystack, size_t haystack_length,
                 const void* needle, size_t needle_length)


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass

    int pthread_mutex_init(pthread_mutex_t* mutex, const void* attributes)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_trylock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)


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
        SO_RCVBUF
        SO_RCVTIMEO
        SHUT_RD
        SHUT_WR
        SHUT_RDWR
        MSG_DONTWAIT
        MSG_NOSIGNAL
        MSG_MORE
        MSG_PEEK
        MSG_TRUNC
        MSG_WAITFORONE

    int c_socket "socket"(int family, int kind, int protocol)
    int bind(int fd, const sockaddr* address, socklen_t length)
    int connect(int fd, const sockaddr* address, socklen_t length)
    int accept4(int fd, sockaddr* address, socklen_t* length, int flags)
    int getpeername(int fd, sockaddr* address, socklen_t* length)
    ssize_t send(int fd, const void* data, size_t length, int flags)
    ssize_t recv(int fd, void* buffer, size_t length, int flags)
    int sendmmsg(int fd, mmsghdr* messages, unsigned int count, int flags)
    int recvmmsg(int fd, mmsghdr* messages, unsigned int count, int flags, timespec* timeout)
    int shutdown(int fd, int how)
    int getsockopt(int fd, int level, int name, void* value, socklen_t* length)
    int setsockopt(int fd, int level, int name, const void* value, socklen_t length)


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


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, int* value)
    unsigned long FIONREAD


cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data data

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLRDHUP
        EPOLLHUP
        EPOLLERR
        EPOLLET
        EPOLLEXCLUSIVE
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CTL_MOD

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int max_events, int timeout_ms)


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents

    enum:
        POLLOUT

    int poll(pollfd* fds, unsigned long nfds, int timeout_ms)


# -- Clocks: CLOCK_MONOTONIC, which every deadline and duration is measured on ------------

cdef inline uint64_t monotonic_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <uint64_t>now.tv_sec * 1000000000 + <uint64_t>now.tv_nsec


cdef inline double monotonic() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


cdef inline uint64_t seconds_to_ns(double seconds) noexcept nogil:
    return <uint64_t>(seconds * 1e9)


# For SO_RCVTIMEO: a blocking receive that returns every so often.
cdef inline timeval seconds_to_timeval(double seconds) noexcept nogil:
    cdef timeval interval
    interval.tv_sec = <long>seconds
    interval.tv_usec = <long>((seconds - interval.tv_sec) * 1e6)
    return interval


# -- Errors: C reports, the Python boundary raises ----------------------------------------

# Raises the OSError subclass the stdlib raises for code (ECONNRESET: ConnectionResetError,
# ...), with strerror's text, and what failed (the system call) where the stdlib puts the
# file name: "[Errno 24] Too many open files: 'accept4'".
cdef inline int raise_errno(int code, object what=None) except -1:
    text = strerror(code).decode("utf-8", "replace")
    if what is None:
        raise OSError(code, text)
    raise OSError(code, text, what)
