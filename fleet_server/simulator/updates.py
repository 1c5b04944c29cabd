"""Over-the-air updates of the virtual devices, driven by the real director metadata.

A device checks when its ``desired`` hint arrives, when it starts and on its poll timer
(at most every ``min_check_interval_s``, like the agent). A check runs the agent's
:class:`~agent.updater.verify.UpdateVerifier` in a worker thread: both TUF repositories
are refreshed and verified, and the director's targets name what the device must run.
For each verified target it does not serve yet, the device downloads the artifact
(``/tuf/image/targets/{dir}/{sha256}.{file}``, the agent's URL), checks it against the
signed length and hashes, and reports the agent's transitions on ``update``:

    downloading → verifying → validating → activating → probation → committed

``failure_rate`` of the updates fail: half at ``validating`` (``failed``,
``golden_mismatch``), half during probation (``rolled_back``, ``error_rate_regression``).
A failed artifact is not tried again, as the agent remembers refusals. Steps take
``step_s`` (+/- 50 %) and probation ``probation_s``; nothing is installed or run.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Literal, ParamSpec, TypeVar

from agent.errors import UpdateError
from agent.protocol.documents import UpdateState
from agent.updater.verify import UpdateVerifier, VerifiedTarget
from fleet_server.errors import FleetError
from fleet_server.simulator.device import VirtualDevice
from fleet_server.simulator.fetching import HttpFetcher, TrustRoots
from fleet_server.simulator.settings import SimulatorSettings
from fleet_server.simulator.stats import Stats

log = logging.getLogger("fleet_server.simulator.updates")

P = ParamSpec("P")
R = TypeVar("R")
FailurePoint = Literal["validating", "probation"] | None
#: device, event payload -> sent (QoS 1, on the device's update topic).
Emit = Callable[[VirtualDevice, bytes], None]


class Updates:
    """Checks and updates for every device of one simulator."""

    def __init__(
        self,
        settings: SimulatorSettings,
        state_dir: Path,
        fetcher: HttpFetcher,
        stats: Stats,
        *,
        emit: Emit,
        status_changed: Callable[[VirtualDevice], None],
        rng: random.Random,
    ) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.fetcher = fetcher
        self.stats = stats
        self._emit = emit
        self._status_changed = status_changed
        self._rng = rng
        self.roots: TrustRoots | None = None
        self._roots_lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(settings.http_concurrency, "sim-http")
        self._slots = asyncio.Semaphore(settings.http_concurrency)
        # Downloads have workers of their own: a device that verified its update does
        # not wait behind thousands of other devices' checks (real devices are independent).
        self._download_pool = ThreadPoolExecutor(settings.http_concurrency, "sim-download")
        self._download_slots = asyncio.Semaphore(settings.http_concurrency)
        self._wanted: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._last_check: dict[str, float] = {}
        self.stopping = False

    # --- waking -----------------------------------------------------------------------

    def wake(self, device: VirtualDevice) -> None:
        """Ask ``device`` to check for updates (a hint, the poll timer or its start)."""
        if self.stopping:
            return
        self._wanted.add(device.id)
        if device.id not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._run(device))
            self._tasks[device.id] = task
            task.add_done_callback(partial(self._done, device.id))

    def _done(self, device_id: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(device_id, None)

    async def _run(self, device: VirtualDevice) -> None:
        """Check while wanted, one check at a time, at most every ``min_check_interval_s``."""
        loop = asyncio.get_running_loop()
        while device.id in self._wanted and not self.stopping:
            last = self._last_check.get(device.id)
            if last is not None:
                wait = last + self.settings.min_check_interval_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            self._wanted.discard(device.id)
            self._last_check[device.id] = loop.time()
            try:
                await self.check(device)
            except Exception:  # a bug must not end the device's updater
                log.exception("%s: update check failed unexpectedly", device.id)

    async def _in_pool(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def _download(self, url: str) -> bytes:
        async with self._download_slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._download_pool, self.fetcher.download, url)

    # --- one check --------------------------------------------------------------------

    async def _trust_roots(self, device: VirtualDevice) -> TrustRoots:
        async with self._roots_lock:
            if self.roots is None:
                s = self.settings
                self.roots = await self._in_pool(
                    TrustRoots.first_use, self.fetcher, s.server_url, device.id
                )
            return self.roots

    def _verify(self, device: VirtualDevice, roots: TrustRoots) -> list[VerifiedTarget]:
        verifier = UpdateVerifier(
            self.settings.server_url,
            self.state_dir / device.id,
            roots.image,
            roots.director,
            fetcher=self.fetcher,
        )
        return verifier.verify_assignments(device.id, device.traits.profile)

    async def check(self, device: VirtualDevice) -> None:
        """Verify ``device``'s assignments and run each update they call for."""
        self.stats.checks += 1
        try:
            roots = await self._trust_roots(device)
            targets = await self._in_pool(self._verify, device, roots)
        except (UpdateError, FleetError) as exc:
            self.stats.check_errors[exc.code] += 1
            log.debug("%s: update check refused: %s", device.id, exc.message)
            return
        for target in targets:
            if self.stopping:
                return
            sha = target.hashes.get("sha256", "")
            name = target.director.name
            if sha in device.refused or device.serves(name, target.director.version, sha):
                continue
            await self.update(device, target)

    # --- one update -------------------------------------------------------------------

    def _failure_point(self) -> FailurePoint:
        if self._rng.random() >= self.settings.failure_rate:
            return None
        return "validating" if self._rng.random() < 0.5 else "probation"

    async def _step(self) -> None:
        mean = self.settings.step_s
        if mean > 0:
            await asyncio.sleep(mean * self._rng.uniform(0.5, 1.5))

    async def update(self, device: VirtualDevice, target: VerifiedTarget) -> None:
        """Take ``device`` through one update of ``target``, reporting every transition."""
        d = target.director
        sha = target.hashes.get("sha256", "")
        running = device.models.get(d.name)
        from_version = running.version if running is not None else None
        from_sha = running.sha256 if running is not None else None

        def event(state: UpdateState, reason: UpdateError | None = None) -> None:
            self.stats.events[state] += 1
            payload = device.update_event(
                d.name,
                state,
                rollout_id=d.rollout_id,
                from_version=from_version,
                to_version=d.version,
                reason=reason,
            )
            self._emit(device, payload)

        if running is None:
            device.refused.add(sha)
            event(
                "failed",
                UpdateError(f"no model {d.name!r} is configured here", code="unknown_model"),
            )
            return
        fail_at = self._failure_point()
        self.stats.updating += 1
        try:
            event("downloading")
            folder = target.path.rsplit("/", 1)[0]
            file = target.path.rsplit("/", 1)[1]
            url = f"{self.settings.server_url}/tuf/image/targets/{folder}/{sha}.{file}"
            try:
                data = await self._download(url)
                event("verifying")
                await self._step()
                target.verify(data)
            except UpdateError as exc:
                if exc.code != "download_failed":
                    device.refused.add(sha)
                event("failed", exc)
                return
            event("validating")
            await self._step()
            if fail_at == "validating":
                device.refused.add(sha)
                reason = f"{d.name} {d.version}: golden vector 1 of 1 differs (simulated)"
                event("failed", UpdateError(reason, code="golden_mismatch"))
                return
            event("activating")
            await self._step()
            device.install(d.name, d.version, sha)
            self._status_changed(device)
            event("probation")
            if self.settings.probation_s > 0:
                await asyncio.sleep(self.settings.probation_s)
            if fail_at == "probation":
                device.refused.add(sha)
                assert from_version is not None
                device.install(d.name, from_version, from_sha)
                self._status_changed(device)
                reason = f"{d.name} {d.version}: error rate up in probation (simulated)"
                event("rolled_back", UpdateError(reason, code="error_rate_regression"))
                return
            event("committed")
        finally:
            self.stats.updating -= 1

    async def close(self) -> None:
        """Stop waking devices, cancel checks and updates in flight, and stop the workers."""
        self.stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._download_pool.shutdown(wait=True, cancel_futures=True)
