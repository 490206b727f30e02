/*
 * The agent's wire protocol (docs/agent-protocol.md): THE table of its constants.
 *
 * The host side declares them again in Python (pod_exec_mcp/agent_channel.py,
 * pod_exec_mcp/agent_streams.py); tests/test_protocol_table.py parses this file and fails
 * when those, or the tables in docs/agent-protocol.md, disagree with it. So: one constant
 * per line, `NAME = value,`, and names as the host spells them. The agent-to-host twin of a
 * stream frame ends in _IN (it comes in, seen from the host).
 */
#ifndef AGENT_PROTOCOL_H
#define AGENT_PROTOCOL_H

#include <stdint.h>

#define PROTOCOL_VERSION 1
#define HDR_LEN 12
#define MAX_PAYLOAD (1024u * 1024u)

/* Frame types. Host to agent: 0x01-0x0F, streams 0x10-0x1F; agent to host: 0x81-0x8F,
 * streams 0x90-0x9F. */
enum {
    T_HELLO = 0x01,
    T_RUN = 0x02,
    T_STDIN = 0x03,
    T_STDIN_END = 0x04,
    T_STOP = 0x05,
    T_PING = 0x06,
    T_SHUTDOWN = 0x07,
    T_HELLO_OK = 0x81,
    T_STARTED = 0x82,
    T_OUTPUT = 0x83,
    T_EXIT = 0x84,
    T_ERROR = 0x85,
    T_PONG = 0x86,
    T_BYE = 0x87,
    T_LISTEN = 0x10,
    T_STREAM_DATA = 0x11,
    T_STREAM_END = 0x12,
    T_STREAM_CREDIT = 0x13,
    T_STREAM_RESET = 0x14,
    T_SPLICE = 0x15,
    T_SPLICE_GO = 0x16,
    T_STREAM_OPEN = 0x90,
    T_STREAM_DATA_IN = 0x91,
    T_STREAM_END_IN = 0x92,
    T_STREAM_CREDIT_IN = 0x93,
    T_STREAM_RESET_IN = 0x94,
    T_LISTENING = 0x95,
    T_SPLICED = 0x96,
    T_SPLICE_END = 0x97,
};

/* RUN flags */
enum {
    F_STDIN_FOLLOWS = 1,
};

/* RUN field tags */
enum {
    FLD_COMMAND = 1,
    FLD_CWD = 2,
    FLD_ENV = 3,
    FLD_SPILL_PATH = 4,
    FLD_SPILL_MAX = 5,
};

/* EXIT flags */
enum {
    X_STOPPED = 1,
    X_ALL_KILLED = 2,
    X_SPILLED = 4,
    X_DEADLINE = 8,
    X_SPILL_FAILED = 16,
    X_SPILL_CUT = 32,
};

/* ERROR codes */
enum {
    E_BAD_FRAME = 1,
    E_BAD_VERSION = 2,
    E_UNKNOWN_ID = 3,
    E_DUPLICATE_ID = 4,
    E_START_FAILED = 5,
    E_UNSUPPORTED = 6,
    E_LIMIT = 7,
    E_INTERNAL = 8,
};

/* SPLICE flags */
enum {
    SPLICE_ONE_REQUEST = 1,
};

/* Integers on the wire are big-endian. */
static inline void put16(unsigned char *p, uint32_t v) { p[0] = v >> 8; p[1] = v; }
static inline void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}
static inline void put64(unsigned char *p, uint64_t v) { put32(p, v >> 32); put32(p + 4, (uint32_t)v); }
static inline uint32_t get16(const unsigned char *p) { return (uint32_t)p[0] << 8 | p[1]; }
static inline uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t get64(const unsigned char *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

#endif
