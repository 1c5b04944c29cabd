"""Publishing a model release: validate the upload, store the artifact, record the release,
hand it to the signing side. Bad uploads store nothing.

The order matters: (1) validate the file on disk, (2) refuse a duplicate before writing
anything, (3) put the artifact (content-addressed, so a retry is idempotent), (4) in one
transaction add the rows and call the :class:`TargetPublisher` hook (TUF targets); if that
fails, the transaction rolls back and the artifact is removed unless another release
already used the same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.bundle import ARCHIVE_SUFFIXES, is_semver
from fleet_server.artifacts import ArtifactStore
from fleet_server.domain import NAME_RE, ModelRelease, Variant
from fleet_server.errors import Conflict, FleetError, ValidationError
from fleet_server.store import releases
from fleet_server.store.engine import Database
from fleet_server.validation import CheckedModel, Validator

log = logging.getLogger("fleet_server.releases")

MODEL_SUFFIXES = (".onnx", ".ort", ".tflite")
UPLOAD_SUFFIXES = (*ARCHIVE_SUFFIXES, *MODEL_SUFFIXES)
DEFAULT_VARIANT = "default"


class TargetPublisher(Protocol):
    """The signing side's hook: make a stored variant a signed target (TUF)."""

    def publish(self, release: ModelRelease, variant: Variant) -> None:
        """Add the variant as a target. Raising aborts the publication."""
        ...


@dataclass(frozen=True)
class UploadRequest:
    """The form fields that came with an upload."""

    filename: str
    version: str | None = None
    variant: str = DEFAULT_VARIANT
    name: str | None = None


def upload_suffix(filename: str) -> str:
    """The suffix that tells what the upload is (``.tar.gz``, ``.onnx``...).

    Raises:
        ValidationError: not a bundle archive or a model file.
    """
    lower = filename.lower()
    for suffix in sorted(UPLOAD_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return suffix
    raise ValidationError(
        f"file: {filename!r} is neither a bundle ({', '.join(ARCHIVE_SUFFIXES)}) "
        f"nor a model file ({', '.join(MODEL_SUFFIXES)})",
        code="unsupported_file",
    )


def _identity(checked: CheckedModel, req: UploadRequest) -> tuple[str, str]:
    """The release's name and version from the manifest and the form, which must agree."""
    name = req.name or checked.name
    if not NAME_RE.match(name):
        raise ValidationError(f"name: {name!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    if checked.version is not None and req.name and req.name != checked.name:
        raise ValidationError(
            f"name: the bundle is {checked.name!r}, not {req.name!r}", code="name_mismatch"
        )
    version = req.version or checked.version
    if version is None:
        raise ValidationError("version: a bare model file needs a version (e.g. 1.3.0)")
    if checked.version is not None and version != checked.version:
        raise ValidationError(
            f"version: the bundle's manifest says {checked.version}, not {version}",
            code="version_mismatch",
        )
    if not is_semver(version) or len(version) > 64:
        raise ValidationError(f"version: {version!r} is not a semantic version (e.g. 1.3.0)")
    if not NAME_RE.match(req.variant):
        raise ValidationError(f"variant: {req.variant!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    return name, version


class ReleaseService:
    """Validates uploads and publishes releases."""

    def __init__(
        self,
        db: Database,
        artifacts: ArtifactStore,
        validator: Validator,
        *,
        publisher: TargetPublisher | None = None,
    ) -> None:
        self.db = db
        self.artifacts = artifacts
        self.validator = validator
        self.publisher = publisher

    def publish(self, path: Path, req: UploadRequest, *, actor: str) -> ModelRelease:
        """Validate the uploaded file at ``path`` and publish it as a release variant.

        ``path`` must end with the upload's own suffix (see :func:`upload_suffix`).

        Raises:
            ValidationError: a bad file type, name, version or variant (422).
            BundleRejected: the bundle or model fails validation (422); nothing stored.
            Conflict: this name, version and variant exist already (409).
            StoreUnavailable: the database cannot be reached (503).
            ArtifactError: the artifact could not be stored.
        """
        checked = self.validator.check(path)
        name, version = _identity(checked, req)
        with self.db.read() as session:
            try:
                existing = releases.get_release(session, name, version)
            except FleetError:
                existing = None
        if existing is not None and any(v.variant == req.variant for v in existing.variants):
            raise Conflict(
                f"{name} {version} already has a variant {req.variant!r}; "
                "releases are immutable: publish a new version",
                code="release_exists",
            )
        manifest = {**checked.manifest, "inputs_seen": checked.inputs}
        manifest["outputs_seen"] = checked.outputs
        manifest["model_sha256"] = checked.model_sha256
        if checked.version is None:  # a bare model: its manifest was made up on the spot
            manifest.update(name=name, version=version)
        with path.open("rb") as fh:
            stored = self.artifacts.put(fh)
        try:
            with self.db.write() as session:
                release = releases.add_variant(
                    session,
                    name=name,
                    version=version,
                    variant=req.variant,
                    kind=checked.kind,
                    format=checked.format,
                    sha256=stored.sha256,
                    size=stored.size,
                    filename=Path(req.filename).name[:255],
                    manifest=manifest,
                    actor=actor,
                )
                if self.publisher is not None:
                    variant = next(v for v in release.variants if v.variant == req.variant)
                    self.publisher.publish(release, variant)
        except BaseException:
            self._discard(stored.sha256)
            raise
        log.info("published %s %s (%s) sha256=%s", name, version, req.variant, stored.sha256)
        return release

    def _discard(self, sha256: str) -> None:
        """Remove an artifact that no committed release uses."""
        try:
            with self.db.read() as session:
                used = releases.artifact_referenced(session, sha256)
        except FleetError:
            return  # cannot tell: keeping an orphan is safer than deleting a used blob
        if not used:
            self.artifacts.delete(sha256)
