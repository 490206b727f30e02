/*
 * `agent init LIFETIME_SECONDS`: the container's PID 1.
 *
 * Reaps zombies and exits after LIFETIME seconds (0 = never), so that a container nobody
 * sweeps still ends (with --rm). It installs no signal handler, so the kernel drops every
 * signal sent to it from inside the sandbox: `kill -9 -1`, `pkill sleep` or `kill 1` cannot
 * end the container.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <sys/wait.h>
#include <time.h>

#include "agent.h"
#include "util.h"

int init_main(long lifetime) {
    /* SIGCHLD is blocked and waited for with a timeout; no handler is ever installed, so
     * as a namespace's init every other signal from inside the sandbox is dropped. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, NULL);
    uint64_t end = lifetime > 0 ? now_ms() + (uint64_t)lifetime * 1000u : 0;
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {}
        uint64_t wait_ms = 3600000u;
        if (end) {
            uint64_t t = now_ms();
            if (t >= end) return 0;
            if (end - t < wait_ms) wait_ms = end - t;
        }
        struct timespec ts = {(time_t)(wait_ms / 1000), (long)(wait_ms % 1000) * 1000000L};
        sigtimedwait(&set, NULL, &ts);
    }
}
