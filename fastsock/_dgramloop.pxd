# The compiled datagram receive loop: one DatagramReceiver drains one UDP or Unix datagram
# socket, a batch of datagrams per recvmmsg() call, without the GIL, and publishes the batch
# to the ring in one call, each datagram a message whose source is the sender's raw sockaddr.
# DatagramCounters are shared by every loop of a server (and, being in shared memory, by its
# forked children).

from libc.stdint cimport uint32_t, uint64_t
from posix.uio cimport iovec

from fastsock._native cimport mmsghdr, msghdr, sockaddr_storage, socklen_t
from fastsock._ring cimport MessageView, RingQueue


cdef enum DatagramCounter:
    COUNT_DATAGRAMS_RECEIVED
    COUNT_BYTES_RECEIVED
    COUNT_DROPPED_QUEUE_FULL
    COUNT_DROPPED_QUEUE_FULL_BYTES
    COUNT_TRUNCATED
    COUNT_KERNEL_DROPS
    COUNT_RECEIVE_CALLS
    COUNT_DATAGRAMS_UNREAD
    # Not exported: publishes to the ring begun, and those whose counts are all added, so
    # that a snapshot can wait for the counts of what a consumer may already have taken.
    COUNT_PUBLISHES_STARTED
    COUNT_PUBLISHES_COUNTED
    DATAGRAM_COUNTER_SLOTS


cdef enum DatagramEnd:
    END_RECEIVING       # not an end: the loop goes on
    END_CHECK_IN        # a check interval passed: the caller checks signals, then resumes
    END_STOPPED         # stop() was called
    END_RING_CLOSED     # the ring was closed: the rest of the batch is dropped and counted
    END_NO_MEMORY       # the kernel could not allocate for the receive (ENOMEM)
    END_OS_ERROR        # any other receive failure: see last_errno


cdef struct DatagramSlot:
    # One per datagram of a batch, besides its mmsghdr (recvmmsg wants those contiguous) and
    # its max_datagram bytes of payload.
    sockaddr_storage sender
    iovec payload


cdef class DatagramCounters:
    cdef uint64_t* values  # DATAGRAM_COUNTER_SLOTS words in an anonymous shared mapping
    # Publishes begun that this object's snapshots stopped waiting for (see snapshot()).
    cdef readonly uint64_t publishes_given_up

    cdef void add(self, DatagramCounter counter, uint64_t amount) noexcept nogil


cdef class DatagramReceiver:
    cdef int fd
    cdef RingQueue ring
    cdef DatagramCounters counters
    cdef unsigned int batch
    cdef uint64_t check_interval_ns
    cdef unsigned int announce_after  # see pump()
    cdef uint64_t busy_poll_ns  # see pump()
    cdef uint64_t drain_timeout_ns  # see drain()
    cdef volatile int stop_requested
    cdef readonly int last_errno
    cdef bint running
    # The socket's kernel drop counter (SO_MEMINFO) as last read.
    cdef uint32_t drops_seen

    cdef mmsghdr* messages
    cdef DatagramSlot* slots
    cdef char* payloads
    cdef MessageView* views  # the datagrams of a batch that go to the ring

    cdef DatagramEnd pump(self) noexcept nogil
    cdef DatagramEnd deliver(self, unsigned int received, bint wake) noexcept nogil
    cdef DatagramEnd check_in(self) noexcept nogil
    cdef DatagramEnd drain(self) noexcept nogil
    cdef DatagramEnd receive_failed(self, int error) noexcept nogil
    cdef void read_kernel_drops(self) noexcept nogil
    cdef void rearm(self, unsigned int index) noexcept nogil
