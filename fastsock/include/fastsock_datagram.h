/* The datagram loop's receive calls (fastsock/_dgramloop.pyx), declared for Cython in
 * fastsock/_native.pxd. */
#ifndef FASTSOCK_DATAGRAM_H
#define FASTSOCK_DATAGRAM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#ifdef __linux__
#include <linux/sock_diag.h>
#endif

/* MSG_WAITFORONE comes with recvmmsg() and struct mmsghdr wherever they exist.  Where they
 * do not, a batch is a recvmsg() per slot with the same rule: the first may wait, the rest
 * take only what is queued.  FASTSOCK_NO_RECVMMSG builds that fallback on Linux too, so
 * that it is tested. */
#ifndef MSG_WAITFORONE
struct mmsghdr {
    struct msghdr msg_hdr;
    unsigned int msg_len;
};
#endif

static inline int fastsock_receive_datagrams(int fd, struct mmsghdr *messages,
                                             unsigned int count, int wait) {
#if defined(MSG_WAITFORONE) && !defined(FASTSOCK_NO_RECVMMSG)
    /* Wait (up to SO_RCVTIMEO) for the first datagram only, then take what is queued; or,
     * without wait, fail with EAGAIN at once if nothing is. */
    return recvmmsg(fd, messages, count, wait ? MSG_WAITFORONE : MSG_DONTWAIT, NULL);
#else
    unsigned int taken = 0;
    while (taken < count) {
        ssize_t received = recvmsg(fd, &messages[taken].msg_hdr,
                                   taken == 0 && wait ? 0 : MSG_DONTWAIT);
        if (received < 0)
            /* After the first, an error (EAGAIN: the queue is empty) ends the batch, as it
             * does recvmmsg()'s; a real one comes back at the next call. */
            return taken ? (int)taken : -1;
        messages[taken].msg_len = (unsigned int)received;
        taken++;
    }
    return (int)taken;
#endif
}

/* The socket's drop counter now: 1 if read, 0 where the kernel cannot tell. */
static inline int fastsock_read_drops(int fd, uint32_t *drops) {
#if defined(__linux__) && defined(SO_MEMINFO)
    uint32_t meminfo[SK_MEMINFO_VARS];
    socklen_t length = sizeof(meminfo);
    if (getsockopt(fd, SOL_SOCKET, SO_MEMINFO, meminfo, &length) != 0
            || length < (SK_MEMINFO_DROPS + 1) * sizeof(uint32_t))
        return 0;
    *drops = meminfo[SK_MEMINFO_DROPS];
    return 1;
#else
    (void)fd;
    (void)drops;
    return 0;
#endif
}

#endif
