"""The whole server loop over a real Mosquitto: a device's update events published on MQTT
reach the ingest, the engine's tick advances the rollout, and the retained ``desired``
hint (``{"revision": N}``, QoS 1) is what the device finds, also after a broker outage."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import func, select

from agent.protocol.documents import format_timestamp
from fleet_server.config import IngestSettings, MqttSettings
from fleet_server.ingest import IngestService
from fleet_server.ingest_mqtt import MqttIngest
from fleet_server.rollouts import operations
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.rollouts.hints import MqttHintPublisher
from fleet_server.store.engine import Database
from fleet_server.store.models import UpdateEventRow
from tests.broker import Mosquitto, probe
from tests.server.rollout_fleet import Fleet

pytestmark = pytest.mark.broker


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@contextmanager
def server_mqtt(db: Database, url: str, prefix: str) -> Iterator[MqttIngest]:
    """The server's ingest (writer thread and MQTT client) on the broker."""
    service = IngestService(db, IngestSettings(flush_interval_ms=20), topic_prefix=prefix)
    service.start()
    mqtt = MqttIngest(MqttSettings(url=url, topic_prefix=prefix), service)
    mqtt.start()
    assert mqtt.wait_connected(10)
    try:
        yield mqtt
    finally:
        mqtt.stop()
        service.stop()


def test_update_events_over_mqtt_advance_the_rollout_and_hints_are_retained(
    sqlite_db: Database, mosquitto: Mosquitto
) -> None:
    db, prefix = sqlite_db, f"t{uuid.uuid4().hex[:8]}"
    fleet = Fleet(db)
    fleet.release("1.2.0")
    fleet.release("1.3.0")
    fleet.devices(2)
    ro = fleet.create(waves="1,100%", dwell_s=3600, probation_s=600)
    with server_mqtt(db, mosquitto.url, prefix) as mqtt:
        engine = RolloutEngine(db, publisher=MqttHintPublisher(mqtt, prefix), clock=fleet.clock)
        assert engine.tick().hints == 1
        (canary,) = [d for d, s in fleet.states(ro.id).items() if s == "assigned"]
        (other,) = {"cam-00", "cam-01"} - {canary}
        with probe(mosquitto.port) as device:
            # subscribing afterwards: the broker hands over the retained hint
            device.subscribe(f"{prefix}/+/desired")
            msg = device.expect()
            assert (msg.topic, msg.retain, msg.qos) == (f"{prefix}/{canary}/desired", True, 1)
            assert json.loads(msg.payload) == {"revision": 1}
            # the canary reports its update on MQTT, as an agent does
            for state in (
                "downloading",
                "verifying",
                "validating",
                "activating",
                "probation",
                "committed",
            ):
                event = {
                    "ts": format_timestamp(fleet.clock()),
                    "rollout_id": str(ro.id),
                    "model": "face",
                    "from_version": "1.2.0",
                    "to_version": "1.3.0",
                    "state": state,
                }
                device.publish(f"{prefix}/{canary}/update", json.dumps(event).encode(), qos=1)

            def stored() -> bool:
                with db.read() as s:
                    q = select(func.count()).select_from(UpdateEventRow)
                    return s.execute(q.where(UpdateEventRow.device_id == canary)).scalar() == 6

            wait_for(stored)
            report = engine.tick()
            assert report.waves_started == [(ro.id, 1)] and report.hints == 1
            msg = device.expect()
            assert msg.topic == f"{prefix}/{other}/desired"
            assert json.loads(msg.payload) == {"revision": 1}

            # the broker connection is gone: a pin's hint waits in the outbox ...
            mqtt.stop()
            with db.write() as s:
                operations.pin(s, other, "face", "1.2.0", actor="token:ops", now=fleet.clock())
            assert engine.tick().hints == 0
            # ... and goes out once the server is connected again
            mqtt.start()
            assert mqtt.wait_connected(10)
            assert engine.tick().hints == 1
            msg = device.expect()
            assert msg.topic == f"{prefix}/{other}/desired"
            assert json.loads(msg.payload) == {"revision": 2}
            assert engine.tick().hints == 0  # sent once
        with probe(mosquitto.port) as late:  # a device that connects later finds the newest
            late.subscribe(f"{prefix}/{other}/desired")
            assert json.loads(late.expect().payload) == {"revision": 2}
