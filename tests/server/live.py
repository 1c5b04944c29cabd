"""A fleet server with its signing side set up (TUF keys, both repositories, the CA),
served by a real uvicorn on a free port of 127.0.0.1 in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from fleet_server import keys
from fleet_server.api import Services, create_app
from fleet_server.ca import CertificateAuthority
from fleet_server.domain import Role
from fleet_server.server import build_services
from fleet_server.store.engine import Database
from fleet_server.tuf import LocalFolderStore
from tests.server.conftest import make_token, settings_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def init_signing(data_dir: Path, offline_dir: Path) -> None:
    """Root key (1 of 1) offline, online keys, both repositories and the CA in ``data_dir``."""
    tuf = data_dir / "tuf"
    keys.init_keys(offline_dir, tuf / "keys", root_threshold=1, root_count=1)
    keys.init_repositories(
        offline_dir,
        tuf / "keys",
        LocalFolderStore(tuf / "image"),
        LocalFolderStore(tuf / "director"),
        root_threshold=1,
    )
    CertificateAuthority.init(data_dir / "ca")


@dataclass
class LiveServer:
    url: str
    services: Services
    data_dir: Path
    offline_dir: Path
    tokens: dict[Role, str]

    def headers(self, role: Role = Role.OPERATOR) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@contextmanager
def live_server(db: Database, tmp_path: Path, **settings: Any) -> Iterator[LiveServer]:
    """The full API (with /tuf and /artifacts) over HTTP, signing set up."""
    data_dir, offline = tmp_path / "data", tmp_path / "offline"
    init_signing(data_dir, offline)
    svc = build_services(settings_for(data_dir, db.url, **settings), db=db)
    port = free_port()
    config = uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield LiveServer(
            f"http://127.0.0.1:{port}",
            svc,
            data_dir,
            offline,
            {role: make_token(db, role) for role in Role},
        )
    finally:
        server.should_exit = True
        thread.join(5)
