"""The fleet server's error hierarchy, grouped by where an error comes from.

Every error carries a stable, machine-readable ``code`` (snake_case), a one-line human
``message`` and the HTTP ``status`` the API answers with. The API returns
``{"error": {"code", "message"}}``; the CLI prints ``error: code: message``. Neither
ever shows a traceback.

    FleetError                    500 internal
    ├── ConfigError               500 config_invalid      bad server/CLI config
    ├── StoreError                500 store_error         the database misbehaved
    │   └── StoreUnavailable      503 db_unavailable      cannot reach the database
    ├── CaUnavailable             503 ca_unavailable      no CA to sign device certificates
    ├── ArtifactError             500 artifact_error      the artifact store failed
    ├── AuthError                 401 unauthorized        missing, unknown or revoked token
    │   ├── TokenExpired          401 token_expired
    │   └── Forbidden             403 forbidden           a valid token with too small a role
    ├── NotFound                  404 not_found
    ├── Conflict                  409 conflict            already exists / already used
    ├── ValidationError           422 invalid             a request that breaks a rule
    │   ├── BundleRejected        422 bundle_invalid      a model upload that fails validation
    │   └── PayloadTooLarge       413 payload_too_large
    └── ServerUnreachable         -   server_unreachable  (CLI) no answer from the server
"""

from __future__ import annotations

from typing import ClassVar


class FleetError(Exception):
    """Base of every error the fleet server raises on purpose."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        """The ``{"code", "message"}`` object used in API error bodies."""
        return {"code": self.code, "message": self.message}


# --- configuration -------------------------------------------------------------------


class ConfigError(FleetError):
    """The server or CLI configuration is invalid."""

    code = "config_invalid"


# --- storage -------------------------------------------------------------------------


class StoreError(FleetError):
    """The database refused or failed an operation."""

    code = "store_error"


class StoreUnavailable(StoreError):
    """The database cannot be reached (down, restarting, or locked for too long)."""

    code = "db_unavailable"
    status = 503


class CaUnavailable(FleetError):
    """No certificate authority is configured, so devices cannot enrol."""

    code = "ca_unavailable"
    status = 503


class ArtifactError(FleetError):
    """The artifact store failed to write, read or delete a blob."""

    code = "artifact_error"


# --- authentication and authorisation ---------------------------------------------


class AuthError(FleetError):
    """No credentials, or credentials that are unknown or revoked."""

    code = "unauthorized"
    status = 401


class TokenExpired(AuthError):
    """A token that was valid once but has expired."""

    code = "token_expired"


class Forbidden(AuthError):
    """Valid credentials whose role is too small for the operation."""

    code = "forbidden"
    status = 403


# --- requests ------------------------------------------------------------------------


class NotFound(FleetError):
    """The named device, release, token... does not exist."""

    code = "not_found"
    status = 404


class Conflict(FleetError):
    """The operation clashes with what exists (a duplicate, a token already used)."""

    code = "conflict"
    status = 409


class ValidationError(FleetError):
    """A request that is well-formed but breaks a rule."""

    code = "invalid"
    status = 422


class BundleRejected(ValidationError):
    """An uploaded bundle or model that fails validation (nothing is stored)."""

    code = "bundle_invalid"


class PayloadTooLarge(ValidationError):
    """An upload over the configured size cap."""

    code = "payload_too_large"
    status = 413


# --- the CLI's side of the wire ---------------------------------------------------


class ServerUnreachable(FleetError):
    """The CLI got no answer from the server."""

    code = "server_unreachable"
    status = 503
