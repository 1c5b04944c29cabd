"""The small CA that certifies devices (mTLS to the broker and the server) and the broker.

Files in its folder (the server's data dir, 0700)::

    ca.key.pem    the CA key (EC P-256, PKCS#8, 0600)
    ca.cert.pem   the self-signed CA certificate (what brokers and servers trust)
    revoked.json  revoked serials and when
    crl.pem       the CRL (Mosquitto ``crlfile``), re-written on every revocation

A device sends a CSR at enrolment; the certificate it gets has ``CN = device id`` and
``clientAuth`` only. Nothing is copied from the CSR except its public key, once the CSR's
signature, its subject and its key strength have been checked.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.updater.targets import is_safe_device_id
from fleet_server.errors import ConfigError, Conflict, ValidationError

DEVICE_URI_PREFIX = "urn:edge-fleet:device:"
_STRONG_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_STRONG_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_MIN_RSA_BITS = 2048
_BACKDATE = timedelta(minutes=5)  # tolerate device clocks slightly behind

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


class CsrRejected(ValidationError):
    """A CSR with a bad signature, a weak key, or a subject that is not the device."""

    code = "csr_rejected"


@dataclass(frozen=True)
class IssuedCertificate:
    """A device certificate as issued (record ``serial`` to revoke it later)."""

    device_id: str
    serial: int
    not_after: datetime
    pem: bytes


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class CertificateAuthority:
    """Issues device and broker certificates, revokes them and publishes the CRL."""

    KEY_FILE = "ca.key.pem"
    CERT_FILE = "ca.cert.pem"
    REVOKED_FILE = "revoked.json"
    CRL_FILE = "crl.pem"

    def __init__(
        self,
        folder: Path,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        clock: Clock = utc_now,
    ) -> None:
        self.folder = folder
        self._key = key
        self.cert = cert
        self._clock = clock

    @classmethod
    def init(
        cls,
        folder: Path,
        *,
        common_name: str = "edge-fleet device CA",
        days: int = 3650,
        clock: Clock = utc_now,
    ) -> CertificateAuthority:
        """Create the CA key and self-signed certificate in ``folder``.

        Raises:
            Conflict: ``folder`` already holds a CA key.
            OSError: ``folder`` cannot be written.
        """
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (folder / cls.KEY_FILE).exists():
            raise Conflict(f"{folder} already holds a CA")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = clock()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(folder / cls.KEY_FILE, key_pem)
        (folder / cls.CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(folder, key, cert, clock)
        ca.crl_pem()
        return ca

    @classmethod
    def load(cls, folder: Path, *, clock: Clock = utc_now) -> CertificateAuthority:
        """Load the CA from ``folder``.

        Raises:
            ConfigError: no CA there, or its files cannot be read.
        """
        try:
            key = serialization.load_pem_private_key((folder / cls.KEY_FILE).read_bytes(), None)
            cert = x509.load_pem_x509_certificate((folder / cls.CERT_FILE).read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the CA from {folder}: {e}", code="ca_missing") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"the CA key in {folder} is not an EC key", code="ca_missing")
        return cls(folder, key, cert, clock)

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM: what brokers, servers and devices trust."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    # --- issuing -------------------------------------------------------------------

    def sign_csr(self, csr_pem: bytes, device_id: str, days: int = 365) -> IssuedCertificate:
        """Issue a client certificate with ``CN = device_id`` for the key in ``csr_pem``.

        Raises:
            CsrRejected: the CSR does not parse, its signature does not verify, its key is
                weak (RSA < 2048 bits, EC below P-256, DSA...), its hash is weak, or its
                CN/SAN is not ``device_id``.
            ValidationError: ``device_id`` is not a valid device id, or ``days`` < 1.
        """
        if not is_safe_device_id(device_id):
            raise ValidationError(f"invalid device id {device_id!r}", code="device_id_invalid")
        if days < 1:
            raise ValidationError(f"a certificate must be valid for at least a day, not {days}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CsrRejected("the CSR is not a PEM certificate request") from None
        if not csr.is_signature_valid:
            raise CsrRejected("the CSR's signature does not verify")
        _check_key(csr.public_key())
        if csr.signature_hash_algorithm is not None and not isinstance(
            csr.signature_hash_algorithm, _STRONG_HASHES
        ):
            raise CsrRejected(f"the CSR is signed with {csr.signature_hash_algorithm.name}")
        _check_subject(csr, device_id)

        now = self._clock()
        not_after = min(now + timedelta(days=days), self.cert.not_valid_after_utc)
        builder = self._leaf(csr.public_key(), device_id, now, not_after)
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"{DEVICE_URI_PREFIX}{device_id}")]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            device_id, cert.serial_number, not_after, cert.public_bytes(serialization.Encoding.PEM)
        )

    def issue_server_certificate(
        self,
        hostnames: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
        days: int = 825,
    ) -> tuple[bytes, bytes]:
        """A new key and ``serverAuth`` certificate for a broker or server: ``(key_pem, cert_pem)``.

        The key is returned, never stored here; write it with mode 0600.

        Raises:
            ValueError: an IP address does not parse, or no name at all is given.
        """
        if not hostnames and not ip_addresses:
            raise ValueError("a server certificate needs a hostname or an IP address")
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        now = self._clock()
        not_after = min(now + timedelta(days=days), self.cert.not_valid_after_utc)
        common_name = hostnames[0] if hostnames else ip_addresses[0]
        cert = (
            self._leaf(key.public_key(), common_name, now, not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)

    def _leaf(
        self,
        public_key: CertificatePublicKeyTypes,
        common_name: str,
        now: datetime,
        not_after: datetime,
    ) -> x509.CertificateBuilder:
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=is_rsa,
                    data_encipherment=False,
                    key_agreement=isinstance(public_key, ec.EllipticCurvePublicKey),
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )

    # --- revocation ----------------------------------------------------------------

    def revoked(self) -> dict[int, datetime]:
        """Revoked serial → revocation time.

        Raises:
            ConfigError: ``revoked.json`` is unreadable.
        """
        try:
            raw = json.loads((self.folder / self.REVOKED_FILE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {self.REVOKED_FILE}: {e}", code="ca_missing") from None
        return {int(serial): datetime.fromisoformat(when) for serial, when in raw.items()}

    def revoke(self, serial: int) -> bytes:
        """Revoke the certificate with ``serial`` and rewrite the CRL; returns the CRL PEM.

        Revoking twice keeps the first revocation time. Brokers read ``crl.pem`` when their
        TLS listener starts: reload or restart them to apply a revocation.

        Raises:
            ValidationError: ``serial`` is not positive.
        """
        if serial <= 0:
            raise ValidationError(f"invalid certificate serial {serial}")
        revoked = self.revoked()
        if serial not in revoked:
            revoked[serial] = self._clock()
            data = {str(s): when.isoformat() for s, when in sorted(revoked.items())}
            _write_private(self.folder / self.REVOKED_FILE, json.dumps(data, indent=1).encode())
        return self.crl_pem()

    def crl_pem(self, days: int = 7) -> bytes:
        """Sign a fresh CRL valid for ``days``, write it to ``crl.pem`` and return it.

        Call it well before ``days`` pass: a broker refuses every client once its CRL
        has expired.
        """
        now = self._clock()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now)
            .next_update(now + timedelta(days=days))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        for serial, when in self.revoked().items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        pem = builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        tmp = self.folder / f".{self.CRL_FILE}.tmp"
        tmp.write_bytes(pem)
        os.replace(tmp, self.folder / self.CRL_FILE)
        return pem


def _check_key(key: object) -> None:
    """Refuse keys weaker than RSA-2048 / P-256, and any other key type."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CsrRejected(f"RSA key of {key.key_size} bits (at least {_MIN_RSA_BITS})")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _STRONG_CURVES):
            raise CsrRejected(f"EC key on {key.curve.name} (P-256, P-384 or P-521 needed)")
    elif not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise CsrRejected(f"unsupported key type {type(key).__name__}")


def _check_subject(csr: x509.CertificateSigningRequest, device_id: str) -> None:
    """The CSR's CN must be ``device_id``; any SAN must name only this device."""
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != device_id:
        found = ", ".join(str(cn.value) for cn in cns) or "none"
        raise CsrRejected(f"the CSR's CN ({found}) is not the device id {device_id}")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    allowed = {device_id, f"{DEVICE_URI_PREFIX}{device_id}"}
    for name in san:
        if not isinstance(name, x509.DNSName | x509.UniformResourceIdentifier) or (
            name.value not in allowed
        ):
            raise CsrRejected(f"the CSR's subject alternative name {name.value} is not this device")
