"""The demo's processes: the broker, ``edge-fleet serve`` and the ``edge-agent run``s.

Each runs in its own session (process group), so a Ctrl-C in the terminal reaches only the
demo, which then stops them in reverse order (SIGTERM, SIGKILL after a grace period) and
checks that no process of those sessions is left, helpers they spawned included.

The broker is Mosquitto when it is installed, otherwise amqtt (pip), a Python MQTT 3.1.1
broker: the agents and the server then fall back to MQTT 3.1.1 by themselves. Either way
the demo's listener is open (no password) and bound to 127.0.0.1 only; a real fleet uses
``scripts/mosquitto/mosquitto-mtls.conf`` (docs/server.md, "The broker").
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

VENV_BIN = Path(sys.executable).parent
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_PR_SET_PDEATHSIG = 1


class DemoError(Exception):
    """Something the demo needs did not work; the message says what and where to look."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """The processes the demo started, each in its own session, logging to ``logs``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``argv`` as ``name`` (its output in ``logs/{name}.log``)."""
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C goes to the demo only; it stops them in order
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (the demo starts no threads)
            )
        self.running.append((name, proc))

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        """Raises DemoError naming the first process that exited, with its log's tail."""
        for name, proc in self.running:
            if proc.poll() is not None:
                raise DemoError(
                    f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}\n"
                    f"(log: {self.logs / name}.log)"
                )

    def wait_port(self, name: str, port: int, timeout: float = 30.0) -> None:
        """Until 127.0.0.1:``port`` accepts; DemoError when ``name`` exits or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            time.sleep(0.05)
        raise DemoError(f"{name} does not accept connections on port {port}")

    def stop_all(self, grace: float = 15.0) -> list[str]:
        """Stop everything (last started first) and return what was still left over after
        that (then killed): ``name pid`` of any process of their sessions."""
        sessions = {proc.pid for _, proc in self.running}
        for name, proc in reversed(self.running):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    print(f"    {name} ignored SIGTERM for {grace:g} s: killed", flush=True)
                    proc.kill()
                    proc.wait(5)
        self.running.clear()
        deadline = time.monotonic() + 5  # helpers such as the server's validation worker
        while (left := session_members(sessions)) and time.monotonic() < deadline:
            time.sleep(0.1)  # exit shortly after their parent
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return [f"{cmd} (pid {pid})" for pid, cmd in left]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the demo dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def session_members(sessions: set[int]) -> list[tuple[int, str]]:
    """Live processes (pid, command) whose session is one of ``sessions`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            state, sid = fields[0], int(fields[3])
            if sid in sessions and state != "Z":
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                found.append((int(entry.name), cmd[:100]))
        except (OSError, ValueError, IndexError):
            continue
    return found


@dataclass(frozen=True)
class Broker:
    """The running broker: which one, and the MQTT version clients should speak."""

    kind: str  # "mosquitto" or "amqtt"
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def protocol(self) -> str:
        """What clients speak: ``5`` or ``3.1.1``."""
        return "5" if self.kind == "mosquitto" else "3.1.1"

    @property
    def mqtt_setting(self) -> str:
        """``mqtt.protocol`` of the agents and the server: ``auto`` (MQTT 5, falling back to
        3.1.1 when the broker refuses it) or ``3.1.1``."""
        return "auto" if self.kind == "mosquitto" else "3.1.1"


def mosquitto_binary() -> str | None:
    """Mosquitto's path, or None when it is not installed."""
    found = shutil.which("mosquitto")
    return found or next((p for p in MOSQUITTO_PATHS if Path(p).exists()), None)


def start_broker(procs: Processes, work: Path, choice: str) -> Broker:
    """Mosquitto (``auto`` when installed, or ``mosquitto``) or amqtt, on a free port.

    Raises:
        DemoError: the chosen broker is not installed, or did not start.
    """
    port = free_port()
    exe = mosquitto_binary()
    if choice == "mosquitto" or (choice == "auto" and exe is not None):
        if exe is None:
            raise DemoError("mosquitto is not installed (scripts/setup installs it as root)")
        lines = [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            "set_tcp_nodelay true",
            "max_queued_messages 10000",
            "max_inflight_messages 200",
            f"log_dest file {work / 'logs' / 'mosquitto-broker.log'}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to a user that cannot read the work dir
        (work / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        procs.start("mosquitto", [exe, "-c", str(work / "mosquitto.conf")])
        procs.wait_port("mosquitto", port)
        return Broker("mosquitto", port)
    if importlib.util.find_spec("amqtt") is None:
        raise DemoError(
            "no broker: install mosquitto (apt-get install mosquitto) or amqtt "
            "(.venv/bin/pip install amqtt)"
        )
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    (work / "amqtt.yaml").write_text(yaml.safe_dump(config))
    procs.start("amqtt", [str(VENV_BIN / "amqtt"), "-c", str(work / "amqtt.yaml")])
    procs.wait_port("amqtt", port)
    return Broker("amqtt", port)


def edge_fleet(*argv: str) -> str:
    """``edge-fleet ARGV`` in this process (the console script's code, without its start-up
    time); its stdout. ``EDGE_FLEET_URL`` and ``EDGE_FLEET_TOKEN`` come from the environment.

    Raises:
        DemoError: the command failed (its error line in the message).
    """
    from fleet_server.cli import main as fleet_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fleet_main(list(argv))
    if code != 0:
        raise DemoError(f"edge-fleet {' '.join(argv)}: {err.getvalue().strip()}")
    return out.getvalue()


def enroll(server_url: str, token: str, device_id: str, config: Path, state: Path) -> None:
    """``edge-agent enroll`` for ``device_id`` (the token in the environment, not argv).

    Raises:
        DemoError: enrolment failed (the agent's error line in the message).
    """
    argv = [str(VENV_BIN / "edge-agent"), "enroll", "--server", server_url]
    argv += ["--device-id", device_id, "--config", str(config), "--state-dir", str(state)]
    env = {**os.environ, "EDGE_AGENT_ENROLL_TOKEN": token}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise DemoError(f"edge-agent enroll {device_id}: {done.stderr.strip()}")
