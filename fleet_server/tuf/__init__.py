"""The fleet server's signing side (TUF, Uptane): the image repository and the director.

* :class:`ImageRepository` signs every artifact the fleet may run (served at ``/tuf/image/``).
* :class:`Director` signs, per device, exactly what that device must run (served at
  ``/tuf/director/{device}/``).
* Both keep their files in a :class:`MetadataStore` (:class:`LocalFolderStore` by default).
* Keys live in :mod:`fleet_server.keys`; the device side is :mod:`agent.updater.verify`.
"""

from __future__ import annotations

from fleet_server.tuf.director import (
    Assignment,
    Director,
    DirectorConfig,
    DirectorMetadata,
    check_device_id,
)
from fleet_server.tuf.errors import MetadataNotFound, SigningError, TargetInvalid, TargetNameInvalid
from fleet_server.tuf.image_repo import ImageRepoConfig, ImageRepository, RefreshResult, custom_of
from fleet_server.tuf.signing import RoleSigners
from fleet_server.tuf.storage import LocalFolderStore, MemoryStore, MetadataStore

__all__ = [
    "Assignment",
    "Director",
    "DirectorConfig",
    "DirectorMetadata",
    "ImageRepoConfig",
    "ImageRepository",
    "LocalFolderStore",
    "MemoryStore",
    "MetadataNotFound",
    "MetadataStore",
    "RefreshResult",
    "RoleSigners",
    "SigningError",
    "TargetInvalid",
    "TargetNameInvalid",
    "check_device_id",
    "custom_of",
]
