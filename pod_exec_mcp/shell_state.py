"""A shell that behaves like one terminal per session, and the paths we keep in a sandbox.

Each call still runs `/bin/sh -lc SCRIPT` in a fresh process (one broken call cannot wedge
the session), but SCRIPT restores the working directory and exported variables that the
previous call of the session left, runs the agent's command in the same shell, and saves
them again when that shell exits. The command travels in an environment variable, so no
quoting is involved, and is unset before it runs.
"""

from __future__ import annotations

import secrets
import shlex

from pod_exec_mcp.engine import EXEC_ID_ENV

# Everything of ours inside a sandbox lives under here (on /tmp, which is writable in
# every profile, including the strict one's read-only root).
STATE_DIR = "/tmp/.pod_exec_mcp"
SHELL_DIR = f"{STATE_DIR}/shell"
OUTPUT_DIR = f"{STATE_DIR}/output"
JOBS_DIR = f"{STATE_DIR}/jobs"

COMMAND_ENV = "POD_EXEC_MCP_COMMAND"

# Restore, run, save, with as few processes as the shell allows (each fork and exec costs
# about a millisecond, against a whole call of ten): restoring uses builtins only. Saving
# writes only when the command changed an exported variable or the directory (most calls
# change neither): one fork to list the variables before and one after, against the `mv`
# (fork and exec, ~3 ms here) that a write needs so that a concurrent call never sources a
# half-written file. It also means a call that changed nothing never overwrites what a
# concurrent one saved. `export -p` prints re-sourceable `export NAME='value'` lines in dash
# and bash alike; the command's exec id is left out of both lists (it differs per call).
# The EXIT trap also runs after `exit N` in the command (and keeps N). A command killed by
# a signal (a timeout) saves nothing, and the previous state stays.
_RESTORE = f"""
__pem_dir={SHELL_DIR}
if [ -r "$__pem_dir/env" ]; then . "$__pem_dir/env"; fi
if [ -r "$__pem_dir/cwd" ] && IFS= read -r __pem_cwd < "$__pem_dir/cwd"; then
  cd "$__pem_cwd" 2>/dev/null ||
    printf '[pod_exec_mcp: the working directory %s is gone, so this runs in %s]\n' \
      "$__pem_cwd" "$(pwd -P)" >&2
fi
"""
_RUN = f"""
__pem_command=${COMMAND_ENV}
unset {COMMAND_ENV}
eval "$__pem_command"
"""
_PERSISTENT = (
    _RESTORE
    + f"""
__pem_save() {{
  unset {EXEC_ID_ENV} {COMMAND_ENV}
  __pem_after=$(export -p)
  if [ "$__pem_after" = "$__pem_before" ] && [ "$PWD" = "$__pem_cwd" ]; then return; fi
  [ -d "$__pem_dir" ] || mkdir -p "$__pem_dir" 2>/dev/null || return
  if [ "$__pem_after" != "$__pem_before" ]; then
    printf '%s\\n' "$__pem_after" > "$__pem_dir/env.$$" &&
      mv -f "$__pem_dir/env.$$" "$__pem_dir/env"
  fi
  printf '%s\n' "$PWD" > "$__pem_dir/cwd"
}}
__pem_before=$(unset {EXEC_ID_ENV} {COMMAND_ENV}; export -p)
trap __pem_save EXIT
"""
    + _RUN
)

# Restore only, for background jobs: a job starts where the shell is, and its own `cd`
# or `export` must not change the terminal's state under the agent's feet.
_RESTORING = _RESTORE + _RUN

# Only the working directory, for file tools: a relative path means what it would mean
# to the agent's next shell_exec. If that directory is gone, a relative path means nothing:
# status CWD_GONE, with the directory as the output.
CWD_GONE = 8
_IN_CWD = f"""
if [ -r {SHELL_DIR}/cwd ] && IFS= read -r __pem_cwd < {SHELL_DIR}/cwd; then
  if ! cd "$__pem_cwd" 2>/dev/null; then
    case "$POD_EXEC_MCP_PATH" in /*) ;; *) printf '%s' "$__pem_cwd"; exit {CWD_GONE} ;; esac
  fi
fi
"""


def persistent_command(command: str) -> tuple[str, dict[str, str]]:
    """The script and environment that run `command` with the session's shell state."""
    return _PERSISTENT, {COMMAND_ENV: command}


def restoring_command(command: str) -> tuple[str, dict[str, str]]:
    """The script and environment that run `command` from the session's shell state,
    leaving that state as it was."""
    return _RESTORING, {COMMAND_ENV: command}


def in_session_cwd(script: str) -> str:
    """`script`, run from the session's current directory."""
    return _IN_CWD + script


def new_output_file() -> str:
    """A fresh path for the whole output of one call."""
    return f"{OUTPUT_DIR}/{secrets.token_hex(6)}.log"


# Newest first, every output file and job log; the running jobs' logs (lines of $KEEP)
# count but stay. One name per line, never globbed: a sandbox may name files as it likes.
_PRUNE_SPILL_FILES = f"""
files=$(ls -1t -- {OUTPUT_DIR}/*.log {JOBS_DIR}/*.log 2>/dev/null)
set -f
IFS='
'
total=0
for f in $files; do
  size=$(stat -c %s -- "$f" 2>/dev/null) || continue
  total=$((total + size))
  [ "$total" -gt "$LIMIT" ] || continue
  case "$KEEP" in *"
$f
"*) ;; *) rm -f -- "$f" ;; esac
done
"""


def prune_spill_files(limit: int, running_logs: list[str]) -> str:
    """A command that deletes the oldest output files and finished jobs' logs until the
    newest of them hold at most `limit` bytes together."""
    keep = shlex.quote("\n" + "".join(f"{p}\n" for p in running_logs))
    return f"LIMIT={int(limit)} KEEP={keep}; {_PRUNE_SPILL_FILES}"
