"""Enrolling the virtual devices through the server's real enrolment API.

For each device, as an operator and then the device would: ``POST
/api/v1/enrolment-tokens`` (single-use, with the fleet's tags, minted with the operator
token), then ``POST /api/v1/enroll`` with a CSR for a fresh EC P-256 key whose CN is the
device id (the agent's own :func:`agent.enroll.make_key_and_csr`). The key, certificate
and CA are written to ``{state}/{device}/identity/``: a device connection over
``mqtts://`` logs in with them, so a broker that requires client certificates
(``scripts/mosquitto/mosquitto-mtls.conf``) authorises each device by its id.

A device that is enrolled already (``409 device_exists``, a second run with the same
ids) keeps the identity a former run wrote, when there is one.
"""

from __future__ import annotations

import asyncio
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization

from agent.enroll import make_key_and_csr
from fleet_server.errors import FleetError, ServerUnreachable
from fleet_server.simulator.device import AGENT_VERSION
from fleet_server.simulator.fetching import USER_AGENT, TrustRoots

TOKEN_TTL_S = 3600


@dataclass(frozen=True)
class Identity:
    """Where an enrolled device's TLS identity lies."""

    key_file: Path
    cert_file: Path
    ca_file: Path

    @classmethod
    def under(cls, folder: Path) -> Identity:
        return cls(folder / "device.key", folder / "device.crt", folder / "ca.crt")

    def exists(self) -> bool:
        return all(p.is_file() for p in (self.key_file, self.cert_file, self.ca_file))


def _error(response: httpx.Response) -> FleetError:
    try:
        err = response.json()["error"]
        return FleetError(str(err["message"]), code=str(err["code"]))
    except (ValueError, KeyError, TypeError):
        return FleetError(f"HTTP {response.status_code}", code="enrolment_failed")


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class Enroller:
    """Enrols devices over HTTP, ``concurrency`` at a time."""

    def __init__(
        self,
        server_url: str,
        api_token: str,
        tags: dict[str, str],
        state_dir: Path,
        *,
        concurrency: int = 8,
        verify: bool | str = True,
    ) -> None:
        self._url = server_url
        self._tags = tags
        self._state = state_dir
        self._slots = asyncio.Semaphore(concurrency)
        self._client = httpx.AsyncClient(
            base_url=server_url,
            timeout=30.0,
            verify=verify,
            trust_env=False,
            headers={"User-Agent": USER_AGENT},
        )
        self._auth = {"Authorization": f"Bearer {api_token}"}
        self.roots: TrustRoots | None = None

    async def _post(self, path: str, body: dict[str, Any], auth: bool) -> httpx.Response:
        try:
            return await self._client.post(path, json=body, headers=self._auth if auth else None)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"{self._url}{path}: {exc}") from None

    async def enrol(self, device_id: str, profile: str) -> Identity | None:
        """Enrol one device; its identity on disk, or None when the device was enrolled
        before and no identity of it was kept (fine without TLS).

        Raises:
            FleetError: the server refused (its code: ``unauthorized``, ``bad_csr``...).
            ServerUnreachable: the server cannot be reached.
        """
        identity = Identity.under(self._state / device_id / "identity")
        async with self._slots:
            created = await self._post(
                "/api/v1/enrolment-tokens", {"tags": self._tags, "expires_in_s": TOKEN_TTL_S}, True
            )
            if created.status_code != 201:
                raise _error(created)
            key, csr = make_key_and_csr(device_id)
            facts = {
                "profile": profile,
                "agent_version": AGENT_VERSION,
                "arch": "simulated",
                "os": platform.system(),
                "simulated": True,
            }
            body = {"token": created.json()["token"], "csr_pem": csr, "facts": facts}
            answer = await self._post("/api/v1/enroll", body, False)
        if answer.status_code != 200:
            error = _error(answer)
            if error.code == "device_exists":  # enrolled by a former run
                return identity if identity.exists() else None
            raise error
        data = answer.json()
        identity.key_file.parent.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(identity.key_file, pem, 0o600)
        _write(identity.cert_file, data["certificate_pem"].encode())
        _write(identity.ca_file, data["ca_certificate_pem"].encode())
        if self.roots is None:
            self.roots = TrustRoots.from_enrolment(data)
        return identity

    async def close(self) -> None:
        await self._client.aclose()
