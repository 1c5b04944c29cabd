"""Device enrolment: redeem a single-use token, sign the device's CSR, register the device.

The device id is the CSR's subject common name (checked against the protocol's alphabet);
the CSR's own signature must verify. Everything happens in one transaction: if signing
fails, the token stays unused and no device row is written.

The certificate authority is a seam (:class:`DeviceCA`); ``fleet_server.ca`` provides the
real one. Without a CA the server refuses enrolment with ``ca_unavailable`` (503).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from fleet_server.auth import ENROLMENT_TOKEN_PREFIX, hash_token, mint
from fleet_server.domain import NAME_RE, EnrolmentToken, utcnow
from fleet_server.errors import CaUnavailable, ValidationError
from fleet_server.store import devices, tokens
from fleet_server.store.engine import Database

MAX_FACTS_BYTES = 64 * 1024


class IssuedCert(Protocol):
    """A signed device certificate (``fleet_server.ca.IssuedCertificate`` fits)."""

    @property
    def serial(self) -> int: ...

    @property
    def pem(self) -> bytes: ...


class DeviceCA(Protocol):
    """What enrolment needs from a certificate authority (``fleet_server.ca`` fits)."""

    def sign_csr(self, csr_pem: bytes, device_id: str) -> IssuedCert:
        """Check the CSR (signature, key strength, CN = device id) and sign it.

        Raises ValidationError (422) for a CSR it refuses."""
        ...

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate devices (and the broker) trust."""
        ...


@dataclass(frozen=True)
class Enrolment:
    """What a device gets back."""

    device_id: str
    certificate_pem: str
    ca_certificate_pem: str
    broker_url: str | None
    server_url: str | None
    #: The update trust roots (TUF ``root.json`` of the image repository and of the
    #: director), when the signing side is set up.
    trust_root: dict[str, Any] | None
    director_root: dict[str, Any] | None = None


def device_id_from_csr(csr_pem: str) -> str:
    """The device id a CSR asks for: its subject common name. The CA checks the rest
    (signature, key strength, that the CN and SAN name only this device).

    Raises:
        ValidationError: not a PEM CSR, or a CN that is not a valid device id (``bad_csr``).
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValidationError(
            "csr_pem: not a PEM certificate signing request", code="bad_csr"
        ) from exc
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = names[0].value if names else ""
    if not isinstance(cn, str) or not NAME_RE.match(cn) or cn in (".", ".."):
        raise ValidationError(
            "csr_pem: the subject CN must be the device id ([A-Za-z0-9_.-]{1,64})", code="bad_csr"
        )
    return cn


class EnrolmentService:
    """Creates enrolment tokens and redeems them."""

    def __init__(
        self,
        db: Database,
        *,
        ca: DeviceCA | None,
        stale_after: timedelta,
        broker_url: str | None = None,
        server_url: str | None = None,
        trust_root: Callable[[], dict[str, Any] | None] | None = None,
        director_root: Callable[[], dict[str, Any] | None] | None = None,
        max_ttl: timedelta = timedelta(days=7),
        reserved_ids: Sequence[str] = ("fleet-server",),
        reserved_prefixes: Sequence[str] = ("app-",),
    ) -> None:
        self.db = db
        self.ca = ca
        self.stale_after = stale_after
        self.broker_url = broker_url
        self.server_url = server_url
        self.trust_root = trust_root
        self.director_root = director_root
        self.max_ttl = max_ttl
        self.reserved_ids = frozenset(reserved_ids)
        self.reserved_prefixes = tuple(reserved_prefixes)

    def create_token(
        self, *, tags: dict[str, str], ttl: timedelta, actor: str
    ) -> tuple[str, EnrolmentToken]:
        """Mint a single-use token; returns the secret (shown once) and its record.

        Raises:
            ValidationError: ``ttl`` is not positive or longer than the configured maximum.
            StoreUnavailable: the database cannot be reached.
        """
        if ttl <= timedelta(0) or ttl > self.max_ttl:
            raise ValidationError(f"expires: must be between 1s and {self.max_ttl}")
        secret = mint(ENROLMENT_TOKEN_PREFIX)
        with self.db.write() as session:
            record = tokens.create_enrolment_token(
                session,
                token_hash=secret.hash,
                prefix=secret.prefix,
                tags=tags,
                expires_at=utcnow() + ttl,
                actor=actor,
            )
        return secret.token, record

    def enrol(
        self, *, token: str, csr_pem: str, facts: dict[str, Any], server_url: str | None = None
    ) -> Enrolment:
        """Redeem ``token`` for the device named by the CSR and sign its certificate.

        Raises:
            CaUnavailable: no CA is configured (503).
            ValidationError: a bad CSR (refused by the CA), a reserved device id
                (``device_id_reserved``) or oversized facts (422).
            AuthError: an unknown token (401); TokenExpired: an expired one (401).
            Conflict: the token was used already (``token_used``), or the device is enrolled
                and not revoked (``device_exists``) (409).
            StoreUnavailable: the database cannot be reached (503).
        """
        if self.ca is None:
            raise CaUnavailable("this server has no certificate authority configured")
        if len(repr(facts)) > MAX_FACTS_BYTES:
            raise ValidationError(f"facts: larger than {MAX_FACTS_BYTES} bytes")
        device_id = device_id_from_csr(csr_pem)
        if device_id in self.reserved_ids or device_id.startswith(self.reserved_prefixes):
            raise ValidationError(
                f"csr_pem: {device_id!r} is reserved for a broker identity that is not a device",
                code="device_id_reserved",
            )
        with self.db.write() as session:
            used = tokens.redeem_enrolment_token(session, hash_token(token), device_id=device_id)
            devices.check_enrollable(session, device_id)  # before the CA signs anything
            issued = self.ca.sign_csr(csr_pem.encode("utf-8"), device_id)
            devices.enrol_device(
                session,
                device_id=device_id,
                facts=facts,
                tags=used.tags,
                cert_serial=format(issued.serial, "x"),
                actor=f"enrolment:{used.prefix}",
                stale_after=self.stale_after,
            )
        return Enrolment(
            device_id=device_id,
            certificate_pem=issued.pem.decode("ascii"),
            ca_certificate_pem=self.ca.cert_pem.decode("ascii"),
            broker_url=self.broker_url,
            server_url=self.server_url or server_url,
            trust_root=self.trust_root() if self.trust_root is not None else None,
            director_root=self.director_root() if self.director_root is not None else None,
        )
