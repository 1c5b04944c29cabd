"""The agent's error hierarchy, grouped by where an error comes from.

Every error carries a stable, machine-readable ``code`` (snake_case) and a one-line
human ``message``. The CLI and the MQTT reply path show exactly those two things to
a user, never a traceback.

    EdgeError
    ├── ConfigError          invalid config or device profile (at start-up)
    ├── ModelError           a model or bundle that cannot be loaded or served
    │   ├── BundleError          bad manifest, unsafe archive, failing golden vectors
    │   ├── ModelLoadError       corrupt/truncated file, unsupported op, bad format
    │   ├── ProviderError        an execution provider or delegate that is unusable
    │   └── InferenceError       the runtime failed while running, or produced NaN/Inf
    └── RequestError         a request that cannot be served (the protocol's codes)
        ├── BadRequest           ``bad_request``
        ├── BadInput             ``bad_input``
        ├── PayloadTooLarge      ``payload_too_large``
        ├── UnknownModel         ``unknown_model``
        ├── ModelNotReady        ``model_not_ready``
        ├── Overloaded           ``overloaded``
        └── DeadlineExceeded     ``deadline_exceeded``

Codes of :class:`RequestError` subclasses are exactly the error codes of the device
protocol (``docs/protocol.md``); any other error reaching a client is sent as
``internal``.
"""

from __future__ import annotations

from typing import ClassVar


class EdgeError(Exception):
    """Base of every error the agent raises on purpose."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        """The ``{"code", "message"}`` object used in replies and events."""
        return {"code": self.code, "message": self.message}


# --- configuration -----------------------------------------------------------------


class ConfigError(EdgeError):
    """The agent config or a device profile is invalid. Raised at start-up."""

    code = "config_invalid"


# --- models ------------------------------------------------------------------------


class ModelError(EdgeError):
    """A model or bundle cannot be loaded, validated or run."""

    code = "model_error"


class BundleError(ModelError):
    """A bundle is malformed, unsafe, or fails its own golden vectors."""

    code = "bundle_invalid"


class ModelLoadError(ModelError):
    """The model file is corrupt, truncated, of an unknown format, or uses an unsupported op."""

    code = "model_load_failed"


class ProviderError(ModelError):
    """An execution provider or delegate is missing or unusable (and was required)."""

    code = "provider_unavailable"


class InferenceError(ModelError):
    """The runtime failed while running a request, or produced non-finite outputs."""

    code = "inference_failed"


# --- requests (codes are the device protocol's) -------------------------------------


class RequestError(EdgeError):
    """A request that cannot be served; ``code`` is one of the protocol's error codes."""

    code = "internal"


class BadRequest(RequestError):
    code = "bad_request"


class BadInput(RequestError):
    code = "bad_input"


class PayloadTooLarge(RequestError):
    code = "payload_too_large"


class UnknownModel(RequestError):
    code = "unknown_model"


class ModelNotReady(RequestError):
    code = "model_not_ready"


class Overloaded(RequestError):
    code = "overloaded"


class DeadlineExceeded(RequestError):
    code = "deadline_exceeded"


PROTOCOL_ERROR_CODES: frozenset[str] = frozenset(
    {
        "bad_request",
        "bad_input",
        "payload_too_large",
        "unknown_model",
        "model_not_ready",
        "overloaded",
        "deadline_exceeded",
        "internal",
    }
)


def protocol_code(exc: BaseException) -> str:
    """The protocol error code a client sees for ``exc`` (``internal`` when it has none)."""
    if isinstance(exc, EdgeError) and exc.code in PROTOCOL_ERROR_CODES:
        return exc.code
    return "internal"


# --- updates (the device side of OTA: signed metadata and artifacts) ---------------
#
#   UpdateError              update_failed       (a local I/O failure while verifying)
#   ├── MetadataUnavailable      metadata_unavailable      server unreachable, HTTP error
#   ├── MetadataInvalid          metadata_invalid          malformed, oversized, hash mismatch
#   ├── MetadataExpired          metadata_expired
#   ├── RollbackAttack           rollback_attack           a version lower than one already seen
#   ├── BadSignature             bad_signature             signed by no key the root trusts
#   ├── ThresholdNotMet          threshold_not_met         too few of the trusted keys signed
#   ├── ClockUnsynced            clock_unsynced            clock before root or known-good time
#   ├── WrongDevice              wrong_device              director metadata for another device
#   ├── WrongProfile             wrong_profile             a variant for another profile
#   ├── DirectorImageMismatch    director_image_mismatch   director and image repo disagree
#   ├── TargetPathInvalid        target_path_invalid       path traversal or odd characters
#   └── TargetMismatch           target_mismatch           downloaded bytes of the wrong length/hash


class UpdateError(EdgeError):
    """An update that must not be installed: its metadata or artifact failed verification."""

    code = "update_failed"


class MetadataUnavailable(UpdateError):
    """The update server could not be reached or answered with an HTTP error."""

    code = "metadata_unavailable"


class MetadataInvalid(UpdateError):
    """Metadata that is malformed, too large, or whose hashes do not match."""

    code = "metadata_invalid"


class MetadataExpired(UpdateError):
    code = "metadata_expired"


class RollbackAttack(UpdateError):
    """Metadata with a version lower than one this device has already trusted."""

    code = "rollback_attack"


class BadSignature(UpdateError):
    """Metadata signed by no key that the trusted root names for its role."""

    code = "bad_signature"


class ThresholdNotMet(UpdateError):
    """Metadata signed by some, but fewer than the threshold of, trusted keys."""

    code = "threshold_not_met"


class ClockUnsynced(UpdateError):
    """The device clock is earlier than the trusted root's creation or a known-good time."""

    code = "clock_unsynced"


class WrongDevice(UpdateError):
    code = "wrong_device"


class WrongProfile(UpdateError):
    code = "wrong_profile"


class DirectorImageMismatch(UpdateError):
    """The director names a target the image repository lists differently (or not at all)."""

    code = "director_image_mismatch"


class TargetPathInvalid(UpdateError):
    code = "target_path_invalid"


class TargetMismatch(UpdateError):
    """Downloaded bytes whose length or hashes differ from the verified metadata."""

    code = "target_mismatch"
