"""What a signed target says: safe target paths and the custom fields of both repositories.

The fleet server signs these and the device checks them, so both import this module.

* A target path is ``models/{name}/{version}/{variant}/{file}``: ``/``-separated segments
  of ``[A-Za-z0-9_.-]`` that never start with a dot (so no ``.``/``..``), not absolute,
  at most 512 characters.
* The image repository's ``custom`` says what the artifact is (:class:`ImageTargetCustom`).
* The director's ``custom`` says who must run it (:class:`DirectorTargetCustom`).
* Roots and timestamps carry a signed issue time (:data:`ISSUED_FIELD`).

Unknown custom fields are ignored, so an older agent accepts metadata from a newer server.
"""

from __future__ import annotations

import re
from typing import Annotated, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

#: A signed field of roots and timestamps: when the server issued them (RFC 3339, UTC).
#: A device whose clock is earlier than a trusted issue time has an unsynced clock.
ISSUED_FIELD = "x-edge-fleet-issued"
MAX_TARGET_PATH = 512
#: One path segment: never ``.``/``..`` or a dotfile, never empty.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
#: Device ids, model and profile names (the protocol's alphabet).
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_SEGMENT = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$"
_DIGEST = r"^(sha256:)?[0-9a-f]{64}$"
_VERSION = r"^\d+\.\d+(\.\d+)?([-+][0-9A-Za-z.-]+)?$"

ProfileName = Annotated[str, Field(pattern=ID_PATTERN)]


def is_safe_device_id(device_id: str) -> bool:
    """True when ``device_id`` has the protocol's alphabet and is not ``.``/``..``.

    A device id is a URL path segment (``/tuf/director/{device}/``) and a certificate CN.
    """
    return re.fullmatch(ID_PATTERN, device_id) is not None and device_id not in {".", ".."}


def is_safe_target_path(path: str) -> bool:
    """True when ``path`` is relative, has no ``.``/``..``/empty segment, and a safe alphabet."""
    if not path or len(path) > MAX_TARGET_PATH:
        return False
    return all(_SEGMENT_RE.fullmatch(segment) for segment in path.split("/"))


class ModelTargetPath(NamedTuple):
    """The parts of ``models/{name}/{version}/{variant}/{file}``."""

    name: str
    version: str
    variant: str
    file: str

    def __str__(self) -> str:
        return f"models/{self.name}/{self.version}/{self.variant}/{self.file}"


def parse_model_target(path: str) -> ModelTargetPath | None:
    """The parts of a model target path, or None when ``path`` is unsafe or laid out otherwise."""
    if not is_safe_target_path(path):
        return None
    parts = path.split("/")
    if len(parts) != 5 or parts[0] != "models":
        return None
    return ModelTargetPath(parts[1], parts[2], parts[3], parts[4])


class ImageTargetCustom(BaseModel):
    """``custom`` of an image-repository target: what the artifact is."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(pattern=ID_PATTERN)
    version: str = Field(pattern=_SEGMENT)
    format: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="e.g. onnx, tflite")
    compatible_profiles: tuple[ProfileName, ...] = Field(min_length=1)
    manifest_digest: str = Field(pattern=_DIGEST)
    min_agent_version: str | None = Field(default=None, pattern=_VERSION)


class DirectorTargetCustom(BaseModel):
    """``custom`` of a director target: which device must run it, for which rollout."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    device_id: str = Field(pattern=ID_PATTERN)
    rollout_id: str | None = Field(default=None, max_length=128)
    name: str = Field(pattern=ID_PATTERN)
    version: str = Field(pattern=_SEGMENT)
    variant: str = Field(pattern=_SEGMENT)
    profile: str = Field(pattern=ID_PATTERN)
