"""The HTTP API through a real ASGI client, on real databases, with the real CA and the
agent's real loader validating uploads."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from fleet_server.api import create_app
from fleet_server.ca import CertificateAuthority
from fleet_server.domain import ReportedModel, Role, utcnow
from fleet_server.server import build_services
from fleet_server.store import migrate
from fleet_server.store.device_reports import StatusReport, apply_batch
from fleet_server.store.engine import Database
from fleet_server.store.models import ApiTokenRow, EnrolmentTokenRow, ReleaseRow, VariantRow
from tests.server.conftest import BundleFactory, make_token, settings_for


@dataclass
class Api:
    client: TestClient
    db: Database
    data_dir: Path
    tokens: dict[Role, str]

    def h(self, role: Role = Role.ADMIN) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def get(self, path: str, role: Role = Role.VIEWER, **kw: Any) -> Any:
        return self.client.get(path, headers=self.h(role), **kw)


def _api(db: Database, tmp_path: Path, *, with_ca: bool = True, **settings: Any) -> Api:
    data_dir = tmp_path / "data"
    if with_ca:
        CertificateAuthority.init(data_dir / "ca")
    svc = build_services(settings_for(data_dir, db.url, **settings), db=db)
    tokens = {role: make_token(db, role) for role in Role}
    return Api(TestClient(create_app(svc)), db, data_dir, tokens)


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[Api]:
    """The app on SQLite and on PostgreSQL."""
    a = _api(db, tmp_path)
    yield a
    a.client.close()


@pytest.fixture
def lite(sqlite_db: Database, tmp_path: Path) -> Iterator[Api]:
    """The app on SQLite only (for the slower upload tests)."""
    a = _api(sqlite_db, tmp_path, max_upload_bytes=64 * 1024)
    yield a
    a.client.close()


def _err(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


# --- auth ----------------------------------------------------------------------------


def test_tokens_and_roles(api: Api) -> None:
    c = api.client
    assert _err(c.get("/api/v1/devices")) == (401, "unauthorized")
    assert _err(c.get("/api/v1/devices", headers={"Authorization": "Bearer eft_nope"})) == (
        401,
        "unauthorized",
    )
    assert _err(c.get("/api/v1/devices", headers={"Authorization": "Basic x"})) == (
        401,
        "unauthorized",
    )
    assert api.get("/api/v1/devices").status_code == 200
    assert _err(api.get("/api/v1/audit", Role.VIEWER)) == (403, "forbidden")
    assert api.get("/api/v1/audit", Role.OPERATOR).status_code == 200
    assert _err(api.get("/api/v1/tokens", Role.OPERATOR)) == (403, "forbidden")

    r = c.post("/api/v1/tokens", json={"name": "ci", "role": "operator"}, headers=api.h())
    assert r.status_code == 201
    created = r.json()
    new = {"Authorization": f"Bearer {created['token']}"}
    assert created["token"].startswith(created["prefix"]) and created["role"] == "operator"
    assert c.get("/api/v1/audit", headers=new).status_code == 200
    listed = api.get("/api/v1/tokens", Role.ADMIN).json()
    assert "ci" in [t["name"] for t in listed] and all("token" not in t for t in listed)
    assert c.delete(f"/api/v1/tokens/{created['id']}", headers=api.h()).status_code == 200
    assert _err(c.get("/api/v1/audit", headers=new)) == (401, "token_revoked")

    with api.db.write() as s:  # an expired token
        s.execute(
            update(ApiTokenRow)
            .where(ApiTokenRow.name == "viewer")
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert _err(api.get("/api/v1/devices")) == (401, "token_expired")

    actions = [e["action"] for e in api.get("/api/v1/audit", Role.ADMIN).json()["items"]]
    assert actions[:2] == ["token.revoke", "token.create"]


# --- devices ---------------------------------------------------------------------------


def _seed(db: Database, n: int) -> None:
    now = utcnow()
    reports = [
        StatusReport(
            device_id=f"cam-{i:03d}",
            received_at=now,
            ts=now,
            state="online",
            agent_version="0.3.0",
            profile="rpi5" if i % 2 else "jetson",
            models=(ReportedModel("face", "1.3.0" if i % 3 else "1.2.0", "ready", "onnx", "CPU"),),
        )
        for i in range(n)
    ]
    with db.write() as s:
        apply_batch(s, reports)


def test_device_list_filters_pages_and_tags(api: Api) -> None:
    _seed(api.db, 12)
    c = api.client
    r = c.patch(
        "/api/v1/devices/cam-001/tags",
        json={"set": {"site": "berlin"}},
        headers=api.h(Role.OPERATOR),
    )
    assert r.status_code == 200 and r.json()["tags"] == {"site": "berlin"}
    c.patch(
        "/api/v1/devices/cam-003/tags",
        json={"set": {"site": "berlin"}},
        headers=api.h(Role.OPERATOR),
    )
    assert _err(
        c.patch(
            "/api/v1/devices/cam-003/tags", json={"set": {"site": "x"}}, headers=api.h(Role.VIEWER)
        )
    ) == (403, "forbidden")

    page = api.get("/api/v1/devices", params={"tag": "site=berlin", "profile": "rpi5"}).json()
    assert [d["id"] for d in page["items"]] == ["cam-001", "cam-003"]
    page = api.get("/api/v1/devices", params={"model": "face", "model_version": "1.2.0"}).json()
    assert [d["id"] for d in page["items"]] == ["cam-000", "cam-003", "cam-006", "cam-009"]
    assert api.get("/api/v1/devices", params={"state": "online"}).json()["items"][0]["state"] == (
        "online"
    )

    ids, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 5}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/api/v1/devices", params=params).json()
        ids += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert ids == [f"cam-{i:03d}" for i in range(12)]

    one = api.get("/api/v1/devices/cam-001").json()
    assert one["models"][0]["name"] == "face" and one["agent_version"] == "0.3.0"
    assert _err(api.get("/api/v1/devices/nope")) == (404, "not_found")
    r = c.post("/api/v1/devices/cam-001/revoke", headers=api.h(Role.OPERATOR))
    assert r.json()["revoked_at"] is not None
    audit = api.get("/api/v1/audit", Role.OPERATOR, params={"target_id": "cam-001"}).json()
    assert [e["action"] for e in audit["items"]] == ["device.revoke", "device.tag"]


def test_request_errors_name_the_field(api: Api) -> None:
    r = api.get("/api/v1/devices", params={"limit": 0})
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith("query.limit:")
    r = api.get("/api/v1/devices", params={"state": "sleepy"})
    assert r.json()["error"]["fields"][0]["field"] == "query.state"
    assert _err(api.get("/api/v1/devices", params={"cursor": "!!"})) == (422, "bad_cursor")
    assert _err(api.get("/api/v1/devices", params={"tag": "=x"})) == (422, "bad_tag")
    r = api.client.post("/api/v1/tokens", json={"name": "x", "role": "god"}, headers=api.h())
    assert r.json()["error"]["message"].startswith("body.role:")


# --- enrolment -------------------------------------------------------------------------


def _csr(device_id: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_enrolment_is_single_use_and_signs_the_device(api: Api) -> None:
    c = api.client
    r = c.post(
        "/api/v1/enrolment-tokens",
        json={"tags": {"site": "berlin"}, "expires_in_s": 600},
        headers=api.h(Role.OPERATOR),
    )
    assert r.status_code == 201
    token = r.json()["token"]
    body = {"token": token, "csr_pem": _csr("cam-7"), "facts": {"cpu": "arm64", "ram_mb": 4096}}
    r = c.post("/api/v1/enroll", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    ca = x509.load_pem_x509_certificate(out["ca_certificate_pem"].encode())
    cert = x509.load_pem_x509_certificate(out["certificate_pem"].encode())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-7"
    assert out["device_id"] == "cam-7"
    device = api.get("/api/v1/devices/cam-7").json()
    assert device["tags"] == {"site": "berlin"} and device["facts"]["cpu"] == "arm64"
    assert device["cert_serial"] == format(cert.serial_number, "x")

    assert _err(c.post("/api/v1/enroll", json={**body, "csr_pem": _csr("cam-8")})) == (
        409,
        "token_used",
    )
    assert _err(c.post("/api/v1/enroll", json={**body, "token": "efe_unknown-token"})) == (
        401,
        "bad_enrolment_token",
    )
    short = c.post(
        "/api/v1/enrolment-tokens", json={"expires_in_s": 60}, headers=api.h(Role.OPERATOR)
    ).json()["token"]
    fresh = c.post("/api/v1/enrolment-tokens", json={}, headers=api.h(Role.OPERATOR)).json()
    assert _err(
        c.post("/api/v1/enroll", json={**body, "token": fresh["token"], "csr_pem": "junk"})
    ) == (422, "bad_csr")
    # a token survives a refused attempt (a bad CSR; a device id already enrolled)
    assert _err(c.post("/api/v1/enroll", json={**body, "token": fresh["token"]})) == (
        409,
        "device_exists",
    )
    r = c.post("/api/v1/enroll", json={**body, "token": fresh["token"], "csr_pem": _csr("cam-9")})
    assert r.status_code == 200
    with api.db.write() as s:  # let the short token expire
        s.execute(
            update(EnrolmentTokenRow)
            .where(EnrolmentTokenRow.prefix == short[:12])
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert _err(
        c.post("/api/v1/enroll", json={**body, "token": short, "csr_pem": _csr("cam-10")})
    ) == (
        401,
        "token_expired",
    )


def test_enrolment_without_a_ca_is_unavailable(sqlite_db: Database, tmp_path: Path) -> None:
    api = _api(sqlite_db, tmp_path, with_ca=False)
    token = api.client.post(
        "/api/v1/enrolment-tokens", json={}, headers=api.h(Role.OPERATOR)
    ).json()["token"]
    r = api.client.post("/api/v1/enroll", json={"token": token, "csr_pem": _csr("cam-1")})
    assert _err(r) == (503, "ca_unavailable")


# --- releases --------------------------------------------------------------------------


def _push(api: Api, path: Path, role: Role = Role.OPERATOR, **fields: str) -> Any:
    with path.open("rb") as fh:
        return api.client.post(
            "/api/v1/models", files={"file": (path.name, fh)}, data=fields, headers=api.h(role)
        )


def _stored(api: Api) -> tuple[int, int, list[Path]]:
    with api.db.read() as s:
        n_rel = s.scalar(select(func.count()).select_from(ReleaseRow)) or 0
        n_var = s.scalar(select(func.count()).select_from(VariantRow)) or 0
    root = api.data_dir / "artifacts"
    blobs = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "tmp"]
    return n_rel, n_var, blobs


def test_a_valid_bundle_is_published(lite: Api, bundle: BundleFactory) -> None:
    r = _push(lite, bundle("affine", "1.3.0"), variant="cpu")
    assert r.status_code == 201, r.text
    rel = r.json()
    assert (rel["name"], rel["version"]) == ("affine", "1.3.0")
    v = rel["variants"][0]
    assert (v["variant"], v["kind"], v["format"]) == ("cpu", "bundle", "onnx")
    n_rel, n_var, blobs = _stored(lite)
    assert (n_rel, n_var) == (1, 1) and [b.name for b in blobs] == [v["sha256"][2:]]
    assert v["manifest"]["golden"][0]["name"] == "pair"

    assert _err(_push(lite, bundle("affine", "1.3.0"), variant="cpu")) == (409, "release_exists")
    assert _err(_push(lite, bundle("affine", "1.3.0"), version="2.0.0")) == (
        422,
        "version_mismatch",
    )
    assert _err(_push(lite, bundle("affine", "1.4.0"), Role.VIEWER)) == (403, "forbidden")
    assert _stored(lite)[:2] == (1, 1)
    shown = lite.get("/api/v1/models/affine/1.3.0").json()
    assert shown["variants"][0]["sha256"] == v["sha256"]
    assert [r["version"] for r in lite.get("/api/v1/models").json()["items"]] == ["1.3.0"]
    assert _err(lite.get("/api/v1/models/affine/9.9.9")) == (404, "not_found")


def test_bad_uploads_store_nothing(lite: Api, bundle: BundleFactory, tmp_path: Path) -> None:
    r = _push(lite, bundle("affine", "1.0.0", offset=0.5))
    assert _err(r) == (422, "golden_mismatch")
    assert "golden vector 'pair'" in r.json()["error"]["message"]
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07not an onnx model at all")
    assert _push(lite, bad, version="1.0.0").status_code == 422
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert _err(_push(lite, notes)) == (422, "unsupported_file")
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * (200 * 1024))
    assert _err(_push(lite, big, version="1.0.0")) == (413, "payload_too_large")
    assert _stored(lite) == (0, 0, [])
    assert list((lite.data_dir / "artifacts" / "tmp").iterdir()) == []


def test_a_bare_model_needs_a_version(lite: Api, tmp_path: Path) -> None:
    from tests import modelgen

    model = modelgen.make_onnx_affine(tmp_path / "tiny-affine.onnx")
    assert _push(lite, model).json()["error"]["message"].startswith("version:")
    rel = _push(lite, model, version="0.2.0").json()
    assert (rel["name"], rel["version"], rel["variants"][0]["kind"]) == (
        "tiny-affine",
        "0.2.0",
        "model",
    )


# --- telemetry, health, outages --------------------------------------------------------


def test_series_endpoints(api: Api) -> None:
    from tests.server.test_store import telemetry

    now = int(utcnow().timestamp()) // 60 * 60
    with api.db.write() as s:
        apply_batch(s, [telemetry("cam", now - 600 + i * 10, requests=i) for i in range(60)])
    r = api.get("/api/v1/devices/cam/telemetry", params={"step": 60})
    assert r.status_code == 200 and r.json()["step_s"] == 60
    assert sum(p["samples"] for p in r.json()["points"]) == 60
    r = api.get("/api/v1/models/face/telemetry", params={"step": 300})
    assert sum(p["requests"] for p in r.json()["points"]) == 59
    assert _err(
        api.get(
            "/api/v1/models/face/telemetry", params={"step": 1, "since": "2020-01-01T00:00:00Z"}
        )
    ) == (422, "invalid")
    assert _err(api.get("/api/v1/devices/nope/telemetry")) == (404, "not_found")


def test_health_docs_and_a_database_outage(api: Api, tmp_path: Path) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json() == {"status": "ready"}
    assert api.get("/api/v1/health").json()["database"]["revision"] == migrate.head()
    spec = api.client.get("/openapi.json").json()
    assert "/api/v1/devices" in spec["paths"] and "/api/v1/enroll" in spec["paths"]
    assert api.client.get("/docs").status_code == 200

    down = Database("postgresql+psycopg://postgres@127.0.0.1:1/fleet")
    svc = build_services(settings_for(tmp_path / "down", down.url), db=down)
    client = TestClient(create_app(svc))
    r = client.get("/api/v1/devices", headers={"Authorization": "Bearer eft_x"})
    assert _err(r) == (503, "db_unavailable") and r.headers["Retry-After"] == "5"
    assert client.get("/readyz").status_code == 503


def test_published_variants_are_signed_into_the_image_repository(
    sqlite_db: Database, tmp_path: Path, bundle: BundleFactory
) -> None:
    from fleet_server import keys
    from fleet_server.tuf import ImageRepository, LocalFolderStore, custom_of

    tuf = tmp_path / "data" / "tuf"
    keys.init_keys(tmp_path / "offline", tuf / "keys", root_threshold=1, root_count=1)
    keys.init_repositories(
        tmp_path / "offline",
        tuf / "keys",
        LocalFolderStore(tuf / "image"),
        LocalFolderStore(tuf / "director"),
        root_threshold=1,
    )
    api = _api(sqlite_db, tmp_path)
    rel = _push(
        api,
        bundle("affine", "2.0.0", manifest_extra={"compatible_profiles": ["rpi5"]}),
        variant="cpu",
    ).json()
    v = rel["variants"][0]
    repo = ImageRepository(
        LocalFolderStore(tuf / "image"), keys.load_online_signers(tuf / "keys", "image")
    )
    ((path, target),) = repo.targets().items()
    assert path.startswith("models/affine/2.0.0/cpu/")
    assert target.hashes == {"sha256": v["sha256"]} and target.length == v["size"]
    assert custom_of(target)["compatible_profiles"] == ["rpi5"]

    # a refusal by the signing side stores nothing: sign other bytes under the next path first
    from agent.updater.targets import ImageTargetCustom

    taken = bundle("affine", "2.1.0")
    custom = ImageTargetCustom(
        name="affine",
        version="2.1.0",
        format="onnx",
        compatible_profiles=("rpi5",),
        manifest_digest="0" * 64,
    )
    repo.add_target(f"models/affine/2.1.0/default/{taken.name}", 1, {"sha256": "0" * 64}, custom)
    assert _err(_push(api, taken)) == (409, "conflict")
    assert _stored(api)[:2] == (1, 1) and len(_stored(api)[2]) == 1

    token = api.client.post(
        "/api/v1/enrolment-tokens", json={}, headers=api.h(Role.OPERATOR)
    ).json()["token"]
    out = api.client.post("/api/v1/enroll", json={"token": token, "csr_pem": _csr("cam-1")}).json()
    assert out["trust_root"]["signed"]["_type"] == "root"


@pytest.mark.slow
def test_validation_in_a_worker_process(bundle: BundleFactory) -> None:
    from fleet_server.errors import BundleRejected
    from fleet_server.validation import Validator

    validator = Validator(isolation="process", timeout_s=60)
    try:
        checked = validator.check(bundle("affine", "1.0.0"))
        assert (checked.name, checked.version, checked.golden_vectors) == ("affine", "1.0.0", 1)
        assert checked.inputs == [{"name": "x", "shape": [None, 3], "dtype": "float32"}]
        with pytest.raises(BundleRejected) as err:
            validator.check(bundle("affine", "1.0.1", offset=0.5))
        assert err.value.code == "golden_mismatch"
    finally:
        validator.close()
