"""The dashboard's session cookie: signing, tampering, expiry, the key file, redirects."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fleet_server.dashboard.session import (
    KEY_BYTES,
    SessionCodec,
    load_key,
    safe_next,
    same_secret,
)
from fleet_server.errors import ConfigError

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HASH = "ab" * 32


def test_a_session_round_trips_and_holds_no_token() -> None:
    codec = SessionCodec(b"k" * KEY_BYTES)
    data = codec.new(HASH, NOW)
    value = codec.encode(data)
    assert codec.decode(value, NOW + timedelta(hours=11)) == data
    assert len(data.csrf) >= 40
    assert codec.new(HASH, NOW).csrf != data.csrf  # a fresh CSRF secret per session


def test_a_session_expires() -> None:
    codec = SessionCodec(b"k" * KEY_BYTES)
    value = codec.encode(codec.new(HASH, NOW, ttl=timedelta(minutes=5)))
    assert codec.decode(value, NOW + timedelta(minutes=4)) is not None
    assert codec.decode(value, NOW + timedelta(minutes=5)) is None


def test_forged_and_malformed_cookies_are_refused() -> None:
    codec = SessionCodec(b"k" * KEY_BYTES)
    value = codec.encode(codec.new(HASH, NOW))
    payload, mac = value.split(".")
    other = SessionCodec(b"x" * KEY_BYTES)
    assert other.decode(value, NOW) is None  # signed under another key
    # a payload changed by one character no longer matches its signature
    flipped = payload[:-1] + ("A" if payload[-1] != "A" else "B")
    assert codec.decode(f"{flipped}.{mac}", NOW) is None
    # a validly signed payload that is not a session
    junk = "bm90IGpzb24"
    assert codec.decode(f"{junk}.{codec._mac(junk)}", NOW) is None
    for bad in (None, "", "abc", "a.b.c", "." * 3, "x" * 2000):
        assert codec.decode(bad, NOW) is None


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ConfigError):
        SessionCodec(b"short")


def test_the_key_file_is_created_private_and_kept(tmp_path: Path) -> None:
    key = load_key(tmp_path)
    path = tmp_path / "dashboard" / "session.key"
    assert len(key) == KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(tmp_path) == key  # a restart keeps the sessions valid
    assert [p.name for p in path.parent.iterdir()] == ["session.key"]  # no temp file left


def test_a_truncated_key_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "dashboard").mkdir()
    (tmp_path / "dashboard" / "session.key").write_bytes(b"123")
    with pytest.raises(ConfigError, match="shorter"):
        load_key(tmp_path)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/devices?state=online", "/devices?state=online"),
        (None, "/"),
        ("", "/"),
        ("https://evil.example/", "/"),
        ("//evil.example/x", "/"),
        ("/\\evil.example", "/"),
        ("devices", "/"),
        ("/a\r\nSet-Cookie: x=1", "/"),
    ],
)
def test_after_login_only_local_paths(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_csrf_secrets_compare_exactly() -> None:
    assert same_secret("abc", "abc")
    assert not same_secret("abc", "abd")
    assert not same_secret("abc", "")
    assert not same_secret("abc", None)
