/* Streams (streams.c) and their splice (splice.c): the egress proxy's connections. */
#ifndef AGENT_STREAMS_H
#define AGENT_STREAMS_H

#include <poll.h>
#include <stddef.h>
#include <stdint.h>

#include "agent.h"
#include "util.h"

#define SPLICE_BUF (256u * 1024u)
#define UNLIMITED UINT64_MAX
#define MIN_WINDOW (16u * 1024u)
#define MAX_WINDOW (4u * 1024u * 1024u)
#define STREAM_ID_BIT 0x80000000u
#define STREAM_POLL_FDS (1 + 2 * MAX_STREAMS)   /* the listener; per stream: client, `up` */

/* One direction of a spliced stream: bytes read from one socket, not yet sent on. */
struct copy_buf {
    unsigned char *buf;       /* SPLICE_BUF bytes */
    size_t off, len;
    uint64_t sent;            /* bytes sent on so far (SPLICE_END) */
};

struct stream {
    int used;
    uint32_t id;              /* agent-chosen, top bit set */
    int fd;
    struct bytes to_sock;     /* from the host, not yet written to the socket */
    uint32_t credit;          /* bytes we may still send to the host */
    uint32_t owed;            /* written to the socket, not yet credited to the host */
    int rd_eof;               /* the client sent EOF (STREAM_END sent) */
    int host_end;             /* STREAM_END received */
    int wr_shut;              /* our write side is shut down */
    /* Spliced (SPLICE): the host handed over its connection to the destination (`up`), and
     * this side copies between it and the client itself. */
    int up;                   /* the destination's socket, or -1 */
    uint32_t splice_flags;
    int go;                   /* SPLICE_GO received: client bytes may go to `up` */
    uint64_t budget;          /* client bytes `up` may still get (UNLIMITED: no limit) */
    int up_eof, up_shut;      /* `up` sent EOF; our write side of `up` is shut down */
    struct copy_buf down;     /* destination -> client */
    struct copy_buf upload;   /* client -> destination */
};

extern int pass_fd;   /* `serve --pass-fd`: where SPLICE's descriptors arrive, or -1 */

/* streams.c */
void streams_init(void);                       /* every descriptor -1 */
void streams_close_all(void);                  /* the listener, every stream, the pass socket */
void stream_free(struct stream *s);            /* close it: gone without a word */
void stream_reset(struct stream *s, const char *why);   /* STREAM_RESET, then free it */
/* LISTEN and every frame of a stream from the host. */
void handle_stream_frame(uint32_t type, uint32_t id, const unsigned char *p, size_t len);
uint64_t streams_next_wake(uint64_t now, uint64_t wake);   /* a paused accept's retry */
/* Poll set-up (returns how many entries it filled) and events. `paused`: too much waits
 * for the host, so relayed sockets are not read. */
int streams_poll_fds(struct pollfd *pf, int paused);
void streams_poll_events(const struct pollfd *pf);

/* splice.c */
void handle_splice(struct stream *s, const unsigned char *p, size_t len);
/* A frame from the host for a spliced stream (SPLICE_GO, a RESET, a late END). */
void splice_frame(struct stream *s, uint32_t type, const unsigned char *p, size_t len);
int splice_pump(struct stream *s);             /* copy what can move; 0: the stream is gone */

#endif
