/*
 * pod_exec_mcp agent: the persistent in-sandbox exec agent (protocol: docs/agent-protocol.md).
 *
 * One static binary, two modes:
 *
 *   agent init LIFETIME_SECONDS
 *       The container's PID 1. Reaps zombies and exits after LIFETIME seconds (0 = never), so
 *       that a container nobody sweeps still ends (with --rm). It installs no signal handler,
 *       so the kernel drops every signal sent to it from inside the sandbox: `kill -9 -1`,
 *       `pkill sleep` or `kill 1` cannot end the container.
 *
 *   agent serve
 *       Started by the host as `podman exec -i CTR /.pod_exec_mcp/agent serve`, so it runs
 *       with exactly the user, capabilities, seccomp filter, cgroup and environment of a
 *       `podman exec`. It speaks a framed binary protocol on stdin/stdout (stderr carries
 *       its own diagnostics) and runs many commands at once.
 *
 * Design of `serve`: one thread, one poll(2) loop, so it costs one pid and never needs a
 * new thread or process to kill anything. Every command gets a SUPERVISOR: a fork of the
 * agent (no exec) that makes itself a child subreaper (PR_SET_CHILD_SUBREAPER) and forks
 * `/bin/sh -lc COMMAND`. However a descendant detaches (setsid, double fork, scrubbed env,
 * uid change, non-dumpable), it stays in the supervisor's subtree: when its parent dies it
 * is re-parented to the supervisor, never to the container's init. A stop walks that subtree
 * through the ppid links of /proc/PID/stat, sends SIGTERM, waits out the grace, then sends
 * SIGKILL round after round (reaping in between) until waitpid says ECHILD: the subtree is
 * then verifiably empty. The supervisor exits once its subtree is empty.
 *
 *   host <== stdin/stdout frames ==> agent --ctl pipes--> supervisor --fork--> sh -lc CMD
 *                                          <--status----                         |
 *                                          <==== merged stdout+stderr pipe ======+
 *
 * The command's output pipe goes straight to the agent (the supervisor keeps no end of it),
 * so output is forwarded with no extra copy. The supervisor tells the agent when the shell
 * exits; the agent then drains what the pipe already holds and reports EXIT. Background
 * children that keep the pipe open are still drained (output discarded), so they never die
 * of SIGPIPE. Memory is bounded: while too much output waits for the host, the agent stops
 * reading command pipes, and the commands block, as they would on a slow terminal.
 *
 * Build: gcc -static -O2 -Wall -Wextra -o agent agent.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* ---- protocol constants (docs/agent-protocol.md) ---- */
#define PROTOCOL_VERSION 1
#define HDR_LEN 12
#define MAX_PAYLOAD (1024u * 1024u)

enum {
    T_HELLO = 0x01, T_RUN = 0x02, T_STDIN = 0x03, T_STDIN_END = 0x04, T_STOP = 0x05,
    T_PING = 0x06, T_SHUTDOWN = 0x07,
    T_HELLO_OK = 0x81, T_STARTED = 0x82, T_OUTPUT = 0x83, T_EXIT = 0x84, T_ERROR = 0x85,
    T_PONG = 0x86, T_BYE = 0x87,
};
enum { F_STDIN_FOLLOWS = 1 };
enum { X_STOPPED = 1, X_ALL_KILLED = 2, X_SPILLED = 4, X_DEADLINE = 8, X_SPILL_FAILED = 16 };
enum {
    E_BAD_FRAME = 1, E_BAD_VERSION = 2, E_UNKNOWN_ID = 3, E_DUPLICATE_ID = 4,
    E_START_FAILED = 5, E_UNSUPPORTED = 6, E_LIMIT = 7, E_INTERNAL = 8,
};
enum { FLD_COMMAND = 1, FLD_CWD = 2, FLD_ENV = 3, FLD_SPILL_PATH = 4 };

/* ---- limits ---- */
#define MAX_JOBS 256                       /* commands alive at once, incl. finished ones
                                              whose background children still run */
#define MAX_ENV 256
#define OUT_HIGH (1024u * 1024u)           /* stop reading command pipes above this */
#define READ_CHUNK (64u * 1024u)
#define MAX_STDIN_PENDING (64u * 1024u * 1024u)
#define MAX_SPILL_AFTER (64ull * 1024u * 1024u)
#define DEFAULT_HEARTBEAT_MS 30000u
#define MIN_HEARTBEAT_MS 1000u
#define MAX_HEARTBEAT_MS 3600000u
#define HOST_GONE_GRACE_MS 2000u           /* stop grace when the host is gone */
#define AGENT_GONE_GRACE_MS 1000u          /* a supervisor's grace when the agent is gone */
#define KILL_PERSIST_MS 10000u             /* keep sending SIGKILL this long before giving up */
#define SHUTDOWN_EXTRA_MS 15000u           /* wait for supervisors at most grace + this */

/* ---- supervisor <-> agent messages (same binary, pipes, < PIPE_BUF: atomic) ---- */
struct ctl_msg {
    uint32_t op;      /* CTL_* */
    int32_t a;        /* pid, status, or errno */
    uint32_t b;       /* grace_ms or EXIT flags */
    uint32_t c;       /* survivors */
};
enum { CTL_STOP = 1, CTL_STARTED = 2, CTL_START_FAILED = 3, CTL_EXIT = 4 };

/* ---- small helpers ---- */
static void diag(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(2, "agent: ", 7);
    w = write(2, buf, (size_t)n);
    (void)w;
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void put16(unsigned char *p, uint32_t v) { p[0] = v >> 8; p[1] = v; }
static void put32(unsigned char *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static void put64(unsigned char *p, uint64_t v) { put32(p, v >> 32); put32(p + 4, (uint32_t)v); }
static uint32_t get16(const unsigned char *p) { return (uint32_t)p[0] << 8 | p[1]; }
static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t get64(const unsigned char *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* A growable byte queue: data lives in buf[off, len). */
struct bytes {
    unsigned char *buf;
    size_t off, len, cap;
};

static int bytes_append(struct bytes *q, const void *data, size_t n) {
    if (q->off > 0 && q->off == q->len) q->off = q->len = 0;
    if (q->len + n > q->cap) {
        if (q->off > 0) { /* compact before growing */
            memmove(q->buf, q->buf + q->off, q->len - q->off);
            q->len -= q->off;
            q->off = 0;
        }
        if (q->len + n > q->cap) {
            size_t cap = q->cap ? q->cap : 4096;
            while (cap < q->len + n) cap *= 2;
            unsigned char *b = realloc(q->buf, cap);
            if (!b) return -1;
            q->buf = b;
            q->cap = cap;
        }
    }
    memcpy(q->buf + q->len, data, n);
    q->len += n;
    return 0;
}

static size_t bytes_pending(const struct bytes *q) { return q->len - q->off; }

static void bytes_free(struct bytes *q) {
    free(q->buf);
    memset(q, 0, sizeof *q);
}

/* ======================================================================================
 * init mode
 * ====================================================================================== */

static int init_main(long lifetime) {
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

/* ======================================================================================
 * supervisor: one per command, a fork of the agent
 * ====================================================================================== */

struct proc_entry { pid_t pid, ppid; };

/* Every process in this pid namespace, with its parent, from /proc/PID/stat. */
static size_t scan_procs(struct proc_entry **out) {
    size_t n = 0, cap = 256;
    struct proc_entry *v = malloc(cap * sizeof *v);
    DIR *d = opendir("/proc");
    if (!v || !d) {
        if (d) closedir(d);
        free(v);
        *out = NULL;
        return 0;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 0) continue;
        char path[64], buf[512];
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t r = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (r <= 0) continue;
        buf[r] = 0;
        /* "PID (COMM) STATE PPID ...": COMM may hold spaces and ')', so take the last ')'. */
        char *rp = strrchr(buf, ')');
        char state;
        long ppid;
        if (!rp || sscanf(rp + 1, " %c %ld", &state, &ppid) != 2) continue;
        if (n == cap) {
            struct proc_entry *nv = realloc(v, cap * 2 * sizeof *v);
            if (!nv) break;
            v = nv;
            cap *= 2;
        }
        v[n].pid = (pid_t)pid;
        v[n].ppid = (pid_t)ppid;
        n++;
    }
    closedir(d);
    *out = v;
    return n;
}

/* Send sig to every descendant of this process; returns how many were found. */
static unsigned signal_subtree(int sig) {
    struct proc_entry *p;
    size_t n = scan_procs(&p);
    if (!p) return 0;
    pid_t *queue = malloc((n + 1) * sizeof *queue);
    char *taken = calloc(n + 1, 1);
    unsigned found = 0;
    if (queue && taken) {
        size_t head = 0, tail = 0;
        queue[tail++] = getpid();
        while (head < tail) {
            pid_t parent = queue[head++];
            for (size_t i = 0; i < n; i++) {
                if (taken[i] || p[i].ppid != parent) continue;
                taken[i] = 1;
                queue[tail++] = p[i].pid;
                kill(p[i].pid, sig);
                if (sig == SIGTERM) kill(p[i].pid, SIGCONT); /* a stopped one must see TERM */
                found++;
            }
        }
    }
    free(queue);
    free(taken);
    free(p);
    return found;
}

struct sup_state {
    int ctl_in, ctl_out;        /* from / to the agent */
    pid_t shell;
    int shell_status;           /* -1 while the shell runs */
    int stopping, exit_sent, agent_gone;
    uint64_t term_until;        /* end of the grace period */
    uint64_t kill_until;        /* give up sending SIGKILL after this */
    uint32_t flags;
};

static void sup_send(struct sup_state *s, uint32_t op, int32_t a, uint32_t b, uint32_t c) {
    if (s->agent_gone) return;
    struct ctl_msg m = {op, a, b, c};
    if (write_all(s->ctl_out, &m, sizeof m) < 0) s->agent_gone = 1;
}

static int wait_status(int st) {
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return 255;
}

/* Reap every exited child; returns 1 once the subtree is empty (ECHILD). */
static int sup_reap(struct sup_state *s) {
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p > 0) {
            if (p == s->shell) {
                s->shell_status = wait_status(st);
                if (!s->stopping) {
                    sup_send(s, CTL_EXIT, s->shell_status, 0, 0);
                    s->exit_sent = 1;
                }
            }
            continue;
        }
        if (p < 0 && errno == EINTR) continue;
        return p < 0 && errno == ECHILD;
    }
}

/* Start a stop, or shorten the grace of one under way (e.g. SHUTDOWN after a long STOP). */
static void sup_begin_stop(struct sup_state *s, uint32_t grace_ms) {
    uint64_t until = now_ms() + grace_ms;
    if (s->stopping && until >= s->term_until) return;
    s->term_until = until;
    s->kill_until = until + KILL_PERSIST_MS;
    if (!s->stopping) signal_subtree(SIGTERM);
    s->stopping = 1;
}

static void shell_child(const char *cmd, const char *cwd, char **env, int nenv, int in_fd,
                        int out_fd) {
    setsid();
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
    if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(out_fd, 2) < 0) _exit(126);
    if (in_fd > 2) close(in_fd);
    if (out_fd > 2) close(out_fd);
    if (cwd && chdir(cwd) < 0) {
        dprintf(2, "pod_exec_mcp agent: cannot change directory to %s: %s\n", cwd,
                strerror(errno));
        _exit(127);
    }
    for (int i = 0; i < nenv; i++) putenv(env[i]);
    char *argv[] = {"/bin/sh", "-lc", (char *)cmd, NULL};
    execve("/bin/sh", argv, environ);
    int e = errno;
    dprintf(2, "pod_exec_mcp agent: cannot run /bin/sh: %s\n", strerror(e));
    _exit(e == ENOENT ? 127 : 126);
}

/* Close every descriptor except the ones in keep[] (the agent's other jobs' pipes must not
 * leak into this supervisor, or EOFs would never arrive). */
static void close_fds_except(const int *keep, int nkeep) {
    DIR *d = opendir("/proc/self/fd");
    if (!d) return;
    int dfd = dirfd(d);
    int fds[4096], n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < 4096) {
        if (e->d_name[0] == '.') continue;
        int fd = atoi(e->d_name);
        if (fd <= 2 || fd == dfd) continue;
        int k = 0;
        for (int i = 0; i < nkeep; i++) k |= keep[i] == fd;
        if (!k) fds[n++] = fd;
    }
    closedir(d);
    for (int i = 0; i < n; i++) close(fds[i]);
}

/* The supervisor's whole life; never returns. */
static void supervisor_main(int ctl_in, int ctl_out, int in_fd, int out_fd, const char *cmd,
                            const char *cwd, char **env, int nenv) {
    int keep[] = {ctl_in, ctl_out, in_fd, out_fd};
    close_fds_except(keep, 4);
    int devnull = open("/dev/null", O_RDWR);
    if (devnull >= 0) { /* let go of the host's stdio so its EOF means "agent gone" */
        dup2(devnull, 0);
        dup2(devnull, 1);
        dup2(devnull, 2);
        if (devnull > 2) close(devnull);
    }
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    prctl(PR_SET_NAME, "pem-supervisor");
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);

    struct sup_state s = {.ctl_in = ctl_in, .ctl_out = ctl_out, .shell_status = -1};
    pid_t pid = fork();
    if (pid == 0) shell_child(cmd, cwd, env, nenv, in_fd, out_fd);
    if (pid < 0) {
        sup_send(&s, CTL_START_FAILED, errno, 0, 0);
        _exit(0);
    }
    close(in_fd);
    close(out_fd);
    s.shell = pid;
    sup_send(&s, CTL_STARTED, pid, 0, 0);

    for (;;) {
        int empty = sup_reap(&s);
        if (empty && s.shell_status >= 0) {
            if (s.stopping && !s.exit_sent)
                sup_send(&s, CTL_EXIT, s.shell_status, X_STOPPED | X_ALL_KILLED, 0);
            _exit(0);
        }
        int timeout = -1;
        if (s.stopping) {
            uint64_t t = now_ms();
            if (t >= s.term_until) {
                unsigned left = signal_subtree(SIGKILL);
                if (t >= s.kill_until) { /* e.g. stuck in uninterruptible sleep */
                    if (!s.exit_sent) {
                        int st = s.shell_status >= 0 ? s.shell_status : 128 + SIGKILL;
                        sup_send(&s, CTL_EXIT, st, X_STOPPED, left ? left : 1);
                    }
                    _exit(1);
                }
                timeout = 10;
            } else {
                timeout = (int)(s.term_until - t < 20 ? s.term_until - t : 20);
            }
        }
        if (sfd < 0 && (timeout < 0 || timeout > 50)) timeout = 50; /* no signalfd: poll */
        struct pollfd pf[2] = {{.fd = s.agent_gone ? -1 : ctl_in, .events = POLLIN},
                               {.fd = sfd, .events = POLLIN}};
        if (poll(pf, 2, timeout) < 0 && errno != EINTR) timeout = 10;
        if (pf[1].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) > 0) {}
        }
        if (pf[0].revents) {
            struct ctl_msg m;
            ssize_t r = read(ctl_in, &m, sizeof m);
            if (r == (ssize_t)sizeof m && m.op == CTL_STOP) {
                sup_begin_stop(&s, m.b);
            } else if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) {
                s.agent_gone = 1; /* no one to report to: stop the tree and leave */
                sup_begin_stop(&s, AGENT_GONE_GRACE_MS);
            }
        }
    }
}

/* ======================================================================================
 * serve mode: the agent
 * ====================================================================================== */

struct job {
    int used;
    uint32_t id;            /* protocol id; 0 once EXIT was reported (id free for reuse) */
    pid_t sup_pid;
    int out_fd;             /* merged output pipe, read end; -1 at EOF */
    int ctl_r, ctl_w;       /* from / to the supervisor */
    int in_fd;              /* stdin pipe, write end; -1 if none or closed */
    struct bytes in_q;      /* stdin bytes not yet written */
    int in_end;             /* STDIN_END received */
    int started, reported, stop_sent;
    uint32_t flags;         /* X_* flags for EXIT */
    uint64_t deadline;      /* 0 = none */
    uint32_t grace_ms;
    uint64_t output_bytes;
    /* spill */
    char *spill_path;
    uint64_t spill_after;
    struct bytes spill_keep;
    int spill_fd;           /* -1 until spilling */
};

static struct job jobs[MAX_JOBS];
static struct bytes outq;                   /* frames waiting for the host */
static unsigned char inbuf[HDR_LEN + MAX_PAYLOAD];
static size_t inlen;
static int hello_done, host_gone, input_closed, shutting_down, shutdown_reply;
static uint64_t last_rx, shutdown_until;
static uint32_t heartbeat_ms = DEFAULT_HEARTBEAT_MS;
/* The host's channel: stdin/stdout, or one socket passed down (`serve --fd N`, e.g. with
 * `podman exec --preserve-fds`), which spares the copy through Podman's stdio relay. */
static int host_in = 0, host_out = 1;

static void send_frame(uint32_t type, uint32_t id, const void *payload, size_t len) {
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

static void send_error(uint32_t id, uint32_t code, const char *fmt, ...) {
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

static struct job *find_job(uint32_t id) {
    if (id == 0) return NULL;
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used && jobs[i].id == id) return &jobs[i];
    return NULL;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void job_free(struct job *j) {
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

static void job_stop(struct job *j, uint32_t grace_ms) {
    if (j->ctl_w < 0) return;
    struct ctl_msg m = {CTL_STOP, 0, grace_ms, 0};
    if (write_all(j->ctl_w, &m, sizeof m) == 0) j->stop_sent = 1;
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
    j->flags &= ~(uint32_t)X_SPILLED;
    close_fd(&j->spill_fd);
    bytes_free(&j->spill_keep);
    free(j->spill_path);
    j->spill_path = NULL;
}

static void spill_output(struct job *j, const unsigned char *data, size_t n) {
    if (!j->spill_path) return;
    if (j->spill_fd < 0 && j->output_bytes <= j->spill_after) {
        if (bytes_append(&j->spill_keep, data, n) < 0) spill_fail(j, "buffer");
        return;
    }
    if (j->spill_fd < 0) { /* just crossed the threshold: write what was kept, then this */
        if (mkdir_parents(j->spill_path) < 0) return spill_fail(j, "mkdir");
        j->spill_fd = open(j->spill_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (j->spill_fd < 0) return spill_fail(j, "open");
        j->flags |= X_SPILLED;
        if (write_all(j->spill_fd, j->spill_keep.buf + j->spill_keep.off,
                      bytes_pending(&j->spill_keep)) < 0)
            return spill_fail(j, "write");
        bytes_free(&j->spill_keep);
    }
    if (write_all(j->spill_fd, data, n) < 0) spill_fail(j, "write");
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

/* ---- RUN ---- */

struct field { const char *s; size_t len; };

struct run_req {
    uint32_t deadline_ms, grace_ms, flags;
    uint64_t spill_after;
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
    if (r->cwd.s && (r->cwd.len == 0 || r->cwd.s[0] != '/')) return "cwd must be an absolute path";
    return NULL;
}

static char *field_str(struct field f) { return f.s ? strndup(f.s, f.len) : NULL; }

static void handle_run(uint32_t id, const unsigned char *p, size_t len) {
    if (id == 0) return send_error(0, E_BAD_FRAME, "RUN needs a non-zero id");
    if (shutting_down) return send_error(id, E_START_FAILED, "the agent is shutting down");
    if (find_job(id)) return send_error(id, E_DUPLICATE_ID, "id %u is already running", id);
    struct run_req r;
    const char *bad = parse_run(p, len, &r);
    if (bad) return send_error(id, E_BAD_FRAME, "%s", bad);
    struct job *j = NULL;
    for (int i = 0; i < MAX_JOBS && !j; i++)
        if (!jobs[i].used) j = &jobs[i];
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
    }
}

/* ======================================================================================
 * streams: the egress proxy's connections (docs/agent-protocol.md, "Streams")
 *
 * After LISTEN the agent accepts TCP connections on a loopback address in the sandbox and
 * relays each one to the host as a stream: its bytes go out in STREAM_DATA frames and the
 * host's come back the same way. Flow control per stream and direction: a sender may have
 * at most `stream_window` bytes the receiver has not credited back (STREAM_CREDIT). This
 * side reads a socket only while it holds credit (and the host is keeping up), and credits
 * the host for bytes once they are written to the socket; so every stream's memory here is
 * bounded by the window and a slow one never holds up the channel or the others.
 * ====================================================================================== */

enum {
    T_LISTEN = 0x10, T_SDATA = 0x11, T_SEND = 0x12, T_SCREDIT = 0x13, T_SRESET = 0x14,
    T_SPLICE = 0x15, T_SPLICE_GO = 0x16,
    T_SOPEN = 0x90, T_SDATA_OUT = 0x91, T_SEND_OUT = 0x92, T_SCREDIT_OUT = 0x93,
    T_SRESET_OUT = 0x94, T_LISTENING = 0x95, T_SPLICED = 0x96, T_SPLICE_END = 0x97,
};
enum { SPLICE_ONE_REQUEST = 1 };
#define SPLICE_BUF (256u * 1024u)
#define UNLIMITED UINT64_MAX
#define MAX_STREAMS 128
#define MIN_WINDOW (16u * 1024u)
#define MAX_WINDOW (4u * 1024u * 1024u)
#define STREAM_ID_BIT 0x80000000u

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

static struct stream streams[MAX_STREAMS];
static int listen_fd = -1;
static int pass_fd = -1;         /* `serve --pass-fd`: where SPLICE's descriptors arrive */
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

static void stream_free(struct stream *s) {
    if (s->fd >= 0) close(s->fd); /* a plain close: what the kernel holds is still sent */
    if (s->up >= 0) close(s->up);
    bytes_free(&s->to_sock);
    free(s->down.buf);
    free(s->upload.buf);
    memset(s, 0, sizeof *s);
    s->fd = s->up = -1;
}

static void stream_reset(struct stream *s, const char *why) {
    send_frame(T_SRESET_OUT, s->id, why, strlen(why));
    stream_free(s);
}

static void streams_close_all(void) {
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
        send_frame(T_SCREDIT_OUT, s->id, p, sizeof p);
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
        send_frame(T_SEND_OUT, s->id, NULL, 0);
        return stream_maybe_done(s);
    }
    s->credit -= (uint32_t)n;
    send_frame(T_SDATA_OUT, s->id, buf, (size_t)n);
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
        send_frame(T_SOPEN, id, NULL, 0);
    }
}

/* ---- spliced streams (docs/agent-protocol.md, "Splice") ---- */

/* The descriptor the host passed for stream `id` on the pass socket, or -1. The host sends
 * it before the SPLICE frame, so it is already queued here. Older messages are for streams
 * whose SPLICE never got here (the stream was reset first): they are closed and skipped. */
static int recv_passed_fd(uint32_t id) {
    if (pass_fd < 0) return -1;
    for (int tries = 0; tries < MAX_STREAMS; tries++) {
        unsigned char tag[4];
        struct iovec iov = {.iov_base = tag, .iov_len = sizeof tag};
        union {
            struct cmsghdr h;
            char buf[CMSG_SPACE(sizeof(int))];
        } control;
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = control.buf;
        m.msg_controllen = sizeof control.buf;
        ssize_t n = recvmsg(pass_fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) return -1;
        int fd = -1;
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        if (h && h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS &&
            h->cmsg_len == CMSG_LEN(sizeof(int)))
            memcpy(&fd, CMSG_DATA(h), sizeof fd);
        if (n == (ssize_t)sizeof tag && get32(tag) == id && !(m.msg_flags & MSG_CTRUNC))
            return fd;
        if (fd >= 0) close(fd);
    }
    return -1;
}

/* The spliced exchange is over (both directions, or the answer with ONE_REQUEST). */
static void splice_maybe_done(struct stream *s) {
    int down_done = s->wr_shut;
    int up_done = s->go && s->upload.len == 0 &&
                  (s->up_shut || s->budget == 0 || (s->rd_eof && s->budget != UNLIMITED));
    if (down_done && (up_done || (s->splice_flags & SPLICE_ONE_REQUEST))) {
        unsigned char p[16];
        put64(p, s->upload.sent);
        put64(p + 8, s->down.sent);
        send_frame(T_SPLICE_END, s->id, p, sizeof p);
        stream_free(s);
    }
}

/* One step of one direction: when `b` is empty and `want` > 0, read up to `want` bytes
 * from `from` into it (end of stream: *eof); then send what it holds on to `to`. Returns
 * whether anything moved (*got: bytes read), or -1 on an error (errno says which). */
static int copy_step(int from, int to, struct copy_buf *b, size_t want, int *eof, size_t *got) {
    int moved = 0;
    *got = 0;
    if (b->len == 0 && want > 0) {
        ssize_t n = read(from, b->buf, want);
        if (n > 0) {
            b->off = 0;
            b->len = *got = (size_t)n;
            moved = 1;
        } else if (n == 0) {
            *eof = moved = 1;
        } else if (errno != EAGAIN && errno != EINTR) {
            return -1;
        }
    }
    if (b->len > 0) {
        ssize_t n = send(to, b->buf + b->off, b->len, MSG_NOSIGNAL);
        if (n > 0) {
            b->off += (size_t)n;
            b->len -= (size_t)n;
            b->sent += (uint64_t)n;
            moved = 1;
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            return -1;
        }
    }
    return moved;
}

/* Move what can move now between the client and the destination, both ways, without
 * blocking (both sockets are non-blocking). Returns 0 once the stream is gone. */
static int splice_pump(struct stream *s) {
    for (int progress = 1; progress && s->used;) {
        size_t got;
        /* destination -> client, after what the host had already sent (to_sock) */
        int ready = !s->up_eof && bytes_pending(&s->to_sock) == 0;
        int down = copy_step(s->up, s->fd, &s->down, ready ? SPLICE_BUF : 0, &s->up_eof, &got);
        if (s->up_eof && s->down.len == 0 && bytes_pending(&s->to_sock) == 0 && !s->wr_shut) {
            shutdown(s->fd, SHUT_WR);
            s->wr_shut = 1;
        }
        /* client -> destination, once the host said GO, at most `budget` bytes */
        size_t want = 0;
        if (down >= 0 && s->go && !s->rd_eof && s->budget > 0)
            want = s->budget < SPLICE_BUF ? (size_t)s->budget : SPLICE_BUF;
        int up = down < 0 ? -1 : copy_step(s->fd, s->up, &s->upload, want, &s->rd_eof, &got);
        if (down < 0 || up < 0) {
            stream_reset(s, strerror(errno));
            return 0;
        }
        if (s->budget != UNLIMITED) s->budget -= got;
        /* The client's EOF ends an unlimited upload (CONNECT, a chunked body): pass it on. */
        if (s->go && s->rd_eof && s->upload.len == 0 && s->budget == UNLIMITED && !s->up_shut) {
            shutdown(s->up, SHUT_WR);
            s->up_shut = 1;
        }
        progress = down || up;
    }
    if (s->used) splice_maybe_done(s);
    return s->used;
}

static void splice_answer(uint32_t id, uint32_t status, const char *why) {
    unsigned char p[4 + 200];
    size_t n = strlen(why) < 200 ? strlen(why) : 200;
    put32(p, status);
    memcpy(p + 4, why, n);
    send_frame(T_SPLICED, id, p, 4 + n);
}

/* SPLICE: take the host's connection to the destination (passed on the pass socket) and
 * copy between it and the client here. Refused (SPLICED with a non-zero status) when it
 * cannot be done; the host then goes on relaying the stream itself. */
static void handle_splice(struct stream *s, const unsigned char *p, size_t len) {
    if (len != 4) return splice_answer(s->id, 1, "SPLICE payload must be 4 bytes");
    if (s->up >= 0) return splice_answer(s->id, 1, "already spliced");
    int fd = recv_passed_fd(s->id);
    if (fd < 0) return splice_answer(s->id, 1, "no descriptor was passed for this stream");
    s->down.buf = malloc(SPLICE_BUF);
    s->upload.buf = malloc(SPLICE_BUF);
    if (!s->down.buf || !s->upload.buf) {
        close(fd);
        free(s->down.buf);
        free(s->upload.buf);
        s->down.buf = s->upload.buf = NULL;
        return splice_answer(s->id, 1, "out of memory");
    }
    set_nonblock(fd);
    s->up = fd;
    s->splice_flags = get32(p);
    s->budget = 0;
    splice_answer(s->id, 0, "");
    splice_pump(s);
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
static void handle_stream_frame(uint32_t type, uint32_t id, const unsigned char *p, size_t len) {
    if (type == T_LISTEN) return handle_listen(id, p, len);
    struct stream *s = find_stream(id);
    if (!s) return;
    if (type == T_SPLICE) return handle_splice(s, p, len);
    if (s->up >= 0) { /* spliced: the host sends nothing more but GO, RESET and a late END */
        if (type == T_SPLICE_GO && len == 8 && !s->go) {
            s->go = 1;
            s->budget = get64(p);
            splice_pump(s);
        } else if (type == T_SRESET) {
            stream_free(s);
        } else if (type != T_SEND && type != T_SCREDIT) {
            stream_reset(s, "unexpected frame on a spliced stream");
        }
        return;
    }
    switch (type) {
    case T_SDATA:
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
    case T_SEND:
        s->host_end = 1;
        return stream_write(s); /* shuts the write side once everything is written */
    case T_SCREDIT:
        if (len != 4 || (uint64_t)s->credit + get32(p) > host_window)
            return stream_reset(s, "bad credit");
        s->credit += get32(p);
        return;
    case T_SRESET:
        return stream_free(s);
    }
}

/* ---- host frames ---- */

static void begin_shutdown(uint32_t grace_ms, int reply) {
    if (!shutting_down) {
        shutting_down = 1;
        shutdown_until = now_ms() + grace_ms + KILL_PERSIST_MS + SHUTDOWN_EXTRA_MS;
    }
    shutdown_reply |= reply;
    streams_close_all();
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used) job_stop(&jobs[i], grace_ms);
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

static void handle_frame(uint32_t type, uint32_t id, const unsigned char *p, size_t len) {
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
    case T_STDIN_END:
        j = find_job(id);
        if (!j || j->reported) return send_error(id, E_UNKNOWN_ID, "no running command %u", id);
        if (j->in_fd < 0 || j->in_end) return; /* stdin already closed: bytes dropped */
        if (type == T_STDIN_END) {
            j->in_end = 1;
        } else if (bytes_pending(&j->in_q) + len > MAX_STDIN_PENDING) {
            send_error(id, E_LIMIT, "more than 64 MiB of stdin pending; stdin closed");
            close_fd(&j->in_fd);
            bytes_free(&j->in_q);
        } else if (bytes_append(&j->in_q, p, len) < 0) {
            send_error(id, E_LIMIT, "out of memory for stdin; stdin closed");
            close_fd(&j->in_fd);
        }
        return;
    case T_STOP:
        if (len != 4) return send_error(id, E_BAD_FRAME, "STOP payload must be 4 bytes");
        j = find_job(id);
        if (!j) return send_error(id, E_UNKNOWN_ID, "no running command %u", id);
        return job_stop(j, get32(p)); /* EXIT says whether the stop got there first */
    case T_PING: return send_frame(T_PONG, id, p, len > 64 ? 64 : len);
    case T_SHUTDOWN:
        return begin_shutdown(len == 4 ? get32(p) : HOST_GONE_GRACE_MS, 1);
    case T_LISTEN:
    case T_SDATA:
    case T_SEND:
    case T_SCREDIT:
    case T_SRESET:
    case T_SPLICE:
    case T_SPLICE_GO:
        return handle_stream_frame(type, id, p, len);
    default:
        return send_error(id, E_UNSUPPORTED, "unsupported frame type 0x%02x", type);
    }
}

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
static void host_is_silent(const char *why) {
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

/* Jobs whose supervisor still runs. A job whose supervisor gave up (survivors hold its
 * pipe) is not waited for at shutdown: nothing is left that could stop its survivors. */
static int jobs_alive(void) {
    int n = 0;
    for (int i = 0; i < MAX_JOBS; i++) n += jobs[i].used && jobs[i].ctl_r >= 0;
    return n;
}

static void check_timers(void) {
    uint64_t t = now_ms();
    if (!input_closed && t - last_rx > heartbeat_ms) host_is_silent("heartbeat missed");
    for (int i = 0; i < MAX_JOBS; i++) {
        struct job *j = &jobs[i];
        if (j->used && !j->reported && j->deadline && t >= j->deadline && !j->stop_sent) {
            j->flags |= X_DEADLINE;
            job_stop(j, j->grace_ms);
        }
    }
}

static int next_timeout(void) {
    uint64_t t = now_ms(), wake = t + 1000; /* reap supervisors at least once a second */
    if (accept_pause_until > t && accept_pause_until < wake) wake = accept_pause_until;
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used && !jobs[i].reported && jobs[i].deadline && !jobs[i].stop_sent &&
            jobs[i].deadline < wake)
            wake = jobs[i].deadline;
    return wake > t ? (int)(wake - t) : 0;
}

static int serve_main(void) {
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
    for (int i = 0; i < MAX_JOBS; i++) { /* -1: no descriptor (0 is the host's stdin) */
        struct job *j = &jobs[i];
        j->out_fd = j->ctl_r = j->ctl_w = j->in_fd = j->spill_fd = -1;
    }
    for (int i = 0; i < MAX_STREAMS; i++) streams[i].fd = streams[i].up = -1;
    set_nonblock(host_in);
    set_nonblock(host_out);
    last_rx = now_ms();
    struct pollfd pf[2 + 3 * MAX_JOBS + 1 + 2 * MAX_STREAMS];
    struct job *owner[2 + 3 * MAX_JOBS];
    struct stream *sowner[MAX_STREAMS];
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {} /* supervisors that exited */
        for (int i = 0; i < MAX_JOBS; i++) { /* a job ends when its supervisor and pipe do */
            struct job *j = &jobs[i];
            if (j->used && j->ctl_r < 0 && j->out_fd < 0) job_free(j);
        }
        check_timers();
        if (shutting_down && (jobs_alive() == 0 || now_ms() >= shutdown_until)) {
            if (shutdown_reply) send_frame(T_BYE, 0, NULL, 0);
            while (!host_gone && bytes_pending(&outq) > 0) {
                struct pollfd o = {.fd = host_out, .events = POLLOUT};
                if (poll(&o, 1, 5000) <= 0) break;
                write_host();
            }
            return jobs_alive() ? 1 : 0;
        }
        int n = 0;
        int paused = bytes_pending(&outq) > OUT_HIGH; /* backpressure from the host */
        int read_in = !host_gone && !input_closed && inlen < sizeof inbuf;
        pf[n] = (struct pollfd){.fd = read_in ? host_in : -1, .events = POLLIN};
        owner[n++] = NULL;
        int write_out = bytes_pending(&outq) && !host_gone;
        pf[n] = (struct pollfd){.fd = write_out ? host_out : -1, .events = POLLOUT};
        owner[n++] = NULL;
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
        int jobs_end = n, lidx = n, ns = 0;
        int can_accept = listen_fd >= 0 && free_stream() && now_ms() >= accept_pause_until;
        pf[n++] = (struct pollfd){.fd = can_accept ? listen_fd : -1, .events = POLLIN};
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
            sowner[ns++] = s;
        }
        if (poll(pf, (nfds_t)n, next_timeout()) < 0) {
            if (errno == EINTR) continue;
            diag("poll: %s", strerror(errno));
            return 3;
        }
        if (pf[0].revents) read_host();
        if (pf[1].revents) write_host();
        for (int k = 2; k < jobs_end; k += 3) {
            struct job *j = owner[k];
            /* Read control before output: on EXIT the pipe is drained then reported. */
            if (pf[k + 1].revents && j->ctl_r >= 0) job_read_ctl(j);
            if (pf[k].revents && j->out_fd >= 0) job_read_output(j);
            if (pf[k + 2].revents && j->in_fd >= 0) job_write_stdin(j);
            if (j->in_fd >= 0 && j->in_end && bytes_pending(&j->in_q) == 0) close_fd(&j->in_fd);
        }
        if (pf[lidx].revents && listen_fd >= 0) accept_streams();
        for (int k = 0; k < ns; k++) {
            struct stream *s = sowner[k];
            short re = pf[lidx + 1 + 2 * k].revents, ure = pf[lidx + 2 + 2 * k].revents;
            if (re && s->used && bytes_pending(&s->to_sock) > 0) stream_write(s);
            if (s->used && s->up >= 0) {
                if (re || ure) splice_pump(s);
                continue;
            }
            if (re && s->used && (re & (POLLIN | POLLHUP | POLLERR))) stream_read(s);
        }
    }
}

/* `agent install DEST`: copy this binary to DEST (mode 0755), atomically: written beside
 * it, then renamed over it, so a sandbox starting meanwhile sees the old file or the new
 * one, never half of one. This is how the host fills the volume that sandboxes mount
 * read-only, with nothing but `podman run` (which also works through remote Podman). */
static int install_main(const char *dest) {
    /* Unique even across containers installing at once (each is PID 1 in its own). */
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.%ld.%ld.tmp", dest, (long)now.tv_sec, (long)now.tv_nsec) >=
        (int)sizeof tmp) {
        diag("install: destination path too long");
        return 1;
    }
    int in = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
    if (in < 0 || out < 0) {
        diag("install: cannot open /proc/self/exe or %s: %s", tmp, strerror(errno));
        return 1;
    }
    char buf[65536];
    ssize_t got;
    while ((got = read(in, buf, sizeof buf)) > 0) {
        for (ssize_t done = 0; done < got;) {
            ssize_t put = write(out, buf + done, (size_t)(got - done));
            if (put < 0) {
                if (errno == EINTR) continue;
                diag("install: write %s: %s", tmp, strerror(errno));
                unlink(tmp);
                return 1;
            }
            done += put;
        }
    }
    if (got < 0 || fchmod(out, 0755) < 0 || fsync(out) < 0 || close(out) < 0 ||
        rename(tmp, dest) < 0) {
        diag("install: %s: %s", dest, strerror(errno));
        unlink(tmp);
        return 1;
    }
    close(in);
    return 0;
}

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
