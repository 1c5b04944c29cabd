"""The updater service: when to look for updates, and what to install.

One thread per agent. It wakes on the retained ``desired`` hint (untrusted: it only wakes
the thread, at most every ``min_check_interval_s``) or on the jittered poll timer, whichever
comes first. A check verifies both TUF repositories (:mod:`agent.updater.verify`); for each
verified target that is neither serving nor refused it runs one update through the machine
(:mod:`agent.updater.machine`, the steps in :mod:`agent.updater.steps`). At start-up it
first resumes, or rolls back, the update a previous process left.

Every transition is reported on ``{prefix}/{device}/update`` (QoS 1) through the agent's
outbox, so events survive a broker outage and a restart.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import agent
from agent.bundle import SemVer, sha256_file
from agent.errors import BadRequest, UpdateError
from agent.protocol import DesiredHint, UpdateEvent, decode_document, desired_topic, update_topic
from agent.protocol import utc_now as _now
from agent.telemetry.outbox import OutboxError
from agent.transport import Message
from agent.updater.config import UpdateConfig
from agent.updater.fetch import Downloader, HttpClient, TufFetcher
from agent.updater.machine import (
    REASON_STATES,
    State,
    Trigger,
    UpdateMachine,
    UpdateRecord,
    describe,
)
from agent.updater.steps import UpdateSteps
from agent.updater.store import ArtifactStore
from agent.updater.targets import parse_model_target
from agent.updater.verify import UpdateVerifier, VerifiedTarget

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("agent.updater")

_LIVE = frozenset({State.ACTIVATING, State.PROBATION})


class Updater:
    """Finds, verifies, installs and judges model updates for one running :class:`Agent`."""

    def __init__(
        self, agent_: Agent, config: UpdateConfig, *, verifier: UpdateVerifier | None = None
    ) -> None:
        """Raises UpdateError: unreadable trust roots or TLS files, or an unreadable state."""
        self.agent = agent_
        self.config = config
        root = agent_.config.state_dir / "updates"
        self.store = ArtifactStore(root)
        self.machine = UpdateMachine(root / "state.json", listener=self._report)
        client = HttpClient.from_config(config)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.downloader = Downloader(
            client,
            rate_limit=config.bandwidth_limit_bytes_per_s,
            max_attempts=config.max_attempts,
            backoff_s=config.retry_backoff_s,
            stop=self._stop,
        )
        self.verifier = verifier or UpdateVerifier(
            config.server_url,
            agent_.config.state_dir,
            _read_root(config.image_root_file),
            _read_root(config.director_root_file),
            fetcher=TufFetcher(client),
        )
        self.steps = UpdateSteps(
            agent_, config, self.machine, self.store, downloader=self.downloader, stop=self._stop
        )
        self._thread: threading.Thread | None = None
        self._source_sha: dict[str, str] = {}
        #: The outcome of the last check: ``{"ts", "targets"}`` or ``{"ts", "error"}``.
        self.last_check: dict[str, Any] = {}
        #: Checks completed since the start.
        self.checks = 0

    # --- lifetime ----------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to the ``desired`` hint and start the updater thread (idempotent)."""
        if self._thread is not None:
            return
        self.steps.begin_epochs()
        topic = desired_topic(self.agent.device_id, self.agent.prefix)
        self.agent.transport.subscribe(topic, 1, self._on_desired)
        self._thread = threading.Thread(target=self._main, name="updater", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; an update in progress stays persisted and resumes at the next start.

        A stop during probation means a rollback at the next start (never committed).
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def check_now(self) -> None:
        """Wake the thread for a check (as a ``desired`` hint does)."""
        self._wake.set()

    def describe(self) -> dict[str, Any]:
        """The persisted state and the last check, for diagnostics."""
        return {"state": describe(self.machine.data), "last_check": dict(self.last_check)}

    def _on_desired(self, message: Message) -> None:
        if not message.payload:
            return  # a cleared retained hint
        try:
            hint = decode_document(DesiredHint, message.payload)
        except BadRequest as exc:
            log.warning("ignoring a malformed desired hint: %s", exc.message)
            return
        log.info("desired hint (revision %d): checking for updates", hint.revision)
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------

    def _main(self) -> None:
        settled = getattr(self.agent, "_models_settled", None)
        while settled is not None and not settled.wait(0.2):
            if self._stop.is_set():
                return
        self._guarded(self._recover)
        next_poll, last = time.monotonic(), -float("inf")
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_poll or (
                self._wake.is_set() and now >= last + self.config.min_check_interval_s
            ):
                self._wake.clear()
                self._guarded(self._check)
                last = time.monotonic()
                spread = self.config.poll_jitter * (2 * random.random() - 1)
                next_poll = last + self.config.poll_interval_s * (1 + spread)
            elif self._wake.is_set():
                self._stop.wait(max(0.01, last + self.config.min_check_interval_s - now))
            else:
                self._wake.wait(max(0.01, next_poll - now))

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:
            log.exception("updater: unexpected error (the agent keeps serving)")

    def _recover(self) -> None:
        """Resume or roll back the update found at start-up."""
        record = self.machine.update
        if record is None:
            return
        live = record.state in _LIVE
        if record.resumes >= self.config.max_resumes:
            reason = UpdateError(
                f"the agent restarted {record.resumes + 1} times during this update",
                code="crash_loop",
            )
            self.machine.fire(Trigger.GIVE_UP, reason, refuse=record.state not in REASON_STATES)
        else:
            reason = UpdateError(
                f"the agent restarted during {record.state}; the new model was never committed",
                code="agent_restarted",
            )
            self.machine.fire(Trigger.RESUME, reason, refuse=live)
        self.steps.drive()

    def _check(self) -> None:
        try:
            self._check_targets()
        finally:
            self.checks += 1

    def _check_targets(self) -> None:
        self.steps.drive()  # an update a bug left half-way
        try:
            targets = self.verifier.verify_assignments(
                self.agent.device_id, self.agent.profile.name
            )
        except UpdateError as exc:
            log.warning("update check refused: %s", exc)
            self.last_check = {"ts": _now().isoformat(), "error": exc.to_dict()}
            return
        self.last_check = {"ts": _now().isoformat(), "targets": [t.path for t in targets]}
        for target in targets:
            if self._stop.is_set():
                return
            record = self._plan(target)
            if record is not None:
                self.machine.start(record)
                self.steps.drive()

    # --- planning ------------------------------------------------------------------------

    def _plan(self, target: VerifiedTarget) -> UpdateRecord | None:
        """The update ``target`` calls for, or None (serving already, or refused before)."""
        name = target.director.name
        sha = target.hashes.get("sha256", "")
        refusal = self.machine.data.refused.get(sha)
        if refusal is not None and refusal.agent_version == agent.__version__:
            return None
        slot = self.agent.slots.get(name)
        if slot is not None and self._serving_sha(name) == sha:
            return None
        parts = parse_model_target(target.path)
        assert parts is not None  # the verifier checked it
        model = slot.model if slot is not None else None
        record = UpdateRecord(
            state=State.IDLE,
            model=name,
            target_path=target.path,
            file=parts.file,
            length=target.length,
            hashes=target.hashes,
            format=target.image.format,
            rollout_id=target.director.rollout_id,
            from_version=model.version if model is not None else None,
            to_version=target.director.version,
            from_sha256=self._serving_sha(name) if slot is not None else None,
        )
        refusal_reason = self._refusal(target, slot is not None, sha)
        if refusal_reason is not None:
            self.machine.refuse(record, refusal_reason)
            return None
        return record

    @staticmethod
    def _refusal(target: VerifiedTarget, configured: bool, sha: str) -> UpdateError | None:
        """Why ``target`` cannot be installed at all on this agent, or None."""
        if not configured:
            name = target.director.name
            return UpdateError(f"no model {name!r} is configured here", code="unknown_model")
        if not sha:
            return UpdateError("the target has no sha256 hash", code="metadata_invalid")
        needs = target.image.min_agent_version
        if needs is not None and SemVer(agent.__version__) < SemVer(needs):
            return UpdateError(
                f"the model needs agent {needs} or newer, this is {agent.__version__}",
                code="incompatible_agent",
            )
        return None

    def _serving_sha(self, name: str) -> str | None:
        """The sha256 of the artifact ``name`` serves from (installed, or the config's file)."""
        installed = self.machine.data.installed.get(name)
        slot = self.agent.slots.get(name)
        model = slot.model if slot is not None else None
        if model is None:
            return installed.sha256 if installed is not None else None
        source = Path(model.source)
        if installed is not None and source == installed.path:
            return installed.sha256
        if source.parent.parent == self.store.store:
            return source.parent.name
        if source.is_file():
            if str(source) not in self._source_sha:
                self._source_sha[str(source)] = sha256_file(source)
            return self._source_sha[str(source)]
        return None

    def _report(self, record: UpdateRecord) -> None:
        """Queue the ``update`` event of ``record``'s state in the outbox (QoS 1)."""
        event = UpdateEvent(
            ts=_now(),
            rollout_id=record.rollout_id,
            model=record.model,
            from_version=record.from_version,
            to_version=record.to_version,
            state=record.state.value,  # type: ignore[arg-type]
            reason=record.reason if record.state in REASON_STATES else None,
        )
        topic = update_topic(self.agent.device_id, self.agent.prefix)
        try:
            self.agent.outbox.put(topic, event.to_json(), qos=1, retain=False)
        except OutboxError as exc:
            log.error("update event lost: %s", exc)


def _read_root(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UpdateError(
            f"cannot read the trust root {path}: {exc.strerror or exc}", code="trust_root_missing"
        ) from None


def attach_updater(agent_: Agent, config: UpdateConfig | None = None) -> Updater | None:
    """Create and start the updater of ``agent_``; None when updates are off or cannot start.

    ``config`` defaults to the agent config's ``updates`` section. Call it from
    :meth:`Agent.start` once the slots exist, and :meth:`Updater.stop` at shutdown. An
    updater that cannot start (unreadable trust roots, TLS files or state) is logged as an
    error and left out: the agent serves its current models regardless. Never raises.
    """
    config = config or getattr(agent_.config, "updates", None)
    if config is None:
        return None
    try:
        updater = Updater(agent_, config)
    except UpdateError as exc:
        log.error("updates are disabled: %s", exc)
        return None
    updater.start()
    return updater
