/*
 * A command's supervisor: a fork of the agent (no exec), one per command.
 *
 * It makes itself a child subreaper (PR_SET_CHILD_SUBREAPER) and forks `/bin/sh -lc CMD`.
 * However a descendant detaches (setsid, double fork, scrubbed env, uid change,
 * non-dumpable), it stays in this subtree: when its parent dies it is re-parented to the
 * supervisor, never to the container's init. A stop walks the subtree through the ppid
 * links of /proc/PID/stat, sends SIGTERM, waits out the grace, then sends SIGKILL round
 * after round (reaping in between) until waitpid says ECHILD: the subtree is then
 * verifiably empty. The supervisor exits once its subtree is empty.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"
#include "protocol.h"
#include "supervisor.h"
#include "util.h"

extern char **environ;

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
void supervisor_main(int ctl_in, int ctl_out, int in_fd, int out_fd, const char *cmd,
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
