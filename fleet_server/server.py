"""Wiring: build the services from the settings, and run the background work.

``build_services`` creates the database handle, the artifact store, the validator, the
enrolment service (with the CA when ``edge-fleet ca init`` made one) and the release
service (with the TUF publisher when ``edge-fleet keys init`` made the repositories).
``Background`` runs the ingest (when ``mqtt.url`` is set), the periodic retention and
the signing upkeep, and is what the app's lifespan starts and stops.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text

from fleet_server.api import Services, create_app
from fleet_server.artifacts import LocalArtifactStore
from fleet_server.config import ServerSettings
from fleet_server.dashboard import mount_dashboard
from fleet_server.domain import utcnow
from fleet_server.enrolment import EnrolmentService
from fleet_server.errors import FleetError
from fleet_server.ingest import IngestService
from fleet_server.ingest_mqtt import MqttIngest
from fleet_server.integrations import (
    TufPublisher,
    load_ca,
    load_repositories,
    load_revocations,
)
from fleet_server.releases import ReleaseService
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.rollouts.hints import MqttHintPublisher
from fleet_server.store import migrate
from fleet_server.store.engine import Database
from fleet_server.store.timeseries import downsample
from fleet_server.validation import Validator
from fleet_server.workers import LOG_LEVEL_ENV, BackgroundLease, LeasedRunner, settings_from_env

log = logging.getLogger("fleet_server")


def build_services(settings: ServerSettings, *, db: Database | None = None) -> Services:
    """Everything the API needs, from the settings (nothing is started).

    Raises:
        StoreError: the database URL is unusable.
        ArtifactError: the artifact folder cannot be created.
        ConfigError: the CA or signing keys are present but unusable.
    """
    db = db or Database(settings.resolved_database_url())
    artifacts = LocalArtifactStore(settings.resolved_artifacts_dir())
    validator = Validator(
        isolation=settings.validation.isolation, timeout_s=settings.validation.timeout_s
    )
    t = settings.telemetry
    stale_after = timedelta(seconds=t.interval_s * t.stale_after_intervals)
    repositories = load_repositories(settings)
    ca = load_ca(settings)
    enrol = settings.enrolment
    enrolment = EnrolmentService(
        db,
        ca=ca,
        stale_after=stale_after,
        broker_url=enrol.broker_url or settings.mqtt.url,
        server_url=enrol.public_url,
        trust_root=repositories.image_root if repositories else None,
        director_root=repositories.director_root if repositories else None,
        max_ttl=timedelta(seconds=enrol.max_token_ttl_s),
        reserved_ids=enrol.reserved_ids,
        reserved_prefixes=enrol.reserved_prefixes,
    )
    publisher = TufPublisher(repositories) if repositories else None
    releases = ReleaseService(db, artifacts, validator, publisher=publisher)
    ingest = None
    if settings.mqtt.url is not None:
        ingest = IngestService(db, settings.ingest, topic_prefix=settings.mqtt.topic_prefix)
    return Services(
        settings=settings,
        db=db,
        artifacts=artifacts,
        releases=releases,
        enrolment=enrolment,
        ingest=ingest,
        repositories=repositories,
        revocations=load_revocations(settings, ca),
    )


def run_retention(db: Database, settings: ServerSettings) -> dict[str, Any]:
    """Apply the time-series retention once.

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    t = settings.telemetry
    with db.write() as session:
        result = downsample(
            session,
            now=int(utcnow().timestamp()),
            raw_retention=timedelta(hours=t.raw_retention_h),
            minute_retention=timedelta(hours=t.minute_retention_h),
            five_minute_retention=timedelta(hours=t.five_minute_retention_h),
        )
        if db.dialect == "sqlite":  # keep the planner's statistics fresh (PostgreSQL:
            session.execute(text("PRAGMA optimize"))  # autovacuum does it)
    return result.__dict__


class Background:
    """The background work of one replica: the ingest writer and MQTT client, the
    time-series retention, and the signing upkeep (image metadata re-signed at half-life,
    the CRL re-signed and copied for the broker)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.mqtt: MqttIngest | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the ingest (if configured) and the timers."""
        svc = self.services
        if svc.ingest is not None:
            svc.ingest.start()
            self.mqtt = MqttIngest(svc.settings.mqtt, svc.ingest)
            self.mqtt.start()
        self._stop.clear()
        s = svc.settings
        jobs: list[tuple[str, float, Callable[[], object]]] = [
            ("retention", s.telemetry.maintenance_interval_s, self._retain)
        ]
        if svc.repositories is not None:
            jobs.append(("tuf-refresh", s.tuf.refresh_interval_s, self._refresh_metadata))
        if svc.revocations is not None:
            jobs.append(("crl", s.ca.crl_refresh_s, svc.revocations.publish))
        engine = self._rollout_engine()
        jobs.append(("rollouts", engine.settings.interval_s, engine.catch_up))
        for name, interval, job in jobs:
            thread = threading.Thread(
                target=self._every, args=(name, interval, job), name=f"fleet-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _every(self, name: str, interval: float, job: Callable[[], object]) -> None:
        while not self._stop.wait(interval):
            try:
                done = job()
                log.debug("%s: %s", name, done)
            except FleetError as exc:
                log.warning("%s skipped: %s", name, exc)

    def _rollout_engine(self) -> RolloutEngine:
        """The rollout reconciler; its ``desired`` hints go out on the ingest's MQTT
        connection (without one they wait in the database's outbox)."""
        prefix = self.services.settings.mqtt.topic_prefix
        publisher = MqttHintPublisher(self.mqtt, prefix) if self.mqtt is not None else None
        return RolloutEngine(
            self.services.db, settings=self.services.settings.rollouts, publisher=publisher
        )

    def _retain(self) -> dict[str, Any]:
        return run_retention(self.services.db, self.services.settings)

    def _refresh_metadata(self) -> object:
        repositories = self.services.repositories
        assert repositories is not None
        result = repositories.refresh()
        if result.resigned:
            log.info("image metadata re-signed: %s", ", ".join(result.resigned))
        left = result.root_expires - utcnow()
        if left < timedelta(days=30):
            log.warning(
                "the TUF roots expire in %d days: renew them with the offline keys", left.days
            )
        return result

    def stop(self) -> None:
        """Stop the MQTT client first, then write what the ingest queued."""
        self._stop.set()
        if self.mqtt is not None:
            self.mqtt.stop()
        if self.services.ingest is not None:
            self.services.ingest.stop()
        self.services.releases.validator.close()


def prepare(services: Services) -> None:
    """What a server does once before serving: apply the migrations and publish the CRL
    (a broker started after the server finds a fresh one).

    Raises:
        StoreUnavailable: the database cannot be reached to migrate it.
        ConfigError: the CRL cannot be written to ``ca.crl_file``.
    """
    before, after = migrate.upgrade(services.db)
    if before != after:
        log.info("database migrated from %s to %s", before or "empty", after)
    if services.revocations is not None:
        services.revocations.publish()


def build_app(settings: ServerSettings, *, apply_migrations: bool = True) -> FastAPI:
    """The full server app: migrations applied and the CRL published (unless
    ``apply_migrations`` is False: ``serve --workers`` did both in the parent), background
    work tied to the lifespan in the one process that holds the data dir's background
    lease (:mod:`fleet_server.workers`).

    Raises:
        StoreUnavailable: the database cannot be reached to migrate it.
        StoreError, ArtifactError, ConfigError: see :func:`build_services`; ConfigError
            also when the CRL cannot be written to ``ca.crl_file``.
    """
    services = build_services(settings)
    if apply_migrations:
        prepare(services)
    background = Background(services)
    runner = LeasedRunner(
        BackgroundLease(settings.data_dir / "background.lock"), background.start, background.stop
    )
    services.background_here = lambda: runner.running

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            runner.stop()
            services.db.dispose()

    app = create_app(services, lifespan=lifespan)
    mount_dashboard(app)  # the dashboard's pages at /
    return app


def app_from_env() -> FastAPI:
    """The app of one ``serve --workers`` worker (uvicorn's factory).

    Raises:
        KeyError: not started by ``edge-fleet serve --workers``.
    """
    level = os.environ.get(LOG_LEVEL_ENV, "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return build_app(settings_from_env(), apply_migrations=False)
