"""The device CA: CSR checks, issued certificates, revocation and the CRL.

The certificates are also used in a real TLS handshake (OpenSSL via ``ssl``, the same
checks a Mosquitto ``mqtts`` listener with ``require_certificate`` and ``crlfile`` makes).
"""

from __future__ import annotations

import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet_server.ca import CertificateAuthority, CsrRejected
from fleet_server.errors import Conflict, ValidationError


def make_csr(
    key: CertificateIssuerPrivateKeyTypes,
    cn: str,
    san: list[x509.GeneralName] | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


def test_init_writes_a_private_key_and_a_self_signed_ca(ca: CertificateAuthority) -> None:
    assert stat.S_IMODE((ca.folder / "ca.key.pem").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((ca.folder / "ca.cert.pem").read_bytes())
    cert.verify_directly_issued_by(cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert CertificateAuthority.load(ca.folder).cert_pem == ca.cert_pem
    with pytest.raises(Conflict):
        CertificateAuthority.init(ca.folder)


def test_signed_csr_gives_a_client_certificate_for_the_device(ca: CertificateAuthority) -> None:
    device_key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.sign_csr(make_csr(device_key, "dev-1"), "dev-1", days=30)

    cert = x509.load_pem_x509_certificate(issued.pem)
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    assert cert.serial_number == issued.serial
    assert cert.public_key() == device_key.public_key()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:edge-fleet:device:dev-1"
    ]
    expected_end = datetime.now(UTC) + timedelta(days=30)
    assert abs(cert.not_valid_after_utc - expected_end) < timedelta(minutes=1)
    # ed25519 device keys are fine too
    ca.sign_csr(make_csr(ed25519.Ed25519PrivateKey.generate(), "dev-2"), "dev-2")


@pytest.mark.parametrize(
    ("cn", "san", "reason"),
    [
        ("dev-2", None, "CN"),
        ("dev-1", [x509.DNSName("broker.example.com")], "subject alternative name"),
        ("dev-1", [x509.UniformResourceIdentifier("urn:edge-fleet:device:dev-2")], "alternative"),
    ],
)
def test_csr_naming_someone_else_is_refused(
    ca: CertificateAuthority, cn: str, san: list[x509.GeneralName] | None, reason: str
) -> None:
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()), cn, san)
    with pytest.raises(CsrRejected, match=reason):
        ca.sign_csr(csr, "dev-1")


def test_weak_keys_forged_signatures_and_bad_ids_are_refused(ca: CertificateAuthority) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CsrRejected, match="1024 bits"):
        ca.sign_csr(make_csr(weak, "dev-1"), "dev-1")
    with pytest.raises(CsrRejected, match="secp224r1"):
        ca.sign_csr(make_csr(ec.generate_private_key(ec.SECP224R1()), "dev-1"), "dev-1")

    good = make_csr(ed25519.Ed25519PrivateKey.generate(), "dev-1")
    der = bytearray(x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ed25519 signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRejected, match="signature does not verify"):
        ca.sign_csr(forged, "dev-1")
    with pytest.raises(CsrRejected, match="not a PEM"):
        ca.sign_csr(b"hello", "dev-1")
    for device in ("..", "a/b", "", "dev 1"):
        with pytest.raises(ValidationError, match="invalid device id"):
            ca.sign_csr(good, device)


def test_revoked_serial_is_in_the_signed_crl(ca: CertificateAuthority) -> None:
    issued = ca.sign_csr(make_csr(ec.generate_private_key(ec.SECP256R1()), "dev-1"), "dev-1")
    other = ca.sign_csr(make_csr(ec.generate_private_key(ec.SECP256R1()), "dev-2"), "dev-2")
    pem = ca.revoke(issued.serial)
    assert (ca.folder / "crl.pem").read_bytes() == pem

    crl = x509.load_pem_x509_crl(pem)
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(issued.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(other.serial) is None
    assert crl.next_update_utc is not None and crl.next_update_utc > datetime.now(UTC)
    reloaded = CertificateAuthority.load(ca.folder)
    assert set(reloaded.revoked()) == {issued.serial}
    first = reloaded.revoked()[issued.serial]
    reloaded.revoke(issued.serial)  # again: no change
    assert reloaded.revoked()[issued.serial] == first


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """A TLS handshake in memory; raises the server's or the client's ssl error."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            client_side.write(b"ping")  # TLS 1.3: the server checks the client cert late
            s_in.write(c_out.read())
            assert server_side.read(4) == b"ping"
            return
    raise AssertionError("handshake did not finish")


def test_device_certificate_works_in_tls_until_revoked(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    server_key, server_cert = ca.issue_server_certificate(("localhost",), ("127.0.0.1",))
    (tmp_path / "server.pem").write_bytes(server_cert + server_key)
    device_key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.sign_csr(make_csr(device_key, "dev-1"), "dev-1")
    (tmp_path / "device.pem").write_bytes(issued.pem + key_pem(device_key))

    def broker() -> ssl.SSLContext:  # like mosquitto: cafile, certfile, crlfile
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "server.pem")
        ctx.load_verify_locations(cadata=ca.cert_pem.decode())
        ctx.load_verify_locations(cafile=str(ca.folder / "crl.pem"))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cadata=ca.cert_pem.decode())
    client.load_cert_chain(tmp_path / "device.pem")

    _handshake(broker(), client)
    ca.revoke(issued.serial)
    with pytest.raises(ssl.SSLError, match="revoked"):
        _handshake(broker(), client)
