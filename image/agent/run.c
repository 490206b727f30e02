/*
 * RUN: parse the request, make the command's pipes and fork its supervisor
 * (supervisor.c), which forks the shell. The job (jobs.c) takes over from there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "channel.h"
#include "jobs.h"
#include "protocol.h"
#include "supervisor.h"

struct field { const char *s; size_t len; };

struct run_req {
    uint32_t deadline_ms, grace_ms, flags;
    uint64_t spill_after, spill_max;
    struct field command, cwd, spill_path;
    struct field env[MAX_ENV];
    int nenv;
};

/* Parse a RUN payload into fields (pointing into it); on error, returns a message. */
static const char *parse_run(const unsigned char *p, size_t len, struct run_req *r) {
    memset(r, 0, sizeof *r);
    if (len < 24) return "RUN payload shorter than its 24-byte fixed part";
    r->deadline_ms = get32(p);
    r->grace_ms = get32(p + 4);
    r->flags = get32(p + 8);
    r->spill_after = get64(p + 16);
    if (r->flags & ~(uint32_t)F_STDIN_FOLLOWS) return "unknown RUN flags";
    if (get32(p + 12) != 0) return "RUN reserved word is not zero";
    if (r->spill_after > MAX_SPILL_AFTER) return "spill threshold above the 64 MiB limit";
    size_t off = 24;
    while (off < len) {
        if (len - off < 5) return "truncated RUN field header";
        uint32_t tag = p[off];
        uint32_t flen = get32(p + off + 1);
        off += 5;
        if (flen > len - off) return "RUN field longer than the payload";
        struct field f = {(const char *)p + off, flen};
        if (memchr(f.s, 0, flen)) return "RUN field contains a NUL byte";
        switch (tag) {
        case FLD_COMMAND:
            if (r->command.s) return "RUN has two commands";
            r->command = f;
            break;
        case FLD_CWD: r->cwd = f; break;
        case FLD_SPILL_PATH: r->spill_path = f; break;
        case FLD_SPILL_MAX: { /* decimal text: fields hold no NUL byte */
            char num[24], *end;
            if (flen == 0 || flen >= sizeof num) return "SPILL_MAX is not a decimal number";
            memcpy(num, f.s, flen);
            num[flen] = 0;
            errno = 0;
            r->spill_max = strtoull(num, &end, 10);
            if (*end || errno || num[0] < '0' || num[0] > '9')
                return "SPILL_MAX is not a decimal number";
            break;
        }
        case FLD_ENV:
            if (r->nenv == MAX_ENV) return "more than 256 environment variables";
            if (flen == 0 || f.s[0] == '=' || !memchr(f.s, '=', flen))
                return "ENV field is not NAME=VALUE";
            r->env[r->nenv++] = f;
            break;
        default: return "unknown RUN field tag";
        }
        off += flen;
    }
    if (!r->command.s) return "RUN has no command";
    if (r->spill_after && (r->spill_path.len == 0 || r->spill_path.s[0] != '/'))
        return "spill needs an absolute spill path";
    if (r->spill_max && r->spill_max < 2 * READ_CHUNK)
        return "SPILL_MAX below twice the read size";
    if (r->cwd.s && (r->cwd.len == 0 || r->cwd.s[0] != '/')) return "cwd must be an absolute path";
    return NULL;
}

static char *field_str(struct field f) { return f.s ? strndup(f.s, f.len) : NULL; }

void handle_run(uint32_t id, const unsigned char *p, size_t len) {
    if (id == 0) return send_error(0, E_BAD_FRAME, "RUN needs a non-zero id");
    if (shutting_down) return send_error(id, E_START_FAILED, "the agent is shutting down");
    if (find_job(id)) return send_error(id, E_DUPLICATE_ID, "id %u is already running", id);
    struct run_req r;
    const char *bad = parse_run(p, len, &r);
    if (bad) return send_error(id, E_BAD_FRAME, "%s", bad);
    struct job *j = free_job();
    if (!j) return send_error(id, E_LIMIT, "more than %d commands alive at once", MAX_JOBS);

    /* C strings for the supervisor (it forks from here, so plain memory is inherited). */
    char *cmd = field_str(r.command);
    char *cwd = field_str(r.cwd);
    char *env[MAX_ENV];
    int nenv = 0;
    for (int i = 0; i < r.nenv; i++) env[nenv++] = field_str(r.env[i]);
    int outp[2] = {-1, -1}, inp[2] = {-1, -1}, c2s[2] = {-1, -1}, s2c[2] = {-1, -1};
    int ok = pipe2(outp, O_CLOEXEC) == 0 && pipe2(c2s, O_CLOEXEC) == 0 &&
             pipe2(s2c, O_CLOEXEC) == 0;
    if (ok && (r.flags & F_STDIN_FOLLOWS)) ok = pipe2(inp, O_CLOEXEC) == 0;
    if (ok && inp[0] < 0) {
        inp[0] = open("/dev/null", O_RDONLY | O_CLOEXEC);
        ok = inp[0] >= 0;
    }
    pid_t sup = -1;
    int err = errno;
    if (ok) {
        sup = fork();
        err = errno;
        if (sup == 0)
            supervisor_main(c2s[0], s2c[1], inp[0], outp[1], cmd, cwd, env, nenv);
    }
    free(cmd);
    free(cwd);
    for (int i = 0; i < nenv; i++) free(env[i]);
    int fds[] = {inp[0], outp[1], c2s[0], s2c[1]};
    for (int i = 0; i < 4; i++)
        if (fds[i] >= 0) close(fds[i]);
    if (sup < 0) {
        int rest[] = {outp[0], c2s[1], s2c[0], inp[1]};
        for (int i = 0; i < 4; i++)
            if (rest[i] >= 0) close(rest[i]);
        return send_error(id, E_START_FAILED, "cannot start the command: %s: %s",
                          ok ? "fork" : "pipe", strerror(err));
    }
    job_free(j);
    j->used = 1;
    j->id = id;
    j->sup_pid = sup;
    j->out_fd = outp[0];
    j->ctl_w = c2s[1];
    j->ctl_r = s2c[0];
    j->in_fd = inp[1];
    set_nonblock(j->out_fd);
    set_nonblock(j->ctl_r);
    set_nonblock(j->ctl_w); /* a full control pipe means STOPs are queued already */
    if (j->in_fd >= 0) set_nonblock(j->in_fd);
    j->grace_ms = r.grace_ms;
    j->deadline = r.deadline_ms ? now_ms() + r.deadline_ms : 0;
    if (r.spill_after) {
        j->spill_after = r.spill_after;
        j->spill_path = field_str(r.spill_path);
        j->spill_max = r.spill_max;
    }
}
