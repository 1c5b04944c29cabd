"""Wiring: build the services from the settings, and run the background work.

``build_services`` creates the database handle, the artifact store, the validator, the
enrolment service (with the CA when ``fleet_server.ca`` is set up) and the release
service (with the TUF publisher when ``fleet_server.tuf`` is set up). ``Background``
runs the ingest (when ``mqtt.url`` is set) and the periodic retention, and is what the
app's lifespan starts and stops.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text

from fleet_server.api import Services, create_app
from fleet_server.artifacts import LocalArtifactStore
from fleet_server.config import ServerSettings
from fleet_server.domain import utcnow
from fleet_server.enrolment import EnrolmentService
from fleet_server.errors import FleetError
from fleet_server.ingest import IngestService
from fleet_server.ingest_mqtt import MqttIngest
from fleet_server.integrations import load_ca, load_publisher
from fleet_server.releases import ReleaseService
from fleet_server.store import migrate
from fleet_server.store.engine import Database
from fleet_server.store.timeseries import downsample
from fleet_server.validation import Validator

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
    publisher, trust_root = load_publisher(settings)
    enrolment = EnrolmentService(
        db,
        ca=load_ca(settings),
        stale_after=stale_after,
        broker_url=settings.enrolment.broker_url or settings.mqtt.url,
        server_url=settings.enrolment.public_url,
        trust_root=trust_root,
        max_ttl=timedelta(seconds=settings.enrolment.max_token_ttl_s),
    )
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
    """The ingest writer, the MQTT client and the retention timer of one replica."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.mqtt: MqttIngest | None = None
        self._stop = threading.Event()
        self._retention: threading.Thread | None = None

    def start(self) -> None:
        """Start the ingest (if configured) and the retention timer."""
        svc = self.services
        if svc.ingest is not None:
            svc.ingest.start()
            self.mqtt = MqttIngest(svc.settings.mqtt, svc.ingest)
            self.mqtt.start()
        self._stop.clear()
        self._retention = threading.Thread(target=self._retain, name="fleet-retention", daemon=True)
        self._retention.start()

    def _retain(self) -> None:
        interval = self.services.settings.telemetry.maintenance_interval_s
        while not self._stop.wait(interval):
            try:
                done = run_retention(self.services.db, self.services.settings)
                log.info("retention: %s", done)
            except FleetError as exc:
                log.warning("retention skipped: %s", exc)

    def stop(self) -> None:
        """Stop the MQTT client first, then write what the ingest queued."""
        self._stop.set()
        if self.mqtt is not None:
            self.mqtt.stop()
        if self.services.ingest is not None:
            self.services.ingest.stop()
        self.services.releases.validator.close()


def build_app(settings: ServerSettings, *, apply_migrations: bool = True) -> FastAPI:
    """The full server app: migrations applied, background work tied to the lifespan.

    Raises:
        StoreUnavailable: the database cannot be reached to migrate it.
        StoreError, ArtifactError, ConfigError: see :func:`build_services`.
    """
    services = build_services(settings)
    if apply_migrations:
        before, after = migrate.upgrade(services.db)
        if before != after:
            log.info("database migrated from %s to %s", before or "empty", after)
    background = Background(services)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        background.start()
        try:
            yield
        finally:
            background.stop()
            services.db.dispose()

    return create_app(services, lifespan=lifespan)
