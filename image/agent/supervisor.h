/* A command's supervisor (supervisor.c), and the messages it and the agent exchange. */
#ifndef AGENT_SUPERVISOR_H
#define AGENT_SUPERVISOR_H

#include <stdint.h>

/* Supervisor <-> agent messages: same binary, over pipes, < PIPE_BUF so atomic. */
struct ctl_msg {
    uint32_t op;      /* CTL_* */
    int32_t a;        /* pid, status, or errno */
    uint32_t b;       /* grace_ms or EXIT flags */
    uint32_t c;       /* survivors */
};
enum { CTL_STOP = 1, CTL_STARTED = 2, CTL_START_FAILED = 3, CTL_EXIT = 4 };

/* The supervisor's whole life, in a fresh fork of the agent; never returns. It runs
 * `/bin/sh -lc cmd` with stdin in_fd and stdout+stderr out_fd, takes CTL_STOP on ctl_in
 * and reports CTL_STARTED / CTL_START_FAILED / CTL_EXIT on ctl_out. */
__attribute__((noreturn)) void supervisor_main(int ctl_in, int ctl_out, int in_fd, int out_fd,
                                               const char *cmd, const char *cwd, char **env,
                                               int nenv);

#endif
