"""The routes devices use: TUF metadata of both repositories and resumable artifact
downloads, checked with the agent's own verifier and downloader over real HTTP."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.updater.config import UpdateConfig
from agent.updater.fetch import Downloader, HttpClient, TufFetcher
from agent.updater.verify import UpdateVerifier
from fleet_server import keys
from fleet_server.ca import CertificateAuthority
from fleet_server.domain import utcnow
from fleet_server.keys import KeyRole
from fleet_server.store import devices
from fleet_server.store.assignments import Desired, set_desired
from fleet_server.store.engine import Database
from fleet_server.tuf import Director, ImageRepository, LocalFolderStore
from tests.server.conftest import BundleFactory
from tests.server.live import LiveServer, live_server


@pytest.fixture
def srv(sqlite_db: Database, tmp_path: Path) -> Iterator[LiveServer]:
    with live_server(sqlite_db, tmp_path) as server:
        yield server


def push(srv: LiveServer, path: Path, variant: str) -> dict[str, Any]:
    with path.open("rb") as fh:
        r = httpx.post(
            f"{srv.url}/api/v1/models",
            files={"file": (path.name, fh)},
            data={"variant": variant},
            headers=srv.headers(),
            timeout=60,
        )
    assert r.status_code == 201, r.text
    variant_out: dict[str, Any] = r.json()["variants"][0]
    return variant_out


def add_device(srv: LiveServer, device_id: str, profile: str = "rpi5") -> None:
    with srv.services.db.write() as s:
        devices.enrol_device(
            s,
            device_id=device_id,
            facts={"profile": profile},
            tags={},
            cert_serial="abc123",
            actor="test",
            stale_after=timedelta(seconds=30),
        )


def desire(srv: LiveServer, device_id: str, model: str, version: str, variant: str) -> None:
    with srv.services.db.write() as s:
        set_desired(s, device_id, model, Desired(version, variant, rollout_id=7), utcnow())


def verifier(srv: LiveServer, state: Path) -> UpdateVerifier:
    tuf = srv.data_dir / "tuf"
    return UpdateVerifier(
        srv.url,
        state,
        (tuf / "image" / "1.root.json").read_bytes(),
        (tuf / "director" / "1.root.json").read_bytes(),
        fetcher=TufFetcher(HttpClient(timeout_s=10)),
    )


def get(srv: LiveServer, path: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{srv.url}{path}", headers=headers, timeout=10)


def test_a_device_verifies_and_resumes_what_its_director_assigns(
    srv: LiveServer, bundle: BundleFactory, tmp_path: Path
) -> None:
    archive = bundle("affine", "2.0.0", manifest_extra={"compatible_profiles": ["rpi5"]})
    v = push(srv, archive, "cpu")
    data = archive.read_bytes()
    assert v["sha256"] == hashlib.sha256(data).hexdigest()
    add_device(srv, "cam-1")
    check = verifier(srv, tmp_path / "device")
    assert check.verify_assignments("cam-1", "rpi5") == []  # nothing assigned yet

    desire(srv, "cam-1", "affine", "2.0.0", "cpu")
    (target,) = check.verify_assignments("cam-1", "rpi5")
    assert target.path == f"models/affine/2.0.0/cpu/{archive.name}"
    assert (target.length, target.hashes) == (len(data), {"sha256": v["sha256"]})
    assert target.director.device_id == "cam-1"

    # the agent's URL: {server}/tuf/image/targets/{dir}/{sha256}.{file}, resumed from byte 100
    config = UpdateConfig(
        server_url=srv.url,
        image_root_file=tmp_path / "unused",
        director_root_file=tmp_path / "unused",
    )
    folder, file = target.path.rsplit("/", 1)
    url = f"{config.artifacts_url}{folder}/{v['sha256']}.{file}"
    partial = tmp_path / "partial"
    partial.write_bytes(data[:100])
    result = Downloader(HttpClient(timeout_s=10), max_attempts=1).download(url, partial, len(data))
    assert (result.resumed_from, result.bytes_written) == (100, len(data) - 100)
    assert partial.read_bytes() == data
    target.verify(partial.read_bytes())
    short = get(srv, f"/tuf/targets/{folder}/{v['sha256']}.{file}")
    assert short.content == data == get(srv, f"/artifacts/sha256/{v['sha256']}").content

    assert target.director.rollout_id == "7"

    # a new assignment revision gives strictly newer director metadata
    before = json.loads(get(srv, "/tuf/director/cam-1/timestamp.json").content)
    desire(srv, "cam-1", "affine", "2.0.0", "cpu")
    after = json.loads(get(srv, "/tuf/director/cam-1/timestamp.json").content)
    assert after["signed"]["version"] == before["signed"]["version"] + 1
    assert len(check.verify_assignments("cam-1", "rpi5")) == 1


def test_metadata_routes_name_files_and_caching(srv: LiveServer) -> None:
    root = get(srv, "/tuf/image/1.root.json")
    assert root.status_code == 200 and root.headers["content-type"] == "application/json"
    assert json.loads(root.content)["signed"]["_type"] == "root"
    assert "immutable" in root.headers["cache-control"]
    ts = get(srv, "/tuf/image/timestamp.json")
    assert ts.headers["cache-control"] == "no-store"
    snap_v = json.loads(ts.content)["signed"]["meta"]["snapshot.json"]["version"]
    snap = json.loads(get(srv, f"/tuf/image/{snap_v}.snapshot.json").content)
    targets_v = snap["signed"]["meta"]["targets.json"]["version"]
    assert get(srv, f"/tuf/image/{targets_v}.targets.json").status_code == 200
    for name in ("2.root.json", "0.root.json", "foo.json", "snapshot.json", "%2E%2E"):
        r = get(srv, f"/tuf/image/{name}")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "metadata_not_found"), name
    # The director's roots are public and the same for every device: served without a
    # database read, so they tell nothing about which devices exist; the rest is per device.
    assert get(srv, "/tuf/director/cam-9/1.root.json").status_code == 200
    assert get(srv, "/tuf/director/cam-9/timestamp.json").status_code == 404  # unknown device


def test_director_refusals(srv: LiveServer) -> None:
    add_device(srv, "cam-1")
    for bad in ("%2E", "%2E%2E", "a%20b"):
        r = get(srv, f"/tuf/director/{bad}/timestamp.json")
        assert (r.status_code, r.json()["error"]["code"]) == (422, "device_id_invalid"), bad
    r = get(srv, "/tuf/director/cam-2/timestamp.json")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = get(srv, "/tuf/director/cam-1/7.snapshot.json")  # no such epoch
    assert (r.status_code, r.json()["error"]["code"]) == (404, "metadata_not_found")
    desire(srv, "cam-1", "ghost", "1.0.0", "cpu")  # a release that does not exist
    r = get(srv, "/tuf/director/cam-1/timestamp.json")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "assignment_invalid")

    # revoking: refused here, and the certificate lands in the CRL
    r = httpx.post(f"{srv.url}/api/v1/devices/cam-1/revoke", headers=srv.headers(), timeout=10)
    assert r.status_code == 200
    r = get(srv, "/tuf/director/cam-1/timestamp.json")
    assert (r.status_code, r.json()["error"]["code"]) == (403, "device_revoked")
    ca = CertificateAuthority.load(srv.data_dir / "ca")
    assert int("abc123", 16) in ca.revoked()


def test_director_can_require_the_proxys_client_certificate_header(
    sqlite_db: Database, tmp_path: Path
) -> None:
    with live_server(sqlite_db, tmp_path, tuf={"director_client_cn_header": "X-Client-CN"}) as srv:
        add_device(srv, "cam-1")
        path = "/tuf/director/cam-1/timestamp.json"
        assert get(srv, path).status_code == 403
        assert get(srv, path, **{"X-Client-CN": "cam-2"}).status_code == 403
        assert get(srv, path, **{"X-Client-CN": "cam-1"}).status_code == 200


def test_artifact_ranges(srv: LiveServer, bundle: BundleFactory) -> None:
    archive = bundle("affine", "1.0.0")
    data = archive.read_bytes()
    size, sha = len(data), push(srv, archive, "default")["sha256"]
    path, etag = f"/artifacts/sha256/{sha}", f'"{sha}"'

    full = get(srv, path)
    assert (full.status_code, full.content) == (200, data)
    assert full.headers["accept-ranges"] == "bytes" and full.headers["etag"] == etag
    assert full.headers["content-length"] == str(size)
    part = get(srv, path, Range="bytes=10-19")
    assert (part.status_code, part.content) == (206, data[10:20])
    assert part.headers["content-range"] == f"bytes 10-19/{size}"
    assert get(srv, path, Range="bytes=-5").content == data[-5:]
    assert get(srv, path, Range=f"bytes={size - 3}-").content == data[-3:]
    assert get(srv, path, Range=f"bytes=0-{size + 100}").content == data  # clipped, 206
    beyond = get(srv, path, Range=f"bytes={size}-")
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"
    assert get(srv, path, Range="bytes=5-2").status_code == 200  # invalid: whole file
    assert get(srv, path, Range="bytes=0-1,4-5").status_code == 200  # several: whole file
    assert get(srv, path, Range="bytes=0-1", **{"If-Range": '"other"'}).status_code == 200
    assert get(srv, path, Range="bytes=0-1", **{"If-Range": etag}).status_code == 206
    assert get(srv, path, **{"If-None-Match": etag}).status_code == 304
    head = httpx.head(f"{srv.url}{path}", headers={"Range": "bytes=0-9"}, timeout=10)
    assert head.status_code == 206 and head.content == b""
    assert head.headers["content-length"] == "10"
    for bad in ("0" * 64, "XYZ", sha.upper()):
        assert get(srv, f"/artifacts/sha256/{bad}").status_code == 404
    for bad in (f"models/a/1.0.0/v/{sha}", f"models/../1.0.0/v/{sha}.x", f"x/{sha}.m.onnx"):
        assert get(srv, f"/tuf/targets/{bad}").status_code == 404, bad


def test_the_server_follows_a_key_rotation_on_disk(srv: LiveServer, tmp_path: Path) -> None:
    add_device(srv, "cam-1")
    check = verifier(srv, tmp_path / "device")
    assert check.verify_assignments("cam-1", "rpi5") == []
    tuf = srv.data_dir / "tuf"
    image = ImageRepository(
        LocalFolderStore(tuf / "image"), keys.load_online_signers(tuf / "keys", "image")
    )
    director = Director(
        LocalFolderStore(tuf / "director"), keys.load_online_signers(tuf / "keys", "director")
    )
    (new_key,) = keys.rotate_role(
        KeyRole.DIRECTOR_TIMESTAMP,
        offline_dir=srv.offline_dir,
        online_dir=tuf / "keys",
        image=image,
        director=director,
    )
    keys.rotate_role(
        KeyRole.ROOT,
        offline_dir=srv.offline_dir,
        online_dir=tuf / "keys",
        image=image,
        director=director,
    )
    signed = json.loads(get(srv, "/tuf/director/cam-1/timestamp.json").content)
    assert [s["keyid"] for s in signed["signatures"]] == [new_key]
    assert check.verify_assignments("cam-1", "rpi5") == []  # walks 1 → 3.root.json
    assert (
        json.loads((tmp_path / "device/tuf/director/cam-1/root.json").read_bytes())["signed"][
            "version"
        ]
        == 3
    )


def test_the_background_keeps_the_brokers_crl_fresh(sqlite_db: Database, tmp_path: Path) -> None:
    from cryptography import x509

    from fleet_server.server import Background, build_services
    from tests.server.conftest import settings_for
    from tests.server.live import init_signing

    init_signing(tmp_path / "data", tmp_path / "offline")
    crl_file = tmp_path / "broker" / "fleet-ca.crl"
    settings = settings_for(
        tmp_path / "data",
        sqlite_db.url,
        ca={"crl_file": str(crl_file), "crl_refresh_s": 1},
        tuf={"refresh_interval_s": 1},
    )
    svc = build_services(settings, db=sqlite_db)
    assert svc.revocations is not None
    first = x509.load_pem_x509_crl(svc.revocations.publish()).last_update_utc
    background = Background(svc)
    background.start()
    try:

        def refreshed() -> bool:
            crl = x509.load_pem_x509_crl(crl_file.read_bytes())
            return crl.last_update_utc > first

        deadline = time.monotonic() + 5
        while not refreshed():
            assert time.monotonic() < deadline, "the CRL was not re-signed"
            time.sleep(0.1)
    finally:
        background.stop()
