"""``edge-fleet``: local commands on a real database, API commands against a real HTTP
server (uvicorn on a free port), and ``serve`` as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

from fleet_server.api import create_app
from fleet_server.cli import main
from fleet_server.domain import ReportedModel, Role, utcnow
from fleet_server.server import build_services
from fleet_server.store import migrate
from fleet_server.store.device_reports import StatusReport, apply_batch
from fleet_server.store.engine import Database
from tests.broker import Mosquitto, probe
from tests.server.conftest import BundleFactory, make_token, settings_for

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for var in (
        "EDGE_FLEET_URL",
        "EDGE_FLEET_TOKEN",
        "EDGE_FLEET_DATA_DIR",
        "EDGE_FLEET_DATABASE_URL",
    ):
        monkeypatch.delenv(var, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_local_token_and_db_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    code, out, _ = run(capsys, "db", "upgrade", *data)
    assert code == 0 and out.startswith(f"database at {migrate.head()} (was empty)")
    code, out, err = run(capsys, "token", "create", "--role", "admin", "--name", "ops", *data)
    token = out.strip()
    assert code == 0 and token.startswith("eft_") and "shown only once" in err
    run(capsys, "token", "create", "--role", "viewer", "--name", "dash", "--expires", "30d", *data)
    code, out, _ = run(capsys, "token", "list", *data)
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "NAME", "ROLE", "PREFIX"]
    assert [ln.split()[1:3] for ln in lines[1:]] == [["ops", "admin"], ["dash", "viewer"]]
    assert token not in out  # secrets are never listed
    assert run(capsys, "token", "revoke", "2", *data)[0] == 0
    assert "dash" not in run(capsys, "token", "list", *data)[1]
    assert "dash" in run(capsys, "token", "list", "--all", *data)[1]
    code, _, err = run(capsys, "token", "revoke", "9", *data)
    assert code == 1 and err == "error: not_found: no API token with id 9\n"
    code, out, _ = run(capsys, "db", "current", *data)
    assert out.strip() == f"{migrate.head()} (newest: {migrate.head()})"
    with pytest.raises(SystemExit) as exit_:
        main(["token", "create", "--role", "admin", "--name", "x", "--expires", "soon", *data])
    assert exit_.value.code == 2


@pytest.fixture
def server(sqlite_db: Database, tmp_path: Path) -> Iterator[tuple[str, Database]]:
    """The API on a real socket."""
    svc = build_services(settings_for(tmp_path / "data", sqlite_db.url), db=sqlite_db)
    port = free_port()
    config = uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", sqlite_db
    srv.should_exit = True
    thread.join(5)


def test_api_commands(
    server: tuple[str, Database],
    bundle: BundleFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    url, db = server
    monkeypatch.setenv("EDGE_FLEET_URL", url)
    monkeypatch.setenv("EDGE_FLEET_TOKEN", make_token(db, Role.OPERATOR))
    now = utcnow()
    with db.write() as s:
        apply_batch(
            s,
            [
                StatusReport(
                    device_id=f"cam-{i}",
                    received_at=now,
                    ts=now,
                    state="online",
                    agent_version="0.3.0",
                    profile="rpi5",
                    models=(ReportedModel("face", "1.3.0", "ready", "onnx", "CPU"),),
                )
                for i in range(3)
            ],
        )

    code, out, err = run(
        capsys, "device", "token", "--tags", "site=berlin,tier=gold", "--expires", "1h"
    )
    assert code == 0 and out.strip().startswith("efe_") and "site=berlin,tier=gold" in err
    assert run(capsys, "device", "tag", "cam-1", "site=berlin")[1] == "cam-1: site=berlin\n"
    code, out, _ = run(capsys, "device", "list", "--tag", "site=berlin")
    rows = out.splitlines()
    assert rows[0].split() == ["ID", "STATE", "PROFILE", "AGENT", "MODELS", "TAGS", "LAST", "SEEN"]
    assert rows[1].split()[:6] == ["cam-1", "online", "rpi5", "0.3.0", "face@1.3.0", "site=berlin"]
    assert len(rows) == 2
    assert len(run(capsys, "device", "list", "--limit", "2", "--all")[1].splitlines()) == 4
    code, out, _ = run(capsys, "device", "show", "cam-1")
    assert "state:" in out and "face" in out and "site=berlin" in out
    code, out, _ = run(capsys, "device", "show", "cam-1", "--json")
    assert '"id": "cam-1"' in out
    assert "revoked at" in run(capsys, "device", "revoke", "cam-2")[1]

    code, out, err = run(capsys, "model", "push", str(bundle("affine", "1.3.0")), "--variant", "x")
    assert code == 0 and out.startswith("published affine 1.3.0 (x, onnx bundle)"), err
    code, out, _ = run(capsys, "model", "list")
    assert out.splitlines()[1].split()[:5] == ["affine", "1.3.0", "x", "bundle", "onnx"]
    assert "affine" in run(capsys, "model", "show", "affine", "1.3.0")[1]
    code, _, err = run(capsys, "model", "push", str(bundle("affine", "1.4.0", offset=1.0)))
    assert code == 1 and err.startswith("error: golden_mismatch: affine 1.4.0: golden vector")
    assert "Traceback" not in err

    code, _, err = run(capsys, "device", "show", "nope")
    assert (code, err) == (1, "error: not_found: no device 'nope'\n")
    monkeypatch.setenv("EDGE_FLEET_TOKEN", "eft_wrong")
    code, _, err = run(capsys, "device", "list")
    assert (code, err) == (1, "error: unauthorized: unknown API token\n")
    monkeypatch.delenv("EDGE_FLEET_TOKEN")
    cfg = tmp_path / "xdg" / "edge-fleet" / "cli.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        yaml.safe_dump({"url": "http://127.0.0.1:1", "token": make_token(db, Role.VIEWER)})
    )
    code, _, err = run(capsys, "device", "list")  # EDGE_FLEET_URL still wins over cli.yaml
    assert code == 0
    code, _, err = run(capsys, "device", "token")
    assert (code, err.split(":")[:2]) == (1, ["error", " forbidden"])
    monkeypatch.delenv("EDGE_FLEET_URL")
    code, _, err = run(capsys, "device", "list")
    assert code == 1 and err.startswith(
        "error: server_unreachable: cannot reach http://127.0.0.1:1"
    )
    cfg.write_text("colour: blue\n")
    code, _, err = run(capsys, "device", "list")
    assert code == 1 and err.startswith("error: config_invalid:") and "colour" in err


def test_model_quantize_delegates(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["model", "quantize", "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.broker
def test_serve_migrates_ingests_and_serves(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "d")]
    token = run(capsys, "token", "create", "--role", "viewer", "--name", "v", *data)[1].strip()
    port, prefix = free_port(), f"s{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    config = tmp_path / "server.yaml"
    config.write_text(
        yaml.safe_dump({"mqtt": {"topic_prefix": prefix}, "ingest": {"flush_interval_ms": 50}})
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet_server.cli",
            "serve",
            *data,
            "--config",
            str(config),
            "--port",
            str(port),
            "--mqtt-url",
            mosquitto.url,
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                r = httpx.get(f"{url}/readyz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve did not come up"
                time.sleep(0.1)
        assert r.json() == {"status": "ready"}
        status = {
            "state": "online",
            "ts": "2026-01-01T00:00:00.000Z",
            "agent_version": "0.3.0",
            "profile": "rpi5",
            "started_at": "2026-01-01T00:00:00.000Z",
            "models": {},
        }
        headers = {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + 15
        with probe(mosquitto.port) as p:
            while True:  # the ingest subscribes shortly after the API is up
                p.publish(f"{prefix}/cam-1/status", json.dumps(status).encode(), qos=1)
                r = httpx.get(f"{url}/api/v1/devices/cam-1", headers=headers, timeout=2)
                if r.status_code == 200:
                    break
                assert time.monotonic() < deadline, r.text
                time.sleep(0.2)
        assert r.json()["agent_version"] == "0.3.0"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
