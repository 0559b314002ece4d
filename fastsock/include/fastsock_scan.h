/* The line framer's delimiter scan (fastsock/_framing.pyx), declared for Cython in
 * fastsock/_native.pxd. */
#ifndef FASTSOCK_SCAN_H
#define FASTSOCK_SCAN_H

#include <stdint.h>

#ifdef __SSE2__
#include <emmintrin.h>
#define FASTSOCK_BLOCK_SCAN 1

/* Bit i set where block[i] is byte, for the 64 bytes at block: one look at each byte finds
 * every delimiter of a block, where memchr() pays a call and a setup per line.  SSE2 is
 * part of x86-64. */
static inline uint64_t fastsock_block_hits(const char *block, char byte) {
    const __m128i wanted = _mm_set1_epi8(byte);
    uint64_t hits = 0;
    int part;
    for (part = 3; part >= 0; part--) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(block + 16 * part));
        hits = (hits << 16) | (uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, wanted));
    }
    return hits;
}

#else
/* Elsewhere the framer never calls it (FASTSOCK_BLOCK_SCAN is 0) and uses memchr(). */
#define FASTSOCK_BLOCK_SCAN 0

static inline uint64_t fastsock_block_hits(const char *block, char byte) {
    (void)block;
    (void)byte;
    return 0;
}
#endif

#endif
