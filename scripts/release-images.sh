#!/usr/bin/env bash
# The release's container images, for .github/workflows/release.yml (runnable by hand too).
#
#   scripts/release-images.sh build      # on each architecture: build, label, tag NAME:VERSION-ARCH
#   scripts/release-images.sh push       # push those tags
#   scripts/release-images.sh manifest   # join the architectures: NAME:VERSION (and NAME:latest)
#   scripts/release-images.sh stamp SRC DEST   # SRC plus the release's labels, as DEST
#
# Environment: VERSION (e.g. 1.2.3), REVISION (the commit), SOURCE_URL (the repository's
# URL), IMAGE_PREFIX (e.g. ghcr.io/OWNER); ARCHES for `manifest` (default "amd64 arm64").
# `build` needs pod_exec_mcp_build on PATH (the released wheel's) and runs from the checkout.
#
# Each architecture is built natively on its own runner, with the same commands a user runs
# (no emulation), and pushed under an architecture tag; `manifest` then makes the multi-arch
# tags from those. `latest` moves only for a final release (no a/b/rc/dev in the version).
set -euo pipefail

# The sandbox images (pod_exec_mcp_build makes both) and the server image (Dockerfile).
SANDBOX_IMAGES=(pod_exec_mcp_base pod_exec_mcp_agent)
SERVER_IMAGE=pod_exec_mcp
IMAGES=("${SANDBOX_IMAGES[@]}" "$SERVER_IMAGE")

say() { printf '==> %s\n' "$*" >&2; }
need() { for v in "$@"; do [ -n "${!v:-}" ] || { echo "error: $v is not set" >&2; exit 2; }; done; }
arch() { podman info --format '{{.Host.Arch}}'; }

# DEST = SRC plus the OCI labels of this release. A FROM-only build adds no layer; labels
# set here override those the Containerfiles carry (e.g. their placeholder source URL).
stamp() {
    need VERSION REVISION SOURCE_URL
    local src=$1 dest=$2 ctx
    ctx=$(mktemp -d)
    printf 'FROM %s\n' "$src" > "$ctx/Containerfile"
    podman build --quiet --pull=never --tag "$dest" \
        --label "org.opencontainers.image.version=$VERSION" \
        --label "org.opencontainers.image.revision=$REVISION" \
        --label "org.opencontainers.image.source=$SOURCE_URL" \
        "$ctx" >/dev/null
    rm -rf "$ctx"
}

build() {
    need VERSION REVISION SOURCE_URL IMAGE_PREFIX
    local a; a=$(arch)
    say "building ${SANDBOX_IMAGES[*]} with pod_exec_mcp_build ($a)"
    pod_exec_mcp_build --pull=always
    say "building $SERVER_IMAGE from the Dockerfile ($a)"
    podman build --pull=always --tag "$SERVER_IMAGE" .
    for name in "${IMAGES[@]}"; do
        podman image exists "$name" || {
            echo "error: $name was not built (pod_exec_mcp_build makes ${SANDBOX_IMAGES[*]})" >&2
            exit 1
        }
        stamp "$name" "$IMAGE_PREFIX/$name:$VERSION-$a"
        say "$IMAGE_PREFIX/$name:$VERSION-$a"
    done
}

push() {
    need VERSION IMAGE_PREFIX
    local a; a=$(arch)
    for name in "${IMAGES[@]}"; do
        podman push "$IMAGE_PREFIX/$name:$VERSION-$a"
    done
}

# The tags a release gets: its version, and latest for a final release only.
release_tags() {
    need VERSION
    echo "$VERSION"
    if [[ $VERSION =~ ^[0-9]+(\.[0-9]+)*$ ]]; then echo latest; fi
}

manifest() {
    need VERSION IMAGE_PREFIX
    local name tag list a
    for name in "${IMAGES[@]}"; do
        for tag in $(release_tags); do
            list="$IMAGE_PREFIX/$name:$tag"
            podman manifest rm "$list" >/dev/null 2>&1 || true
            podman manifest create "$list" >/dev/null
            for a in ${ARCHES:-amd64 arm64}; do
                podman manifest add "$list" "docker://$IMAGE_PREFIX/$name:$VERSION-$a" >/dev/null
            done
            podman manifest push --all "$list" "docker://$list"
            say "$list"
        done
    done
}

cmd=${1:-}; shift || true
case "$cmd" in
    build) build ;;
    push) push ;;
    manifest) manifest ;;
    stamp) [ $# -eq 2 ] || { echo "usage: $0 stamp SRC DEST" >&2; exit 2; }; stamp "$@" ;;
    tags) release_tags ;;
    *) echo "usage: $0 build|push|manifest|tags|stamp SRC DEST" >&2; exit 2 ;;
esac
