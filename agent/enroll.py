"""``edge-agent enroll``: join a fleet with a single-use token from the operator.

1. Make the device's key pair here (EC P-256: what Mosquitto and OpenSSL take for TLS
   client authentication everywhere). The private key never leaves the device.
2. Send a CSR (``CN = device id``) and the hardware facts (profile, architecture, agent
   version) with the token to ``POST {server}/api/v1/enroll``.
3. Check the answer: a certificate for this key and this id, issued by the CA that came
   with it, and the update trust roots.
4. Only then write the identity and the trust roots into the state dir, and update the
   agent config, keeping its models (see :mod:`agent.enroll_files`).

A refusal (token used, expired or unknown; a device id already enrolled) writes nothing.
"""

from __future__ import annotations

import json
import platform
import re
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

import agent
from agent.config import DEFAULT_STATE_DIR, parse_config
from agent.enroll_files import (
    identity_files,
    merged_config,
    read_config_mapping,
    writable,
    write_atomic,
)
from agent.errors import ConfigError, EdgeError
from agent.updater.targets import is_safe_device_id

ENROL_PATH = "/api/v1/enroll"
MAX_REPLY_BYTES = 1024 * 1024


class EnrolmentError(EdgeError):
    """Enrolment failed; ``code`` is the server's (``token_used``, ``token_expired``...)
    or ``server_unreachable`` / ``enrolment_reply_invalid``."""

    code = "enrolment_failed"


class _Reply(BaseModel):
    """What the server answers (``fleet_server.api.schemas.EnrolOut``)."""

    model_config = ConfigDict(extra="ignore")

    device_id: str
    certificate_pem: str
    ca_certificate_pem: str
    broker_url: str | None = None
    server_url: str | None = None
    trust_root: dict[str, Any] | None = None
    director_root: dict[str, Any] | None = None


@dataclass(frozen=True)
class EnrolResult:
    """What enrolment wrote, and what the operator should know."""

    device_id: str
    config_path: Path
    state_dir: Path
    files: dict[str, Path]
    broker_url: str | None
    server_url: str
    serial: str
    warnings: list[str] = field(default_factory=list)


def default_device_id() -> str:
    """This machine's host name, as a device id (``[A-Za-z0-9_.-]``, at most 64).

    Raises:
        ConfigError: the host name cannot make a device id (pass ``--device-id``).
    """
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0])[:64]
    if not is_safe_device_id(name):
        raise ConfigError("the host name is not a usable device id: pass --device-id")
    return name


def hardware_facts(profile: str | None = None) -> dict[str, Any]:
    """The facts sent at enrolment: profile (detected unless given), arch, agent version."""
    facts: dict[str, Any] = {
        "arch": platform.machine(),
        "agent_version": agent.__version__,
        "os": platform.system(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    if profile is None:
        from agent.profiles import detect_profile

        try:
            detection = detect_profile()
            profile = detection.profile.name
            facts["profile_reason"] = detection.reason
        except EdgeError as exc:  # enrol anyway; the status will carry the profile later
            facts["profile_error"] = exc.message
    if profile is not None:
        facts["profile"] = profile
    return facts


def make_key_and_csr(device_id: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A new EC P-256 key and a CSR for it with ``CN = device_id`` (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _error_of(exc: urllib.error.HTTPError) -> EnrolmentError:
    try:
        body = json.loads(exc.read(64 * 1024))
        err = body["error"]
        return EnrolmentError(str(err["message"]), code=str(err["code"]))
    except (ValueError, KeyError, TypeError, OSError):
        return EnrolmentError(f"the server answered HTTP {exc.code} {exc.reason}")
    finally:
        exc.close()


def request_enrolment(
    server_url: str,
    body: dict[str, Any],
    *,
    ca_file: Path | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """POST ``body`` to the server's enrol endpoint; the parsed JSON answer.

    Raises:
        EnrolmentError: the server refused (its code and message), could not be reached
            (``server_unreachable``), or answered something that is not JSON.
    """
    url = server_url.rstrip("/") + ENROL_PATH
    if not url.startswith(("http://", "https://")):
        raise EnrolmentError(f"--server {server_url!r} is not an http(s) URL", code="bad_arguments")
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise EnrolmentError(f"--server-ca: {exc}", code="bad_arguments") from None
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": f"edge-agent/{agent.__version__}",
        },
    )
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), urllib.request.ProxyHandler({})
    )
    try:
        with opener.open(request, timeout=timeout_s) as response:
            data = response.read(MAX_REPLY_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise _error_of(exc) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EnrolmentError(f"cannot reach {url}: {reason}", code="server_unreachable") from None
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise EnrolmentError(
            "the server's answer is not JSON", code="enrolment_reply_invalid"
        ) from None
    return reply


def check_reply(raw: dict[str, Any], device_id: str, key: ec.EllipticCurvePrivateKey) -> _Reply:
    """The server's answer, once its certificate is for this key and id and was issued by
    the CA it came with.

    Raises:
        EnrolmentError: ``enrolment_reply_invalid`` when any of that does not hold.
    """

    def bad(why: str) -> EnrolmentError:
        return EnrolmentError(f"the server's answer {why}", code="enrolment_reply_invalid")

    try:
        reply = _Reply.model_validate(raw)
        cert = x509.load_pem_x509_certificate(reply.certificate_pem.encode())
        ca = x509.load_pem_x509_certificate(reply.ca_certificate_pem.encode())
    except (PydanticValidationError, ValueError) as exc:
        raise bad(f"is malformed: {str(exc).splitlines()[0]}") from None
    if reply.device_id != device_id:
        raise bad(f"names device {reply.device_id!r}, not {device_id!r}")
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [c.value for c in cn] != [device_id]:
        raise bad("holds a certificate for another name")
    ours = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, ours
    ) != key.public_key().public_bytes(serialization.Encoding.DER, ours):
        raise bad("holds a certificate for another key")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise bad(f"holds a certificate its CA did not issue ({exc})") from None
    for name, root in (("trust_root", reply.trust_root), ("director_root", reply.director_root)):
        signed = (root or {}).get("signed")
        if root is not None and (not isinstance(signed, dict) or signed.get("_type") != "root"):
            raise bad(f"holds a {name} that is not a TUF root")
    return reply


def enroll(
    server_url: str,
    token: str,
    *,
    config_path: Path,
    device_id: str | None = None,
    state_dir: Path | None = None,
    profile: str | None = None,
    server_ca: Path | None = None,
    timeout_s: float = 30.0,
) -> EnrolResult:
    """Enrol this device with the fleet server at ``server_url`` (see the module doc).

    ``device_id`` defaults to the config's, then to the host name; ``state_dir`` to the
    config's, then ``/var/lib/edge-agent``; ``server_ca`` is the CA of an https server
    whose certificate the system does not trust.

    Raises:
        ConfigError: the existing config is not a mapping, the device id is invalid, or the
            state dir or config cannot be written (checked before the token is spent).
        EnrolmentError: the server refused (``token_used``, ``token_expired``,
            ``bad_enrolment_token``, ``device_exists``, ``csr_rejected``...), could not be
            reached (``server_unreachable``), or answered something unusable
            (``enrolment_reply_invalid``). Nothing is written in these cases.
        OSError: writing failed after the server signed (rerun with a new token).
    """
    current = read_config_mapping(config_path)
    device_id = device_id or str(current.get("device_id") or "") or default_device_id()
    if not is_safe_device_id(device_id):
        raise ConfigError(f"device id {device_id!r}: must match [A-Za-z0-9_.-]{{1,64}}")
    state = state_dir or Path(current.get("state_dir") or DEFAULT_STATE_DIR)
    for place in (state, config_path.parent):  # files are replaced: the folder is written
        if not writable(place):
            raise ConfigError(f"{place}: not writable (run as the agent's user, or root)")
    key, csr = make_key_and_csr(device_id)
    facts = hardware_facts(profile or current.get("profile"))
    body = {"token": token, "csr_pem": csr, "facts": facts}
    reply = check_reply(
        request_enrolment(server_url, body, ca_file=server_ca, timeout_s=timeout_s), device_id, key
    )

    files = identity_files(state)
    server = reply.server_url or server_url.rstrip("/")
    warnings = []
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(files["key"], key_pem, 0o600)
    write_atomic(files["cert"], reply.certificate_pem.encode())
    write_atomic(files["ca"], reply.ca_certificate_pem.encode())
    if reply.trust_root is not None and reply.director_root is not None:
        write_atomic(files["image_root"], json.dumps(reply.trust_root).encode())
        write_atomic(files["director_root"], json.dumps(reply.director_root).encode())
    else:
        files.pop("image_root")
        files.pop("director_root")
        warnings.append("the server gave no update trust roots: OTA updates stay off")
    serial = format(
        x509.load_pem_x509_certificate(reply.certificate_pem.encode()).serial_number, "x"
    )
    record = {
        "device_id": device_id,
        "server_url": server,
        "broker_url": reply.broker_url,
        "certificate_serial": serial,
        "enrolled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(files["record"], json.dumps(record, indent=1).encode())

    config = merged_config(
        current,
        device_id=device_id,
        state_dir=state,
        files=files,
        broker_url=reply.broker_url,
        server_url=server,
        server_ca=server_ca,
    )
    if "mqtt" not in config:
        warnings.append(f"the server gave no broker URL: set mqtt.url in {config_path}")
    else:
        try:
            parse_config(config, str(config_path))
        except ConfigError as exc:
            warnings.append(f"the config does not validate yet: {exc.message}")
    mode = config_path.stat().st_mode & 0o777 if config_path.exists() else 0o644
    write_atomic(config_path, yaml.safe_dump(config, sort_keys=False).encode(), mode)
    return EnrolResult(
        device_id=device_id,
        config_path=config_path,
        state_dir=state,
        files=files,
        broker_url=reply.broker_url,
        server_url=server,
        serial=serial,
        warnings=warnings,
    )
