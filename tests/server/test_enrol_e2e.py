"""Enrolment end to end, with real processes: ``edge-fleet serve``, the shipped Mosquitto
mTLS config with the fleet CA and its CRL, ``edge-agent enroll`` and ``edge-agent run``.

    keys init, ca init, ca broker-cert, ca client-cert (the CLI, in-process)
    → Mosquitto (scripts/mosquitto/mosquitto-mtls.conf + acl) and edge-fleet serve
    → edge-fleet device token → edge-agent enroll → edge-agent run: status "online"
    → the inventory shows it; cam-02's certificate cannot publish as cam-01; token reuse
      is refused; edge-fleet device revoke → CRL → broker reload → cam-01 is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
import yaml
from cryptography import x509

from fleet_server.cli import main as fleet_main
from tests.broker import Pki, Probe, free_port, probe, start_example

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
T = TypeVar("T")

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def fleet(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``edge-fleet ARGV`` in-process; its stdout."""
    code = fleet_main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def agent_cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """``edge-agent ARGV`` as a process."""
    cmd = [sys.executable, "-m", "agent.cli", *argv]
    return subprocess.run(cmd, env=ENV, capture_output=True, timeout=60, check=False)


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while (result := check()) is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


@contextlib.contextmanager
def process(module: str, *argv: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m MODULE ARGV``, output to ``log``; SIGTERM at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *argv], env=ENV, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def tls(folder: Path, name: str, ca: str = "fleet-ca.crt") -> dict[str, str]:
    """paho ``tls_set`` arguments for the identity ``{folder}/{name}.crt|key``."""
    return {
        "ca_certs": str(folder / ca),
        "certfile": str(folder / f"{name}.crt"),
        "keyfile": str(folder / f"{name}.key"),
    }


class CaFiles:
    """The fleet CA's files under the names :func:`start_example` swaps in."""

    def __init__(self, broker_dir: Path, crl_file: Path) -> None:
        self.server_cert = broker_dir / "server.crt"
        self.server_key = broker_dir / "server.key"
        self.ca_file = broker_dir / "fleet-ca.crt"
        self.crl_file = crl_file


def status_online(watcher: Probe, agent: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    def online() -> dict[str, Any] | None:
        assert agent.poll() is None, log.read_text()
        with contextlib.suppress(Exception):
            msg = watcher.expect(0.5)
            doc: dict[str, Any] = json.loads(msg.payload)
            if msg.topic == "edge/cam-01/status" and doc.get("state") == "online":
                return doc
        return None

    return wait_for("cam-01 online", online, timeout=30)


def test_enrol_connect_refuse_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    data, clients = tmp_path / "data", tmp_path / "data" / "clients"
    crl = tmp_path / "broker-files" / "fleet-ca.crl"
    server_yaml = tmp_path / "server.yaml"
    server_yaml.write_text(yaml.safe_dump({"ca": {"crl_file": str(crl)}}))
    d = ["--data-dir", str(data), "--config", str(server_yaml)]
    fleet(capsys, "keys", "init", "--offline-dir", str(tmp_path / "offline"), *d)
    fleet(capsys, "ca", "init", *d)
    fleet(capsys, "ca", "broker-cert", "--host", "localhost", "--host", "127.0.0.1", *d)
    fleet(capsys, "ca", "client-cert", "fleet-server", *d)
    fleet(capsys, "ca", "client-cert", "cam-02", *d)  # another identity of the same CA
    operator = fleet(capsys, "token", "create", "--role", "operator", "--name", "ops", *d).strip()

    # the shipped config with only paths and the port swapped, reading the server's CRL
    files = CaFiles(data / "broker", crl)
    broker = start_example("mosquitto-mtls.conf", tmp_path / "mosquitto", cast(Pki, files), {})
    mqtt_port, http_port = broker.ports[0], free_port()
    broker_url, url = f"mqtts://127.0.0.1:{mqtt_port}", f"http://127.0.0.1:{http_port}"
    mqtt = {"ca_file": str(clients / "fleet-ca.crt")}
    mqtt |= {"cert_file": str(clients / "fleet-server.crt")}
    mqtt |= {"key_file": str(clients / "fleet-server.key")}
    settings = {
        "mqtt": mqtt,
        "enrolment": {"broker_url": broker_url},
        "ca": {"crl_file": str(crl)},
        "ingest": {"flush_interval_ms": 50},
        "validation": {"isolation": "inline"},
    }
    server_yaml.write_text(yaml.safe_dump(settings))
    serve = ["serve", *d, "--port", str(http_port), "--mqtt-url", broker_url]
    with contextlib.ExitStack() as stack:
        stack.callback(broker.kill)
        server = stack.enter_context(
            process("fleet_server.cli", *serve, "--log-level", "warning", log=tmp_path / "s.log")
        )

        def ready() -> bool | None:
            assert server.poll() is None, (tmp_path / "s.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200 or None
            return None

        wait_for("the server", ready)
        monkeypatch.setenv("EDGE_FLEET_URL", url)
        monkeypatch.setenv("EDGE_FLEET_TOKEN", operator)
        token = fleet(capsys, "device", "token", "--tags", "site=berlin").strip()

        agent_yaml, state = tmp_path / "agent.yaml", tmp_path / "agent-state"
        enrol = ["enroll", "--server", url, "--token", token]
        done = agent_cli(
            *enrol, "--device-id", "cam-01", "--config", str(agent_yaml), "--state-dir", str(state)
        )
        assert done.returncode == 0, done.stderr.decode()
        identity = state / "identity"

        with probe(mqtt_port, tls=tls(clients, "fleet-server")) as watcher:
            watcher.subscribe("edge/cam-01/#")
            watcher.subscribe("edge/cam-02/#")
            run = ["run", "--config", str(agent_yaml)]
            with process("agent.cli", *run, log=tmp_path / "agent.log") as agent:
                status = status_online(watcher, agent, tmp_path / "agent.log")
                assert status["agent_version"] and status["profile"]

                def listed() -> dict[str, Any] | None:
                    auth = {"Authorization": f"Bearer {operator}"}
                    r = httpx.get(f"{url}/api/v1/devices/cam-01", headers=auth, timeout=2)
                    device: dict[str, Any] = r.json()
                    return device if device.get("state") == "online" else None

                device = wait_for("the inventory", listed)
                assert device["profile"] == status["profile"]
                assert device["agent_version"] == status["agent_version"]
                assert device["facts"]["arch"] and device["tags"] == {"site": "berlin"}

                # cam-02's certificate is valid, but only for edge/cam-02/#
                with probe(mqtt_port, tls=tls(clients, "cam-02")) as cam02:
                    cam02.publish("edge/cam-01/telemetry", b'{"spoofed": true}', qos=0)
                    cam02.publish("edge/cam-02/telemetry", b'{"own": true}', qos=0)
                    assert watcher.expect(5).topic == "edge/cam-02/telemetry"
                    assert watcher.nothing(0.5)

        # the token was single-use; nothing is written on a refusal
        other = ["--config", str(tmp_path / "b.yaml"), "--state-dir", str(tmp_path / "b")]
        again = agent_cli(*enrol, "--device-id", "cam-09", *other)
        assert again.returncode == 2
        assert again.stderr == b"error: token_used: this enrolment token was already used\n"
        assert not (tmp_path / "b").exists() and not (tmp_path / "b.yaml").exists()

        # revoked: the broker's CRL gains cam-01's serial; after a reload cam-01 is refused
        cert = x509.load_pem_x509_certificate((identity / "device.crt").read_bytes())
        with probe(mqtt_port, tls=tls(identity, "device", ca="ca.crt")):
            pass  # still accepted before the revocation
        assert "revoked at" in fleet(capsys, "device", "revoke", "cam-01")
        listed_crl = x509.load_pem_x509_crl(crl.read_bytes())
        assert listed_crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        broker.reload()
        with pytest.raises((ssl.SSLError, OSError, RuntimeError)):  # noqa: SIM117
            with probe(mqtt_port, tls=tls(identity, "device", ca="ca.crt")):
                pass
        with probe(mqtt_port, tls=tls(clients, "cam-02")):  # the others still connect
            pass
