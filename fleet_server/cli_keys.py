"""``edge-fleet keys ...`` and ``edge-fleet ca ...``: signing keys and the device CA.

Run on the server host, against its data dir (no API token: they touch files only)::

    edge-fleet keys init --offline-dir /media/usb/fleet-root [--root-threshold 2 --root-count 3]
    edge-fleet keys rotate ROLE --offline-dir /media/usb/fleet-root
    edge-fleet keys status
    edge-fleet ca init
    edge-fleet ca broker-cert --host broker.example.com [--host 10.0.0.5] [--out-dir DIR]
    edge-fleet ca client-cert fleet-server [--out-dir DIR]
    edge-fleet ca crl [--out FILE]

Where things go: root keys into the offline folder; online keys into
``{tuf_dir}/keys``, the repositories into ``{tuf_dir}/image`` and ``{tuf_dir}/director``
(``tuf_dir`` defaults to ``{data_dir}/tuf``); the CA into ``{data_dir}/ca``.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from fleet_server.ca import CertificateAuthority
from fleet_server.cli_output import block, dump_json, table
from fleet_server.config import ServerSettings, load_server_settings
from fleet_server.errors import ConfigError, Conflict, ValidationError
from fleet_server.integrations import ca_dir, load_ca, tuf_dir
from fleet_server.keys import (
    KeyRole,
    init_keys,
    init_repositories,
    load_online_signers,
    rotate_role,
)
from fleet_server.trust import Revocations, write_public
from fleet_server.tuf import Director, ImageRepository, LocalFolderStore

PASSPHRASE_ENV = "EDGE_FLEET_ROOT_PASSPHRASE"


def add_data_options(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--data-dir`` (env: EDGE_FLEET_DATA_DIR)."""
    p.add_argument("--config", type=Path, help="server settings (YAML)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("EDGE_FLEET_DATA_DIR"),
        help="the server's data dir (default ./edge-fleet-data)",
    )


def _settings(args: argparse.Namespace) -> ServerSettings:
    return load_server_settings(args.config, {"data_dir": args.data_dir})


def _passphrase(args: argparse.Namespace, *, confirm: bool) -> bytes | None:
    """The root keys' passphrase: asked (``--ask-passphrase``), from $EDGE_FLEET_ROOT_PASSPHRASE,
    or none."""
    if getattr(args, "ask_passphrase", False):
        first = getpass.getpass("root key passphrase: ")
        if confirm and getpass.getpass("again: ") != first:
            raise ValidationError("the passphrases differ", code="passphrase_mismatch")
        return first.encode() or None
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def _repositories(tuf: Path) -> tuple[ImageRepository, Director]:
    if not (tuf / "image" / "root.json").exists():
        raise ConfigError(f"no repositories in {tuf}: run edge-fleet keys init", code="no_keys")
    keys = tuf / "keys"
    image = ImageRepository(LocalFolderStore(tuf / "image"), load_online_signers(keys, "image"))
    director = Director(LocalFolderStore(tuf / "director"), load_online_signers(keys, "director"))
    return image, director


def cmd_keys_init(args: argparse.Namespace) -> int:
    """Root keys into the offline folder; online keys and both repositories into tuf_dir."""
    tuf = tuf_dir(_settings(args))
    offline: Path = args.offline_dir
    passphrase = _passphrase(args, confirm=True)
    try:
        inventory = init_keys(
            offline, tuf / "keys", args.root_threshold, args.root_count, passphrase=passphrase
        )
        init_repositories(
            offline,
            tuf / "keys",
            LocalFolderStore(tuf / "image"),
            LocalFolderStore(tuf / "director"),
            root_threshold=args.root_threshold,
            passphrase=passphrase,
        )
    except ValueError as exc:
        raise ValidationError(str(exc), code="bad_threshold") from None
    except OSError as exc:
        raise ConfigError(f"cannot write keys: {exc}", code="keys_unwritable") from None
    if args.json:
        dump_json(
            {
                "root_keyids": inventory.root_keyids,
                "root_threshold": inventory.root_threshold,
                "online_keyids": {str(r): k for r, k in inventory.online_keyids.items()},
            }
        )
        return 0
    block(
        [
            ("root keys", f"{len(inventory.root_keyids)} in {offline}"),
            ("threshold", f"{inventory.root_threshold} of {len(inventory.root_keyids)}"),
            ("online keys", tuf / "keys"),
            ("image repo", tuf / "image"),
            ("director", tuf / "director"),
        ]
    )
    print(
        f"keep {offline} offline (a USB stick, a safe): it is needed only to rotate keys "
        "and renew the roots",
        file=sys.stderr,
    )
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Replace a role's key(s) and publish new roots (both repositories for ``root``)."""
    tuf = tuf_dir(_settings(args))
    image, director = _repositories(tuf)
    role = KeyRole(args.role)
    try:
        keyids = rotate_role(
            role,
            offline_dir=args.offline_dir,
            online_dir=tuf / "keys",
            image=image,
            director=director,
            passphrase=_passphrase(args, confirm=role is KeyRole.ROOT),
            new_root_count=args.root_count,
            new_root_threshold=args.root_threshold,
        )
    except ValueError as exc:
        raise ValidationError(str(exc), code="bad_threshold") from None
    versions = (image.roots.current().signed.version, director.roots.current().signed.version)
    if args.json:
        dump_json({"role": role.value, "keyids": keyids, "root_versions": versions})
        return 0
    block(
        [
            ("rotated", role.value),
            ("new key ids", ", ".join(k[:16] for k in keyids)),
            ("image root", f"version {versions[0]}"),
            ("director root", f"version {versions[1]}"),
        ]
    )
    return 0


def cmd_keys_status(args: argparse.Namespace) -> int:
    """Each repository's root version, expiry and the key ids of every role."""
    image, director = _repositories(tuf_dir(_settings(args)))
    rows: list[list[Any]] = []
    for repo_name, repo in (("image", image), ("director", director)):
        root = repo.roots.current().signed
        for role_name, role in root.roles.items():
            rows.append(
                [
                    repo_name,
                    role_name,
                    f"{role.threshold} of {len(role.keyids)}",
                    ",".join(k[:12] for k in role.keyids),
                    root.version,
                    root.expires.isoformat(timespec="seconds"),
                ]
            )
    if args.json:
        keys = ["repository", "role", "threshold", "keyids", "root_version", "root_expires"]
        dump_json([dict(zip(keys, r, strict=True)) for r in rows])
        return 0
    table(["repository", "role", "threshold", "key ids", "root", "root expires"], rows)
    return 0


def _ca(settings: ServerSettings) -> CertificateAuthority:
    ca = load_ca(settings)
    if ca is None:
        raise ConfigError(f"no CA in {ca_dir(settings)}: run edge-fleet ca init", code="ca_missing")
    return ca


def cmd_ca_init(args: argparse.Namespace) -> int:
    """Create the device CA (EC P-256) in ``{data_dir}/ca`` and its first CRL."""
    settings = _settings(args)
    try:
        ca = CertificateAuthority.init(ca_dir(settings), common_name=args.common_name)
    except OSError as exc:
        raise ConfigError(f"cannot create the CA: {exc}", code="ca_unwritable") from None
    Revocations(
        ca, crl_file=settings.ca.crl_file, validity_days=settings.ca.crl_validity_days
    ).publish()
    block(
        [("CA", ca.folder / ca.CERT_FILE), ("CRL", settings.ca.crl_file or ca.folder / "crl.pem")]
    )
    return 0


def cmd_ca_crl(args: argparse.Namespace) -> int:
    """Re-sign the CRL; write it to ``--out`` (or ``ca.crl_file``), else print it."""
    settings = _settings(args)
    out: Path | None = args.out or settings.ca.crl_file
    pem = Revocations(
        _ca(settings), crl_file=out, validity_days=settings.ca.crl_validity_days
    ).publish()
    if out is None:
        sys.stdout.write(pem.decode("ascii"))
    else:
        print(f"CRL written to {out} (reload the broker to apply it)", file=sys.stderr)
    return 0


def _write_identity(
    out_dir: Path, name: str, key_pem: bytes, cert_pem: bytes, ca_pem: bytes
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    key_file = out_dir / f"{name}.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key_pem)
    finally:
        os.close(fd)
    write_public(out_dir / f"{name}.crt", cert_pem)
    write_public(out_dir / "fleet-ca.crt", ca_pem)
    block(
        [
            ("key", key_file),
            ("certificate", out_dir / f"{name}.crt"),
            ("CA", out_dir / "fleet-ca.crt"),
        ]
    )


def _refuse_overwrite(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise Conflict(f"{path} exists (--force replaces it)", code="file_exists")


def cmd_ca_broker_cert(args: argparse.Namespace) -> int:
    """Issue the broker's ``serverAuth`` certificate (and key) for the given names."""
    settings = _settings(args)
    ca = _ca(settings)
    hosts, ips = [], []
    for host in args.host:
        try:
            ips.append(str(ipaddress.ip_address(host)))
        except ValueError:
            hosts.append(host)
    out_dir: Path = args.out_dir or settings.data_dir / "broker"
    _refuse_overwrite(out_dir / "server.key", args.force)
    key_pem, cert_pem = ca.issue_server_certificate(hosts, ips, days=args.days)
    _write_identity(out_dir, "server", key_pem, cert_pem, ca.cert_pem)
    return 0


def cmd_ca_client_cert(args: argparse.Namespace) -> int:
    """Issue a client certificate for a broker identity that is not a device: the fleet
    server's own (``fleet-server``) or an inference client's (``app-...``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    settings = _settings(args)
    ca = _ca(settings)
    out_dir: Path = args.out_dir or settings.data_dir / "clients"
    _refuse_overwrite(out_dir / f"{args.name}.key", args.force)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.name)]))
        .sign(key, hashes.SHA256())
    )
    issued = ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), args.name, days=args.days)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_identity(out_dir, args.name, key_pem, issued.pem, ca.cert_pem)
    print(f"serial {issued.serial:x} (CN {args.name})", file=sys.stderr)
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``keys`` and ``ca`` to the CLI; ``common`` holds --json and --url."""
    keys = sub.add_parser("keys", help="TUF signing keys (offline root, online roles)")
    ks = keys.add_subparsers(dest="keys_cmd", required=True)
    p = ks.add_parser("init", parents=[common], help="create the keys and both repositories")
    add_data_options(p)
    p.add_argument("--offline-dir", type=Path, required=True, help="where the root keys go")
    p.add_argument("--root-threshold", type=int, default=2, help="root keys needed (default 2)")
    p.add_argument("--root-count", type=int, default=3, help="root keys made (default 3)")
    p.add_argument(
        "--ask-passphrase",
        action="store_true",
        help=f"encrypt the root keys (or ${PASSPHRASE_ENV})",
    )
    p.set_defaults(func=cmd_keys_init)
    p = ks.add_parser("rotate", parents=[common], help="replace a role's key(s), publish new roots")
    add_data_options(p)
    p.add_argument("role", choices=[r.value for r in KeyRole])
    p.add_argument("--offline-dir", type=Path, required=True, help="the current root keys")
    p.add_argument("--root-threshold", type=int, help="root only: the new threshold")
    p.add_argument("--root-count", type=int, help="root only: how many new root keys")
    p.add_argument("--ask-passphrase", action="store_true", help="the root keys are encrypted")
    p.set_defaults(func=cmd_keys_rotate)
    p = ks.add_parser("status", parents=[common], help="root versions, expiry and key ids")
    add_data_options(p)
    p.set_defaults(func=cmd_keys_status)

    ca = sub.add_parser("ca", help="the device CA: broker and client certificates, the CRL")
    cs = ca.add_subparsers(dest="ca_cmd", required=True)
    p = cs.add_parser("init", parents=[common], help="create the CA in {data_dir}/ca")
    add_data_options(p)
    p.add_argument("--common-name", default="edge-fleet device CA")
    p.set_defaults(func=cmd_ca_init)
    p = cs.add_parser("crl", parents=[common], help="re-sign the CRL and write or print it")
    add_data_options(p)
    p.add_argument("--out", type=Path, help="file to write (default: ca.crl_file, else stdout)")
    p.set_defaults(func=cmd_ca_crl)
    p = cs.add_parser("broker-cert", parents=[common], help="the broker's server certificate")
    add_data_options(p)
    p.add_argument("--host", action="append", required=True, help="DNS name or IP (repeat)")
    p.add_argument("--out-dir", type=Path, help="default {data_dir}/broker")
    p.add_argument("--days", type=int, default=825)
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_ca_broker_cert)
    p = cs.add_parser("client-cert", parents=[common], help="a non-device broker identity")
    add_data_options(p)
    p.add_argument("name", help="the CN, i.e. the broker username (fleet-server, app-...)")
    p.add_argument("--out-dir", type=Path, help="default {data_dir}/clients")
    p.add_argument("--days", type=int, default=825)
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_ca_client_cert)
