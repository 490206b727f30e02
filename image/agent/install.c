/*
 * `agent install DEST`: copy this binary to DEST (mode 0755), atomically: written beside
 * it, then renamed over it, so a sandbox starting meanwhile sees the old file or the new
 * one, never half of one. This is how the host fills the volume that sandboxes mount
 * read-only, with nothing but `podman run` (which also works through remote Podman).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "util.h"

int install_main(const char *dest) {
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
