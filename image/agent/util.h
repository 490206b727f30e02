/* Small helpers every module uses: diagnostics, the clock, descriptors, a byte queue. */
#ifndef AGENT_UTIL_H
#define AGENT_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* "agent: ..." and a newline on stderr (the host keeps its tail for error messages). */
void diag(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
uint64_t now_ms(void);                 /* CLOCK_MONOTONIC */
void set_nonblock(int fd);
int write_all(int fd, const void *buf, size_t len);   /* 0, or -1 on an error */
void close_fd(int *fd);                /* close if open; *fd = -1 */

/* A growable byte queue: data lives in buf[off, len). */
struct bytes {
    unsigned char *buf;
    size_t off, len, cap;
};

int bytes_append(struct bytes *q, const void *data, size_t n);   /* -1: out of memory */
size_t bytes_pending(const struct bytes *q);
void bytes_free(struct bytes *q);

#endif
