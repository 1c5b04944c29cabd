"""Hooks into the signing side: the device CA and the TUF repositories.

Both are optional at run time. Where their files are (relative to the server settings):

* the CA: ``{data_dir}/ca/`` (``ca.key.pem``, ``ca.cert.pem``; ``fleet_server.ca``),
  made by ``edge-fleet ca init``;
* the repositories' metadata: ``{tuf_dir}/image/`` and ``{tuf_dir}/director/``, their
  online keys ``{tuf_dir}/keys/{image,director}-*.pem`` (``fleet_server.keys``), made by
  ``edge-fleet keys init``; ``tuf_dir`` defaults to ``{data_dir}/tuf``.

With no CA, enrolment answers ``ca_unavailable``. With no repositories, releases are
stored but not signed, and ``/tuf/`` answers 404.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

from fleet_server.ca import CertificateAuthority
from fleet_server.config import ServerSettings
from fleet_server.domain import ModelRelease, Variant
from fleet_server.trust import Repositories, Revocations

log = logging.getLogger("fleet_server")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def ca_dir(settings: ServerSettings) -> Path:
    """Where the device CA lives."""
    return settings.data_dir / "ca"


def tuf_dir(settings: ServerSettings) -> Path:
    """Where the TUF metadata and online keys live."""
    return settings.tuf_dir or settings.data_dir / "tuf"


def load_ca(settings: ServerSettings) -> CertificateAuthority | None:
    """The device CA, or ``None`` when none was initialised.

    Raises:
        ConfigError: a CA is there but cannot be loaded.
    """
    folder = ca_dir(settings)
    if not (folder / "ca.key.pem").exists():
        return None
    return CertificateAuthority.load(folder)


def target_path(name: str, version: str, variant: str, filename: str) -> str:
    """The TUF target path of a release variant: ``models/{name}/{version}/{variant}/{file}``."""
    safe = _UNSAFE.sub("_", filename).lstrip(".") or "artifact"
    return f"models/{name}/{version}/{variant}/{safe}"


def compatible_profiles(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The profiles a target is signed for: the manifest's ``compatible_profiles``, or,
    when it lists none ("every profile"), every profile this server knows (the agent's
    built-in ones): a device checks that its own profile is listed."""
    listed = manifest.get("compatible_profiles") or []
    if listed:
        return tuple(str(p) for p in listed)
    return _known_profiles()


@functools.cache
def _known_profiles() -> tuple[str, ...]:
    """Every built-in profile name, parsed once (11 YAML files; rollouts ask per device)."""
    from agent.profiles import list_profiles

    return tuple(sorted(p.name for p in list_profiles()))


class TufPublisher:
    """Signs each published variant into the image repository."""

    def __init__(self, repositories: Repositories) -> None:
        self.repositories = repositories

    def publish(self, release: ModelRelease, variant: Variant) -> None:
        """Add the variant as a signed target.

        Raises:
            FleetError: the signing side refused it (``target_invalid``...).
        """
        from agent.updater.targets import ImageTargetCustom

        manifest = variant.manifest
        custom = ImageTargetCustom(
            name=release.name,
            version=release.version,
            format=variant.format,
            compatible_profiles=compatible_profiles(manifest),
            manifest_digest=str(manifest.get("model_sha256") or variant.sha256),
            min_agent_version=manifest.get("min_agent_version"),
        )
        path = target_path(release.name, release.version, variant.variant, variant.filename)
        self.repositories.image.add_target(path, variant.size, {"sha256": variant.sha256}, custom)


def load_repositories(settings: ServerSettings) -> Repositories | None:
    """The TUF repositories, or None when ``edge-fleet keys init`` has not created them.

    Raises:
        ConfigError: the repository exists but its online keys cannot be loaded.
    """
    base = tuf_dir(settings)
    if not Repositories.present(base):
        return None
    return Repositories(base)


def load_revocations(
    settings: ServerSettings, ca: CertificateAuthority | None
) -> Revocations | None:
    """The CRL publisher of ``ca`` (None without a CA)."""
    if ca is None:
        return None
    return Revocations(
        ca, crl_file=settings.ca.crl_file, validity_days=settings.ca.crl_validity_days
    )
