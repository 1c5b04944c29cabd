"""``edge-agent enroll`` against a real fleet server over HTTP: what it writes, what it
keeps, and that a refusal writes nothing."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.cli import main as agent_main
from agent.config import load_config
from agent.enroll import EnrolmentError, enroll
from agent.errors import ConfigError
from fleet_server.auth import ENROLMENT_TOKEN_PREFIX, mint
from fleet_server.domain import utcnow
from fleet_server.store import tokens
from fleet_server.store.engine import Database
from tests.server.live import LiveServer, live_server

BROKER = "mqtts://broker.example:8883"


@pytest.fixture
def srv(sqlite_db: Database, tmp_path: Path) -> Iterator[LiveServer]:
    with live_server(sqlite_db, tmp_path, enrolment={"broker_url": BROKER}) as server:
        yield server


def new_token(srv: LiveServer, **tags: str) -> str:
    r = httpx.post(
        f"{srv.url}/api/v1/enrolment-tokens",
        json={"tags": tags, "expires_in_s": 600},
        headers=srv.headers(),
        timeout=10,
    )
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enroll_writes_the_identity_and_keeps_the_config(srv: LiveServer, tmp_path: Path) -> None:
    config = tmp_path / "etc" / "agent.yaml"
    config.parent.mkdir()
    model = {"name": "face", "path": "/opt/models/face.tflite", "queue_size": 8}
    before = {
        "device_id": "old-name",
        "mqtt": {"url": "mqtt://old:1883", "username": "u", "password": "p", "keepalive": 40},
        "models": [model],
        "telemetry": {"interval_s": 5},
    }
    config.write_text(yaml.safe_dump(before))
    config.chmod(0o640)
    state = tmp_path / "state"
    result = enroll(
        srv.url,
        new_token(srv, site="berlin"),
        config_path=config,
        device_id="cam-01",
        state_dir=state,
        profile="rpi5",
    )
    assert (result.device_id, result.broker_url, result.server_url) == ("cam-01", BROKER, srv.url)
    key_file, cert_file, ca_file = (
        state / "identity" / n for n in ("device.key", "device.crt", "ca.crt")
    )
    assert mode(key_file) == 0o600 and mode(config) == 0o640
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_file.read_bytes()))
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(*der) == key.public_key().public_bytes(*der)
    assert format(cert.serial_number, "x") == result.serial
    tuf = srv.data_dir / "tuf"
    for name in ("image", "director"):
        written = json.loads((state / "tuf" / f"{name}-root.json").read_bytes())
        assert written == json.loads((tuf / name / "root.json").read_bytes())
    record = json.loads((state / "identity" / "enrolment.json").read_bytes())
    assert record["certificate_serial"] == result.serial and record["broker_url"] == BROKER

    after = yaml.safe_load(config.read_text())
    assert after["device_id"] == "cam-01" and after["models"] == [model]
    assert after["telemetry"] == {"interval_s": 5}
    assert after["mqtt"] == {
        "url": BROKER,
        "keepalive": 40,
        "tls": {"ca_file": str(ca_file), "cert_file": str(cert_file), "key_file": str(key_file)},
    }
    parsed = load_config(config)  # the agent accepts what enrolment wrote
    assert parsed.mqtt.client_id == "cam-01" and parsed.state_dir == state

    r = httpx.get(f"{srv.url}/api/v1/devices/cam-01", headers=srv.headers(), timeout=10)
    device = r.json()
    assert (device["profile"], device["agent_version"], device["tags"]) == (
        "rpi5",
        result_version(),
        {"site": "berlin"},
    )
    assert device["cert_serial"] == result.serial and device["facts"]["arch"]


def result_version() -> str:
    import agent

    return agent.__version__


def test_a_refused_enrolment_writes_nothing(srv: LiveServer, tmp_path: Path) -> None:
    config, state = tmp_path / "agent.yaml", tmp_path / "state"
    token = new_token(srv)
    enroll(
        srv.url,
        token,
        config_path=tmp_path / "first.yaml",
        device_id="cam-1",
        state_dir=tmp_path / "s1",
    )

    expired = mint(ENROLMENT_TOKEN_PREFIX)
    with srv.services.db.write() as s:
        tokens.create_enrolment_token(
            s,
            token_hash=expired.hash,
            prefix=expired.prefix,
            tags={},
            expires_at=utcnow() - timedelta(seconds=1),
            actor="test",
        )
    cases = [
        (srv.url, token, "cam-2", "token_used"),
        (srv.url, "efe_not-a-token", "cam-2", "bad_enrolment_token"),
        (srv.url, expired.token, "cam-2", "token_expired"),
        (srv.url, new_token(srv), "cam-1", "device_exists"),  # enrolled and not revoked
        (srv.url, new_token(srv), "fleet-server", "device_id_reserved"),
        (srv.url, new_token(srv), "app-frontdoor", "device_id_reserved"),
        ("http://127.0.0.1:1", new_token(srv), "cam-2", "server_unreachable"),
    ]
    for url, tok, device_id, code in cases:
        with pytest.raises(EnrolmentError) as err:
            enroll(url, tok, config_path=config, device_id=device_id, state_dir=state)
        assert err.value.code == code, err.value
        assert not config.exists() and not state.exists()

    # checked before the token is spent: an unwritable state dir, a bad id
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    spare = new_token(srv)
    with pytest.raises(ConfigError, match="not writable"):
        enroll(srv.url, spare, config_path=config, device_id="cam-3", state_dir=blocker / "s")
    with pytest.raises(ConfigError, match="device id"):
        enroll(srv.url, spare, config_path=config, device_id="..", state_dir=state)
    assert enroll(srv.url, spare, config_path=config, device_id="cam-3", state_dir=state).serial


def test_the_cli(srv: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = new_token(srv)
    argv = ["enroll", "--server", srv.url, "--token", token, "--device-id", "cam-7"]
    argv += ["--config", str(tmp_path / "a.yaml"), "--state-dir", str(tmp_path / "st")]
    assert agent_main(argv) == 0
    out = capsys.readouterr()
    assert out.out.startswith("enrolled cam-7 (certificate serial ") and BROKER in out.out
    r = httpx.get(f"{srv.url}/api/v1/devices/cam-7", headers=srv.headers(), timeout=10)
    assert r.json()["profile"]  # detected on this machine
    assert agent_main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: token_used: this enrolment token was already used\n"


def test_the_updates_section_fits_the_updater(tmp_path: Path) -> None:
    from agent.enroll_files import identity_files, merged_config
    from agent.updater.config import UpdateConfig

    files = identity_files(tmp_path)
    current = {"updates": {"poll_interval_s": 60, "server_url": "http://old"}}
    config = merged_config(
        current,
        device_id="cam-1",
        state_dir=tmp_path,
        files=files,
        broker_url=None,
        server_url="https://fleet.example",
        server_ca=tmp_path / "server-ca.pem",
        with_updates=True,
    )
    updates = UpdateConfig.model_validate(config["updates"])
    assert updates.server_url == "https://fleet.example" and updates.poll_interval_s == 60
    assert updates.image_root_file == files["image_root"]
    assert updates.cert_file == files["cert"] and updates.ca_file == tmp_path / "server-ca.pem"
    assert "mqtt" not in config  # no broker known: left for the operator (enroll warns)
