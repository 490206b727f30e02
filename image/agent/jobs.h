/* The agent's commands ("jobs"): jobs.c runs them once started, run.c starts them (RUN). */
#ifndef AGENT_JOBS_H
#define AGENT_JOBS_H

#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "agent.h"
#include "util.h"

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
    uint64_t spill_max;     /* the file keeps at most this: its head and its tail; 0 = all */
    uint64_t spill_size;    /* bytes in the file */
    uint64_t spill_ring;    /* once full: where in the tail region the next byte goes */
};

#define JOB_POLL_FDS (3 * MAX_JOBS)   /* per job: output, control, stdin */

void jobs_init(void);                          /* every descriptor -1 (0 is the host's) */
struct job *find_job(uint32_t id);             /* a job with this id (not yet reported) */
struct job *free_job(void);                    /* an unused slot, or NULL */
void job_free(struct job *j);
void job_stop(struct job *j, uint32_t grace_ms);
void jobs_stop_all(uint32_t grace_ms);
int jobs_alive(void);                          /* jobs whose supervisor still runs */
void jobs_reap(void);                          /* free jobs whose supervisor and pipe ended */
void jobs_check_deadlines(uint64_t now);       /* stop commands past their own deadline */
uint64_t jobs_next_deadline(uint64_t wake);    /* the earliest deadline before `wake` */

/* STDIN (end 0) and STDIN_END (end 1) for command id; written to its pipe from the loop. */
void handle_stdin(uint32_t id, int end, const unsigned char *p, size_t len);

/* Poll set-up (returns how many entries it filled) and events for every job. `paused`:
 * too much output waits for the host, so command pipes are not read. */
int jobs_poll_fds(struct pollfd *pf, int paused);
void jobs_poll_events(const struct pollfd *pf, int n);

/* run.c: RUN(id) with its payload; answered by ERROR, or by STARTED later. */
void handle_run(uint32_t id, const unsigned char *p, size_t len);

#endif
