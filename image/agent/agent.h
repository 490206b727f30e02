/* What the agent's modules share: its modes' entry points, its limits and timings. */
#ifndef AGENT_AGENT_H
#define AGENT_AGENT_H

/* ---- the modes (main.c picks one from argv) ---- */
int init_main(long lifetime);          /* init.c: PID 1 */
int serve_main(void);                  /* serve.c: the agent */
int install_main(const char *dest);    /* install.c: copy this binary */

/* ---- limits (docs/agent-protocol.md, "Limits") ---- */
#define MAX_JOBS 256                       /* commands alive at once, incl. finished ones
                                              whose background children still run */
#define MAX_ENV 256
#define OUT_HIGH (1024u * 1024u)           /* stop reading command pipes above this */
#define READ_CHUNK (64u * 1024u)
#define MAX_STDIN_PENDING (64u * 1024u * 1024u)
#define MAX_SPILL_AFTER (64ull * 1024u * 1024u)
#define MAX_STREAMS 128

/* ---- timings ---- */
#define DEFAULT_HEARTBEAT_MS 30000u
#define MIN_HEARTBEAT_MS 1000u
#define MAX_HEARTBEAT_MS 3600000u
#define HOST_GONE_GRACE_MS 2000u           /* stop grace when the host is gone */
#define AGENT_GONE_GRACE_MS 1000u          /* a supervisor's grace when the agent is gone */
#define KILL_PERSIST_MS 10000u             /* keep sending SIGKILL this long before giving up */
#define SHUTDOWN_EXTRA_MS 15000u           /* wait for supervisors at most grace + this */

/* serve.c: set once SHUTDOWN (or host gone) began; nothing new starts after it. */
extern int shutting_down;

#endif
