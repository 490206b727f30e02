/*
 * A command once started: its output (forwarded as OUTPUT, and spilled to a file past a
 * threshold), its stdin, its supervisor's reports (STARTED, EXIT), its stop.
 *
 * The command's output pipe goes straight to the agent (the supervisor keeps no end of
 * it), so output is forwarded with no extra copy. The supervisor tells the agent when the
 * shell exits; the agent then drains what the pipe already holds and reports EXIT.
 * Background children that keep the pipe open are still drained (output discarded), so
 * they never die of SIGPIPE. Memory is bounded: while too much output waits for the host,
 * the agent stops reading command pipes, and the commands block, as on a slow terminal.
 */
#define _GNU_SOURCE
#include "jobs.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "channel.h"
#include "protocol.h"
#include "supervisor.h"

static struct job jobs[MAX_JOBS];

void jobs_init(void) {
    for (int i = 0; i < MAX_JOBS; i++) { /* -1: no descriptor (0 is the host's stdin) */
        struct job *j = &jobs[i];
        j->out_fd = j->ctl_r = j->ctl_w = j->in_fd = j->spill_fd = -1;
    }
}

struct job *find_job(uint32_t id) {
    if (id == 0) return NULL;
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used && jobs[i].id == id) return &jobs[i];
    return NULL;
}

struct job *free_job(void) {
    for (int i = 0; i < MAX_JOBS; i++)
        if (!jobs[i].used) return &jobs[i];
    return NULL;
}

void job_free(struct job *j) {
    close_fd(&j->out_fd);
    close_fd(&j->ctl_r);
    close_fd(&j->ctl_w);
    close_fd(&j->in_fd);
    close_fd(&j->spill_fd);
    bytes_free(&j->in_q);
    bytes_free(&j->spill_keep);
    free(j->spill_path);
    memset(j, 0, sizeof *j);
    j->out_fd = j->ctl_r = j->ctl_w = j->in_fd = j->spill_fd = -1;
}

void job_stop(struct job *j, uint32_t grace_ms) {
    if (j->ctl_w < 0) return;
    struct ctl_msg m = {CTL_STOP, 0, grace_ms, 0};
    if (write_all(j->ctl_w, &m, sizeof m) == 0) j->stop_sent = 1;
}

void jobs_stop_all(uint32_t grace_ms) {
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used) job_stop(&jobs[i], grace_ms);
}

/* A job whose supervisor gave up (survivors hold its pipe) is not waited for at shutdown:
 * nothing is left that could stop its survivors. */
int jobs_alive(void) {
    int n = 0;
    for (int i = 0; i < MAX_JOBS; i++) n += jobs[i].used && jobs[i].ctl_r >= 0;
    return n;
}

void jobs_reap(void) {
    for (int i = 0; i < MAX_JOBS; i++) { /* a job ends when its supervisor and pipe do */
        struct job *j = &jobs[i];
        if (j->used && j->ctl_r < 0 && j->out_fd < 0) job_free(j);
    }
}

void jobs_check_deadlines(uint64_t t) {
    for (int i = 0; i < MAX_JOBS; i++) {
        struct job *j = &jobs[i];
        if (j->used && !j->reported && j->deadline && t >= j->deadline && !j->stop_sent) {
            j->flags |= X_DEADLINE;
            job_stop(j, j->grace_ms);
        }
    }
}

uint64_t jobs_next_deadline(uint64_t wake) {
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used && !jobs[i].reported && jobs[i].deadline && !jobs[i].stop_sent &&
            jobs[i].deadline < wake)
            wake = jobs[i].deadline;
    return wake;
}

/* ---- spill: all of a command's output to a file once it passes a threshold ---- */

static int mkdir_parents(const char *path) {
    char *p = strdup(path);
    if (!p) return -1;
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        if (mkdir(p, 0755) < 0 && errno != EEXIST) {
            free(p);
            return -1;
        }
        *s = '/';
    }
    free(p);
    return 0;
}

static void spill_fail(struct job *j, const char *what) {
    diag("spill %s for command %u: %s", what, j->id, strerror(errno));
    j->flags |= X_SPILL_FAILED;
    j->flags &= ~(uint32_t)(X_SPILLED | X_SPILL_CUT);
    close_fd(&j->spill_fd);
    bytes_free(&j->spill_keep);
    free(j->spill_path);
    j->spill_path = NULL;
}

/* Write to the file: up to spill_max bytes in order; past that the head (its first half)
 * stays and the tail region after it is overwritten as a ring, so the file never grows
 * beyond spill_max however much the command prints (spill_finish puts it back in order). */
static int spill_write(struct job *j, const unsigned char *data, size_t n) {
    if (!j->spill_max) return write_all(j->spill_fd, data, n);
    uint64_t head = j->spill_max / 2, tail = j->spill_max - head;
    while (n) {
        size_t k;
        off_t at;
        if (j->spill_size < j->spill_max) { /* still filling: in order */
            k = n < j->spill_max - j->spill_size ? n : (size_t)(j->spill_max - j->spill_size);
            at = (off_t)j->spill_size;
            j->spill_size += k;
        } else { /* full: the oldest bytes of the tail region go */
            k = n < tail - j->spill_ring ? n : (size_t)(tail - j->spill_ring);
            at = (off_t)(head + j->spill_ring);
            j->spill_ring = (j->spill_ring + k) % tail;
            j->flags |= X_SPILL_CUT;
        }
        for (size_t done = 0; done < k;) {
            ssize_t w = pwrite(j->spill_fd, data + done, k - done, at + (off_t)done);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) return -1;
            done += (size_t)w;
        }
        data += k;
        n -= k;
    }
    return 0;
}

/* Copy len bytes at `from` of in_fd to the end of out_fd (no buffer of ours). */
static int copy_range(int in_fd, off_t from, int out_fd, uint64_t len) {
    while (len) {
        ssize_t c = copy_file_range(in_fd, &from, out_fd, NULL, (size_t)len, 0);
        if (c < 0 && errno == EINTR) continue;
        if (c <= 0) return -1;
        len -= (uint64_t)c;
    }
    return 0;
}

/* A file whose tail region wrapped: rewrite it as head, a line saying what was cut, and
 * the tail in order, and put that in its place. */
static void spill_finish(struct job *j) {
    if (j->spill_fd < 0 || !(j->flags & X_SPILL_CUT)) return;
    uint64_t head = j->spill_max / 2, tail = j->spill_max - head;
    size_t plen = strlen(j->spill_path);
    char *tmp = malloc(plen + 6);
    if (!tmp) return spill_fail(j, "buffer");
    memcpy(tmp, j->spill_path, plen);
    memcpy(tmp + plen, ".part", 6);
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    char line[128];
    int ll = snprintf(line, sizeof line,
                      "\n[pod_exec_mcp: %llu bytes cut here; the first %llu and last %llu kept]\n",
                      (unsigned long long)(j->output_bytes - j->spill_max),
                      (unsigned long long)head, (unsigned long long)tail);
    int ok = out >= 0 && copy_range(j->spill_fd, 0, out, head) == 0 &&
             write_all(out, line, (size_t)ll) == 0 &&
             copy_range(j->spill_fd, (off_t)(head + j->spill_ring), out, tail - j->spill_ring) == 0 &&
             copy_range(j->spill_fd, (off_t)head, out, j->spill_ring) == 0;
    if (out >= 0 && close(out) < 0) ok = 0;
    if (ok && rename(tmp, j->spill_path) < 0) ok = 0;
    if (!ok) {
        unlink(tmp);
        unlink(j->spill_path); /* out of order: no one should read it as the output */
    }
    free(tmp);
    if (!ok) spill_fail(j, "rewrite");
}

static void spill_output(struct job *j, const unsigned char *data, size_t n) {
    if (!j->spill_path) return;
    if (j->spill_fd < 0 && j->output_bytes <= j->spill_after) {
        if (bytes_append(&j->spill_keep, data, n) < 0) spill_fail(j, "buffer");
        return;
    }
    if (j->spill_fd < 0) { /* just crossed the threshold: write what was kept, then this */
        if (mkdir_parents(j->spill_path) < 0) return spill_fail(j, "mkdir");
        j->spill_fd = open(j->spill_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (j->spill_fd < 0) return spill_fail(j, "open");
        j->flags |= X_SPILLED;
        if (spill_write(j, j->spill_keep.buf + j->spill_keep.off,
                        bytes_pending(&j->spill_keep)) < 0)
            return spill_fail(j, "write");
        bytes_free(&j->spill_keep);
    }
    if (spill_write(j, data, n) < 0) spill_fail(j, "write");
}

/* ---- command output ---- */

/* Read once from a command's pipe; forward it unless EXIT was already reported. */
static int job_read_output(struct job *j) {
    unsigned char buf[READ_CHUNK];
    ssize_t n = read(j->out_fd, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return 0;
    if (n <= 0) {
        close_fd(&j->out_fd);
        return 0;
    }
    if (!j->reported) {
        j->output_bytes += (uint64_t)n;
        send_frame(T_OUTPUT, j->id, buf, (size_t)n);
        spill_output(j, buf, (size_t)n);
    }
    return 1;
}

static void job_report_exit(struct job *j, int32_t status, uint32_t flags, uint32_t survivors) {
    /* The shell exited: what it wrote is already in the pipe. Drain it, then report.
     * Bounded by the pipe's capacity, since nothing the shell wrote can still be coming. */
    int rounds = 0;
    while (j->out_fd >= 0 && rounds++ < 32 && job_read_output(j)) {} /* 2 MiB > any pipe */
    spill_finish(j);
    flags |= j->flags;
    unsigned char p[20];
    put32(p, (uint32_t)status);
    put32(p + 4, flags);
    put32(p + 8, survivors);
    put64(p + 12, j->output_bytes);
    send_frame(T_EXIT, j->id, p, sizeof p);
    j->reported = 1;
    j->id = 0; /* the id may be reused; background children are still drained */
    close_fd(&j->spill_fd);
    bytes_free(&j->spill_keep);
    close_fd(&j->in_fd);
    bytes_free(&j->in_q);
}

static void job_read_ctl(struct job *j) {
    struct ctl_msg m;
    ssize_t r = read(j->ctl_r, &m, sizeof m);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (r != (ssize_t)sizeof m) { /* EOF: the supervisor exited (its subtree is empty) */
        close_fd(&j->ctl_r);
        close_fd(&j->ctl_w);
        if (!j->reported) { /* it died without a report, e.g. killed from inside */
            send_error(j->id, E_INTERNAL, "the command's supervisor died before reporting");
            j->reported = 1;
            j->id = 0;
        }
        return;
    }
    switch (m.op) {
    case CTL_STARTED: {
        j->started = 1;
        unsigned char p[8];
        put32(p, (uint32_t)j->sup_pid);
        put32(p + 4, (uint32_t)m.a);
        send_frame(T_STARTED, j->id, p, sizeof p);
        break;
    }
    case CTL_START_FAILED:
        send_error(j->id, E_START_FAILED, "cannot start the command: fork: %s",
                   strerror(m.a));
        j->reported = 1;
        j->id = 0;
        break;
    case CTL_EXIT:
        if (!j->reported) job_report_exit(j, m.a, m.b, m.c);
        break;
    }
}

static void job_write_stdin(struct job *j) {
    size_t left = bytes_pending(&j->in_q);
    if (left > 0) {
        ssize_t n = write(j->in_fd, j->in_q.buf + j->in_q.off, left);
        if (n > 0) {
            j->in_q.off += (size_t)n;
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) { /* EPIPE: reader gone */
            close_fd(&j->in_fd);
            bytes_free(&j->in_q);
            return;
        }
    }
    if (bytes_pending(&j->in_q) == 0 && j->in_end) close_fd(&j->in_fd);
}

void handle_stdin(uint32_t id, int end, const unsigned char *p, size_t len) {
    struct job *j = find_job(id);
    if (!j || j->reported) return send_error(id, E_UNKNOWN_ID, "no running command %u", id);
    if (j->in_fd < 0 || j->in_end) return; /* stdin already closed: bytes dropped */
    if (end) {
        j->in_end = 1;
    } else if (bytes_pending(&j->in_q) + len > MAX_STDIN_PENDING) {
        send_error(id, E_LIMIT, "more than 64 MiB of stdin pending; stdin closed");
        close_fd(&j->in_fd);
        bytes_free(&j->in_q);
    } else if (bytes_append(&j->in_q, p, len) < 0) {
        send_error(id, E_LIMIT, "out of memory for stdin; stdin closed");
        close_fd(&j->in_fd);
    }
}

/* ---- the poll loop's part ---- */

static struct job *owner[JOB_POLL_FDS];

int jobs_poll_fds(struct pollfd *pf, int paused) {
    int n = 0;
    for (int i = 0; i < MAX_JOBS; i++) {
        struct job *j = &jobs[i];
        if (!j->used) continue;
        /* After EXIT the output is discarded, so background children are never paused. */
        int read_out = j->out_fd >= 0 && (!paused || j->reported);
        pf[n] = (struct pollfd){.fd = read_out ? j->out_fd : -1, .events = POLLIN};
        owner[n++] = j;
        pf[n] = (struct pollfd){.fd = j->ctl_r, .events = POLLIN};
        owner[n++] = j;
        int want_in = j->in_fd >= 0 && (bytes_pending(&j->in_q) > 0 || j->in_end);
        pf[n] = (struct pollfd){.fd = want_in ? j->in_fd : -1, .events = POLLOUT};
        owner[n++] = j;
    }
    return n;
}

void jobs_poll_events(const struct pollfd *pf, int n) {
    for (int k = 0; k < n; k += 3) {
        struct job *j = owner[k];
        /* Read control before output: on EXIT the pipe is drained then reported. */
        if (pf[k + 1].revents && j->ctl_r >= 0) job_read_ctl(j);
        if (pf[k].revents && j->out_fd >= 0) job_read_output(j);
        if (pf[k + 2].revents && j->in_fd >= 0) job_write_stdin(j);
        if (j->in_fd >= 0 && j->in_end && bytes_pending(&j->in_q) == 0) close_fd(&j->in_fd);
    }
}
