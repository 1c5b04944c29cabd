"""Errors of the signing side: the TUF repositories, the keys and the CA.

They extend :mod:`fleet_server.errors`, so the API answers them with their ``code``, a
one-line ``message`` and the HTTP ``status`` of their base class.

    FleetError
    ├── NotFound             404
    │   └── MetadataNotFound      metadata_not_found   no such metadata file (or version)
    ├── ValidationError      422
    │   ├── TargetNameInvalid     target_name_invalid  path traversal, bad alphabet, bad layout
    │   └── TargetInvalid         target_invalid       bad length, hashes or custom fields
    └── SigningError         500  signing_failed       keys that do not meet a role's threshold
"""

from __future__ import annotations

from fleet_server.errors import FleetError, NotFound, ValidationError


class MetadataNotFound(NotFound):
    """The named metadata file (or metadata version) does not exist."""

    code = "metadata_not_found"


class TargetNameInvalid(ValidationError):
    """A target name that is unsafe (``..``, absolute, odd characters) or badly laid out."""

    code = "target_name_invalid"


class TargetInvalid(ValidationError):
    """A target whose length, hashes or custom fields are invalid."""

    code = "target_invalid"


class SigningError(FleetError):
    """Metadata could not be signed so that its own root accepts it (wrong or too few keys)."""

    code = "signing_failed"
