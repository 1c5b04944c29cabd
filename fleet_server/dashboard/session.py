"""The dashboard's login session: a signed, HttpOnly, SameSite=Strict cookie.

The cookie never holds the API token. It holds the token's sha256 (what the database
stores), a per-session CSRF secret and an expiry, signed with HMAC-SHA256 under a server
secret kept in ``<data-dir>/dashboard/session.key`` (created on first use, mode 0600).
Every request re-reads the token by its hash, so revoking or expiring the token ends its
dashboard sessions at once. Replicas that serve one dashboard need the same key file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from hashlib import sha256
from pathlib import Path

from fleet_server.domain import as_utc
from fleet_server.errors import ConfigError

SESSION_COOKIE = "efd_session"
#: The double-submit nonce of the login form (no session exists yet to hold one).
LOGIN_COOKIE = "efd_login"
SESSION_TTL = timedelta(hours=12)
KEY_BYTES = 32
_FORMAT = 1


@dataclass(frozen=True)
class SessionData:
    """What a session cookie carries."""

    token_hash: str
    csrf: str
    expires_at: int  # epoch seconds

    def expired(self, now: datetime) -> bool:
        """True once the session's lifetime is over."""
        return as_utc(now).timestamp() >= self.expires_at


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


class SessionCodec:
    """Signs and verifies session cookies with one server secret."""

    def __init__(self, key: bytes) -> None:
        """``key``: at least 32 random bytes.

        Raises:
            ConfigError: the key is too short.
        """
        if len(key) < KEY_BYTES:
            raise ConfigError(f"the dashboard session key needs {KEY_BYTES} bytes or more")
        self._key = key

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), sha256).digest())

    def new(self, token_hash: str, now: datetime, ttl: timedelta = SESSION_TTL) -> SessionData:
        """A fresh session (with a new CSRF secret) for the token with this hash."""
        expires = int((as_utc(now) + ttl).timestamp())
        return SessionData(token_hash, secrets.token_urlsafe(32), expires)

    def encode(self, data: SessionData) -> str:
        """The cookie value of ``data``."""
        body = {"v": _FORMAT, "h": data.token_hash, "c": data.csrf, "e": data.expires_at}
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def decode(self, value: str | None, now: datetime) -> SessionData | None:
        """The session in a cookie value, or ``None`` when it is missing, forged,
        malformed or expired. Never raises."""
        if not value or value.count(".") != 1 or len(value) > 1024:
            return None
        payload, mac = value.split(".")
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            body = json.loads(_unb64(payload))
            data = SessionData(str(body["h"]), str(body["c"]), int(body["e"]))
        except (binascii.Error, ValueError, KeyError, TypeError):
            return None
        if body.get("v") != _FORMAT or data.expired(now):
            return None
        return data


def same_secret(expected: str, presented: str | None) -> bool:
    """Constant-time comparison of a CSRF secret with what a form sent."""
    if not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


def load_key(data_dir: Path) -> bytes:
    """The session key in ``<data_dir>/dashboard/session.key``, created (0600) if missing.

    Raises:
        ConfigError: the file cannot be read or written, or is too short.
    """
    path = data_dir / "dashboard" / "session.key"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            # write a whole key aside, then link it in: a replica starting at the same
            # moment either wins the link or reads the winner's complete key
            tmp = path.with_name(f".session.key.{secrets.token_hex(8)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(KEY_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        key = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read or create the session key: {exc.strerror}") from exc
    if len(key) < KEY_BYTES:
        raise ConfigError(f"{path}: the session key is shorter than {KEY_BYTES} bytes")
    return key


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site, never another host."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(ch) < 0x20 for ch in target):
        return "/"
    return target
