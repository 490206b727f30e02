# The pod_exec_mcp server image: the MCP server, a venv, and a Podman *client*.
#
# The container starts no containers itself: its podman (the `podman-remote` client) talks to
# the host's Podman API socket, mounted at /run/podman/podman.sock (see CONTAINER_HOST), and
# every sandbox runs on the host's Podman. The sandbox image (pod_exec_mcp_base by default)
# must exist in that Podman's storage: build it on the host with `pod_exec_mcp_build`.
#
#   podman build -t pod_exec_mcp .
#   podman run -d --name pod_exec_mcp -p 127.0.0.1:8000:8000 \
#     -v "$XDG_RUNTIME_DIR/podman/podman.sock:/run/podman/podman.sock" \
#     --userns=keep-id:uid=10001,gid=10001 --security-opt label=disable \
#     -v pod_exec_mcp-state:/home/pod_exec_mcp/.local/state \
#     -e POD_EXEC_MCP_AUTH_TOKEN="$(openssl rand -hex 32)" pod_exec_mcp
#
# docs/install.md explains each option, and gives the Docker and rootful variants.
#
# The Debian base is chosen by tag (not digest) behind an ARG, so that sites without a
# registry can provide it locally. Python is trixie's own python3 (no python: image needed).
ARG BASE_IMAGE=docker.io/library/debian:trixie-slim

# --- base: the Debian base plus its python3, shared by both stages below -------------------
FROM ${BASE_IMAGE} AS base
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# --- build: a venv with pod_exec_mcp and its dependencies ----------------------------------
FROM base AS build
# Optional: a CA bundle for pip, for builds behind a TLS-intercepting proxy, e.g.
#   podman build -v /etc/ssl/certs/ca-certificates.crt:/tmp/host-ca.crt:ro \
#     --build-arg PIP_CERT=/tmp/host-ca.crt .
# Used in this stage only; nothing of it reaches the runtime image.
ARG PIP_CERT
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && python3 -m venv /opt/pod_exec_mcp
# Dependencies first, in a layer of their own that is reused until pyproject.toml changes.
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && /opt/pod_exec_mcp/bin/pip install --no-cache-dir -r /tmp/requirements.txt
# Then the package itself (.dockerignore keeps .venv, .git and the like out of the context).
COPY . /src
RUN /opt/pod_exec_mcp/bin/pip install --no-cache-dir --no-deps /src \
 && /opt/pod_exec_mcp/bin/pod_exec_mcp --version

# --- runtime: python3, the venv, the podman client; runs as a non-root user --------------
FROM base
LABEL org.opencontainers.image.title="pod_exec_mcp" \
      org.opencontainers.image.description="MCP server that gives every agent session its own Podman sandbox; talks to the host's Podman socket" \
      org.opencontainers.image.source="https://github.com/pod-exec-mcp/pod_exec_mcp" \
      org.opencontainers.image.licenses="MIT"
# podman-remote is Debian's remote-only Podman client (two small dependencies instead of the
# whole container engine). Linked as `podman`, the name the server calls by default.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends podman-remote \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && ln -s /usr/bin/podman-remote /usr/local/bin/podman \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin pod_exec_mcp \
 && install -d -o 10001 -g 10001 /home/pod_exec_mcp/.config /home/pod_exec_mcp/.local \
      /home/pod_exec_mcp/.local/state
COPY --from=build /opt/pod_exec_mcp /opt/pod_exec_mcp
ENV PATH=/opt/pod_exec_mcp/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MCP_HOST=0.0.0.0 \
    MCP_PORT=8000 \
    CONTAINER_HOST=unix:///run/podman/podman.sock
# State (instance locks) and config (token file) live under the home directory; both exist
# here, owned by the server's user, so that a volume mounted on them starts out writable.
USER 10001:10001
WORKDIR /home/pod_exec_mcp
EXPOSE 8000
# Liveness: /healthz answers while the server serves (/readyz, for orchestrators, also needs
# podman and the sandbox image). python3 is here already; curl is not. Podman keeps a
# HEALTHCHECK only in images built with --format docker.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MCP_PORT', '8000'), timeout=4)"]
# Off loopback the server refuses to start without a token: pass POD_EXEC_MCP_AUTH_TOKEN
# (or mount a token file and set POD_EXEC_MCP_AUTH_TOKEN_FILE).
ENTRYPOINT ["pod_exec_mcp"]
