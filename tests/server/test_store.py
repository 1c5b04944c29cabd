"""The store on real SQLite and real PostgreSQL: migrations, inventory queries, tokens,
releases, applying device reports, time series and retention; the artifact store."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select

from fleet_server.artifacts import LocalArtifactStore
from fleet_server.domain import ArtifactKind, DeviceState, ReportedModel, Role, utcnow
from fleet_server.errors import (
    AuthError,
    Conflict,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    TokenExpired,
    ValidationError,
)
from fleet_server.store import audit, devices, migrate, releases, timeseries, tokens
from fleet_server.store.device_reports import (
    ModelSample,
    StatusReport,
    TelemetryReport,
    UpdateReport,
    apply_batch,
)
from fleet_server.store.engine import Database
from fleet_server.store.models import (
    Base,
    DeviceRow,
    ModelPointRow,
    TelemetryPointRow,
    UpdateEventRow,
)

STALE = timedelta(seconds=30)
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def status(device: str, ts: datetime, state: str = "online", **kw: object) -> StatusReport:
    models = kw.pop("models", (ReportedModel("face", "1.3.0", "ready", "onnx", "CPU"),))
    return StatusReport(
        device_id=device,
        received_at=kw.pop("received_at", ts),  # type: ignore[arg-type]
        ts=ts,
        state=state,
        agent_version="0.3.0",
        profile="rpi5",
        models=models,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def telemetry(
    device: str, ts: int, requests: int, errors: int = 0, p99: float = 5.0
) -> TelemetryReport:
    return TelemetryReport(
        device_id=device,
        received_at=datetime.fromtimestamp(ts, UTC),
        ts=ts,
        seq=ts,
        system={"cpu_percent": 10.0 + ts % 7, "mem_used_bytes": 1e6, "mem_total_bytes": 4e6},
        models=(ModelSample("face", requests, errors, 1.0, 2.0, p99, 0.0),),
    )


# --- migrations ------------------------------------------------------------------------


def test_migrations_match_the_models_and_are_idempotent(db: Database) -> None:
    assert migrate.current(db) == migrate.head()
    with db.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == []
    before, after = migrate.upgrade(db)  # nothing left to apply
    assert before == after == migrate.head()


def test_a_fresh_sqlite_database_is_migrated_from_empty(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'new' / 'fleet.db'}")
    assert migrate.current(db) is None
    assert migrate.upgrade(db) == (None, migrate.head())
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    db.dispose()


def test_an_unreachable_database_is_store_unavailable() -> None:
    db = Database("postgresql+psycopg://postgres@127.0.0.1:1/none")
    with pytest.raises(StoreUnavailable) as err:
        db.ping()
    assert err.value.code == "db_unavailable" and err.value.status == 503


# --- inventory ---------------------------------------------------------------------------


def _fleet(db: Database) -> None:
    """10 devices: d00..d09; even ones at site=berlin; d00-d02 run face 1.3.0, d03 face 1.2.0."""
    now = utcnow()
    reports = []
    for i in range(10):
        models: tuple[ReportedModel, ...] = ()
        if i < 3:
            models = (ReportedModel("face", "1.3.0", "ready", "onnx", "CPU"),)
        elif i == 3:
            models = (ReportedModel("face", "1.2.0", "ready", "onnx", "CPU"),)
        state = "offline" if i == 9 else "online"
        seen = now - timedelta(minutes=5) if i == 8 else now  # d08 has gone quiet
        reports.append(status(f"d{i:02d}", seen, state, models=models, received_at=seen))
    with db.write() as s:  # one batch shares one arrival time: d08's comes on its own
        apply_batch(s, [r for r in reports if r.device_id != "d08"])
    with db.write() as s:
        apply_batch(s, [r for r in reports if r.device_id == "d08"])
    with db.write() as s:
        for i in range(0, 10, 2):
            devices.set_tags(
                s, f"d{i:02d}", put={"site": "berlin"}, remove=[], actor="t", stale_after=STALE
            )
        devices.set_tags(
            s, "d01", put={"site": "paris", "tier": "gold"}, remove=[], actor="t", stale_after=STALE
        )


def _ids(db: Database, flt: devices.DeviceFilter, limit: int = 100) -> list[str]:
    with db.read() as s:
        return [d.id for d in devices.list_devices(s, flt, stale_after=STALE, limit=limit).items]


def test_device_filters(db: Database) -> None:
    _fleet(db)
    f = devices.DeviceFilter
    assert _ids(db, f(tags={"site": "berlin"})) == ["d00", "d02", "d04", "d06", "d08"]
    assert _ids(db, f(tags={"site": "paris", "tier": "gold"})) == ["d01"]
    assert _ids(db, f(tags={"tier": None})) == ["d01"]
    assert _ids(db, f(model="face")) == ["d00", "d01", "d02", "d03"]
    assert _ids(db, f(model="face", model_version="1.2.0")) == ["d03"]
    assert _ids(db, f(state=DeviceState.STALE)) == ["d08"]
    assert _ids(db, f(state=DeviceState.OFFLINE)) == ["d09"]
    assert _ids(db, f(state=DeviceState.ONLINE, tags={"site": "berlin"}, model="face")) == [
        "d00",
        "d02",
    ]
    assert _ids(db, f(profile="nope")) == []
    assert len(_ids(db, f(profile="rpi5"))) == 10


def test_keyset_pages_cover_every_device_once(db: Database) -> None:
    _fleet(db)
    seen: list[str] = []
    cursor = None
    with db.read() as s:
        while True:
            page = devices.list_devices(
                s, devices.DeviceFilter(), stale_after=STALE, limit=3, cursor=cursor
            )
            seen += [d.id for d in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    assert seen == [f"d{i:02d}" for i in range(10)]
    with db.read() as s, pytest.raises(ValidationError):
        devices.list_devices(s, devices.DeviceFilter(), stale_after=STALE, cursor="%%%")


def test_tags_and_revocation_are_audited(db: Database) -> None:
    _fleet(db)
    with db.write() as s:
        d = devices.set_tags(
            s, "d01", put={"tier": "silver"}, remove=["site"], actor="alice", stale_after=STALE
        )
    assert d.tags == {"tier": "silver"}
    with db.write() as s:
        d = devices.revoke_device(s, "d01", actor="bob", stale_after=STALE)
    assert d.revoked_at is not None
    with db.read() as s:
        entries = audit.list_entries(s, target_id="d01").items
        with pytest.raises(NotFound):
            devices.get_device(s, "nope", stale_after=STALE)
    assert [(e.actor, e.action) for e in entries][:2] == [
        ("bob", "device.revoke"),
        ("alice", "device.tag"),
    ]
    assert entries[1].before == {"tags": {"site": "paris", "tier": "gold"}}
    assert entries[1].after == {"tags": {"tier": "silver"}}
    assert entries[0].before is not None and entries[0].before["revoked_at"] is None
    assert _ids(db, devices.DeviceFilter(revoked=True)) == ["d01"]


# --- tokens ------------------------------------------------------------------------------


def test_api_tokens_are_found_by_hash_and_revoked(db: Database) -> None:
    with db.write() as s:
        t = tokens.create_api_token(
            s, name="ops", role=Role.ADMIN, token_hash="a" * 64, prefix="eft_x", actor="test"
        )
    with db.read() as s:
        found = tokens.find_api_token(s, "a" * 64)
        assert found is not None and found[0].role is Role.ADMIN and found[1] == "a" * 64
        assert tokens.find_api_token(s, "b" * 64) is None
    with db.write() as s:
        revoked = tokens.revoke_api_token(s, t.id, actor="test")
        with pytest.raises(NotFound):
            tokens.revoke_api_token(s, 999, actor="test")
    assert revoked.revoked_at is not None
    with db.read() as s:
        assert tokens.list_api_tokens(s) == []
        assert len(tokens.list_api_tokens(s, include_revoked=True)) == 1


def test_enrolment_tokens_are_single_use_and_expire(db: Database) -> None:
    with db.write() as s:
        tokens.create_enrolment_token(
            s,
            token_hash="1" * 64,
            prefix="efe_1",
            tags={"a": "b"},
            expires_at=utcnow() + timedelta(hours=1),
            actor="t",
        )
        tokens.create_enrolment_token(
            s,
            token_hash="2" * 64,
            prefix="efe_2",
            tags={},
            expires_at=utcnow() - timedelta(seconds=1),
            actor="t",
        )
    with db.write() as s:
        used = tokens.redeem_enrolment_token(s, "1" * 64, device_id="cam-1")
    assert used.used_by == "cam-1" and used.tags == {"a": "b"}
    with db.write() as s, pytest.raises(Conflict) as err:
        tokens.redeem_enrolment_token(s, "1" * 64, device_id="cam-2")
    assert err.value.code == "token_used"
    with db.write() as s, pytest.raises(TokenExpired):
        tokens.redeem_enrolment_token(s, "2" * 64, device_id="cam-3")
    with db.write() as s, pytest.raises(AuthError):
        tokens.redeem_enrolment_token(s, "3" * 64, device_id="cam-4")


# --- releases ----------------------------------------------------------------------------


def _variant(s: object, version: str, variant: str = "default") -> None:
    releases.add_variant(
        s,  # type: ignore[arg-type]
        name="face",
        version=version,
        variant=variant,
        kind=ArtifactKind.BUNDLE,
        format="onnx",
        sha256=version[0] * 64,
        size=10,
        filename="face.tgz",
        manifest={"name": "face"},
        actor="t",
    )


def test_releases_are_immutable_and_listed_newest_first(db: Database) -> None:
    with db.write() as s:
        _variant(s, "1.0.0")
        _variant(s, "1.0.0", "int8")
        _variant(s, "2.0.0")
    with db.write() as s, pytest.raises(Conflict) as err:
        _variant(s, "1.0.0", "int8")
    assert err.value.code == "release_exists"
    with db.read() as s:
        first = releases.list_releases(s, limit=1)
        rest = releases.list_releases(s, limit=5, cursor=first.next_cursor)
        one = releases.get_release(s, "face", "1.0.0")
        assert releases.artifact_referenced(s, "2" * 64)
        assert not releases.artifact_referenced(s, "9" * 64)
        with pytest.raises(NotFound):
            releases.get_release(s, "face", "9.9.9")
    assert [r.version for r in first.items + rest.items] == ["2.0.0", "1.0.0"]
    assert rest.next_cursor is None
    assert [v.variant for v in one.variants] == ["default", "int8"]


# --- device reports ----------------------------------------------------------------------


def test_status_reports_update_the_inventory_in_order(db: Database) -> None:
    with db.write() as s:
        apply_batch(s, [status("cam", T0), status("cam", T0 + timedelta(seconds=5), "degraded")])
    with db.write() as s:  # a retained replay older than what is stored is ignored
        r = apply_batch(s, [status("cam", T0 - timedelta(seconds=1), models=(), retained=True)])
    assert r.stale_statuses == 1
    with db.write() as s:  # the Last Will is older (composed at connect) yet applies; it
        # has no models, so the reported ones stay
        r = apply_batch(
            s,
            [
                status(
                    "cam",
                    T0 - timedelta(seconds=9),
                    "offline",
                    models=None,
                    received_at=T0 + timedelta(seconds=9),
                )
            ],
        )
    assert r.statuses == 1
    with db.read() as s:
        d = devices.get_device(s, "cam", stale_after=STALE)
    assert d.state is DeviceState.OFFLINE and d.reported_state == "offline"
    assert d.models == (ReportedModel("face", "1.3.0", "ready", "onnx", "CPU"),)
    assert d.agent_version == "0.3.0" and d.profile == "rpi5"
    assert d.last_seen == T0 + timedelta(seconds=9)


def test_unknown_and_revoked_devices(db: Database) -> None:
    with db.write() as s:
        r = apply_batch(s, [telemetry("new", 100, 1)], auto_register=False)
    assert r.dropped_unknown == 1 and r.telemetry == 0
    with db.write() as s:
        r = apply_batch(s, [telemetry("new", 100, 1)])
    assert r.registered == 1 and r.telemetry == 1
    with db.write() as s:
        devices.revoke_device(s, "new", actor="t", stale_after=STALE)
    with db.write() as s:
        r = apply_batch(s, [telemetry("new", 110, 2)])
    assert r.dropped_revoked == 1 and r.telemetry == 0
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(TelemetryPointRow)) == 1


def test_a_retained_status_counts_as_seen_at_its_own_time(db: Database) -> None:
    old = T0 - timedelta(hours=2)
    with db.write() as s:
        apply_batch(s, [status("cam", old, retained=True, received_at=T0)])
    with db.read() as s:
        d = devices.get_device(s, "cam", stale_after=STALE, now=T0)
    assert d.last_seen == old and d.state is DeviceState.STALE


def test_update_events_are_stored(db: Database) -> None:
    ev = UpdateReport(
        device_id="cam",
        received_at=T0,
        ts=T0,
        model="face",
        state="failed",
        rollout_id="r1",
        from_version="1.2.0",
        to_version="1.3.0",
        reason={"code": "golden_mismatch", "message": "off"},
    )
    with db.write() as s:
        assert apply_batch(s, [ev]).update_events == 1
    with db.read() as s:
        row = s.scalars(select(UpdateEventRow)).one()
    assert (row.device_id, row.rollout_id, row.state) == ("cam", "r1", "failed")
    assert row.reason == {"code": "golden_mismatch", "message": "off"}


# --- time series and retention ---------------------------------------------------------


def test_model_series_sums_counter_increases_across_devices_and_restarts(db: Database) -> None:
    base = 1_800_000_000 // 60 * 60
    batch = [telemetry("a", base + i * 10, requests=10 * (i + 1)) for i in range(12)]
    # b restarts at i=6: its counter drops from 60 to 5
    batch += [
        telemetry(
            "b",
            base + i * 10,
            requests=(10 * (i + 1) if i < 6 else i - 1),
            errors=i // 6,
            p99=float(i),
        )
        for i in range(12)
    ]
    with db.write() as s:
        apply_batch(s, batch)
    with db.read() as s:
        pts = timeseries.model_series(s, "face", since=base, until=base + 120, step=60)
        only_a = timeseries.model_series(
            s, "face", since=base, until=base + 120, step=60, device_id="a"
        )
        sys_pts = timeseries.device_series(s, "a", since=base, until=base + 120, step=60)
    # a: +10 per point, the first point of the window has no base -> 50 then 60
    assert [p.requests for p in only_a] == [50, 60]
    # b: 50 before the restart, then 5 (counted from 0 after the restart) + 1+1+1+1+1
    assert [p.requests for p in pts] == [100, 60 + 5 + 5]
    assert [p.errors for p in pts] == [0, 1]
    assert [p.p99_ms for p in pts] == [5.0, 11.0]
    assert [p.devices for p in pts] == [2, 2]
    assert [p.samples for p in sys_pts] == [6, 6]
    assert sys_pts[0].cpu_percent == pytest.approx(
        sum(10.0 + (base + i * 10) % 7 for i in range(6)) / 6
    )


def test_downsampling_keeps_totals_and_shrinks_the_tables(db: Database) -> None:
    now = 1_900_000_000
    start = (now - 3 * 86400) // 300 * 300  # three days ago, on a 5-minute boundary
    batch = [telemetry("a", start + i * 10, requests=i + 1) for i in range(180)]  # 30 minutes
    with db.write() as s:
        apply_batch(s, batch)
    with db.read() as s:
        before = timeseries.model_series(s, "face", since=start, until=start + 1800, step=300)
    with db.write() as s:
        r = timeseries.downsample(
            s,
            now=now,
            raw_retention=timedelta(days=1),
            minute_retention=timedelta(days=2),
            five_minute_retention=timedelta(days=30),
        )
    assert r.deleted > 0 and not r.skipped
    with db.read() as s:
        rows = s.execute(
            select(ModelPointRow.resolution, func.count()).group_by(ModelPointRow.resolution)
        ).all()
        after = timeseries.model_series(s, "face", since=start, until=start + 1800, step=300)
        sys_rows = s.scalar(select(func.count()).select_from(TelemetryPointRow))
    assert dict(rows) == {300: 6} and sys_rows == 6
    # the counters' increases survive (the first bucket has no earlier base either way)
    assert sum(p.requests for p in after[1:]) == sum(p.requests for p in before[1:])
    with db.write() as s:
        timeseries.downsample(
            s,
            now=now + 40 * 86400,
            raw_retention=timedelta(days=1),
            minute_retention=timedelta(days=2),
            five_minute_retention=timedelta(days=30),
        )
        assert s.scalar(select(func.count()).select_from(ModelPointRow)) == 0
        assert s.scalar(select(func.count()).select_from(DeviceRow)) == 1


def test_the_retention_task_runs_on_both_databases(db: Database, tmp_path: Path) -> None:
    from fleet_server.config import load_server_settings
    from fleet_server.server import run_retention

    settings = load_server_settings(None, {"data_dir": tmp_path, "database_url": db.url})
    with db.write() as s:
        apply_batch(s, [telemetry("a", 1_000_000_000, requests=1)])  # 2001: long expired
    done = run_retention(db, settings)
    assert done["skipped"] is False and done["deleted"] >= 2
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(TelemetryPointRow)) == 0


# --- artifacts ---------------------------------------------------------------------------


def test_local_artifact_store(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "a")
    data = bytes(range(256)) * 4096  # 1 MiB, several chunks
    stored = store.put(io.BytesIO(data))
    import hashlib

    assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size == len(data)
    assert store.exists(stored.sha256) and store.size(stored.sha256) == len(data)
    assert store.put(io.BytesIO(data)) == stored  # idempotent
    reader = store.open_range(stored.sha256, 1000, 1010)
    assert reader.read() == data[1000:1010]
    reader.close()
    with pytest.raises(PayloadTooLarge):
        store.put(io.BytesIO(b"x" * 2048), max_bytes=1024)
    assert list((tmp_path / "a" / "tmp").iterdir()) == []  # nothing half-written is left
    assert store.delete(stored.sha256) and not store.exists(stored.sha256)
    assert not store.delete(stored.sha256)
    with pytest.raises(NotFound):
        store.open_range("../../etc/passwd")
    assert not store.exists("not-a-digest")
