/*
 * Streams: the egress proxy's connections (docs/agent-protocol.md, "Streams").
 *
 * After LISTEN the agent accepts TCP connections on a loopback address in the sandbox and
 * relays each one to the host as a stream: its bytes go out in STREAM_DATA frames and the
 * host's come back the same way. Flow control per stream and direction: a sender may have
 * at most `stream_window` bytes the receiver has not credited back (STREAM_CREDIT). This
 * side reads a socket only while it holds credit (and the host is keeping up), and credits
 * the host for bytes once they are written to the socket; so every stream's memory here is
 * bounded by the window and a slow one never holds up the channel or the others.
 * A spliced stream (splice.c) is copied by the agent itself instead.
 */
#define _GNU_SOURCE
#include "streams.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "channel.h"
#include "protocol.h"

static struct stream streams[MAX_STREAMS];
static int listen_fd = -1;
int pass_fd = -1;
static uint32_t stream_window;   /* bytes from the host a stream may buffer here */
static uint32_t host_window;     /* bytes a stream may send the host before it credits them */
static uint32_t next_stream = 1;
static uint64_t accept_pause_until;

static struct stream *find_stream(uint32_t id) {
    if (!(id & STREAM_ID_BIT)) return NULL;
    for (int i = 0; i < MAX_STREAMS; i++)
        if (streams[i].used && streams[i].id == id) return &streams[i];
    return NULL;
}

static struct stream *free_stream(void) {
    for (int i = 0; i < MAX_STREAMS; i++)
        if (!streams[i].used) return &streams[i];
    return NULL;
}

void stream_free(struct stream *s) {
    if (s->fd >= 0) close(s->fd); /* a plain close: what the kernel holds is still sent */
    if (s->up >= 0) close(s->up);
    bytes_free(&s->to_sock);
    free(s->down.buf);
    free(s->upload.buf);
    memset(s, 0, sizeof *s);
    s->fd = s->up = -1;
}

void stream_reset(struct stream *s, const char *why) {
    send_frame(T_STREAM_RESET_IN, s->id, why, strlen(why));
    stream_free(s);
}

void streams_close_all(void) {
    if (listen_fd >= 0) close(listen_fd);
    listen_fd = -1;
    for (int i = 0; i < MAX_STREAMS; i++)
        if (streams[i].used) stream_free(&streams[i]);
    if (pass_fd >= 0) close(pass_fd);
    pass_fd = -1;
}

/* Both directions are over: the stream is done. */
static void stream_maybe_done(struct stream *s) {
    if (s->used && s->rd_eof && s->wr_shut) stream_free(s);
}

static void stream_credit_host(struct stream *s, int now) {
    if (s->up >= 0) { /* spliced: the host sends no more data, so owes and is owed nothing */
        s->owed = 0;
        return;
    }
    if (s->owed && (now || s->owed >= stream_window / 4)) {
        unsigned char p[4];
        put32(p, s->owed);
        send_frame(T_STREAM_CREDIT_IN, s->id, p, sizeof p);
        s->owed = 0;
    }
}

static void stream_write(struct stream *s) {
    size_t left = bytes_pending(&s->to_sock);
    if (left > 0) {
        ssize_t n = send(s->fd, s->to_sock.buf + s->to_sock.off, left, MSG_NOSIGNAL);
        if (n > 0) {
            s->to_sock.off += (size_t)n;
            s->owed += (uint32_t)n;
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            return stream_reset(s, strerror(errno));
        }
    }
    if (bytes_pending(&s->to_sock) > 0) return stream_credit_host(s, 0);
    s->to_sock.off = s->to_sock.len = 0;
    stream_credit_host(s, 1);
    if (s->host_end && !s->wr_shut && s->up < 0) {
        shutdown(s->fd, SHUT_WR);
        s->wr_shut = 1;
        stream_maybe_done(s);
    }
}

static void stream_read(struct stream *s) {
    unsigned char buf[READ_CHUNK];
    size_t want = s->credit < sizeof buf ? s->credit : sizeof buf;
    if (want == 0 || s->rd_eof) return;
    ssize_t n = read(s->fd, buf, want);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (n < 0) return stream_reset(s, strerror(errno));
    if (n == 0) {
        s->rd_eof = 1;
        send_frame(T_STREAM_END_IN, s->id, NULL, 0);
        return stream_maybe_done(s);
    }
    s->credit -= (uint32_t)n;
    send_frame(T_STREAM_DATA_IN, s->id, buf, (size_t)n);
}

static void accept_streams(void) {
    for (;;) {
        struct stream *s = free_stream();
        if (!s) return; /* the rest wait in the backlog */
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
                diag("accept: %s", strerror(errno)); /* e.g. EMFILE: retry a bit later */
                accept_pause_until = now_ms() + 100;
            }
            return;
        }
        uint32_t id;
        do {
            id = STREAM_ID_BIT | (next_stream++ & ~STREAM_ID_BIT);
        } while (id == STREAM_ID_BIT || find_stream(id));
        memset(s, 0, sizeof *s);
        s->used = 1;
        s->id = id;
        s->fd = fd;
        s->up = -1;
        s->credit = host_window;
        send_frame(T_STREAM_OPEN, id, NULL, 0);
    }
}

static void handle_listen(uint32_t id, const unsigned char *p, size_t len) {
    if (id == 0 || (id & STREAM_ID_BIT))
        return send_error(0, E_BAD_FRAME, "LISTEN needs a host-chosen id (non-zero, top bit 0)");
    if (len != 16) return send_error(id, E_BAD_FRAME, "LISTEN payload must be 16 bytes");
    if (get16(p + 6) != 0) return send_error(id, E_BAD_FRAME, "LISTEN reserved field is not 0");
    if (p[0] != 127) return send_error(id, E_BAD_FRAME, "LISTEN only on loopback (127.0.0.0/8)");
    if (listen_fd >= 0) return send_error(id, E_LIMIT, "already listening");
    if (shutting_down) return send_error(id, E_START_FAILED, "the agent is shutting down");
    uint32_t port = get16(p + 4), window = get32(p + 8), hwindow = get32(p + 12);
    stream_window = window < MIN_WINDOW ? MIN_WINDOW : window > MAX_WINDOW ? MAX_WINDOW : window;
    host_window = hwindow < MIN_WINDOW ? MIN_WINDOW : hwindow > MAX_WINDOW ? MAX_WINDOW : hwindow;
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    memcpy(&a.sin_addr, p, 4);
    socklen_t alen = sizeof a;
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 128) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &alen) < 0) {
        int e = errno;
        if (fd >= 0) close(fd);
        return send_error(id, E_START_FAILED, "cannot listen on %u.%u.%u.%u:%u: %s", p[0], p[1],
                          p[2], p[3], port, strerror(e));
    }
    listen_fd = fd;
    unsigned char r[4];
    put16(r, ntohs(a.sin_port));
    put16(r + 2, 0);
    send_frame(T_LISTENING, id, r, sizeof r);
}

/* A stream frame from the host. Frames for a stream that is gone (a RESET or the end
 * crossed them) are dropped: both sides may legitimately send them. */
void handle_stream_frame(uint32_t type, uint32_t id, const unsigned char *p, size_t len) {
    if (type == T_LISTEN) return handle_listen(id, p, len);
    struct stream *s = find_stream(id);
    if (!s) return;
    if (type == T_SPLICE) return handle_splice(s, p, len);
    if (s->up >= 0) return splice_frame(s, type, p, len);
    switch (type) {
    case T_STREAM_DATA:
        if (s->host_end) return stream_reset(s, "data after the end of the stream");
        if (bytes_pending(&s->to_sock) + s->owed + len > stream_window)
            return stream_reset(s, "the host sent more than the window");
        if (bytes_pending(&s->to_sock) == 0 && len > 0) { /* straight from the frame: no copy */
            ssize_t n = send(s->fd, p, len, MSG_NOSIGNAL);
            if (n < 0 && errno != EAGAIN && errno != EINTR) return stream_reset(s, strerror(errno));
            if (n > 0) {
                s->owed += (uint32_t)n;
                p += n;
                len -= (size_t)n;
            }
        }
        if (len > 0 && bytes_append(&s->to_sock, p, len) < 0)
            return stream_reset(s, "out of memory");
        return stream_write(s);
    case T_STREAM_END:
        s->host_end = 1;
        return stream_write(s); /* shuts the write side once everything is written */
    case T_STREAM_CREDIT:
        if (len != 4 || (uint64_t)s->credit + get32(p) > host_window)
            return stream_reset(s, "bad credit");
        s->credit += get32(p);
        return;
    case T_STREAM_RESET:
        return stream_free(s);
    }
}

void streams_init(void) {
    for (int i = 0; i < MAX_STREAMS; i++) streams[i].fd = streams[i].up = -1;
}

uint64_t streams_next_wake(uint64_t t, uint64_t wake) {
    return accept_pause_until > t && accept_pause_until < wake ? accept_pause_until : wake;
}

/* ---- the poll loop's part ---- */

static struct stream *sowner[MAX_STREAMS];
static int nsowner;

int streams_poll_fds(struct pollfd *pf, int paused) {
    int n = 0;
    int can_accept = listen_fd >= 0 && free_stream() && now_ms() >= accept_pause_until;
    pf[n++] = (struct pollfd){.fd = can_accept ? listen_fd : -1, .events = POLLIN};
    nsowner = 0;
    for (int i = 0; i < MAX_STREAMS; i++) {
        struct stream *s = &streams[i];
        if (!s->used) continue;
        short ev = 0, uev = 0;
        if (s->up < 0) {
            if (!s->rd_eof && s->credit > 0 && !paused) ev |= POLLIN;
            if (bytes_pending(&s->to_sock) > 0) ev |= POLLOUT;
        } else { /* spliced: frames to the host play no part, so `paused` neither */
            if (s->go && !s->rd_eof && s->upload.len == 0 && s->budget > 0) ev |= POLLIN;
            if (bytes_pending(&s->to_sock) > 0 || s->down.len > 0) ev |= POLLOUT;
            if (!s->up_eof && s->down.len == 0 && bytes_pending(&s->to_sock) == 0)
                uev |= POLLIN;
            if (s->upload.len > 0) uev |= POLLOUT;
        }
        pf[n++] = (struct pollfd){.fd = ev ? s->fd : -1, .events = ev};
        pf[n++] = (struct pollfd){.fd = uev ? s->up : -1, .events = uev};
        sowner[nsowner++] = s;
    }
    return n;
}

void streams_poll_events(const struct pollfd *pf) {
    if (pf[0].revents && listen_fd >= 0) accept_streams();
    for (int k = 0; k < nsowner; k++) {
        struct stream *s = sowner[k];
        short re = pf[1 + 2 * k].revents, ure = pf[2 + 2 * k].revents;
        if (re && s->used && bytes_pending(&s->to_sock) > 0) stream_write(s);
        if (s->used && s->up >= 0) {
            if (re || ure) splice_pump(s);
            continue;
        }
        if (re && s->used && (re & (POLLIN | POLLHUP | POLLERR))) stream_read(s);
    }
}
