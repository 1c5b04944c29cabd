"""Where enrolment puts things: the device's identity files and its agent config.

Under the state dir::

    identity/device.key  (0600)   identity/device.crt   identity/ca.crt
    identity/enrolment.json       (the server and broker URLs, the serial, when)
    tuf/image-root.json           tuf/director-root.json

Every file is written atomically (temp file, fsync, rename). The agent config keeps what
it had (models, limits...); enrolment sets ``device_id``, ``state_dir``, ``mqtt`` (the
broker URL and, for ``mqtts://``, the three TLS files) and ``updates`` (the server URL and
the trust roots) where the config knows that section.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from agent.config import AgentConfig
from agent.errors import ConfigError


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` (tempfile, fsync, rename, fsync of the folder).

    Raises:
        OSError: the folder cannot be written.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_config_mapping(path: Path) -> dict[str, Any]:
    """The agent config at ``path`` as a plain mapping (empty when the file is missing).

    Raises:
        ConfigError: the file exists but is not a YAML mapping.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping")
    return data


def merged_config(
    current: dict[str, Any],
    *,
    device_id: str,
    state_dir: Path,
    files: dict[str, Path],
    broker_url: str | None,
    server_url: str,
    server_ca: Path | None,
    with_updates: bool | None = None,
) -> dict[str, Any]:
    """``current`` with the enrolment's identity, broker and update settings put in.

    ``with_updates`` (default: whether :class:`AgentConfig` has an ``updates`` section)
    says whether the ``updates`` section is written."""
    if with_updates is None:
        with_updates = "updates" in AgentConfig.model_fields
    config = dict(current)
    config["device_id"] = device_id
    config["state_dir"] = str(state_dir)
    mqtt = {
        k: v
        for k, v in dict(config.get("mqtt") or {}).items()
        if k not in ("username", "password", "tls", "client_id")
    }
    url = broker_url or mqtt.get("url")
    if url is not None:
        mqtt["url"] = url
        if str(url).startswith("mqtts://"):
            mqtt["tls"] = {
                "ca_file": str(files["ca"]),
                "cert_file": str(files["cert"]),
                "key_file": str(files["key"]),
            }
        config["mqtt"] = mqtt
    if with_updates and "image_root" in files:
        updates = dict(config.get("updates") or {})
        updates.update(
            server_url=server_url,
            image_root_file=str(files["image_root"]),
            director_root_file=str(files["director_root"]),
            cert_file=str(files["cert"]),
            key_file=str(files["key"]),
        )
        if server_ca is not None:
            updates["ca_file"] = str(server_ca)
        config["updates"] = updates
    return config


def writable(folder: Path) -> bool:
    """True when files can be created in ``folder`` (or, if it does not exist yet, in its
    nearest existing parent, where it would be made): checked before the token is spent,
    without creating anything."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def identity_files(state_dir: Path) -> dict[str, Path]:
    """Where enrolment writes the device's identity and trust roots under ``state_dir``."""
    return {
        "key": state_dir / "identity" / "device.key",
        "cert": state_dir / "identity" / "device.crt",
        "ca": state_dir / "identity" / "ca.crt",
        "record": state_dir / "identity" / "enrolment.json",
        "image_root": state_dir / "tuf" / "image-root.json",
        "director_root": state_dir / "tuf" / "director-root.json",
    }
