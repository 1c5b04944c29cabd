"""The downloader and the artifact store, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import TargetMismatch, UpdateError
from agent.updater.fetch import Downloader, DownloadStopped, HttpClient
from agent.updater.store import ArtifactStore, InsufficientDisk, verify_artifact
from tests.agent.updater_rig import Fault, Fleet, FleetHttp

REPO = Path(__file__).resolve().parents[2]
DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def http(tmp_path: Path) -> Iterator[FleetHttp]:
    fleet = Fleet.create(tmp_path / "fleet")
    fleet.http.add(DATA)
    yield fleet.http
    fleet.http.close()


def downloader(**kwargs: object) -> Downloader:
    kwargs.setdefault("backoff_s", 0.01)
    return Downloader(HttpClient(timeout_s=5), **kwargs)  # type: ignore[arg-type]


def test_a_cut_download_resumes_where_it_stopped(http: FleetHttp, tmp_path: Path) -> None:
    http.faults[SHA] = Fault(cut_after=100_000)
    partial = tmp_path / "a.part"
    result = downloader().download(http.artifact_url(SHA), partial, len(DATA))

    assert partial.read_bytes() == DATA
    assert (result.attempts, result.resumed_from, result.bytes_written) == (2, 0, len(DATA))
    assert [(s.range, s.status, s.sent) for s in http.downloads(SHA)] == [
        (None, 200, 100_000),
        ("bytes=100000-", 206, 200_000),
    ]


def test_bytes_already_on_disk_are_not_fetched_again(http: FleetHttp, tmp_path: Path) -> None:
    partial = tmp_path / "a.part"
    partial.write_bytes(DATA[:250_000])  # left by a process that was killed
    result = downloader().download(http.artifact_url(SHA), partial, len(DATA))
    assert partial.read_bytes() == DATA
    assert (result.resumed_from, result.bytes_written) == (250_000, 50_000)


def test_a_server_that_ignores_range_restarts_the_file(http: FleetHttp, tmp_path: Path) -> None:
    http.faults[SHA] = Fault(ignore_range=True)
    partial = tmp_path / "a.part"
    partial.write_bytes(b"\xff" * 1000)  # not the artifact's first bytes
    downloader().download(http.artifact_url(SHA), partial, len(DATA))
    assert partial.read_bytes() == DATA


def test_the_bandwidth_cap_holds(http: FleetHttp, tmp_path: Path) -> None:
    rate = 400_000  # bytes/s: the first 100 kB pass as a burst, the rest take >= 0.5 s
    t0 = time.monotonic()
    downloader(rate_limit=rate).download(http.artifact_url(SHA), tmp_path / "a.part", len(DATA))
    elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed < 3.0, elapsed
    assert (tmp_path / "a.part").read_bytes() == DATA


@pytest.mark.parametrize(
    ("body", "no_length", "message"),
    [
        (DATA + b"x" * 10, False, "server has 300010 bytes"),
        (DATA + b"x" * 10, True, "more than the signed 300000 bytes"),
        (DATA[:-10], False, "server has 299990 bytes"),
    ],
    ids=["oversized", "oversized-unannounced", "truncated"],
)
def test_a_wrong_length_is_refused_without_writing_past_it(
    http: FleetHttp, tmp_path: Path, body: bytes, no_length: bool, message: str
) -> None:
    http.faults[SHA] = Fault(body=body, no_length=no_length, times=10)
    partial = tmp_path / "a.part"
    with pytest.raises(TargetMismatch, match=message):
        downloader().download(http.artifact_url(SHA), partial, len(DATA))
    assert not partial.exists() or partial.stat().st_size <= len(DATA)
    assert len(http.downloads(SHA)) == 1, "a wrong length is not retried"


def test_a_truncated_file_without_length_ends_in_a_416_that_states_its_size(
    http: FleetHttp, tmp_path: Path
) -> None:
    http.faults[SHA] = Fault(body=DATA[:-10], no_length=True, times=10)
    with pytest.raises(TargetMismatch, match="server has 299990 bytes"):
        downloader().download(http.artifact_url(SHA), tmp_path / "a.part", len(DATA))
    assert [s.status for s in http.downloads(SHA)] == [200, 416]


def test_an_unreachable_server_fails_after_the_attempts(http: FleetHttp, tmp_path: Path) -> None:
    http.down = True
    with pytest.raises(UpdateError, match="3 attempts failed; last: HTTP 503") as exc:
        downloader(max_attempts=3).download(http.artifact_url(SHA), tmp_path / "a.part", 10)
    assert exc.value.code == "download_failed"


def test_a_stop_keeps_the_partial_file(http: FleetHttp, tmp_path: Path) -> None:
    stop = threading.Event()
    partial = tmp_path / "a.part"
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(DownloadStopped):
        downloader(rate_limit=100_000, stop=stop).download(
            http.artifact_url(SHA), partial, len(DATA)
        )
    assert 0 < partial.stat().st_size < len(DATA)
    assert partial.read_bytes() == DATA[: partial.stat().st_size]


def test_a_full_disk_is_reported_and_the_partial_file_removed(
    http: FleetHttp, tmp_path: Path
) -> None:
    # A real write failure: the child process may not grow a file past 100 kB (EFBIG).
    script = f"""
import resource, signal, sys
from pathlib import Path
from agent.updater.fetch import Downloader, HttpClient, DiskFull
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
partial = Path({str(tmp_path / "a.part")!r})
try:
    Downloader(HttpClient()).download({http.artifact_url(SHA)!r}, partial, {len(DATA)})
except DiskFull as exc:
    print(exc.code, partial.exists())
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.stdout.strip() == "disk_full False", out.stderr


# --- the store -----------------------------------------------------------------------------


def test_the_store_keeps_complete_artifacts_read_only(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "updates")
    store.partial(SHA).write_bytes(DATA)
    path = store.commit(SHA, "model.onnx")

    assert path == tmp_path / "updates" / "store" / SHA / "model.onnx"
    assert path.read_bytes() == DATA
    assert path.stat().st_mode & 0o777 == 0o444
    assert path.parent.stat().st_mode & 0o777 == 0o500
    assert not store.partial(SHA).exists()
    verify_artifact(path, "models/m/1/cpu/model.onnx", len(DATA), {"sha256": SHA})
    with pytest.raises(TargetMismatch, match=r"model\.onnx"):
        verify_artifact(path, "models/m/1/cpu/model.onnx", len(DATA), {"sha256": "0" * 64})


def test_prune_keeps_what_it_is_told_and_drops_the_rest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "updates")
    shas = []
    for i in range(3):
        data = bytes([i]) * 10
        sha = hashlib.sha256(data).hexdigest()
        store.partial(sha).write_bytes(data)
        store.commit(sha, "m.onnx")
        shas.append(sha)
    store.partial("f" * 64).write_bytes(b"half")
    assert store.prune({shas[0], shas[2]}) == [shas[1]]
    assert store.artifacts() == sorted([shas[0], shas[2]])
    assert list(store.incoming.iterdir()) == []


def test_store_refuses_unsafe_names_and_a_download_that_would_not_fit(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "updates")
    with pytest.raises(UpdateError):
        store.path("../" + SHA[3:], "m.onnx")
    with pytest.raises(UpdateError):
        store.path(SHA, "../evil")
    free = store.free_bytes()
    store.check_space(SHA, 1000, margin=free // 2)
    with pytest.raises(InsufficientDisk, match="must stay free"):
        store.check_space(SHA, free + 1, margin=0)
