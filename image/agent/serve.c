/*
 * `agent serve`: the agent. Started by the host as `podman exec -i CTR /.pod_exec_mcp/agent
 * serve`, so it runs with exactly the user, capabilities, seccomp filter, cgroup and
 * environment of a `podman exec`. It speaks the framed protocol on its channel
 * (channel.c; stderr carries its own diagnostics) and runs many commands at once.
 *
 * One thread, one poll(2) loop, so it costs one pid and never needs a new thread or
 * process to kill anything: every command has its own supervisor (supervisor.c), told to
 * stop over a pipe.
 *
 *   host <== frames (channel.c) ==> agent --ctl pipes--> supervisor --fork--> sh -lc CMD
 *                                         <--status----                         |
 *                                         <==== merged stdout+stderr pipe ======+
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"
#include "channel.h"
#include "jobs.h"
#include "protocol.h"
#include "streams.h"
#include "util.h"

int shutting_down;
static int hello_done, shutdown_reply;
static uint64_t shutdown_until;
static uint32_t heartbeat_ms = DEFAULT_HEARTBEAT_MS;

void begin_shutdown(uint32_t grace_ms, int reply) {
    if (!shutting_down) {
        shutting_down = 1;
        shutdown_until = now_ms() + grace_ms + KILL_PERSIST_MS + SHUTDOWN_EXTRA_MS;
    }
    shutdown_reply |= reply;
    streams_close_all();
    jobs_stop_all(grace_ms);
}

static void handle_hello(const unsigned char *p, size_t len) {
    if (len < 8) {
        send_error(0, E_BAD_FRAME, "HELLO payload must be 8 bytes");
        return;
    }
    uint32_t lo = get16(p), hi = get16(p + 2), hb = get32(p + 4);
    if (lo > PROTOCOL_VERSION || hi < PROTOCOL_VERSION) {
        send_error(0, E_BAD_VERSION, "agent speaks protocol version %d only; host asked %u-%u",
                   PROTOCOL_VERSION, lo, hi);
        input_closed = 1; /* nothing runs yet: flush the error and exit */
        begin_shutdown(0, 0);
        return;
    }
    if (hb) heartbeat_ms = hb < MIN_HEARTBEAT_MS ? MIN_HEARTBEAT_MS
                         : hb > MAX_HEARTBEAT_MS ? MAX_HEARTBEAT_MS : hb;
    hello_done = 1;
    unsigned char r[16];
    put16(r, PROTOCOL_VERSION);
    put16(r + 2, 0);
    put32(r + 4, (uint32_t)getpid());
    put32(r + 8, MAX_PAYLOAD);
    put32(r + 12, heartbeat_ms);
    send_frame(T_HELLO_OK, 0, r, sizeof r);
}

void handle_frame(uint32_t type, uint32_t id, const unsigned char *p, size_t len) {
    if (!hello_done && type != T_HELLO) {
        send_error(0, E_BAD_FRAME, "the first frame must be HELLO");
        input_closed = 1;
        begin_shutdown(0, 0);
        return;
    }
    struct job *j;
    switch (type) {
    case T_HELLO:
        if (hello_done) return send_error(0, E_BAD_FRAME, "HELLO sent twice");
        return handle_hello(p, len);
    case T_RUN: return handle_run(id, p, len);
    case T_STDIN:
    case T_STDIN_END: return handle_stdin(id, type == T_STDIN_END, p, len);
    case T_STOP:
        if (len != 4) return send_error(id, E_BAD_FRAME, "STOP payload must be 4 bytes");
        j = find_job(id);
        if (!j) return send_error(id, E_UNKNOWN_ID, "no running command %u", id);
        return job_stop(j, get32(p)); /* EXIT says whether the stop got there first */
    case T_PING: return send_frame(T_PONG, id, p, len > 64 ? 64 : len);
    case T_SHUTDOWN:
        return begin_shutdown(len == 4 ? get32(p) : HOST_GONE_GRACE_MS, 1);
    case T_LISTEN:
    case T_STREAM_DATA:
    case T_STREAM_END:
    case T_STREAM_CREDIT:
    case T_STREAM_RESET:
    case T_SPLICE:
    case T_SPLICE_GO:
        return handle_stream_frame(type, id, p, len);
    default:
        return send_error(id, E_UNSUPPORTED, "unsupported frame type 0x%02x", type);
    }
}

static void check_timers(void) {
    uint64_t t = now_ms();
    if (!input_closed && t - last_rx > heartbeat_ms) host_is_silent("heartbeat missed");
    jobs_check_deadlines(t);
}

static int next_timeout(void) {
    uint64_t t = now_ms(), wake = t + 1000; /* reap supervisors at least once a second */
    wake = jobs_next_deadline(streams_next_wake(t, wake));
    return wake > t ? (int)(wake - t) : 0;
}

int serve_main(void) {
    /* A command's `kill -TERM -1` or `pkill -f agent` must not take its own agent and
     * supervisors down (SIGKILL still can: the host then re-attaches). The shell resets
     * every disposition before exec. */
    int ignored[] = {SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGQUIT};
    for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++) signal(ignored[i], SIG_IGN);
    prctl(PR_SET_NAME, "pem-agent");
    /* It holds sockets of the host's (its channel, spliced egress connections): without
     * this, the sandbox's root could copy them with pidfd_getfd(2) or ptrace. Commands are
     * dumpable again: exec resets it. */
    prctl(PR_SET_DUMPABLE, 0);
    jobs_init();
    streams_init();
    set_nonblock(host_in);
    set_nonblock(host_out);
    last_rx = now_ms();
    struct pollfd pf[2 + JOB_POLL_FDS + STREAM_POLL_FDS];
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {} /* supervisors that exited */
        jobs_reap();
        check_timers();
        if (shutting_down && (jobs_alive() == 0 || now_ms() >= shutdown_until)) {
            if (shutdown_reply) send_frame(T_BYE, 0, NULL, 0);
            channel_flush();
            return jobs_alive() ? 1 : 0;
        }
        int paused = channel_queued() > OUT_HIGH; /* backpressure from the host */
        channel_poll_fds(pf);
        int njobs = jobs_poll_fds(pf + 2, paused);
        int n = 2 + njobs;
        n += streams_poll_fds(pf + n, paused);
        if (poll(pf, (nfds_t)n, next_timeout()) < 0) {
            if (errno == EINTR) continue;
            diag("poll: %s", strerror(errno));
            return 3;
        }
        channel_poll_events(pf);
        jobs_poll_events(pf + 2, njobs);
        streams_poll_events(pf + 2 + njobs);
    }
}
