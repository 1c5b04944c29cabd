"""``edge-agent run``: wiring and lifetime of the device daemon.

Start-up, in this order, so that a device is visible quickly and serves as soon as it can:
1. read the config (an invalid file exits 2 naming the field), resolve the profile;
2. open the outbox, create one slot per model (state ``loading``);
3. connect MQTT in the background (Last Will ``offline``, retained ``online`` birth);
4. load, validate and warm up each model on a loader thread; each becomes ``ready``;
5. tell systemd READY once every model has settled and MQTT is up — or after
   ``lifecycle.ready_timeout_s`` when the broker is down (serving resumes when it returns).

The main loop sends telemetry ticks, flushes the outbox, republishes the status when
it changes, and pings the systemd watchdog only while every worker is healthy.
SIGTERM: stop taking requests, drain within ``lifecycle.drain_timeout_s``, publish
``offline``, exit 0.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.commands import CommandRunner
from agent.config import AgentConfig, load_config
from agent.errors import EdgeError
from agent.intake import Intake
from agent.model_registry import ModelRegistry
from agent.profiles import Profile, detect_profile, load_profile
from agent.protocol import cmd_topic, status_topic, telemetry_topic, utc_now
from agent.serving import ModelSlot
from agent.status import build_status, offline_status
from agent.systemd import Check, Notifier, Watchdog, stuck_worker_check, watchdog_interval
from agent.telemetry import AgentStats, ModelGauge, Outbox, SystemCollector, TelemetryCollector
from agent.telemetry.outbox import OutboxError
from agent.transport import Transport

log = logging.getLogger("agent.daemon")

#: Main-loop period: watchdog ticks, status and outbox checks.
TICK_S = 0.25
#: Entries one outbox flush call sends (the default of Outbox.flush).
OUTBOX_BATCH = 500


class Agent:
    """One running agent. Build it, :meth:`start` it, :meth:`run` until stopped."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        profile: Profile,
        transport: Transport,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.profile = profile
        self.transport = transport
        self.device_id = config.device_id
        self.prefix = config.topic_prefix
        self.started_at = utc_now()
        self._t0 = time.monotonic()
        state = config.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self.work_dir = state / "bundles"
        self.cache_dir = state / "cache"
        self.stats = AgentStats()
        self.outbox = Outbox(
            state / "outbox.sqlite3", max_entries=config.telemetry.outbox_max_entries
        )
        self.telemetry = TelemetryCollector(
            self.device_id, SystemCollector(profile, state), self.stats
        )
        self._stop = threading.Event()
        #: Set whenever the status may have changed (the updater sets it after a swap).
        self._status_changed = threading.Event()
        self._last_status = b""
        #: Set once every configured model has loaded or failed (the updater waits on it).
        self._models_settled = threading.Event()
        self.models = ModelRegistry(
            profile=profile,
            work_dir=self.work_dir,
            cache_dir=self.cache_dir,
            stats=self.stats,
            send=self._send_reply,
            on_change=self._status_changed.set,
        )
        #: name -> slot (the registry's dict; the intake and the updater read it).
        self.slots: dict[str, ModelSlot] = self.models.slots
        self._lock = self.models.lock
        self.intake = Intake(
            device_id=self.device_id,
            prefix=self.prefix,
            transport=transport,
            slots=self.slots,
            max_payload_bytes=config.limits.max_payload_bytes,
            record_refusal=lambda model, code: self.stats.model(model).record_error(code),
            record_unrouted=self.stats.record_unrouted,
            record_dropped=self.stats.record_reply_dropped,
        )
        self.commands = CommandRunner(self)
        self.notifier = Notifier.from_env()
        interval = watchdog_interval()
        self.watchdog = (
            Watchdog(self.notifier, interval, [self._stuck_check()]) if interval else None
        )
        self._prometheus: Any = None
        self.updater: Any = None  # agent.updater.Updater when updates are configured

    # --- properties ----------------------------------------------------------------------

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._t0

    @property
    def status_topic(self) -> str:
        return status_topic(self.device_id, self.prefix)

    # --- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, subscribe, and start loading models (returns at once)."""
        cfg = self.config
        for mc in cfg.models:
            self.models.add(mc)
        self.transport.set_will(self.status_topic, json.dumps(offline_status()).encode())
        self.transport.set_birth(self.status_topic, self._status_payload)
        self.intake.subscribe()
        self.transport.subscribe(
            cmd_topic(self.device_id, self.prefix), 1, self.commands.on_message
        )
        self.transport.on_connect(lambda _v: self._status_changed.set())
        self.commands.start()
        if cfg.prometheus.enabled:
            from agent.telemetry.prometheus import start_prometheus

            self._prometheus = start_prometheus(
                self.stats, cfg.prometheus.host, cfg.prometheus.port
            )
        self.transport.connect()
        threading.Thread(target=self._load_all, name="model-loader", daemon=True).start()
        if cfg.updates is not None:
            from agent.updater.updater import attach_updater

            self.updater = attach_updater(self)

    def _send_reply(self, job: Any, payload: bytes, content_type: str) -> None:
        self.intake.send(job, payload, content_type)

    def _load_all(self) -> None:
        for mc in list(self.config.models):
            self.models.load(mc)
        self._models_settled.set()

    # --- status --------------------------------------------------------------------------

    def status_document(self, state: str = "online") -> dict[str, Any]:
        with self._lock:
            return build_status(
                state=state,
                profile=self.profile.name,
                started_at=self.started_at,
                slots=dict(self.slots),
                required=self.profile.required_accelerator,
            )

    def _status_payload(self) -> bytes:
        payload = json.dumps(self.status_document(), separators=(",", ":")).encode()
        self._last_status = _without_ts(payload)
        return payload

    def _publish_status_if_changed(self) -> None:
        self._status_changed.clear()
        payload = json.dumps(self.status_document(), separators=(",", ":")).encode()
        if _without_ts(payload) == self._last_status:
            return
        if self.transport.publish(self.status_topic, payload, qos=1, retain=True):
            self._last_status = _without_ts(payload)

    # --- commands ------------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply its ``models`` (hot swap, no restart).

        Models an OTA update installed keep their installed version unless the config
        now names another file. See :meth:`ModelRegistry.apply` for the result.

        Raises:
            ConfigError: the new config is invalid (nothing is changed then).
        """
        if self.config_path is None:
            raise EdgeError("this agent was not started from a config file", code="bad_request")
        new = _with_installed(load_config(self.config_path))
        if new.device_id != self.config.device_id or new.mqtt != self.config.mqtt:
            log.warning("reload: device_id and mqtt changes need a restart; they are ignored")
        result = self.models.apply(new.models, self.config.lifecycle.drain_timeout_s)
        self.config = new
        return result

    def reload_from_signal(self) -> None:
        """SIGHUP (``systemctl reload edge-agent``): reload, tell systemd, never raise."""
        self.notifier.reloading()
        try:
            log.info("reload: %s", self.reload())
        except EdgeError as exc:
            log.error("reload refused: %s", exc)
        self.notifier.ready(self._ready_text())

    def diagnostics(self) -> dict[str, Any]:
        from agent.doctor import run_doctor

        report = run_doctor(self.profile.name).to_dict()
        with self._lock:
            models = {
                name: {
                    "state": slot.status.state,
                    "error": slot.status.error,
                    "queue_depth": slot.queue_depth,
                    "model": slot.model.describe() if slot.model is not None else None,
                }
                for name, slot in self.slots.items()
            }
        return {
            "doctor": report,
            "models": models,
            "mqtt": {
                "connected": self.transport.is_connected,
                "protocol": self.transport.protocol_version,
            },
            "outbox": {"entries": len(self.outbox), "dropped": self.outbox.dropped_total},
            "updates": self.updater.describe() if self.updater is not None else None,
            "uptime_s": round(self.uptime_s, 3),
        }

    # --- main loop ------------------------------------------------------------------------

    def run(self) -> None:
        """The main loop; returns after :meth:`request_stop`."""
        interval = self.config.telemetry.interval_s
        next_tick = time.monotonic() + interval
        ready_deadline = time.monotonic() + self.config.lifecycle.ready_timeout_s
        ready_sent = False
        next_extend = time.monotonic() + 10.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_tick:
                self._telemetry_tick()
                next_tick = max(next_tick + interval, now)
            if self.transport.is_connected:
                if self._status_changed.is_set():
                    self._publish_status_if_changed()
                self._flush_outbox()
            settled = self._models_settled.is_set()
            if not settled and now >= next_extend:  # a first TensorRT build can take minutes
                self.notifier.extend_timeout(60.0)
                next_extend = now + 10.0
            if (
                not ready_sent
                and settled
                and (self.transport.is_connected or now >= ready_deadline)
            ):
                self.notifier.ready(self._ready_text())
                ready_sent = True
            if self.watchdog is not None:
                self.watchdog.tick()
            self._stop.wait(min(TICK_S, max(0.0, next_tick - time.monotonic())))

    def _ready_text(self) -> str:
        ready = sum(1 for s in self.slots.values() if s.status.state == "ready")
        mqtt = "connected" if self.transport.is_connected else "broker unreachable"
        return f"{ready}/{len(self.slots)} models ready; MQTT {mqtt}"

    def _telemetry_tick(self) -> None:
        with self._lock:
            gauges = {n: ModelGauge(s.provider, s.queue_depth) for n, s in self.slots.items()}
        topic = telemetry_topic(self.device_id, self.prefix)
        try:
            self.telemetry.enqueue(self.outbox, topic, gauges, qos=self.config.telemetry.qos)
        except OutboxError as exc:
            log.error("telemetry tick lost: %s", exc)

    def _flush_outbox(self) -> None:
        """Send the outbox in order while connected (QoS 1 entries leave the disk only
        once paho holds them on a live connection)."""
        try:
            while len(self.outbox) and self.transport.is_connected:
                if self.outbox.flush(self._publish_outboxed) < OUTBOX_BATCH:
                    break
        except OutboxError as exc:
            log.error("outbox flush failed: %s", exc)

    def _publish_outboxed(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        if not self.transport.is_connected:
            return False
        return self.transport.publish(
            topic, payload, qos=qos, retain=retain, content_type="application/json"
        )

    def _stuck_check(self) -> Check:
        """A watchdog check over every slot's worker (slots come and go with reloads)."""

        def check() -> str | None:
            max_s = self.config.lifecycle.stuck_worker_s
            for name, slot in list(self.slots.items()):
                reason = stuck_worker_check(name, _busy_since(slot), max_s)()
                if reason is not None:
                    return reason
            return None

        return check

    # --- stop ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Drain, publish ``offline``, disconnect, close. Safe to call once after :meth:`run`."""
        self.notifier.stopping()
        if self.updater is not None:
            self.updater.stop()
        self.models.stop_all(self.config.lifecycle.drain_timeout_s)
        if self.transport.is_connected:
            self._flush_outbox()
        self.transport.publish(
            self.status_topic, json.dumps(offline_status()).encode(), qos=1, retain=True
        )
        self.commands.stop()
        self.transport.disconnect(clean=True)
        self.models.close_all()
        if self._prometheus is not None:
            self._prometheus.close()
        self.outbox.close()


def _busy_since(slot: ModelSlot) -> Callable[[], float | None]:
    return lambda: slot.in_flight_since


def _with_installed(config: AgentConfig) -> AgentConfig:
    """``config`` with the paths of committed OTA updates in place of the configured ones."""
    if config.updates is None:
        return config
    from agent.updater.installed import with_installed_models

    return with_installed_models(config)


def _without_ts(payload: bytes) -> bytes:
    doc = json.loads(payload)
    doc.pop("ts", None)
    return json.dumps(doc, sort_keys=True).encode()


def build_agent(config_path: Path, *, profile_name: str | None = None) -> Agent:
    """Read the config and build the agent with a real MQTT transport.

    Raises:
        ConfigError: the config or the profile is invalid.
    """
    from agent.transport.mqtt import MqttTransport

    config = _with_installed(load_config(config_path))
    name = profile_name or config.profile
    profile = load_profile(name) if name else detect_profile().profile
    return Agent(
        config, profile=profile, transport=MqttTransport(config.mqtt), config_path=config_path
    )


def run_daemon(config_path: Path, *, profile: str | None = None) -> int:
    """Run the agent until SIGTERM or SIGINT; the exit code.

    Raises:
        ConfigError: the config or the profile is invalid (the CLI prints it, exit 2).
    """
    agent = build_agent(config_path, profile_name=profile)
    logging.getLogger().setLevel(agent.config.log_level.upper())

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        agent.request_stop()

    def on_hup(_signum: int, _frame: object) -> None:
        threading.Thread(target=agent.reload_from_signal, name="reload", daemon=True).start()

    faulthandler.enable()  # a watchdog SIGABRT prints every thread's stack to the journal
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    agent.start()
    log.info(
        "edge-agent %s on %s (profile %s), %d model(s)",
        agent.config.device_id,
        agent.config.mqtt.url,
        agent.profile.name,
        len(agent.config.models),
    )
    try:
        agent.run()
    finally:
        agent.shutdown()
    return 0


__all__ = ["Agent", "build_agent", "run_daemon"]
