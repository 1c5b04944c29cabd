"""The rollout reconciler: ``tick()`` advances every rollout from its persisted state.

Modelled on hawkBit's rollout reconciler: no in-memory state survives a tick, so a
restarted server, or another replica, continues exactly where the last tick committed.

Each rollout's step (:class:`~fleet_server.rollouts.reconcile.Reconciler`) runs in its own
write transaction that first locks the rollout's row (PostgreSQL:
``FOR UPDATE SKIP LOCKED``: a rollout another replica is working on is skipped this tick;
SQLite: the write transaction's lock serialises replicas). The lock dies with its
transaction, so a crashed replica never blocks the others, and a step is all or nothing.
After the steps the tick publishes the ``desired`` hints the changes left in the outbox.

``edge-fleet serve`` calls ``tick()`` every ``interval_s`` in a background thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from fleet_server.config import EngineSettings
from fleet_server.domain import utcnow
from fleet_server.errors import FleetError, NotFound
from fleet_server.rollouts.gates import Verdict
from fleet_server.rollouts.hints import HintPublisher, publish_pending
from fleet_server.rollouts.reconcile import Reconciler
from fleet_server.store.engine import Database
from fleet_server.store.rollouts import lock_rollout, to_reconcile

log = logging.getLogger("fleet_server.rollouts")


@dataclass
class TickReport:
    """What one tick did."""

    rollouts: int = 0
    skipped: int = 0  # locked by another replica
    errors: int = 0
    assigned: int = 0
    reverted: int = 0
    hints: int = 0
    waves_started: list[tuple[int, int]] = field(default_factory=list)  # (rollout, wave)
    paused: list[tuple[int, Verdict]] = field(default_factory=list)
    ended: list[tuple[int, str]] = field(default_factory=list)
    #: A rollout has a full batch left, or a full batch of hints went out: tick again now.
    more: bool = False


class RolloutEngine:
    """Reconciles every rollout; safe to run on several replicas at once."""

    def __init__(
        self,
        db: Database,
        *,
        settings: EngineSettings | None = None,
        publisher: HintPublisher | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """``publisher``: where hints go (``None``: they wait in the outbox);
        ``clock``: the time source (tests move it forward)."""
        self.db = db
        self.settings = settings or EngineSettings()
        self.publisher = publisher
        self.clock = clock

    def tick(self) -> TickReport:
        """Advance every rollout one step, then publish pending hints.

        A rollout whose step fails (the database, a bug) is logged and retried at the
        next tick; the others still advance.

        Raises:
            StoreUnavailable: the database cannot be reached at all.
        """
        report = TickReport()
        with self.db.read() as session:
            ids = to_reconcile(session)
        for rollout_id in ids:
            try:
                self._step(rollout_id, report)
            except NotFound:
                report.skipped += 1
            except FleetError as exc:
                report.errors += 1
                log.warning("rollout %d: step failed: %s", rollout_id, exc)
            except Exception:  # a bug in one rollout's step must not stop the others
                report.errors += 1
                log.exception("rollout %d: step failed", rollout_id)
        if self.publisher is not None:
            try:
                report.hints = publish_pending(
                    self.db, self.publisher, limit=self.settings.hint_batch
                )
                report.more = report.more or report.hints >= self.settings.hint_batch
            except FleetError as exc:
                log.warning("desired hints not published: %s", exc)
        return report

    def catch_up(self, max_ticks: int = 20) -> list[TickReport]:
        """Tick, and tick again at once while a tick leaves work it could do now (a wave
        larger than ``batch_size``, a backlog of hints), at most ``max_ticks`` times.

        Raises:
            StoreUnavailable: the database cannot be reached at all.
        """
        reports = [self.tick()]
        while reports[-1].more and len(reports) < max_ticks:
            reports.append(self.tick())
        return reports

    def _step(self, rollout_id: int, report: TickReport) -> None:
        now = self.clock()
        with self.db.write() as session:
            row = lock_rollout(session, rollout_id, skip_locked=True)
            result = Reconciler(session, row, now, batch_size=self.settings.batch_size).run()
        report.rollouts += 1
        report.more = report.more or result.more
        report.assigned += result.assigned
        report.reverted += result.reverted
        report.waves_started += [(rollout_id, w) for w in result.waves_started]
        if result.paused is not None:
            report.paused.append((rollout_id, result.paused))
            log.warning("rollout %d paused: %s", rollout_id, result.paused.message)
        if result.ended is not None:
            report.ended.append((rollout_id, result.ended.value))
            log.info("rollout %d %s", rollout_id, result.ended.value)
