"""A real fleet on 127.0.0.1, set up the way docs/server.md tells an operator to, for the
end-to-end tests and ``benchmarks/ota_e2e.py``.

    rig = FleetRig(tmp_path)
    rig.start()          # keys init (root keys to an offline folder), ca init, the broker's
                         # and the server's certificates, an admin token (the edge-fleet CLI);
                         # Mosquitto with the shipped mTLS config and ACL; edge-fleet serve
    rig.enrol_agents([AgentSpec("e2e-1", models=[...])])   # edge-agent enroll, then run
    rig.cli("model", "push", str(bundle))                  # the CLI against the live server
    rig.close()          # SIGTERM every process it started (SIGKILL after a grace period)

Every process is real: ``edge-fleet serve`` (SQLite in a fresh data dir, local artifacts),
``/usr/sbin/mosquitto`` and one ``edge-agent run`` per device. The ``edge-fleet`` operator
commands run in this process through ``fleet_server.cli.main`` (the same code as the console
script, without two seconds of interpreter start-up each), against the server over HTTP.

The broker is ``scripts/mosquitto/mosquitto-mtls.conf`` as shipped (paths and port swapped):
every client shows a certificate of the fleet CA, the CN is the MQTT username, and the ACL
(``scripts/mosquitto/acl``) gives a device only ``edge/{id}/#``. The rig watches as
``fleet-server`` (the server's own identity, another client id) and sends inference requests
as ``app-frontdoor``, the ACL's inference client.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import yaml

from fleet_server.cli import main as fleet_main
from tests.agent.agent_process import TEST_PROFILE, AgentProcess, edge_agent_command
from tests.broker import Mosquitto, Pki, free_port, start_example
from tests.e2e.watch import Watcher

T = TypeVar("T")
#: The ``edge-fleet`` console script of this environment.
EDGE_FLEET = Path(sys.executable).with_name("edge-fleet")
#: The inference client's identity in the shipped ACL (``user app-frontdoor``).
APP = "app-frontdoor"
#: The agent's ``updates:`` settings of the tests: hints wake it, a short probation.
FAST_UPDATES: dict[str, Any] = {
    "poll_interval_s": 120,  # the desired hint, not the poll, must bring updates
    "min_check_interval_s": 0.2,
    "probation_s": 3,
    "probation_check_s": 0.2,
    "probation_min_requests": 5,
    # m answers in ~0.1 ms; on a shared 2-core machine a fresh session's first requests
    # easily take 3x that, which the default 2x would call a latency regression
    "max_latency_ratio": 20,
    "latency_runs": 5,
    "retry_backoff_s": 0.2,
    "min_free_disk_bytes": 0,
}


def wait_for(what: str, check: Callable[[], T | None], timeout: float, step: float = 0.1) -> T:
    """Poll ``check()`` until it returns something other than None; AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (result := check()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)
    return result


@dataclass(frozen=True)
class Identity:
    """A broker identity of the fleet CA: paho ``tls_set`` arguments."""

    ca: Path
    cert: Path
    key: Path

    def tls(self) -> dict[str, str]:
        return {"ca_certs": str(self.ca), "certfile": str(self.cert), "keyfile": str(self.key)}


@dataclass
class AgentSpec:
    """One device to enrol: its id, profile, models and ``updates:`` settings."""

    device_id: str
    models: list[dict[str, Any]]
    profile: str = TEST_PROFILE
    tags: str = "site=berlin"
    updates: dict[str, Any] = field(default_factory=lambda: dict(FAST_UPDATES))
    telemetry_s: float = 2.0


class _CaFiles:
    """The fleet CA's files under the names :func:`start_example` swaps in."""

    def __init__(self, broker_dir: Path, crl_file: Path) -> None:
        self.server_cert = broker_dir / "server.crt"
        self.server_key = broker_dir / "server.key"
        self.ca_file = broker_dir / "fleet-ca.crt"
        self.crl_file = crl_file


class FleetRig:
    """The server, the broker and the agents of one test (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "fleet-data"
        self.offline = root / "offline-root-keys"
        self.server_yaml = root / "server.yaml"
        self.crl = root / "broker-files" / "fleet-ca.crl"
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.broker: Mosquitto | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, AgentProcess] = {}
        self.admin_token = ""
        self.watcher: Watcher | None = None

    # --- identities ----------------------------------------------------------------------

    def identity(self, name: str) -> Identity:
        """A non-device identity made by ``edge-fleet ca client-cert NAME``."""
        clients = self.data / "clients"
        return Identity(clients / "fleet-ca.crt", clients / f"{name}.crt", clients / f"{name}.key")

    @property
    def mqtt_port(self) -> int:
        assert self.broker is not None, "the rig is not started"
        return self.broker.ports[0]

    # --- the operator's CLI ----------------------------------------------------------------

    def cli(self, *argv: str) -> str:
        """``edge-fleet ARGV`` (in this process) against the live server; its stdout.

        Raises:
            AssertionError: the command failed (its stderr in the message).
        """
        out, err = io.StringIO(), io.StringIO()
        env = {"EDGE_FLEET_URL": self.url, "EDGE_FLEET_TOKEN": self.admin_token}
        with _environ(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = fleet_main(list(argv))
        if code != 0:
            raise AssertionError(f"edge-fleet {' '.join(argv)} exited {code}: {err.getvalue()}")
        return out.getvalue()

    def local(self, *argv: str) -> str:
        """``edge-fleet ARGV --data-dir D --config server.yaml``: the commands run on the
        server host against its files (keys, ca, token)."""
        return self.cli(*argv, "--data-dir", str(self.data), "--config", str(self.server_yaml))

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1{path}`` with the admin token; the JSON answer."""
        r = httpx.get(
            f"{self.url}/api/v1{path}",
            params=params,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=10,
        )
        r.raise_for_status()
        return r.json()

    # --- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        """Signing keys, the CA and certificates, the broker and the server (ready)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.server_yaml.write_text(yaml.safe_dump({"ca": {"crl_file": str(self.crl)}}))
        self.local("keys", "init", "--offline-dir", str(self.offline))
        self.local("ca", "init")
        self.local("ca", "broker-cert", "--host", "127.0.0.1", "--host", "localhost")
        for name in ("fleet-server", APP):
            self.local("ca", "client-cert", name)
        self.admin_token = self.local("token", "create", "--role", "admin", "--name", "e2e")
        self.admin_token = self.admin_token.strip()
        files = _CaFiles(self.data / "broker", self.crl)
        self.broker = start_example(
            "mosquitto-mtls.conf", self.root / "mosquitto", cast(Pki, files), {}
        )
        broker_url = f"mqtts://127.0.0.1:{self.mqtt_port}"
        me = self.identity("fleet-server")
        settings = {
            "mqtt": {
                "url": broker_url,
                "ca_file": str(me.ca),
                "cert_file": str(me.cert),
                "key_file": str(me.key),
            },
            "enrolment": {"broker_url": broker_url},
            "ca": {"crl_file": str(self.crl)},
            "ingest": {"flush_interval_ms": 50},
        }
        self.server_yaml.write_text(yaml.safe_dump(settings))
        serve = [str(EDGE_FLEET), "serve", "--data-dir", str(self.data)]
        serve += ["--config", str(self.server_yaml), "--port", str(self.http_port)]
        self.server = _spawn([*serve, "--log-level", "warning"], self.root / "server.log")
        wait_for("the server to be ready", self._ready, timeout=60)
        self.watcher = Watcher(self.mqtt_port, me.tls())

    def _ready(self) -> bool | None:
        assert self.server is not None
        if self.server.poll() is not None:
            raise AssertionError(f"edge-fleet serve exited:\n{self.log('server')}")
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200 or None
        return None

    def enrol_agents(self, specs: list[AgentSpec], timeout: float = 60.0) -> None:
        """Enrol every device (``edge-agent enroll``, a single-use token each, in
        parallel), start ``edge-agent run`` for each, and wait until all are online with
        their models ready."""
        enrolling = []
        for spec in specs:
            folder = self.root / spec.device_id
            folder.mkdir(parents=True, exist_ok=True)
            token = self.cli("device", "token", "--tags", spec.tags).strip()
            config = folder / "agent.yaml"
            config.write_text(yaml.safe_dump(_pre_enrolment_config(spec, folder), sort_keys=False))
            argv = ["enroll", "--server", self.url, "--device-id", spec.device_id]
            argv += ["--config", str(config), "--state-dir", str(folder / "state")]
            env = {**os.environ, "EDGE_AGENT_ENROLL_TOKEN": token}
            proc = subprocess.Popen(
                edge_agent_command(*argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            enrolling.append((spec, proc))
        for spec, proc in enrolling:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"enroll {spec.device_id}: {err.decode()}{out.decode()}"
        for spec, _ in enrolling:
            self.start_agent(spec.device_id)
        for spec, _ in enrolling:
            self.wait_online(spec.device_id, timeout)

    def start_agent(self, device_id: str) -> AgentProcess:
        """``edge-agent run`` with the device's (enrolled) config."""
        folder = self.root / device_id
        agent = AgentProcess.start(folder / "agent.yaml", folder / "agent.log")
        self.agents[device_id] = agent
        return agent

    def edit_agent_config(self, device_id: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``change`` to the device's agent config (stop the agent first)."""
        path = self.root / device_id / "agent.yaml"
        doc = yaml.safe_load(path.read_text())
        change(doc)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))

    def wait_online(self, device_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """The device's first retained status that is up with every model settled."""
        assert self.watcher is not None
        agent = self.agents[device_id]

        def up() -> dict[str, Any] | None:
            if not agent.alive:
                raise AssertionError(f"{device_id} exited:\n{agent.log()[-4000:]}")
            doc = self.watcher.status(device_id) if self.watcher else None
            models = (doc or {}).get("models") or {}
            settled = models and all(m.get("state") in ("ready", "failed") for m in models.values())
            ok = doc is not None and doc.get("state") in ("online", "degraded") and settled
            return doc if ok else None

        return wait_for(f"{device_id} online", up, timeout)

    def log(self, name: str) -> str:
        """The tail of ``server``'s, the broker's (``mosquitto``) or an agent's log."""
        path = {
            "server": self.root / "server.log",
            "mosquitto": self.root / "mosquitto" / "mosquitto.log",
        }.get(name, self.root / name / "agent.log")
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def logs(self) -> str:
        """Every log's tail, for a failure message."""
        names = ["server", *self.agents]
        return "\n".join(f"--- {n} ---\n{self.log(n)}" for n in names)

    def close(self) -> None:
        """Stop the agents, the server and the broker; nothing is left running."""
        if self.watcher is not None:
            self.watcher.close()
        for agent in self.agents.values():
            with contextlib.suppress(AssertionError):
                agent.stop(15)
        if self.server is not None:
            _stop(self.server)
        if self.broker is not None:
            self.broker.kill()


def _pre_enrolment_config(spec: AgentSpec, folder: Path) -> dict[str, Any]:
    """What the device's config holds before enrolment: its models and settings. Enrolment
    adds the id, the broker URL and TLS files, the server URL and the trust roots."""
    return {
        "profile": spec.profile,
        "mqtt": {"reconnect": {"min_s": 0.2, "max_s": 1.0}},
        "models": spec.models,
        "telemetry": {"interval_s": spec.telemetry_s},
        "updates": spec.updates,
        "state_dir": str(folder / "state"),
    }


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def _stop(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
