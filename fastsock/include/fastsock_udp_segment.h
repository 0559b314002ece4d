/* The load generator's UDP sends (fastsock/bench/_loadgen.pyx), declared for Cython in
 * fastsock/_native.pxd. */
#ifndef FASTSOCK_UDP_SEGMENT_H
#define FASTSOCK_UDP_SEGMENT_H

#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103 /* <linux/udp.h>, which older C libraries do not pull in */
#endif
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24 /* Linux 4.2; C libraries before glibc 2.23 lack it */
#endif

static inline size_t fastsock_segment_control_bytes(void) {
    return CMSG_SPACE(sizeof(uint16_t));
}

/* Makes the message one UDP GSO send of `size`-byte datagrams, through its own control
 * buffer, so that the caller's socket keeps its options. */
static inline void fastsock_attach_segment_size(struct msghdr *header, char *control,
                                                uint16_t size) {
    struct cmsghdr *option;
    header->msg_control = control;
    header->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
    option = CMSG_FIRSTHDR(header);
    option->cmsg_level = IPPROTO_UDP;
    option->cmsg_type = UDP_SEGMENT;
    option->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(option), &size, sizeof(size));
}

#endif
