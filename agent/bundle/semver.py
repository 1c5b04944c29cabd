"""Semantic Versioning 2.0.0: validation and precedence (https://semver.org)."""

from __future__ import annotations

import re
from functools import total_ordering

# The regular expression recommended by semver.org.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


@total_ordering
class SemVer:
    """A parsed version; compares by semver precedence (build metadata ignored)."""

    __slots__ = ("build", "major", "minor", "patch", "prerelease")

    def __init__(self, text: str) -> None:
        """Parse ``text``.

        Raises:
            ValueError: ``text`` is not a semantic version.
        """
        m = _SEMVER.match(text)
        if m is None:
            raise ValueError(f"{text!r} is not a semantic version (e.g. 1.4.0 or 2.0.0-rc.1)")
        self.major, self.minor, self.patch = int(m[1]), int(m[2]), int(m[3])
        self.prerelease: tuple[str, ...] = tuple(m[4].split(".")) if m[4] else ()
        self.build = m[5] or ""

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A release sorts after its pre-releases; numeric identifiers sort numerically
        # and before alphanumeric ones; a longer list of equal identifiers sorts later.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SemVer) and self._key() == other._key()

    def __lt__(self, other: SemVer) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        return text + (f"+{self.build}" if self.build else "")


def is_semver(text: str) -> bool:
    """True when ``text`` is a valid semantic version."""
    return _SEMVER.match(text) is not None
