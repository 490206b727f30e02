/*
 * pod_exec_mcp agent: the persistent in-sandbox exec agent (protocol: docs/agent-protocol.md).
 *
 * One static binary, three modes:
 *
 *   agent init LIFETIME_SECONDS       the container's PID 1 (init.c)
 *   agent serve [--fd N [--pass-fd M]]   the agent, speaking frames with the host (serve.c)
 *   agent install DEST                copy this binary to DEST (install.c)
 *
 * The modules, one job each:
 *   protocol.h    the wire table: frame types, flags, codes (the host's are tested against it)
 *   util.c        diagnostics, the clock, descriptors, a byte queue
 *   init.c        PID 1: reaping, lifetime
 *   serve.c       the poll loop, HELLO and frame dispatch, shutdown
 *   channel.c     the host's channel: framing in and out, "host gone"
 *   run.c         RUN: parse, make pipes, fork the supervisor
 *   jobs.c        a started command: output, spill, stdin, STARTED/EXIT, stop
 *   supervisor.c  per command: subreaper, the shell, the subtree walk that stops it
 *   streams.c     LISTEN and streams (the egress proxy's connections)
 *   splice.c      a stream the agent copies itself
 *   install.c     the atomic self-copy
 *
 * Build (image/agent/Containerfile): gcc -static -O2 -Wall -Wextra -Werror -o agent *.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "channel.h"
#include "protocol.h"
#include "streams.h"
#include "util.h"

/* A descriptor number given on the command line that is open, or -1. */
static int fd_arg(const char *text) {
    char *end;
    long fd = strtol(text, &end, 10);
    if (*end || fd < 3 || fd > 1023 || fcntl((int)fd, F_GETFD) < 0) return -1;
    return (int)fd;
}

static int usage(void) {
    diag("usage: agent init LIFETIME_SECONDS | agent serve [--fd N [--pass-fd M]] | "
         "agent install DEST"
         "   (protocol version %d)",
         PROTOCOL_VERSION);
    return 2;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "init") == 0) {
        char *end;
        long lifetime = strtol(argv[2], &end, 10);
        if (*end || lifetime < 0) return usage();
        return init_main(lifetime);
    }
    if (argc == 2 && strcmp(argv[1], "serve") == 0) return serve_main();
    if ((argc == 4 || argc == 6) && strcmp(argv[1], "serve") == 0 &&
        strcmp(argv[2], "--fd") == 0) {
        int fd = fd_arg(argv[3]);
        if (fd < 0) return usage();
        host_in = host_out = fd;
        fcntl(host_in, F_SETFD, FD_CLOEXEC); /* never inherited by a command */
        if (argc == 6) {
            if (strcmp(argv[4], "--pass-fd") != 0 || (pass_fd = fd_arg(argv[5])) < 0) return usage();
            fcntl(pass_fd, F_SETFD, FD_CLOEXEC);
        }
        return serve_main();
    }
    if (argc == 3 && strcmp(argv[1], "install") == 0) return install_main(argv[2]);
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        printf("pod_exec_mcp agent, protocol version %d\n", PROTOCOL_VERSION);
        return 0;
    }
    return usage();
}
