#!/usr/bin/env bash
# postCreateCommand of the devcontainer: runs once, when the container is created.
#   1. sub-id ranges for the nested rootless Podman;
#   2. the project, editable with its test extras, in ~/.venv;
#   3. the sandbox base image, built with pod_exec_mcp_build.
# Steps can be chosen: post-create.sh [subids] [venv] [image] (default: all three).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps=("$@"); [ "${#steps[@]}" -gt 0 ] || steps=(subids venv image)
VENV="$HOME/.venv"
BASE_IMAGE="${POD_EXEC_MCP_BASE_IMAGE:-docker.io/library/debian:trixie-slim}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

subids() {
    # Rootless Podman maps its containers' users onto these ranges. The ids 1-65535 minus our
    # own uid: both a rootful outer engine (all ids) and a rootless one (65536 of them) map
    # that many. The user's uid is only final now (updateRemoteUserUID may have changed it).
    local user uid
    user=$(id -un); uid=$(id -u)
    if [ "$uid" = 0 ]; then return; fi   # root runs a rootful Podman: no sub-ids needed
    if grep -q "^$user:" /etc/subuid 2>/dev/null && grep -q "^$user:" /etc/subgid 2>/dev/null; then
        return
    fi
    say "sub-id ranges for $user (uid $uid)"
    local ranges="$user:1:$((uid - 1))"$'\n'"$user:$((uid + 1)):$((65535 - uid))"
    printf '%s\n' "$ranges" | sudo -n tee -a /etc/subuid /etc/subgid >/dev/null
    podman system migrate >/dev/null 2>&1 || true
}

venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        python3 -m venv "$VENV"
    fi
    say "installing pod_exec_mcp (editable, with test extras)"
    "$VENV/bin/pip" install -q -e '.[test]'
}

image() {
    say "building the sandbox image pod_exec_mcp_base (base $BASE_IMAGE)"
    "$VENV/bin/pod_exec_mcp_build" --base-image "$BASE_IMAGE"
}

for step in "${steps[@]}"; do
    case "$step" in
        subids|venv|image) "$step" ;;
        *) echo "post-create.sh: unknown step $step (subids, venv, image)" >&2; exit 2 ;;
    esac
done
