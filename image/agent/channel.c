/*
 * The host's channel: frames read from host_in and parsed, frames queued for host_out and
 * written from the poll loop (non-blocking, so a slow host never blocks the agent; serve.c
 * stops reading command pipes while too much is queued). Also "host gone": EOF or an error
 * on either side.
 */
#define _GNU_SOURCE
#include "channel.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"
#include "protocol.h"
#include "util.h"

int host_in = 0, host_out = 1;
int host_gone, input_closed;
uint64_t last_rx;

static struct bytes outq;                   /* frames waiting for the host */
static unsigned char inbuf[HDR_LEN + MAX_PAYLOAD];
static size_t inlen;

void send_frame(uint32_t type, uint32_t id, const void *payload, size_t len) {
    if (host_gone) return;
    unsigned char h[HDR_LEN] = {0};
    h[0] = (unsigned char)type;
    put32(h + 4, id);
    put32(h + 8, (uint32_t)len);
    if (bytes_append(&outq, h, HDR_LEN) < 0 || bytes_append(&outq, payload, len) < 0) {
        diag("out of memory queueing a frame");
        exit(3);
    }
}

void send_error(uint32_t id, uint32_t code, const char *fmt, ...) {
    unsigned char buf[2 + 400];
    put16(buf, code);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf((char *)buf + 2, sizeof buf - 2, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n > sizeof buf - 3) n = sizeof buf - 3;
    send_frame(T_ERROR, id, buf, 2 + (size_t)n);
}

size_t channel_queued(void) { return bytes_pending(&outq); }

/* Parse every complete frame in inbuf. A header that breaks the framing is fatal. */
static void parse_input(void) {
    size_t off = 0;
    while (inlen - off >= HDR_LEN) {
        unsigned char *h = inbuf + off;
        uint32_t len = get32(h + 8);
        if (h[1] != 0 || get16(h + 2) != 0 || len > MAX_PAYLOAD) {
            send_error(0, E_BAD_FRAME, "malformed frame header (type 0x%02x, length %u); "
                       "closing the channel", h[0], len);
            diag("malformed frame header: type 0x%02x flags %u length %u", h[0], h[1], len);
            inlen = 0;
            input_closed = 1; /* framing is lost: read no more, stop everything, exit */
            begin_shutdown(HOST_GONE_GRACE_MS, 0);
            return;
        }
        if (inlen - off < HDR_LEN + len) break;
        handle_frame(h[0], get32(h + 4), h + HDR_LEN, len);
        off += HDR_LEN + len;
    }
    memmove(inbuf, inbuf + off, inlen - off);
    inlen -= off;
}

/* The host stopped talking (stdin EOF or error, or no frame within the heartbeat): stop
 * everything and exit, still flushing what is queued in case only its writing side closed. */
void host_is_silent(const char *why) {
    if (input_closed) return;
    diag("host gone (%s): stopping every command", why);
    input_closed = 1;
    begin_shutdown(HOST_GONE_GRACE_MS, 0);
}

/* The host's reading side is gone: nothing can be sent any more. */
static void host_is_gone(const char *why) {
    if (host_gone) return;
    host_is_silent(why);
    host_gone = 1;
    bytes_free(&outq);
}

static void read_host(void) {
    ssize_t n = read(host_in, inbuf + inlen, sizeof inbuf - inlen);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (n <= 0) return host_is_silent(n == 0 ? "stdin closed" : strerror(errno));
    inlen += (size_t)n;
    last_rx = now_ms();
    parse_input();
}

static void write_host(void) {
    size_t left = bytes_pending(&outq);
    ssize_t n = write(host_out, outq.buf + outq.off, left);
    if (n > 0) outq.off += (size_t)n;
    else if (n < 0 && errno != EAGAIN && errno != EINTR) host_is_gone(strerror(errno));
    if (bytes_pending(&outq) == 0) outq.off = outq.len = 0;
}

void channel_poll_fds(struct pollfd pf[2]) {
    int read_in = !host_gone && !input_closed && inlen < sizeof inbuf;
    pf[0] = (struct pollfd){.fd = read_in ? host_in : -1, .events = POLLIN};
    int write_out = bytes_pending(&outq) && !host_gone;
    pf[1] = (struct pollfd){.fd = write_out ? host_out : -1, .events = POLLOUT};
}

void channel_poll_events(const struct pollfd pf[2]) {
    if (pf[0].revents) read_host();
    if (pf[1].revents) write_host();
}

void channel_flush(void) {
    while (!host_gone && bytes_pending(&outq) > 0) {
        struct pollfd o = {.fd = host_out, .events = POLLOUT};
        if (poll(&o, 1, 5000) <= 0) break;
        write_host();
    }
}
