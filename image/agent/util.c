/* Small helpers every module uses (util.h). */
#define _GNU_SOURCE
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void diag(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(2, "agent: ", 7);
    w = write(2, buf, (size_t)n);
    (void)w;
}

uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

int bytes_append(struct bytes *q, const void *data, size_t n) {
    if (q->off > 0 && q->off == q->len) q->off = q->len = 0;
    if (q->len + n > q->cap) {
        if (q->off > 0) { /* compact before growing */
            memmove(q->buf, q->buf + q->off, q->len - q->off);
            q->len -= q->off;
            q->off = 0;
        }
        if (q->len + n > q->cap) {
            size_t cap = q->cap ? q->cap : 4096;
            while (cap < q->len + n) cap *= 2;
            unsigned char *b = realloc(q->buf, cap);
            if (!b) return -1;
            q->buf = b;
            q->cap = cap;
        }
    }
    memcpy(q->buf + q->len, data, n);
    q->len += n;
    return 0;
}

size_t bytes_pending(const struct bytes *q) { return q->len - q->off; }

void bytes_free(struct bytes *q) {
    free(q->buf);
    memset(q, 0, sizeof *q);
}
