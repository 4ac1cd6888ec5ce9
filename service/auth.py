"""Optional API keys: ``Authorization: Bearer <key>``, checked by a pure ASGI middleware.

Keys are kept only as sha256 hashes (of the key's UTF-8 text) and compared in constant time. They
come from ``GSA_API_KEYS`` (comma-separated ``name:sha256hex`` entries, or plain keys, hashed at
load) or ``GSA_API_KEYS_FILE`` (one ``name:sha256hex`` a line, ``#`` comments). ``GSA_AUTH`` is
``auto`` (off when the server binds a loopback address, on otherwise), ``on`` or ``off``.

Open without a key: health (``/v2/health/*``), the web page (``/``) and its static files, and
``/metrics`` unless ``GSA_METRICS_AUTH``. Everything else answers 401 without a valid key. The
request's ``state.principal`` is the key's name (None with auth off): jobs are owned by it.

``python -m service.auth new [NAME]`` prints a new key and the line to configure;
``python -m service.auth hash [KEY]`` (or the key on stdin) prints the line for an existing key.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.settings import Settings

__all__ = ["ApiKey", "AuthConfigError", "AuthMiddleware", "auth_enabled", "configure", "hash_key", "load_keys"]

LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}
_HASHED = re.compile(r"^([A-Za-z0-9._@\-]{1,64}):([0-9a-fA-F]{64})$")


class AuthConfigError(RuntimeError):
    """Authentication is on but cannot work (no keys, or a malformed key file): refuse to start."""


@dataclass(frozen=True)
class ApiKey:
    name: str  # the principal: who owns jobs, what logs may show
    sha256: bytes  # digest of the key; the key itself is never kept

    def __repr__(self) -> str:
        return f"ApiKey({self.name!r})"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _parse_entry(entry: str, where: str, allow_plain: bool) -> ApiKey:
    match = _HASHED.match(entry)
    if match:
        return ApiKey(match.group(1), bytes.fromhex(match.group(2)))
    if not allow_plain:
        raise AuthConfigError(f"{where}: expected 'name:sha256hex' (64 hex digits); "
                              "make one with 'python -m service.auth hash'")
    digest = hashlib.sha256(entry.encode()).digest()
    return ApiKey(digest.hex()[:8], digest)  # a plain key is named by its hash, never by itself


def load_keys(settings: Settings) -> list[ApiKey]:
    """Every configured key: ``GSA_API_KEYS`` then ``GSA_API_KEYS_FILE``."""
    keys: list[ApiKey] = []
    if settings.api_keys is not None:
        entries = [e.strip() for e in settings.api_keys.get_secret_value().split(",")]
        keys += [_parse_entry(e, f"GSA_API_KEYS entry {i + 1}", True) for i, e in enumerate(entries) if e]
    if settings.api_keys_file is not None:
        try:
            lines = Path(settings.api_keys_file).read_text().splitlines()
        except OSError as exc:
            raise AuthConfigError(f"cannot read GSA_API_KEYS_FILE {settings.api_keys_file}: {exc}") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(_parse_entry(line, f"{settings.api_keys_file} line {number}", False))
    return keys


def auth_enabled(settings: Settings) -> bool:
    """``on``/``off`` as set; ``auto`` is on unless the server binds a loopback address."""
    if settings.auth == "auto":
        return settings.host.strip("[]").lower() not in LOOPBACK_HOSTS
    return settings.auth == "on"


class AuthMiddleware:
    """Answers 401 (with ``WWW-Authenticate: Bearer``) for a protected path without a valid key;
    otherwise sets ``scope["state"]["principal"]`` to the key's name and goes on. With no keys
    (auth off) every request passes with principal None."""

    def __init__(self, app: ASGIApp, keys: list[ApiKey] | None, open_metrics: bool = True):
        self.app = app
        self.keys = keys
        self.open_metrics = open_metrics

    def is_open(self, path: str) -> bool:
        return (path == "/" or path.startswith(("/v2/health/", "/static/"))
                or (path == "/metrics" and self.open_metrics))

    def principal(self, authorization: str | None) -> str | None:
        """The name of the key in an ``Authorization`` header, None when there is no valid one."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key in self.keys or ():  # every key compared, in constant time, whichever matches
            if hmac.compare_digest(digest, key.sha256):
                found = key.name
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.keys is None:  # off: no principal of ours (an outer layer, e.g. a gateway's, may have set one)
            state.setdefault("principal", None)
            await self.app(scope, receive, send)
            return
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        name = self.principal(authorization)
        state["principal"] = name
        if name is None and not self.is_open(scope["path"]):
            await _unauthorized(send, "missing API key: send 'Authorization: Bearer <key>'" if not authorization
                                else "invalid API key")
            return
        await self.app(scope, receive, send)


async def _unauthorized(send: Send, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    challenge = b'Bearer realm="gsa-serve"' + (b', error="invalid_token"' if message == "invalid API key" else b"")
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", challenge),
    ]})
    await send({"type": "http.response.body", "body": body})


def configure(settings: Settings) -> list[ApiKey] | None:
    """The keys to check, or None when auth is off. Raises :class:`AuthConfigError` when auth is
    on and no key is configured (a server that nobody can use, or one open by mistake)."""
    if not auth_enabled(settings):
        return None
    keys = load_keys(settings)
    if not keys:
        why = "GSA_AUTH=on" if settings.auth == "on" else f"the server binds {settings.host} (not loopback)"
        raise AuthConfigError(
            f"authentication is on ({why}) but no API keys are configured: set GSA_API_KEYS or "
            "GSA_API_KEYS_FILE (make a key with 'python -m service.auth new'), or GSA_AUTH=off"
        )
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise AuthConfigError(f"API key names must be unique: {', '.join(sorted(names))}")
    return keys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.auth", description="API keys for GSA-Serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="make a new key; prints the key, then its 'name:hash' line")
    new.add_argument("name", nargs="?", default=None, help="the key's name (default: key-<8 hex>)")
    hashed = sub.add_parser("hash", help="print the 'name:hash' line of a key (from the argument or stdin)")
    hashed.add_argument("key", nargs="?", default=None)
    hashed.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    if args.name is not None and not _HASHED.match(f"{args.name}:{'0' * 64}"):
        parser.error(f"name {args.name!r} may hold only letters, digits and . _ @ - (64 at most)")
    if args.command == "new":
        key = "gsa_" + secrets.token_urlsafe(32)
        name = args.name or f"key-{secrets.token_hex(4)}"
        sys.stdout.write(f"key:  {key}\nline: {name}:{hash_key(key)}\n")
    else:
        key = args.key if args.key is not None else sys.stdin.readline().strip()
        if not key:
            parser.error("no key given")
        sys.stdout.write(f"{args.name or hash_key(key)[:8]}:{hash_key(key)}\n")


if __name__ == "__main__":
    main()
