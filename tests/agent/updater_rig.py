"""The updater tests' rig: a real HTTP fleet server, real signed metadata, real models.

* :class:`FleetHttp` is a ``ThreadingHTTPServer`` that serves ``/tuf/image/...`` and
  ``/tuf/director/{device}/...`` from a real :class:`ImageRepository` and :class:`Director`
  (fleet_server.tuf, real ed25519 keys), and artifacts at
  ``/tuf/image/targets/{dir}/{sha256}.{file}`` with Range support. A test can cut a
  download, serve other bytes, or take the server down.
* :class:`Fleet` publishes a model file as a signed target and assigns it to a device.
* :class:`LiveAgent` runs a real :class:`agent.daemon.Agent` in-process on the in-memory
  broker, with its updater, and a client that sends requests and records update events.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tuf.api._payload import TargetFile

from agent.config import AgentConfig
from agent.daemon import Agent
from agent.profiles import Profile, load_profile
from agent.transport.base import Message
from agent.transport.memory import MemoryBroker, MemoryTransport
from agent.updater.config import UpdateConfig
from agent.updater.installed import with_installed_models
from agent.updater.targets import ImageTargetCustom, parse_model_target
from agent.updater.updater import Updater
from fleet_server import keys
from fleet_server.tuf import Assignment, Director, ImageRepository, LocalFolderStore
from fleet_server.tuf.errors import MetadataNotFound
from tests.agent.agent_process import TEST_PROFILE

DEVICE = "dev-1"
_ARTIFACT_RE = re.compile(r"/tuf/image/targets/(?:[^/]+/)+([0-9a-f]{64})\.[^/]+")


# --- the fleet server ----------------------------------------------------------------------


@dataclass
class Fault:
    """What the artifact route does instead of serving the stored bytes."""

    cut_after: int | None = None  # send this many bytes of the body, then hang up
    times: int = 1  # how many responses the fault spoils
    body: bytes | None = None  # serve these bytes (with their own length) instead
    no_length: bool = False  # send no Content-Length: the body ends when the server hangs up
    ignore_range: bool = False  # answer a Range request with the whole file (200)


@dataclass
class Served:
    """One artifact request as the server saw it."""

    sha256: str
    range: str | None
    status: int
    sent: int


class FleetHttp:
    """The fleet server's TUF and artifact routes, over real HTTP on 127.0.0.1."""

    def __init__(self, image: ImageRepository, director: Director) -> None:
        self.image = image
        self.director = director
        self.assignments: dict[str, list[Assignment]] = {}
        self.artifacts: dict[str, bytes] = {}
        self.faults: dict[str, Fault] = {}
        self.log: list[Served] = []
        self.down = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, data: bytes) -> str:
        """Serve ``data`` as an artifact; its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        self.artifacts[sha] = data
        return sha

    def artifact_url(self, sha256: str, file: str = "model.onnx") -> str:
        return f"{self.url}/tuf/image/targets/models/m/1.0.0/cpu/{sha256}.{file}"

    def downloads(self, sha256: str) -> list[Served]:
        return [s for s in self.log if s.sha256 == sha256]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fleet = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if fleet.down:
                    self.send_error(503)
                    return
                match = _ARTIFACT_RE.fullmatch(self.path)
                if match is not None:
                    self._artifact(match[1])
                    return
                try:
                    body = fleet._metadata(self.path)
                except (MetadataNotFound, ValueError):
                    self.send_error(404)
                    return
                self._send(200, body, {})

            def _artifact(self, sha: str) -> None:
                data = fleet.artifacts.get(sha)
                if data is None:
                    self.send_error(404)
                    return
                fault = fleet.faults.get(sha)
                if fault is not None and fault.times > 0:
                    fault.times -= 1
                    data = fault.body if fault.body is not None else data
                else:
                    fault = None
                start, rng = 0, self.headers.get("Range")
                if fault is not None and fault.ignore_range:
                    rng = None
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        fleet.log.append(Served(sha, rng, 416, 0))
                        self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                        return
                body = data[start:]
                headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
                status = 206 if rng else 200
                cut = fault.cut_after if fault is not None else None
                sent = len(body) if cut is None else min(cut, len(body))
                fleet.log.append(Served(sha, rng, status, sent))
                no_length = fault is not None and fault.no_length
                self._send(status, body, headers if rng else {}, cut_after=cut, no_length=no_length)

            def _send(
                self,
                status: int,
                body: bytes,
                headers: dict[str, str],
                cut_after: int | None = None,
                no_length: bool = False,
            ) -> None:
                self.send_response(status)
                if not no_length:
                    self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body if cut_after is None else body[:cut_after])
                if cut_after is not None or no_length:
                    self.close_connection = True

        return Handler

    def _metadata(self, path: str) -> bytes:
        if path.startswith("/tuf/image/"):
            return self.image.read(path.removeprefix("/tuf/image/"))
        if path.startswith("/tuf/director/"):
            device, name = path.removeprefix("/tuf/director/").split("/", 1)
            return self.director.serve(device, name, self.assignments.get(device, []))
        raise MetadataNotFound(path)


@dataclass
class Fleet:
    """The signing side and its HTTP server, for one test."""

    root: Path
    image: ImageRepository
    director: Director
    http: FleetHttp

    @classmethod
    def create(cls, root: Path) -> Fleet:
        keys.init_keys(root / "offline", root / "online", root_threshold=1, root_count=1)
        roots = keys.load_root_signers(root / "offline")
        image = ImageRepository.create(
            LocalFolderStore(root / "image"),
            roots,
            1,
            keys.load_online_signers(root / "online", "image"),
        )
        director = Director.create(
            LocalFolderStore(root / "director"),
            roots,
            1,
            keys.load_online_signers(root / "online", "director"),
        )
        (root / "image-root.json").write_bytes(image.root_bytes())
        (root / "director-root.json").write_bytes(director.root_bytes())
        return cls(root, image, director, FleetHttp(image, director))

    def publish(
        self, name: str, version: str, source: Path, *, fmt: str = "onnx", variant: str = "cpu"
    ) -> TargetFile:
        """Sign ``source`` as ``models/{name}/{version}/{variant}/{file}`` and serve its bytes."""
        data = source.read_bytes()
        path = f"models/{name}/{version}/{variant}/{source.name}"
        assert parse_model_target(path) is not None
        custom = ImageTargetCustom(
            name=name,
            version=version,
            format=fmt,
            compatible_profiles=(TEST_PROFILE,),
            manifest_digest="sha256:" + hashlib.sha256(data).hexdigest(),
        )
        sha = hashlib.sha256(data).hexdigest()
        self.http.artifacts[sha] = data
        return self.image.add_target(path, len(data), {"sha256": sha}, custom)

    def assign(self, target: TargetFile, device: str = DEVICE, rollout: str = "r-1") -> None:
        assignment = Assignment.for_target(target, profile=TEST_PROFILE, rollout_id=rollout)
        self.http.assignments[device] = [assignment]

    def update_config(self, **overrides: Any) -> UpdateConfig:
        values: dict[str, Any] = {
            "server_url": self.http.url,
            "image_root_file": self.root / "image-root.json",
            "director_root_file": self.root / "director-root.json",
            "poll_interval_s": 3600,
            "min_check_interval_s": 0,
            "retry_backoff_s": 0.05,
            "min_free_disk_bytes": 0,
            "probation_s": 0.3,
            "probation_check_s": 0.05,
            "probation_min_requests": 10,
        }
        values.update(overrides)
        return UpdateConfig.model_validate(values)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- an agent in-process ---------------------------------------------------------------------


@dataclass
class LiveAgent:
    """A real Agent on the in-memory broker, its updater, and a client of both."""

    agent: Agent
    updater: Updater
    broker: MemoryBroker
    client: MemoryTransport
    thread: threading.Thread
    events: list[dict[str, Any]] = field(default_factory=list)
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seq: int = 0

    @classmethod
    def start(
        cls,
        state_dir: Path,
        models: dict[str, Path],
        config: UpdateConfig,
        profile: Profile | None = None,
    ) -> LiveAgent:
        agent_config = with_installed_models(
            AgentConfig.model_validate(
                {
                    "device_id": DEVICE,
                    "state_dir": str(state_dir),
                    "mqtt": {"url": "mqtt://127.0.0.1:1"},
                    "models": [{"name": n, "path": str(p)} for n, p in models.items()],
                }
            )
        )
        broker = MemoryBroker()
        agent = Agent(
            agent_config,
            profile=profile or load_profile(TEST_PROFILE),
            transport=MemoryTransport(broker, DEVICE),
        )
        client = MemoryTransport(broker, "client")
        agent.start()
        updater = Updater(agent, config)
        thread = threading.Thread(target=agent.run, daemon=True)
        live = cls(agent, updater, broker, client, thread)
        client.subscribe(f"edge/{DEVICE}/update", 1, live._on_event)
        client.subscribe("replies/#", 1, live._on_reply)
        client.connect()
        thread.start()
        assert agent._models_settled.wait(30), "the agent's models did not settle"
        updater.start()
        live.wait_for(lambda: updater.checks >= 1, 10, "the start-up check")
        return live

    def _on_event(self, message: Message) -> None:
        with self._lock:
            self.events.append(json.loads(message.payload))

    def _on_reply(self, message: Message) -> None:
        doc = json.loads(message.payload)
        with self._lock:
            self.replies[doc["id"]] = doc

    def states(self) -> list[str]:
        with self._lock:
            return [e["state"] for e in self.events]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; events: {self.states()}")
            time.sleep(0.01)

    def wait_idle(self, final: str, timeout: float = 20.0) -> None:
        """Until the update ended in ``final`` (an event) and the machine is idle again."""
        self.wait_for(
            lambda: final in self.states() and self.updater.machine.update is None,
            timeout,
            f"the update to end {final}",
        )

    def request(self, values: list[float], model: str = "m") -> str:
        """Send one inference request for ``x = [values]``; its id."""
        with self._lock:
            self._seq += 1
            rid = f"r{self._seq}"
        payload = {
            "id": rid,
            "reply_to": f"replies/{rid}",
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": values}],
        }
        self.client.publish(f"edge/{DEVICE}/infer/{model}", json.dumps(payload).encode(), qos=1)
        return rid

    def infer(self, values: list[float], model: str = "m", timeout: float = 5.0) -> dict[str, Any]:
        """One request and its reply."""
        rid = self.request(values, model)
        self.wait_for(lambda: rid in self.replies, timeout, f"reply {rid}")
        return self.replies[rid]

    def close(self) -> None:
        self.updater.stop()
        self.agent.request_stop()
        self.thread.join(10)
        self.agent.shutdown()
        self.client.disconnect()


def output(reply: dict[str, Any]) -> list[float]:
    """The ``y`` values of a reply (AssertionError on an error reply)."""
    assert "error" not in reply, reply
    [y] = [o for o in reply["outputs"] if o["name"] == "y"]
    return [float(v) for v in y["data"]]
