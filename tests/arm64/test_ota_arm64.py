"""An over-the-air update of one model, committed by the emulated aarch64 agent.

The session's emulated ``edge-agent run`` (conftest.py) has an ``updates:`` section that
points at ``arm64_fleet``: a real HTTP server with real ed25519-signed TUF metadata (image
repository and director, ``fleet_server.tuf``) and the artifacts. This test signs ``y = 3x``
as version 2.0.0 of the ``ota`` model (``y = 2x`` in the config) for the ``generic-arm64``
profile the agent detected, assigns it to the device, and wakes the updater with the
``desired`` hint. The aarch64 process then downloads it, verifies both repositories' metadata
and the artifact, validates it in the aarch64 onnxruntime, swaps it in while requests keep
coming, judges it on probation, and commits.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from tuf.api._payload import TargetFile

from agent.protocol import (
    InferResponse,
    UpdateEvent,
    decode_document,
    desired_topic,
    encode_request,
    update_topic,
)
from agent.updater.targets import ImageTargetCustom
from fleet_server.tuf import Assignment
from tests.agent.agent_process import status_of
from tests.agent.daemon_client import MqttClient
from tests.agent.updater_models import scale_model
from tests.agent.updater_rig import Fleet
from tests.arm64.emulated_agent import (
    DEVICE,
    OTA_MODEL,
    PROBATION_MIN_REQUESTS,
    PROBATION_S,
    PROFILE,
    EmulatedAgent,
)
from tests.broker import Mosquitto

pytestmark = [pytest.mark.arm64, pytest.mark.broker, pytest.mark.slow]

Array = npt.NDArray[Any]
X = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
V1_Y, V2_Y = tuple((2 * X).ravel().tolist()), tuple((3 * X).ravel().tolist())
STATES = ["downloading", "verifying", "validating", "activating", "probation", "committed"]
ROLLOUT = "r-arm64"
#: Replies to v1 before the update: they prove v1 serves and form the probation's baseline.
BASELINE_REQUESTS = 2 * PROBATION_MIN_REQUESTS
#: Generous for emulation: measured ~10 s from the hint to ``committed``.
UPDATE_TIMEOUT_S = 180.0
REPLY_TIMEOUT_S = 60.0


def sign_and_assign(fleet: Fleet, source: Path, version: str) -> TargetFile:
    """Sign ``source`` as ``models/ota/{version}/cpu/...`` for :data:`PROFILE`, assign it.

    ``Fleet.publish`` signs for the host's test profile; the emulated agent is arm64.
    """
    data = source.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    custom = ImageTargetCustom(
        name=OTA_MODEL,
        version=version,
        format="onnx",
        compatible_profiles=(PROFILE,),
        manifest_digest=f"sha256:{sha}",
    )
    fleet.http.add(data)
    path = f"models/{OTA_MODEL}/{version}/cpu/{source.name}"
    target = fleet.image.add_target(path, len(data), {"sha256": sha}, custom)
    assignment = Assignment.for_target(target, profile=PROFILE, rollout_id=ROLLOUT)
    fleet.http.assignments[DEVICE] = [assignment]
    return target


class Load:
    """Requests to the ``ota`` model from a thread, one at a time, until stopped.

    Each reply is kept as ``(model_version, y)``; an error reply or a lost request fails
    the test when the load stops.
    """

    def __init__(self, port: int, pause_s: float = 0.05) -> None:
        self._client = MqttClient(port)
        self._payload = encode_request([("x", X)], binary=True)
        self._pause_s = pause_s
        self.replies: list[tuple[str, tuple[float, ...]]] = []
        self._failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ota-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                reply = self._client.request(
                    OTA_MODEL,
                    self._payload,
                    device=DEVICE,
                    content_type="application/x-edge-tensors",
                    timeout=REPLY_TIMEOUT_S,
                ).decoded()
                assert isinstance(reply, InferResponse), f"an error reply: {reply}"
                [y] = [t.array for t in reply.outputs if t.name == "y"]
                self.replies.append((reply.model_version, tuple(y.ravel().tolist())))
                self._stop.wait(self._pause_s)
        except BaseException as exc:  # re-raised in the test's thread by stop()
            self._failure = exc

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.replies) < count and self._failure is None:
            assert time.monotonic() < deadline, f"{len(self.replies)} of {count} replies"
            time.sleep(0.05)

    def stop(self) -> list[tuple[str, tuple[float, ...]]]:
        """Stop; every reply (re-raises the thread's failure, if any)."""
        self._stop.set()
        self._thread.join(REPLY_TIMEOUT_S + 5)
        self._client.close()
        if self._failure is not None:
            raise self._failure
        return self.replies


def events_until_done(client: MqttClient, topic: str) -> list[dict[str, Any]]:
    """The ``update`` events until one ends the update (each validated against the protocol)."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + UPDATE_TIMEOUT_S
    while not events or events[-1]["state"] not in ("committed", "failed", "rolled_back"):
        left = deadline - time.monotonic()
        assert left > 0, f"the update did not end within {UPDATE_TIMEOUT_S} s: {events}"
        message = client.expect(topic, left)
        decode_document(UpdateEvent, message.payload)
        events.append(json.loads(message.payload))
    return events


def test_a_signed_update_commits_on_the_emulated_agent(
    emulated_agent: EmulatedAgent,
    arm64_fleet: Fleet,
    arm64_client: MqttClient,
    mosquitto: Mosquitto,
    tmp_path: Path,
) -> None:
    v1_digest = hashlib.sha256(emulated_agent.models[OTA_MODEL].read_bytes()).hexdigest()
    events_topic, hint_topic = update_topic(DEVICE), desired_topic(DEVICE)
    arm64_client.subscribe(events_topic)
    load = Load(mosquitto.port)
    try:
        load.wait_for(BASELINE_REQUESTS, REPLY_TIMEOUT_S)
        v2 = scale_model(tmp_path / "v2" / "model.onnx", 3.0)
        target = sign_and_assign(arm64_fleet, v2, "2.0.0")
        t0 = time.monotonic()
        arm64_client.publish(hint_topic, b'{"revision": 1}', retain=True)
        events = events_until_done(arm64_client, events_topic)
        took_s = time.monotonic() - t0
        load.wait_for(len(load.replies) + 2, REPLY_TIMEOUT_S)  # served after the commit too
    finally:
        replies = load.stop()
        arm64_client.publish(hint_topic, b"", retain=True)  # clear the retained hint
    at = {e["state"]: datetime.fromisoformat(e["ts"]) for e in events}
    if {"downloading", "probation"} <= set(at):
        install_s = (at["probation"] - at["downloading"]).total_seconds()
        print(
            f"\narm64 OTA: hint to committed in {took_s:.1f} s (download to swap {install_s:.1f} s,"
            f" probation {PROBATION_S:.0f} s); {len(replies)} requests answered"
        )

    # The update went through every state, and committed.
    reasons = [(e["state"], (e.get("reason") or {}).get("code")) for e in events]
    assert [e["state"] for e in events] == STATES, reasons
    for event in events:
        assert (event["model"], event["rollout_id"]) == (OTA_MODEL, ROLLOUT)
        assert (event["from_version"], event["to_version"]) == (f"sha256:{v1_digest[:12]}", "2.0.0")
    sha = target.hashes["sha256"]
    [served] = arm64_fleet.http.downloads(sha)  # fetched once, whole, over HTTP
    assert (served.status, served.sent) == (200, target.length)

    # Every request was answered, first by v1 then by v2, never by v1 again after the swap.
    v1, v2_version = f"sha256:{v1_digest[:12]}", f"sha256:{sha[:12]}"
    assert set(replies) <= {(v1, V1_Y), (v2_version, V2_Y)}, set(replies)
    versions = [version for version, _ in replies]
    first_v2 = versions.index(v2_version)
    assert first_v2 >= BASELINE_REQUESTS
    assert all(v == v2_version for v in versions[first_v2:]), "v1 answered after the swap"

    # The probation judged the new model on enough requests before committing it.
    log = emulated_agent.process.log()
    assert "too few to judge" not in log, log[-3000:]
    assert len(versions) - first_v2 >= PROBATION_MIN_REQUESTS
    assert took_s > PROBATION_S

    status = status_of(arm64_client, DEVICE)["models"][OTA_MODEL]
    assert (status["version"], status["state"]) == (v2_version, "ready")
    assert status["provider"] == "CPUExecutionProvider"
