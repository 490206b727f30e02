/*
 * Splice (docs/agent-protocol.md, "Splice"): the host hands over its connection to the
 * destination, and the agent copies between it and the sandbox's client itself with plain
 * read/send, so a download's bytes never pass through the host's process. The bounds of
 * the exchange (SPLICE_GO's budget, ONE_REQUEST) come with it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "channel.h"
#include "protocol.h"
#include "streams.h"


/* The descriptor the host passed for stream `id` on the pass socket, or -1. The host sends
 * it before the SPLICE frame, so it is already queued here. Older messages are for streams
 * whose SPLICE never got here (the stream was reset first): they are closed and skipped. */
static int recv_passed_fd(uint32_t id) {
    if (pass_fd < 0) return -1;
    for (int tries = 0; tries < MAX_STREAMS; tries++) {
        unsigned char tag[4];
        struct iovec iov = {.iov_base = tag, .iov_len = sizeof tag};
        union {
            struct cmsghdr h;
            char buf[CMSG_SPACE(sizeof(int))];
        } control;
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = control.buf;
        m.msg_controllen = sizeof control.buf;
        ssize_t n = recvmsg(pass_fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) return -1;
        int fd = -1;
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        if (h && h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS &&
            h->cmsg_len == CMSG_LEN(sizeof(int)))
            memcpy(&fd, CMSG_DATA(h), sizeof fd);
        if (n == (ssize_t)sizeof tag && get32(tag) == id && !(m.msg_flags & MSG_CTRUNC))
            return fd;
        if (fd >= 0) close(fd);
    }
    return -1;
}

/* The spliced exchange is over (both directions, or the answer with ONE_REQUEST). */
static void splice_maybe_done(struct stream *s) {
    int down_done = s->wr_shut;
    int up_done = s->go && s->upload.len == 0 &&
                  (s->up_shut || s->budget == 0 || (s->rd_eof && s->budget != UNLIMITED));
    if (down_done && (up_done || (s->splice_flags & SPLICE_ONE_REQUEST))) {
        unsigned char p[16];
        put64(p, s->upload.sent);
        put64(p + 8, s->down.sent);
        send_frame(T_SPLICE_END, s->id, p, sizeof p);
        stream_free(s);
    }
}

/* One step of one direction: when `b` is empty and `want` > 0, read up to `want` bytes
 * from `from` into it (end of stream: *eof); then send what it holds on to `to`. Returns
 * whether anything moved (*got: bytes read), or -1 on an error (errno says which). */
static int copy_step(int from, int to, struct copy_buf *b, size_t want, int *eof, size_t *got) {
    int moved = 0;
    *got = 0;
    if (b->len == 0 && want > 0) {
        ssize_t n = read(from, b->buf, want);
        if (n > 0) {
            b->off = 0;
            b->len = *got = (size_t)n;
            moved = 1;
        } else if (n == 0) {
            *eof = moved = 1;
        } else if (errno != EAGAIN && errno != EINTR) {
            return -1;
        }
    }
    if (b->len > 0) {
        ssize_t n = send(to, b->buf + b->off, b->len, MSG_NOSIGNAL);
        if (n > 0) {
            b->off += (size_t)n;
            b->len -= (size_t)n;
            b->sent += (uint64_t)n;
            moved = 1;
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            return -1;
        }
    }
    return moved;
}

/* Move what can move now between the client and the destination, both ways, without
 * blocking (both sockets are non-blocking). Returns 0 once the stream is gone. */
int splice_pump(struct stream *s) {
    for (int progress = 1; progress && s->used;) {
        size_t got;
        /* destination -> client, after what the host had already sent (to_sock) */
        int ready = !s->up_eof && bytes_pending(&s->to_sock) == 0;
        int down = copy_step(s->up, s->fd, &s->down, ready ? SPLICE_BUF : 0, &s->up_eof, &got);
        if (s->up_eof && s->down.len == 0 && bytes_pending(&s->to_sock) == 0 && !s->wr_shut) {
            shutdown(s->fd, SHUT_WR);
            s->wr_shut = 1;
        }
        /* client -> destination, once the host said GO, at most `budget` bytes */
        size_t want = 0;
        if (down >= 0 && s->go && !s->rd_eof && s->budget > 0)
            want = s->budget < SPLICE_BUF ? (size_t)s->budget : SPLICE_BUF;
        int up = down < 0 ? -1 : copy_step(s->fd, s->up, &s->upload, want, &s->rd_eof, &got);
        if (down < 0 || up < 0) {
            stream_reset(s, strerror(errno));
            return 0;
        }
        if (s->budget != UNLIMITED) s->budget -= got;
        /* The client's EOF ends an unlimited upload (CONNECT, a chunked body): pass it on. */
        if (s->go && s->rd_eof && s->upload.len == 0 && s->budget == UNLIMITED && !s->up_shut) {
            shutdown(s->up, SHUT_WR);
            s->up_shut = 1;
        }
        progress = down || up;
    }
    if (s->used) splice_maybe_done(s);
    return s->used;
}

static void splice_answer(uint32_t id, uint32_t status, const char *why) {
    unsigned char p[4 + 200];
    size_t n = strlen(why) < 200 ? strlen(why) : 200;
    put32(p, status);
    memcpy(p + 4, why, n);
    send_frame(T_SPLICED, id, p, 4 + n);
}

/* SPLICE: take the host's connection to the destination (passed on the pass socket) and
 * copy between it and the client here. Refused (SPLICED with a non-zero status) when it
 * cannot be done; the host then goes on relaying the stream itself. */
void handle_splice(struct stream *s, const unsigned char *p, size_t len) {
    if (len != 4) return splice_answer(s->id, 1, "SPLICE payload must be 4 bytes");
    if (s->up >= 0) return splice_answer(s->id, 1, "already spliced");
    int fd = recv_passed_fd(s->id);
    if (fd < 0) return splice_answer(s->id, 1, "no descriptor was passed for this stream");
    s->down.buf = malloc(SPLICE_BUF);
    s->upload.buf = malloc(SPLICE_BUF);
    if (!s->down.buf || !s->upload.buf) {
        close(fd);
        free(s->down.buf);
        free(s->upload.buf);
        s->down.buf = s->upload.buf = NULL;
        return splice_answer(s->id, 1, "out of memory");
    }
    set_nonblock(fd);
    s->up = fd;
    s->splice_flags = get32(p);
    s->budget = 0;
    splice_answer(s->id, 0, "");
    splice_pump(s);
}

void splice_frame(struct stream *s, uint32_t type, const unsigned char *p, size_t len) {
    /* The host sends nothing more but GO, RESET and a late END (or CREDIT) that crossed. */
    if (type == T_SPLICE_GO && len == 8 && !s->go) {
        s->go = 1;
        s->budget = get64(p);
        splice_pump(s);
    } else if (type == T_STREAM_RESET) {
        stream_free(s);
    } else if (type != T_STREAM_END && type != T_STREAM_CREDIT) {
        stream_reset(s, "unexpected frame on a spliced stream");
    }
}
