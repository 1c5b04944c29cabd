"""A real Mosquitto for the test suite: the broker, its PKI, a 3.1.1-only proxy, a probe client.

Fixtures (enable with ``pytest_plugins = ["tests.broker"]``):

- ``mosquitto``: one open broker for the session (anonymous, MQTT 5 and 3.1.1). Tests
  must not stop it.
- ``fresh_mosquitto``: a broker of the test's own, to kill and restart on the same port.
- ``secure_mosquitto``: a TLS listener that requires a client certificate and takes the
  username from its CN, plus a password-file listener, both under the ACL that
  ``scripts/mosquitto/acl`` ships: a device gets only ``edge/{its id}/#``; the fleet
  server (``fleet-server``) reads status, telemetry, update and cmd/reply of every device
  and writes desired and cmd; an inference client (``app-frontdoor``) sends requests and
  reads ``edge/+/infer/+/reply/{its id}``. ``cam-revoked``'s certificate is in the CRL.

Helpers: :class:`Pki` mints client certificates for any device id;
:func:`start_example` runs the shipped example configs; :class:`V311OnlyProxy` makes a
broker refuse MQTT 5 like a 3.1.1-only one; :func:`probe` is a plain paho client.

Every broker runs ``/usr/sbin/mosquitto`` (``scripts/test`` installs it; the tests are
skipped, saying so, where it is missing) from a config written into a temporary folder,
on free ports of 127.0.0.1, with ``set_tcp_nodelay true``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker.mosquitto import (
    ACL_FILE,
    ADMIN,
    EXAMPLES,
    OPEN,
    Mosquitto,
    SecureMosquitto,
    free_port,
    start_example,
    start_secure_mosquitto,
    wait_for_port,
)
from tests.broker.pki import Pki
from tests.broker.probe import Probe, probe
from tests.broker.proxy import V311OnlyProxy

__all__ = [
    "ACL_FILE",
    "ADMIN",
    "EXAMPLES",
    "OPEN",
    "Mosquitto",
    "Pki",
    "Probe",
    "SecureMosquitto",
    "V311OnlyProxy",
    "free_port",
    "fresh_mosquitto",
    "mosquitto",
    "probe",
    "secure_mosquitto",
    "start_example",
    "start_secure_mosquitto",
    "wait_for_port",
]


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """An open broker shared by the session (do not stop it; use ``fresh_mosquitto``)."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.kill()


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """An open broker of this test's own: kill it, restart it on the same port."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.kill()


@pytest.fixture(scope="session")
def secure_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMosquitto]:
    """TLS with client certificates (CN = username) and a password listener, one ACL."""
    passwords = {ADMIN: "admin-secret", "cam-03": "cam-03-secret"}
    secure = start_secure_mosquitto(tmp_path_factory.mktemp("secure-mosquitto"), passwords)
    yield secure
    secure.broker.kill()
