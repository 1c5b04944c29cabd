"""``edge-agent run`` as device ``cam-01`` on the secure broker: TLS with a client certificate
(CN = username) under the shipped ACL (``scripts/mosquitto/acl``).

The device serves an inference client (``app-frontdoor``, replies on its own reply topic);
another device cannot send it requests or read its topics; and the agent itself cannot
publish outside ``edge/cam-01/#``, whatever reply topic a request names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.protocol import encode_request
from tests import modelgen
from tests.agent.agent_process import AgentProcess, running_agent, status_of
from tests.agent.daemon_client import MqttClient
from tests.broker import ADMIN, SecureMosquitto, start_secure_mosquitto

pytestmark = pytest.mark.broker

DEVICE = "cam-01"
NOT_AUTHORIZED = 0x87
W, B = modelgen.affine_weights(3, 2)
X = np.array([[2.0, 0.0, -1.0]], np.float32)
APP_REPLY = f"edge/{DEVICE}/infer/affine/reply/app-frontdoor"


def tls_client(secure: SecureMosquitto, identity: str) -> MqttClient:
    cert, key = secure.client_cert(identity)
    tls = {"ca_certs": str(secure.pki.ca_file), "certfile": str(cert), "keyfile": str(key)}
    return MqttClient(secure.tls_port, tls=tls)


def fleet_server(secure: SecureMosquitto) -> MqttClient:
    return MqttClient(secure.password_port, username=ADMIN, password="admin-secret")


@pytest.fixture(scope="module")
def secure_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMosquitto]:
    """This module's own secure broker: the agent leaves retained messages behind, which
    must not reach the transport tests that share the session's broker."""
    passwords = {ADMIN: "admin-secret"}
    secure = start_secure_mosquitto(tmp_path_factory.mktemp("daemon-secure-broker"), passwords)
    yield secure
    secure.broker.kill()


@pytest.fixture(scope="module")
def daemon(
    secure_mosquitto: SecureMosquitto, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    folder: Path = tmp_path_factory.mktemp("daemon-secure")
    cert, key = secure_mosquitto.client_cert(DEVICE)
    tls = {
        "ca_file": str(secure_mosquitto.pki.ca_file),
        "cert_file": str(cert),
        "key_file": str(key),
    }
    models = [{"name": "affine", "path": modelgen.make_onnx_affine(folder / "affine.onnx")}]
    with running_agent(
        folder,
        secure_mosquitto.tls_port,
        models,
        device=DEVICE,
        url=f"mqtts://127.0.0.1:{secure_mosquitto.tls_port}",
        mqtt={"tls": tls},
        watcher=lambda: fleet_server(secure_mosquitto),
    ) as proc:
        yield proc
        assert proc.alive
    proc.assert_clean_log()


@pytest.fixture(scope="module")
def app(secure_mosquitto: SecureMosquitto, daemon: AgentProcess) -> Iterator[MqttClient]:
    client = tls_client(secure_mosquitto, "app-frontdoor")
    assert client.subscribe(APP_REPLY)[0].value < 0x80
    yield client
    client.close()


def test_the_device_serves_over_tls_with_its_certificate(
    secure_mosquitto: SecureMosquitto, app: MqttClient
) -> None:
    fleet = fleet_server(secure_mosquitto)
    assert status_of(fleet, DEVICE)["state"] == "online"
    fleet.close()
    reply = app.request("affine", encode_request([(None, X)]), device=DEVICE, reply_topic=APP_REPLY)
    np.testing.assert_array_equal(reply.response().outputs[0].array, X @ W + B)


def test_another_device_is_refused_by_the_broker(
    secure_mosquitto: SecureMosquitto, app: MqttClient
) -> None:
    intruder = tls_client(secure_mosquitto, "cam-02")
    try:
        intruder.subscribe(f"edge/{DEVICE}/#")  # granted, but the ACL filters every message:
        assert intruder.nothing_on(f"edge/{DEVICE}/status", 0.3)  # not even the retained status
        code = intruder.publish(
            f"edge/{DEVICE}/infer/affine",
            encode_request([(None, X)]),
            response_topic=APP_REPLY,
            correlation_data=b"intruder",
        )
        assert code is not None and code.value == NOT_AUTHORIZED
        assert intruder.publish(f"edge/{DEVICE}/cmd", b"{}").value == NOT_AUTHORIZED
    finally:
        intruder.close()
    assert app.nothing_on(APP_REPLY, 0.5), "the agent must never have seen the request"


def test_the_agent_cannot_publish_outside_its_tree(
    secure_mosquitto: SecureMosquitto, app: MqttClient, daemon: AgentProcess
) -> None:
    elsewhere = "edge/cam-02/infer/affine/reply/app-frontdoor"  # app-frontdoor may read it
    assert app.subscribe(elsewhere)[0].value < 0x80
    denied = f"Denied PUBLISH from {DEVICE} "

    def refusals() -> int:
        lines = secure_mosquitto.broker.log().splitlines()
        return sum(1 for line in lines if denied in line and f"'{elsewhere}'" in line)

    before = refusals()
    app.send("affine", encode_request([(None, X)]), device=DEVICE, reply_topic=elsewhere)
    assert app.nothing_on(elsewhere, 0.5)
    assert refusals() == before + 1  # the agent tried, and the broker said no
    # The refusal costs the agent nothing: it is still connected and serving.
    again = app.request("affine", encode_request([(None, X)]), device=DEVICE, reply_topic=APP_REPLY)
    np.testing.assert_array_equal(again.response().outputs[0].array, X @ W + B)
    assert daemon.alive
