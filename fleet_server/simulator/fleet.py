"""The simulated fleet: its devices, their schedule, and a run from start to clean stop.

One asyncio loop holds every device. A ticker walks the devices in ``interval_s /
TICK_S`` buckets (a device's bucket is fixed, so its telemetry is evenly spaced and the
fleet's load is flat); on its turn a device sends its telemetry, may start an outage
(``offline_rate``), and wakes its updater when its poll timer is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import shutil
import ssl
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TextIO

from agent.errors import BadRequest
from agent.protocol import DesiredHint, decode_document, status_topic, telemetry_topic, update_topic
from agent.protocol.documents import utc_now
from fleet_server.errors import ConfigError, FleetError
from fleet_server.simulator.connections import DeviceLinks, Links, SharedLinks
from fleet_server.simulator.device import VirtualDevice
from fleet_server.simulator.enrol import Enroller, Identity
from fleet_server.simulator.fetching import HttpFetcher
from fleet_server.simulator.link import LoopBridge, tls_context
from fleet_server.simulator.settings import SimulatorSettings
from fleet_server.simulator.stats import Stats
from fleet_server.simulator.traits import pick_profile, traits_for
from fleet_server.simulator.updates import Updates

log = logging.getLogger("fleet_server.simulator")

TICK_S = 0.1
#: With ``auto`` registration a device exists on the server only once the ingest has
#: written its first status: its first update check waits this long (and up to twice).
AUTO_REGISTER_WAIT_S = 2.0
_POLL_JITTER = 0.2


def _bucket(device_id: str, buckets: int) -> int:
    digest = hashlib.blake2b(device_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % buckets


class Fleet:
    """A simulated fleet (see the module docstring). ``run()`` once, ``stop()`` any time."""

    def __init__(self, settings: SimulatorSettings, *, out: TextIO | None = sys.stdout) -> None:
        self.settings = settings
        self.out = out
        self.stats = Stats(devices=settings.devices)
        self.rng = random.Random(settings.seed)
        self.devices = [self._device(device_id) for device_id in settings.device_ids()]
        self._stop = asyncio.Event()
        self._identities: dict[str, Identity] = {}
        #: Chance that an online device starts an outage at its telemetry turn.
        self.drop_chance = outage_chance(
            settings.offline_rate, settings.interval_s, settings.offline_s
        )

    def _device(self, device_id: str) -> VirtualDevice:
        s = self.settings
        profile = pick_profile(device_id, s.profiles, s.seed)
        return VirtualDevice(
            device_id, traits_for(device_id, profile, s.seed), s.models, s, self.rng
        )

    def stop(self) -> None:
        """End the run: every device says goodbye (offline status) and disconnects."""
        self._stop.set()

    # --- the run ----------------------------------------------------------------------

    async def run(self) -> Stats:
        """Run until :meth:`stop` or ``duration_s``; returns the final counters.

        Raises:
            ConfigError: the TLS files or the state folder cannot be used.
            FleetError: enrolment was refused (``unauthorized``, ``device_exists``...).
            ServerUnreachable: the server cannot be reached to enrol.
        """
        s = self.settings
        owned = s.state_dir is None
        state = Path(tempfile.mkdtemp(prefix="edge-fleet-sim-")) if owned else s.state_dir
        assert state is not None
        loop = asyncio.get_running_loop()
        self.bridge = LoopBridge(loop)
        self.fetcher = HttpFetcher(ca_file=s.ca_file)
        self.updates = Updates(
            s,
            state,
            self.fetcher,
            self.stats,
            emit=self._emit_event,
            status_changed=self._publish_status,
            rng=self.rng,
        )
        links: Links | None = None
        try:
            if s.registration == "enrol":
                await self._enrol(state)
            links = self.links = self._make_links()
            links.start(self.devices)
            tasks = [
                loop.create_task(self.bridge.keepalive()),
                loop.create_task(self._ticker()),
                loop.create_task(self._summaries()),
            ]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), s.duration_s)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await self.updates.close()
            if links is not None:
                await links.close(self.devices)
            self.fetcher.close()
            self._report()
            if owned:
                shutil.rmtree(state, ignore_errors=True)
        return self.stats

    async def _enrol(self, state: Path) -> None:
        s = self.settings
        assert s.api_token is not None
        verify: bool | str = str(s.ca_file) if s.ca_file else True
        enroller = Enroller(
            s.server_url, s.api_token, s.tags, state, concurrency=s.http_concurrency, verify=verify
        )
        try:

            async def one(d: VirtualDevice) -> None:
                identity = await enroller.enrol(d.id, d.traits.profile)
                self.stats.enrolled += 1
                if identity is not None:
                    self._identities[d.id] = identity
                elif s.mqtts and s.connection == "device":
                    raise FleetError(
                        f"{d.id} is enrolled already and its key was not kept: use the "
                        "state dir of the run that enrolled it, or other ids",
                        code="device_exists",
                    )

            await asyncio.gather(*(one(d) for d in self.devices))
        finally:
            await enroller.close()
        if enroller.roots is not None:
            self.updates.roots = enroller.roots

    def _make_links(self) -> Links:
        s = self.settings
        ca = str(s.ca_file) if s.ca_file else None
        if s.connection == "shared":
            tls = None
            if s.mqtts:
                cert = str(s.mqtt_cert_file) if s.mqtt_cert_file else None
                key = str(s.mqtt_key_file) if s.mqtt_key_file else None
                tls = self._tls(ca, cert, key)
            return SharedLinks(s, self.bridge, self, tls)

        def tls_for(d: VirtualDevice) -> ssl.SSLContext | None:
            if not s.mqtts:
                return None
            ident = self._identities[d.id]
            return self._tls(ca or str(ident.ca_file), str(ident.cert_file), str(ident.key_file))

        return DeviceLinks(s, self.bridge, self, tls_for)

    @staticmethod
    def _tls(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
        try:
            return tls_context(ca, cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mqtt TLS files: {exc}") from None

    # --- what the links report ----------------------------------------------------------

    def came_online(self, device: VirtualDevice) -> None:
        """Publish the status, send what was kept while offline, check for updates on the
        first start (as the agent does)."""
        if device.online:
            return
        first = not device.started
        device.online, device.started = True, True
        self.stats.online += 1
        if first:
            self.stats.started += 1
            s = self.settings
            if s.poll_interval_s > 0:
                spread = s.poll_interval_s * (1 + _POLL_JITTER * (2 * self.rng.random() - 1))
                device.next_poll = asyncio.get_running_loop().time() + spread
        else:
            self.stats.reconnects += 1
        self._publish_status(device)
        while device.backlog and device.online:
            topic, payload, qos = device.backlog.popleft()
            self._send(device, topic, payload, qos)
        if first and self.settings.initial_check:
            if self.settings.registration == "auto":  # known once the ingest has written it
                delay = AUTO_REGISTER_WAIT_S * (1 + self.rng.random())
                asyncio.get_running_loop().call_later(delay, self.updates.wake, device)
            else:
                self.updates.wake(device)

    def went_offline(self, device: VirtualDevice, expected: bool) -> None:
        if not device.online:
            return
        device.online = False
        self.stats.online -= 1
        if not expected:
            self.stats.lost += 1

    def message(self, device: VirtualDevice, topic: str, payload: bytes) -> None:
        """The ``desired`` hint wakes the updater; the hint itself is not trusted."""
        if not payload:
            return  # a cleared retained hint
        try:
            decode_document(DesiredHint, payload)
        except BadRequest:
            log.debug("%s: malformed desired hint on %s", device.id, topic)
            return
        self.updates.wake(device)

    # --- sending ----------------------------------------------------------------------

    def _send(self, device: VirtualDevice, topic: str, payload: bytes, qos: int) -> None:
        if device.online and self.links.publish(device, topic, payload, qos):
            return
        if device.online:
            self.stats.publish_failed += 1
        device.backlog.append((topic, payload, qos))
        self.stats.buffered += 1

    def _publish_status(self, device: VirtualDevice) -> None:
        if device.online:
            topic = status_topic(device.id, self.settings.topic_prefix)
            if self.links.publish(device, topic, device.status(), 1, retain=True):
                self.stats.statuses += 1

    def _emit_event(self, device: VirtualDevice, payload: bytes) -> None:
        self._send(device, update_topic(device.id, self.settings.topic_prefix), payload, 1)

    # --- the schedule -------------------------------------------------------------------

    async def _ticker(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        n = max(1, round(s.interval_s / TICK_S))
        buckets: list[list[VirtualDevice]] = [[] for _ in range(n)]
        for d in self.devices:
            buckets[_bucket(d.id, n)].append(d)
        tick = s.interval_s / n
        start = loop.time()
        for k in range(1 << 62):
            await asyncio.sleep(max(0.0, start + k * tick - loop.time()))
            now, wall = loop.time(), utc_now()
            for d in buckets[k % n]:
                self._turn(d, now, wall)

    def _turn(self, device: VirtualDevice, now: float, wall: datetime) -> None:
        s = self.settings
        if not device.started or device.away:
            return
        topic = telemetry_topic(device.id, s.topic_prefix)
        self._send(device, topic, device.telemetry(wall, s.interval_s), 0)
        self.stats.telemetry += 1
        if s.poll_interval_s > 0 and now >= device.next_poll:
            device.next_poll = now + s.poll_interval_s * (
                1 + _POLL_JITTER * (2 * self.rng.random() - 1)
            )
            self.updates.wake(device)
        if device.online and self.drop_chance and self.rng.random() < self.drop_chance:
            self.outage(device, self.rng.expovariate(1.0 / s.offline_s))

    def outage(self, device: VirtualDevice, seconds: float) -> None:
        """Take ``device`` off the broker now, as a lost link would (its Will is
        published), and bring it back after ``seconds``. Call on the fleet's loop."""
        if device.away or not device.started:
            return
        device.away = True
        self.stats.drops += 1
        self.links.drop(device)
        asyncio.get_running_loop().call_later(seconds, self._outage_over, device)

    def _outage_over(self, device: VirtualDevice) -> None:
        if self._stop.is_set():
            return
        device.away = False
        self.links.back(device)

    # --- reporting ----------------------------------------------------------------------

    async def _summaries(self) -> None:
        period = self.settings.summary_interval_s
        previous = self.stats.snapshot()
        while True:
            await asyncio.sleep(period)
            self._sync_http()
            self._print(self.stats.line(previous, period))
            previous = self.stats.snapshot()
            self._write_stats()

    def _sync_http(self) -> None:
        self.stats.http_requests = self.fetcher.requests
        self.stats.http_errors = self.fetcher.errors

    def _write_stats(self) -> None:
        path = self.settings.stats_file
        if path is not None:
            try:
                self.stats.write(path)
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)

    def _print(self, line: str) -> None:
        if self.out is not None:
            with contextlib.suppress(OSError, ValueError):
                print(line, file=self.out, flush=True)

    def _report(self) -> None:
        self._sync_http()
        self._write_stats()
        self._print("stopped: " + self.stats.line())


def outage_chance(offline_rate: float, interval_s: float, offline_s: float) -> float:
    """The chance that an online device starts an outage at its telemetry turn, so that
    ``offline_rate`` of the fleet is offline on average with outages of ``offline_s``.

    Online for a mean ``interval_s / p`` then offline for ``offline_s``: the offline
    share is ``x / (1 + x)`` with ``x = p * offline_s / interval_s``.
    """
    return min(1.0, offline_rate / (1.0 - offline_rate) * interval_s / offline_s)
