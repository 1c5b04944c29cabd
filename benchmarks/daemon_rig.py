"""The rig of the daemon benchmarks: a broker, the agent and the floor as real processes.

Everything listens on 127.0.0.1 only, on free ports, from files in one scratch folder:

- :class:`Broker`: a Mosquitto of its own (the shipped settings that matter for speed:
  ``set_tcp_nodelay true``, no persistence, default queue and in-flight limits);
- :class:`AgentProcess`: ``edge-agent run --config FILE`` as a subprocess, with a device
  profile that pins the intra-op threads, watched through its retained status;
- :class:`FloorProcess`: ``mqtt_floor.py`` serving the same models on ``floor/{name}``;
- :class:`StatusWatcher`: a plain paho client that timestamps status and telemetry.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
MOSQUITTO = Path(os.environ.get("MOSQUITTO_BIN", "/usr/sbin/mosquitto"))
EDGE_AGENT = Path(sys.executable).parent / "edge-agent"
#: The name of the benchmark profile (the file name must match it).
PROFILE = "bench-x86_64"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool]) -> None:
    """Block until 127.0.0.1:``port`` accepts; RuntimeError after ``timeout`` or if not alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing accepts on port {port}")


def models_dir() -> Path:
    """The real models (``scripts/fetch_models.py``; fetched on first use)."""
    sys.path.insert(0, str(REPO / "scripts"))
    fetch_models = importlib.import_module("fetch_models")
    return Path(fetch_models.fetch(fetch_models.cache_root() / "models"))


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> int | None:
    """SIGTERM ``proc``, SIGKILL it after ``timeout``; its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class Broker:
    """One Mosquitto 2.x on a free port of 127.0.0.1, configured and logging in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_file = workdir / "mosquitto.log"
        conf = workdir / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"{user}log_dest file {self.log_file}\nlog_type error\nlog_type warning\n"
            "log_type notice\nper_listener_settings true\nset_tcp_nodelay true\n"
            "persistence false\nmax_packet_size 16777216\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        )
        self._conf = conf
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        if not MOSQUITTO.exists():
            raise SystemExit(f"{MOSQUITTO} is not installed (scripts/setup --tests installs it)")
        self._proc = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(self._conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10.0, lambda: self._proc is not None and self._proc.poll() is None)
        return self

    def dropped_lines(self) -> list[str]:
        """Log lines where the broker says it dropped messages (queue limits)."""
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return [line for line in text.splitlines() if "dropp" in line.lower()]

    def stop(self) -> None:
        _stop(self._proc, 5.0)
        self._proc = None


@dataclass(frozen=True)
class ModelEntry:
    """One ``models:`` entry of the agent config."""

    name: str
    path: Path
    queue_size: int = 64
    max_batch: int = 1
    max_delay_ms: float = 2.0

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "queue_size": self.queue_size,
            "max_batch": self.max_batch,
            "max_delay_ms": self.max_delay_ms,
        }


def write_profile(dest: Path, threads: int) -> Path:
    """``generic-x86_64`` with ``threads.intra_op`` pinned, so agent and floor match.

    The profile is named after ``dest``'s stem, as the agent requires.
    """
    doc = yaml.safe_load((REPO / "device_profiles" / "generic-x86_64.yaml").read_text())
    doc["name"] = dest.stem
    doc["description"] = f"generic-x86_64 with {threads} intra-op thread(s), for benchmarks"
    doc["threads"] = {"intra_op": threads}
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def write_face_bundle(dest: Path, tflite: Path) -> Path:
    """A BlazeFace bundle: 128x128 RGB, ``pixel / 127.5 - 1``, NHWC; raw outputs."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tflite, dest / tflite.name)
    manifest = {
        "name": "face",
        "version": "1.0.0",
        "format": "tflite",
        "model": tflite.name,
        "preprocessing": {
            "kind": "image",
            "width": 128,
            "height": 128,
            "color": "rgb",
            "scale": 1 / 127.5,
            "mean": 1.0,
            "layout": "nhwc",
        },
    }
    (dest / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return dest


@dataclass
class Seen:
    """One status or telemetry message as the watcher got it."""

    at: float  # time.perf_counter()
    topic: str
    doc: dict[str, Any]


@dataclass
class StatusWatcher:
    """A plain paho client that records ``edge/{device}/status`` and ``.../telemetry``."""

    port: int
    device_id: str
    seen: list[Seen] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, f"watch-{os.getpid()}", protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port)
        base = f"edge/{self.device_id}"
        self.client.subscribe([(f"{base}/status", 1), (f"{base}/telemetry", 0)])
        self.client.loop_start()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        if not msg.payload:
            return
        with self._cond:
            self.seen.append(Seen(now, msg.topic, json.loads(msg.payload)))
            self._cond.notify_all()

    def wait_for(
        self, test: Callable[[Seen], bool], timeout: float, alive: Callable[[], bool]
    ) -> Seen | None:
        """The first message (already seen or to come) that passes ``test``; None on
        timeout or as soon as ``alive()`` is false."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.seen:
                    if test(item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    return None
                self._cond.wait(min(left, 0.1))

    def telemetry(self) -> list[Seen]:
        with self._cond:
            return [s for s in self.seen if s.topic.endswith("/telemetry")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def is_online(item: Seen) -> bool:
    return item.topic.endswith("/status") and item.doc.get("state") == "online"


def all_ready(item: Seen) -> bool:
    models = item.doc.get("models") or {}
    return is_online(item) and all(m.get("state") == "ready" for m in models.values())


@dataclass(frozen=True)
class StartTimes:
    """Seconds from ``Popen`` to the first retained ``online`` and to every model ``ready``."""

    online_s: float
    ready_s: float


class AgentProcess:
    """``edge-agent run --config FILE`` as a real subprocess.

    ``threads`` pins the intra-op threads through a profile of its own
    (:func:`write_profile`); None lets the agent detect its profile as on a device.
    """

    def __init__(
        self,
        workdir: Path,
        broker: Broker,
        models: list[ModelEntry],
        *,
        threads: int | None,
        device_id: str = "bench-01",
        telemetry_interval_s: float | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        self.device_id = device_id
        self.log_file = workdir / "agent.log"
        config: dict[str, Any] = {"device_id": device_id}
        if threads is not None:  # else the profile the agent detects, as shipped
            config["profile"] = str(write_profile(workdir / f"{PROFILE}.yaml", threads))
        config["state_dir"] = str(workdir / "state")
        config["mqtt"] = {"url": broker.url}
        config["models"] = [m.to_config() for m in models]
        if telemetry_interval_s is not None:
            config["telemetry"] = {"interval_s": telemetry_interval_s}
        self.config_file = workdir / "agent.yaml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self._proc: subprocess.Popen[bytes] | None = None
        self.watcher: StatusWatcher | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def start(self, timeout: float = 60.0) -> StartTimes:
        """Start the agent and wait until every model is ready.

        Raises:
            RuntimeError: the agent exited or did not get ready within ``timeout``.
        """
        self.watcher = StatusWatcher(self.broker.port, self.device_id)
        time.sleep(0.2)  # the watcher's SUBACK, so that the first status is not missed
        with self.log_file.open("wb") as log:
            t0 = time.perf_counter()
            self._proc = subprocess.Popen(
                [str(EDGE_AGENT), "run", "--config", str(self.config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        proc = self._proc
        online = self.watcher.wait_for(is_online, timeout, lambda: proc.poll() is None)
        ready = self.watcher.wait_for(all_ready, timeout, lambda: proc.poll() is None)
        if online is None or ready is None:
            self.stop()
            raise RuntimeError(f"the agent did not get ready:\n{self.log_file.read_text()[-2000:]}")
        return StartTimes(online.at - t0, ready.at - t0)

    def stop(self) -> int | None:
        """SIGTERM (a clean drain and ``offline``); the exit code."""
        code = _stop(self._proc)
        self._proc = None
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        return code


class FloorProcess:
    """``mqtt_floor.py`` serving ``floor/{name}`` for each spec entry."""

    def __init__(self, broker: Broker, specs: list[dict[str, Any]], *, threads: int) -> None:
        self.args = [
            sys.executable,
            str(BENCH / "mqtt_floor.py"),
            "--port",
            str(broker.port),
            "--threads",
            str(threads),
            "--spec",
            json.dumps(specs),
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = 60.0) -> FloorProcess:
        """Start the floor and wait for its ``ready`` line.

        Raises:
            RuntimeError: it exited or did not say ``ready`` within ``timeout``.
        """
        self._proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, cwd=REPO)
        assert self._proc.stdout is not None
        ready = threading.Event()

        def read() -> None:
            assert self._proc is not None and self._proc.stdout is not None
            for line in self._proc.stdout:
                if line.strip() == b"ready":
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout):
            self.stop()
            raise RuntimeError("the floor process did not get ready")
        return self

    def stop(self) -> None:
        _stop(self._proc, 5.0)
        self._proc = None


class RssSampler:
    """Samples a process's RSS every ``period`` seconds on a thread of its own (a context)."""

    def __init__(self, proc: psutil.Process, period: float = 1.0) -> None:
        self.proc = proc
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self.samples.append(int(self.proc.memory_info().rss))
            self._stop.wait(period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
