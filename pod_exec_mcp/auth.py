"""Bearer-token authentication: where tokens come from, and how they are checked."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import platformdirs
from fastmcp.server.auth import AccessToken, TokenVerifier

from pod_exec_mcp.config import Settings, env_var

APP_NAME = "pod_exec_mcp"


class AuthConfigError(ValueError):
    """Authentication is required but not configured, or its file is unusable."""


def default_token_file() -> Path:
    return platformdirs.user_config_path(APP_NAME) / "auth_token"


def token_file(settings: Settings) -> Path:
    return Path(settings.auth_token_file) if settings.auth_token_file else default_token_file()


def load_tokens(settings: Settings) -> list[str]:
    """The accepted tokens: from the setting if given, else from the token file if present."""
    if settings.auth_token:
        raw = settings.auth_token.split(",")
    else:
        path = token_file(settings)
        if not path.exists():
            if settings.auth_token_file:
                raise AuthConfigError(f"auth token file {path} does not exist")
            return []
        raw = path.read_text().splitlines()
    tokens = [t.strip() for t in raw if t.strip() and not t.strip().startswith("#")]
    for token in tokens:
        if len(token) < 16:
            raise AuthConfigError("an auth token must be at least 16 characters long")
    return tokens


def generate_token_file(path: Path) -> str:
    """Write a new random token to `path` (mode 0600) and return it; never overwrites."""
    if path.exists():
        raise AuthConfigError(f"{path} already exists; remove it first to make a new token")
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def principal_of(token: str) -> str:
    """A stable name for a token's holder that does not reveal the token."""
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:16]


class StaticBearerTokens(TokenVerifier):
    """Accepts any of a fixed set of tokens; each token is its own principal."""

    def __init__(self, tokens: list[str]) -> None:
        super().__init__()
        self._tokens = [t.encode() for t in tokens]

    async def verify_token(self, token: str) -> AccessToken | None:
        given = token.encode("utf-8", "surrogatepass")
        match = None
        # Compare against every token, in constant time each, so timing reveals nothing.
        for known in self._tokens:
            if hmac.compare_digest(given, known):
                match = known
        if match is None:
            return None
        return AccessToken(token=token, client_id=principal_of(match.decode()), scopes=[])


def auth_provider(settings: Settings) -> StaticBearerTokens | None:
    """The auth to serve with, or AuthConfigError if a non-loopback bind has no token."""
    tokens = load_tokens(settings)
    if tokens:
        return StaticBearerTokens(tokens)
    if not settings.binds_loopback:
        raise AuthConfigError(
            f"refusing to listen on {settings.host} without authentication: set "
            f"{env_var('auth_token')}, or run `pod_exec_mcp --generate-token` to create "
            f"{default_token_file()}"
        )
    return None
