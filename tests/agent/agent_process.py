"""Run ``edge-agent run`` as a real subprocess on a test broker, from a generated config.

    config = write_config(tmp / "agent.yaml", url=broker.url, state_dir=tmp / "state",
                          models=[{"name": "affine", "path": str(model)}])
    agent = AgentProcess.start(config, tmp / "agent.log")
    ...
    assert agent.stop() == 0        # SIGTERM, then the exit code

The agent logs to ``log_path`` (stdout and stderr together); :meth:`AgentProcess.log`
reads it, for assertions and for failure messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.agent.daemon_client import MqttClient, Reply

#: The ``edge-agent`` console script of this environment.
EDGE_AGENT = Path(sys.executable).with_name("edge-agent")
#: A profile that needs no accelerator: the tests run on any x86-64 or arm64 machine.
TEST_PROFILE = "generic-arm64" if os.uname().machine == "aarch64" else "generic-x86_64"


def edge_agent_command(*args: str) -> list[str]:
    """The command line that runs ``edge-agent ARGS`` in this environment."""
    if EDGE_AGENT.exists():
        return [str(EDGE_AGENT), *args]
    return [sys.executable, "-m", "agent.cli", *args]


def write_config(
    path: Path,
    *,
    url: str,
    state_dir: Path,
    models: list[dict[str, Any]],
    device_id: str = "cam-01",
    mqtt: dict[str, Any] | None = None,
    **sections: Any,
) -> Path:
    """Write an agent config; ``mqtt`` adds to the ``mqtt`` section, ``sections`` to the top."""
    doc: dict[str, Any] = {
        "device_id": device_id,
        "profile": TEST_PROFILE,
        "state_dir": str(state_dir),
        "mqtt": {"url": url, "reconnect": {"min_s": 0.2, "max_s": 1.0}, **(mqtt or {})},
        "models": [{k: str(v) if isinstance(v, Path) else v for k, v in m.items()} for m in models],
        **sections,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class AgentProcess:
    """One ``edge-agent run --config FILE`` process."""

    def __init__(self, proc: subprocess.Popen[bytes], config_path: Path, log_path: Path) -> None:
        self.proc = proc
        self.config_path = config_path
        self.log_path = log_path

    @classmethod
    def start(cls, config_path: Path, log_path: Path) -> AgentProcess:
        """Start the agent (returns at once; wait for its status to know it serves)."""
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                edge_agent_command("run", "--config", str(config_path)),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return cls(proc, config_path, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then the exit code (SIGKILL and an AssertionError after ``timeout``)."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"the agent ignored SIGTERM for {timeout} s\n{self.log()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL (no clean shutdown: the broker publishes the Last Will) and reap."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def hup(self) -> None:
        """SIGHUP: reload the config."""
        self.proc.send_signal(signal.SIGHUP)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def assert_clean_log(self) -> None:
        """No traceback and no unexpected-error line in the agent's log."""
        text = self.log()
        for marker in ("Traceback", "unexpected error", "Caught exception"):
            assert marker not in text, f"{marker!r} in the agent's log:\n{text[-4000:]}"


def run_agent_once(config_path: Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``edge-agent run`` to completion (for configs that must be refused)."""
    return subprocess.run(
        edge_agent_command("run", "--config", str(config_path)),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_until(predicate: Any, timeout: float, what: str, step: float = 0.02) -> None:
    """Poll ``predicate()`` until it is true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


#: Model states after which a model will not change by itself.
SETTLED = frozenset({"ready", "failed"})


def wait_settled(
    client: MqttClient, agent: AgentProcess, device: str, models: list[str], timeout: float = 30.0
) -> dict[str, Any]:
    """The first status of ``device`` in which every one of ``models`` is ready or failed."""
    topic = f"edge/{device}/status"
    client.subscribe(topic)

    def settled(msg: Reply) -> bool:
        assert agent.alive, f"the agent exited with {agent.proc.returncode}:\n{agent.log()}"
        doc = msg.json()
        states = {k: v.get("state") for k, v in (doc.get("models") or {}).items()}
        return sorted(states) == sorted(models) and set(states.values()) <= SETTLED

    try:
        doc: dict[str, Any] = client.expect_where(topic, settled, timeout).json()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{agent.log()[-4000:]}") from None
    return doc


@contextlib.contextmanager
def running_agent(
    folder: Path,
    port: int,
    models: list[dict[str, Any]],
    *,
    device: str = "cam-01",
    url: str | None = None,
    watcher: Callable[[], MqttClient] | None = None,
    **sections: Any,
) -> Iterator[AgentProcess]:
    """Write a config in ``folder``, start the agent, wait until its models settled.

    ``url`` is the broker the agent uses (default: an open broker on ``port``), ``watcher``
    makes the client that reads its status (default: an anonymous one on ``port``). On
    exit the agent is killed if still running (a test that checks the shutdown stops it
    itself).
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(
        folder / "agent.yaml",
        url=url or f"mqtt://127.0.0.1:{port}",
        state_dir=folder / "state",
        models=models,
        device_id=device,
        **sections,
    )
    agent = AgentProcess.start(config, folder / "agent.log")
    try:
        client = watcher() if watcher is not None else MqttClient(port)
        try:
            wait_settled(client, agent, device, [m["name"] for m in models])
        finally:
            client.close()
        yield agent
    finally:
        if agent.alive:
            agent.kill()


def status_of(client: MqttClient, device: str, timeout: float = 5.0) -> dict[str, Any]:
    """The retained status of ``device``, read by a fresh subscription of ``client``."""
    topic = f"edge/{device}/status"
    client.drain(topic)
    client.subscribe(topic)
    msg = client.expect(topic, timeout)
    assert msg.retain, "the status must be retained"
    doc: dict[str, Any] = json.loads(msg.payload)
    return doc
