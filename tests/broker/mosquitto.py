"""Run Mosquitto: an open broker, the secure broker of the tests, the shipped example configs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.broker.pki import Pki

MOSQUITTO = Path(os.environ.get("MOSQUITTO_BIN", "/usr/sbin/mosquitto"))
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
#: The fleet server's identity in the shipped ACL.
ADMIN = "fleet-server"

EXAMPLES = Path(__file__).resolve().parents[2] / "scripts" / "mosquitto"
#: The production ACL of scripts/mosquitto/, so that the tests check what the docs ship.
ACL_FILE = EXAMPLES / "acl"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(
    port: int, timeout: float = 10.0, alive: Callable[[], bool] = lambda: True
) -> None:
    """Block until 127.0.0.1:``port`` accepts a connection; RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing accepts on port {port}")


#: An open broker: anonymous clients, MQTT 5 and 3.1.1, nothing persisted.
OPEN = """\
per_listener_settings true
set_tcp_nodelay true
persistence false
connection_messages true
listener {port0} 127.0.0.1
allow_anonymous true
"""


class Mosquitto:
    """One Mosquitto process: its config, ports and log live in ``workdir``."""

    def __init__(self, workdir: Path, body: str = OPEN, ports: list[int] | None = None) -> None:
        """``body`` is the config, with ``{port0}``, ``{port1}``... standing for ``ports``
        (one free port by default); logging to ``workdir`` is added."""
        if not MOSQUITTO.exists():
            pytest.skip(f"{MOSQUITTO} is not installed (scripts/setup --tests installs it)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ports = ports or [free_port()]
        self.log_file = workdir / "mosquitto.log"
        head = [f"log_dest file {self.log_file}", "log_type all"]
        if os.geteuid() == 0:
            head.append("user root")  # else mosquitto drops to a user that cannot read workdir
        names = {f"port{i}": p for i, p in enumerate(self.ports)}
        self.config_file = workdir / "mosquitto.conf"
        self.config_file.write_text("\n".join(head) + "\n" + body.format(**names))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The first listener's port."""
        return self.ports[0]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Mosquitto:
        """Start the broker and wait until every listener accepts."""
        self._proc = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            for port in self.ports:
                wait_for_port(port, alive=lambda: self.running)
        except RuntimeError:
            err = self._proc.stderr.read().decode() if self._proc.stderr else ""
            self.kill()
            raise RuntimeError(f"mosquitto did not start: {err}\n{self.log()}") from None
        return self

    def kill(self) -> None:
        """SIGKILL the broker (clients see their connections reset) and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(10)
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def reload(self) -> None:
        """SIGHUP: the broker re-reads its ACL, password file, certificates and CRL."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)
            time.sleep(0.2)

    def restart(self, down_for: float = 0.0) -> None:
        """Kill the broker, wait ``down_for`` seconds, start it again on the same ports."""
        self.kill()
        time.sleep(down_for)
        self.start()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@dataclass
class SecureMosquitto:
    """A broker with a client-certificate TLS listener and a password listener, one ACL."""

    broker: Mosquitto
    pki: Pki
    passwords: dict[str, str]

    @property
    def tls_port(self) -> int:
        return self.broker.ports[0]

    @property
    def password_port(self) -> int:
        return self.broker.ports[1]

    def client_cert(self, device_id: str) -> tuple[Path, Path]:
        """A client certificate and key whose CN (hence broker username) is ``device_id``."""
        return self.pki.client_cert(device_id)


def _password_file(workdir: Path, passwords: dict[str, str]) -> Path:
    if not Path(MOSQUITTO_PASSWD).exists():
        pytest.skip(f"{MOSQUITTO_PASSWD} is not installed (it comes with mosquitto)")
    passwd = workdir / "passwd"
    passwd.touch()
    for user, password in passwords.items():
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), user, password], check=True)
    return passwd


def start_secure_mosquitto(workdir: Path, passwords: dict[str, str]) -> SecureMosquitto:
    """Start the broker of :class:`SecureMosquitto`; ``cam-revoked``'s certificate is revoked.

    Port 0 takes client certificates (CN = username), port 1 passwords; both use the
    production ACL (``scripts/mosquitto/acl``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    passwd = _password_file(workdir, passwords)
    pki = Pki(workdir / "pki")
    pki.revoke("cam-revoked")
    body = (
        "per_listener_settings true\nset_tcp_nodelay true\npersistence false\n"
        "listener {port0} 127.0.0.1\n"
        f"cafile {pki.ca_file}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        f"crlfile {pki.crl_file}\nrequire_certificate true\nuse_identity_as_username true\n"
        f"allow_anonymous false\nacl_file {ACL_FILE}\n"
        "listener {port1} 127.0.0.1\n"
        f"password_file {passwd}\nallow_anonymous false\nacl_file {ACL_FILE}\n"
    )
    broker = Mosquitto(workdir, body, [free_port(), free_port()]).start()
    return SecureMosquitto(broker, pki, dict(passwords))


def start_example(name: str, workdir: Path, pki: Pki, passwords: dict[str, str]) -> Mosquitto:
    """Run ``scripts/mosquitto/{name}`` as shipped, with only paths and ports swapped.

    Its listeners move to free ports of 127.0.0.1 (``ports[0]`` for 8883, ``ports[1]`` for
    1883), ``/etc/mosquitto/...`` to the test PKI, password file and the shipped ACL.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ports = [free_port(), free_port()]
    swaps = {
        "listener 8883\n": f"listener {ports[0]} 127.0.0.1\n",
        "listener 1883 127.0.0.1\n": f"listener {ports[1]} 127.0.0.1\n",
        "/etc/mosquitto/certs/server.crt": str(pki.server_cert),
        "/etc/mosquitto/certs/server.key": str(pki.server_key),
        "/etc/mosquitto/certs/fleet-ca.crt": str(pki.ca_file),
        "/etc/mosquitto/certs/fleet-ca.crl": str(pki.crl_file),
        "/etc/mosquitto/acl": str(ACL_FILE),
        "/etc/mosquitto/passwd": str(_password_file(workdir, passwords)),
        "/var/lib/mosquitto/": f"{workdir}/",
        "log_dest syslog\n": "",
    }
    text = (EXAMPLES / name).read_text()
    for old, new in swaps.items():
        text = text.replace(old, new)
    text = text.replace("{", "{{").replace("}", "}}")
    listening = [p for p in ports if f"listener {p} " in text]
    return Mosquitto(workdir, text, listening).start()
