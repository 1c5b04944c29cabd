"""Opaque keyset-pagination cursors: the last key of a page, url-safe base64 encoded."""

from __future__ import annotations

import base64
import binascii

from fleet_server.errors import ValidationError


def encode(key: str | int) -> str:
    """The cursor that resumes after ``key``."""
    return base64.urlsafe_b64encode(str(key).encode()).decode().rstrip("=")


def decode(cursor: str) -> str:
    """The key inside ``cursor``.

    Raises:
        ValidationError: the cursor is not one :func:`encode` produced.
    """
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        key = raw.decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValidationError("cursor: not a valid page cursor", code="bad_cursor") from exc
    if not key or encode(key) != cursor:
        raise ValidationError("cursor: not a valid page cursor", code="bad_cursor")
    return key


def decode_int(cursor: str) -> int:
    """The integer key inside ``cursor``.

    Raises:
        ValidationError: the cursor is not one :func:`encode` produced from an integer.
    """
    text = decode(cursor)
    if not text.isdigit():
        raise ValidationError("cursor: not a valid page cursor", code="bad_cursor")
    return int(text)
