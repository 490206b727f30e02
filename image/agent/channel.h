/* The host's channel (channel.c): frames in and out, and whether the host is still there. */
#ifndef AGENT_CHANNEL_H
#define AGENT_CHANNEL_H

#include <poll.h>
#include <stddef.h>
#include <stdint.h>

/* stdin/stdout, or one socket passed down (`serve --fd N`, e.g. with `podman exec
 * --preserve-fds`), which spares the copy through Podman's stdio relay. */
extern int host_in, host_out;
extern int host_gone;      /* the host's reading side is gone: nothing is sent any more */
extern int input_closed;   /* nothing more is read from the host */
extern uint64_t last_rx;   /* when the last bytes came from the host */

/* Queue a frame for the host (exits on out of memory: the channel cannot go on). */
void send_frame(uint32_t type, uint32_t id, const void *payload, size_t len);
void send_error(uint32_t id, uint32_t code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
size_t channel_queued(void);   /* bytes of frames not yet written to the host */

/* The host stopped talking (EOF, error, or no frame within the heartbeat). */
void host_is_silent(const char *why);

/* Poll set-up and events for the channel's two descriptors (pf[0] in, pf[1] out). */
void channel_poll_fds(struct pollfd pf[2]);
void channel_poll_events(const struct pollfd pf[2]);
/* At exit: write what is queued, waiting at most 5 s for the host each time. */
void channel_flush(void);

/* Provided by serve.c: one complete, well-framed frame; and a stop of everything. */
void handle_frame(uint32_t type, uint32_t id, const unsigned char *p, size_t len);
void begin_shutdown(uint32_t grace_ms, int reply);

#endif
