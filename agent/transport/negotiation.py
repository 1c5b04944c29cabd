"""Which MQTT version to try next: MQTT 5 first, 3.1.1 when the broker will not speak 5.

Pure bookkeeping, no network, so the rules can be tested on their own:

- ``protocol: "5"`` or ``"3.1.1"``: always that version.
- ``protocol: "auto"``: MQTT 5 first. A CONNACK "unsupported protocol version" (0x84,
  or the 3.1.1 return code 1 that paho reports the same way) is definitive: 3.1.1 at
  once, and MQTT 5 is never tried again. A broker that closes the connection without any
  CONNACK may be one that cannot parse an MQTT 5 CONNECT, or may be failing for another
  reason: 3.1.1 is tried at once, and if it also gets no CONNACK, MQTT 5 again after the
  backoff. The first version that gets a successful CONNACK is kept from then on.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from agent.transport.base import MQTT_V5, MQTT_V311

#: CONNACK reason "Unsupported Protocol Version".
UNSUPPORTED_PROTOCOL_VERSION = 0x84


class NextAttempt(NamedTuple):
    """The version of the next attempt, and whether to make it without waiting."""

    version: int
    at_once: bool


class ProtocolChooser:
    """Tracks the protocol version across connection attempts (see the module doc)."""

    def __init__(self, setting: Literal["auto", "5", "3.1.1"]) -> None:
        self.setting = setting
        self._kept: int | None = {"5": MQTT_V5, "3.1.1": MQTT_V311}.get(setting)
        self._v5_refused = False

    @property
    def kept(self) -> int | None:
        """The version fixed by config or the one that worked; None while still probing."""
        return self._kept

    @property
    def first(self) -> int:
        """The version of the first attempt of a new connection."""
        return self._kept or MQTT_V5

    def connected(self, version: int) -> None:
        """Record a successful CONNACK with ``version``: it is kept from now on."""
        self._kept = version

    def after_failure(
        self, current: int, *, reached: bool, refusal_code: int | None
    ) -> NextAttempt:
        """The next attempt after one with ``current`` that never got a successful CONNACK.

        ``reached``: the TCP (and TLS) connection opened. ``refusal_code``: the reason code
        of a refusing CONNACK, or None when there was no CONNACK at all.
        """
        if self._kept is not None or not reached:
            return NextAttempt(current, at_once=False)
        if current == MQTT_V5:
            if refusal_code == UNSUPPORTED_PROTOCOL_VERSION:
                self._v5_refused = True
                return NextAttempt(MQTT_V311, at_once=True)
            if refusal_code is None:
                return NextAttempt(MQTT_V311, at_once=True)
        elif refusal_code is None and not self._v5_refused:
            return NextAttempt(MQTT_V5, at_once=False)
        return NextAttempt(current, at_once=False)
