"""``edge-fleet keys ...`` and ``edge-fleet ca ...`` on real files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet_server.ca import CertificateAuthority
from fleet_server.cli import main
from fleet_server.keys import KeyRole, load_online_signers
from fleet_server.trust import Repositories


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_init_rotate_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, offline = ["--data-dir", str(tmp_path / "d")], str(tmp_path / "off")
    code, out, err = run(capsys, "keys", "init", "--offline-dir", offline, *data)
    assert code == 0 and "2 of 3" in out and "keep" in err
    tuf = tmp_path / "d" / "tuf"
    assert len(list((tmp_path / "off").glob("root-*.pem"))) == 3
    assert all(mode(p) == 0o600 for p in (tuf / "keys").iterdir())
    assert (tuf / "image" / "1.root.json").exists() and (tuf / "director" / "1.root.json").exists()
    code, _, err = run(capsys, "keys", "init", "--offline-dir", offline, *data)
    assert code == 1 and err.startswith("error: keys_invalid:") and "already holds" in err

    code, out, _ = run(capsys, "keys", "status", "--json", *data)
    rows = json.loads(out)
    assert {(r["repository"], r["role"]) for r in rows} == {
        (repo, role)
        for repo in ("image", "director")
        for role in ("root", "targets", "snapshot", "timestamp")
    }
    assert {r["threshold"] for r in rows if r["role"] == "root"} == {"2 of 3"}

    for role in KeyRole:  # every role, the root included
        args = ["keys", "rotate", role.value, "--offline-dir", offline, "--json", *data]
        code, out, err = run(capsys, *args)
        assert code == 0, err
        rotated = json.loads(out)
        if role is not KeyRole.ROOT:
            signers = load_online_signers(tuf / "keys", role.repo)
            assert getattr(signers, role.tuf_role).public_key.keyid == rotated["keyids"][0]
    repos = Repositories(tuf)
    assert repos.image.roots.current().signed.version == 5  # 3 image roles + root, from 1
    director = repos.director
    assert director is not None and director.roots.current().signed.version == 5
    assert len(list((tmp_path / "off" / "retired").glob("root-*.pem"))) == 3

    code, out, _ = run(
        capsys,
        *("keys", "rotate", "root", "--offline-dir", offline, "--json", *data),
        *("--root-count", "2", "--root-threshold", "3"),
    )
    assert code == 1
    code, _, err = run(
        capsys, "keys", "rotate", "root", "--offline-dir", offline, "--data-dir", "x"
    )
    assert code == 1 and err.startswith("error: no_keys:")


def test_ca_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crl_copy = tmp_path / "broker" / "fleet-ca.crl"
    config = tmp_path / "server.yaml"
    config.write_text(f"ca: {{crl_file: {crl_copy}}}\n")
    data = ["--data-dir", str(tmp_path / "d"), "--config", str(config)]
    code, _, err = run(capsys, "ca", "crl", *data)
    assert code == 1 and err.startswith("error: ca_missing:")
    assert run(capsys, "ca", "init", *data)[0] == 0
    assert crl_copy.exists() and mode(crl_copy) == 0o644
    assert run(capsys, "ca", "init", *data)[0] == 1  # never over an existing CA
    ca = CertificateAuthority.load(tmp_path / "d" / "ca")

    code, _, err = run(
        capsys, "ca", "broker-cert", "--host", "broker.lan", "--host", "10.1.2.3", *data
    )
    assert code == 0, err
    out_dir = tmp_path / "d" / "broker"
    cert = x509.load_pem_x509_certificate((out_dir / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.lan"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert mode(out_dir / "server.key") == 0o600
    assert (out_dir / "fleet-ca.crt").read_bytes() == ca.cert_pem
    code, _, err = run(capsys, "ca", "broker-cert", "--host", "broker.lan", *data)
    assert code == 1 and err.startswith("error: file_exists:")
    assert run(capsys, "ca", "broker-cert", "--host", "b2", "--force", *data)[0] == 0

    code, _, err = run(capsys, "ca", "client-cert", "fleet-server", *data)
    assert code == 0 and "CN fleet-server" in err
    client = x509.load_pem_x509_certificate(
        (tmp_path / "d" / "clients" / "fleet-server.crt").read_bytes()
    )
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fleet-server"
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    ca.revoke(client.serial_number)
    out_file = tmp_path / "elsewhere.crl"
    assert run(capsys, "ca", "crl", "--out", str(out_file), *data)[0] == 0
    crl = x509.load_pem_x509_crl(out_file.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(client.serial_number) is not None
    code, out, _ = run(capsys, "ca", "crl", *data)  # to ca.crl_file, nothing printed
    assert out == "" and x509.load_pem_x509_crl(crl_copy.read_bytes()).is_signature_valid(
        ca.cert.public_key()  # type: ignore[arg-type]
    )
