#!/usr/bin/env bash
# postStartCommand of the devcontainer: runs on every start of the container.
#
# Rootless Podman opens /dev/fuse (fuse-overlayfs) and /dev/net/tun (pasta) as this user.
# Most hosts create them world-readable and -writable (0666), and the container inherits
# that; some give them 0600. Our own device nodes can then be opened up from in here
# (Docker and rootful Podman create them inside the container). Where that is refused
# (rootless Podman bind-mounts the host's nodes), the host must change their mode.
set -u
for dev in /dev/fuse /dev/net/tun; do
    if [ ! -e "$dev" ]; then
        echo "post-start: $dev is missing: add --device=$dev (devcontainer.json runArgs)" >&2
    elif [ ! -r "$dev" ] || [ ! -w "$dev" ]; then
        sudo -n chmod 0666 "$dev" 2>/dev/null \
            || echo "post-start: cannot open $dev; on the host: sudo chmod 0666 $dev" >&2
    fi
done
exit 0
