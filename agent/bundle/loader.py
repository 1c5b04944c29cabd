"""Opening a model source: a bundle directory, a bundle archive, or a bare model file.

Archives are extracted (safely, see :mod:`agent.bundle.extract`) into
``work_dir/<sha256 of the archive>/``: a fresh temporary directory next to it is
filled first and then renamed into place, replacing an earlier extraction of the same
archive, so a half-extracted bundle is never seen there. Every open extracts again;
nothing already on disk is trusted.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import agent
from agent.bundle.extract import DEFAULT_LIMITS, ExtractLimits, extract_archive
from agent.bundle.manifest import MANIFEST_NAME, Manifest, load_manifest
from agent.bundle.semver import SemVer
from agent.errors import BundleError, ModelLoadError
from agent.processing.config import ClassificationPostprocessing, DetectionPostprocessing
from agent.runtimes import format_for_path

Array = npt.NDArray[Any]
ARCHIVE_SUFFIXES = (".tar", ".tgz", ".tar.gz")
#: Largest labels file read (bytes).
MAX_LABELS_BYTES = 16 * 1024 * 1024
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Bundle:
    """An opened, validated model source. Every file it names exists inside ``root``."""

    #: The directory holding the manifest (for a bare model file: the file's directory).
    root: Path
    manifest: Manifest
    model_path: Path
    #: sha256 (hex) of the model file.
    digest: str
    #: The version replies and status report: the manifest's, or ``sha256:<12 hex>``
    #: for a bare model file.
    version: str
    #: Class names resolved from the postprocessing ``labels`` (inline or file).
    labels: tuple[str, ...] | None = None
    #: True for a bare model file opened with a manifest made up on the spot.
    synthesized: bool = False

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def format(self) -> str:
        return self.manifest.format

    def path_of(self, relative: str) -> Path:
        """The file ``relative`` (a manifest path) inside the bundle.

        Raises:
            BundleError: it is missing, not a regular file, or resolves outside ``root``.
        """
        return _inside(self.root, relative)

    def load_array(self, relative: str) -> Array:
        """Load a ``.npy`` file of the bundle (never pickles).

        Raises:
            BundleError: the file is missing or not a valid ``.npy`` array.
        """
        path = self.path_of(relative)
        try:
            array: Array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise BundleError(f"{relative}: not a valid .npy array ({exc})") from None
        if not isinstance(array, np.ndarray):
            raise BundleError(f"{relative}: not a single .npy array")
        return array

    def latency_budget_ms(self, profile: str | None) -> float | None:
        """The latency budget for ``profile`` (else ``default``), or None when unset."""
        budgets = self.manifest.latency_budget_ms
        if profile is not None and profile in budgets:
            return budgets[profile]
        return budgets.get("default")

    def check_compatible(self, profile: str | None, agent_version: str = agent.__version__) -> None:
        """Check ``compatible_profiles`` and ``min_agent_version`` for this device.

        Raises:
            BundleError: ``incompatible_bundle`` when the profile is not listed or the
                agent is older than the bundle needs.
        """
        m = self.manifest
        if m.compatible_profiles and profile not in m.compatible_profiles:
            raise BundleError(
                f"{m.name} {self.version} runs only on profiles "
                f"{', '.join(m.compatible_profiles)}, not {profile!r}",
                code="incompatible_bundle",
            )
        if m.min_agent_version and SemVer(agent_version) < SemVer(m.min_agent_version):
            raise BundleError(
                f"{m.name} {self.version} needs agent {m.min_agent_version} or newer "
                f"(this is {agent_version})",
                code="incompatible_bundle",
            )


def open_bundle(path: Path, work_dir: Path, *, limits: ExtractLimits = DEFAULT_LIMITS) -> Bundle:
    """Open a model source: a bundle directory (or its ``model.yaml``), a ``.tar``,
    ``.tgz`` or ``.tar.gz`` of one, or a bare ``.onnx`` / ``.ort`` / ``.tflite`` file.

    Archives are extracted into ``work_dir/<sha256 of the archive>/``.

    Raises:
        BundleError: ``bundle_not_found`` when ``path`` does not exist; ``bad_archive``
            or ``unsafe_archive`` for an archive that is corrupt or breaks the
            extraction rules; ``bundle_invalid`` for an unknown kind of file, a bad
            manifest, or a file it names that is missing or outside the bundle.
    """
    if not path.exists():
        raise BundleError(f"{path}: no such file or directory", code="bundle_not_found")
    if path.is_dir():
        return _open_dir(path)
    if path.name == MANIFEST_NAME:
        return _open_dir(path.parent)
    if path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return _open_dir(_bundle_root(_extract(path, work_dir, limits)))
    try:
        fmt = format_for_path(path)
    except ModelLoadError:
        raise BundleError(
            f"{path.name}: neither a bundle (directory, .tar, .tgz, .tar.gz) "
            "nor a model file (.onnx, .ort, .tflite)"
        ) from None
    return _open_bare(path, fmt)


def sha256_file(path: Path) -> str:
    """The sha256 (hex) of a file's bytes.

    Raises:
        OSError: the file cannot be read.
    """
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _extract(archive: Path, work_dir: Path, limits: ExtractLimits) -> Path:
    try:
        digest = sha256_file(archive)
        work_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=work_dir))
    except OSError as exc:
        raise BundleError(f"{archive.name}: cannot prepare extraction ({exc})") from None
    dest = work_dir / digest
    try:
        extract_archive(archive, staging, limits)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _bundle_root(extracted: Path) -> Path:
    """The manifest's directory: the archive's top, or its only top-level directory."""
    if (extracted / MANIFEST_NAME).is_file():
        return extracted
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST_NAME).is_file():
        return entries[0]
    raise BundleError(f"no {MANIFEST_NAME} at the top of the archive")


def _open_dir(root: Path) -> Bundle:
    if (root / MANIFEST_NAME).is_symlink():
        _inside(root, MANIFEST_NAME)  # a manifest linked in from elsewhere must stay inside
    manifest = load_manifest(root / MANIFEST_NAME)
    model_path = _inside(root, manifest.model)
    labels = _load_labels(root, manifest)
    for i, vector in enumerate(manifest.golden):
        where = manifest.golden_name(i)
        for rel in [*(vector.inputs or {}).values(), *vector.outputs.values()]:
            _inside(root, rel)
        if vector.image is not None:
            _inside(root, vector.image)
        if vector.top_label is not None and labels is not None and vector.top_label not in labels:
            raise BundleError(
                f"golden vector {where!r}: top_label {vector.top_label!r} is no label"
            )
    return Bundle(
        root=root,
        manifest=manifest,
        model_path=model_path,
        digest=_digest(model_path),
        version=manifest.version,
        labels=labels,
    )


def _open_bare(path: Path, fmt: str) -> Bundle:
    if not path.is_file():
        raise BundleError(f"{path.name}: not a regular file")
    digest = _digest(path)
    name = _UNSAFE_NAME_CHARS.sub("_", path.stem)[:64] or "model"
    manifest = Manifest(
        name=name,
        # Valid semver carrying the digest; replies show ``version`` below instead.
        version=f"0.0.0+sha256.{digest[:12]}",
        format=fmt,
        model=path.name,
        description=f"bare model file {path.name}",
    )
    return Bundle(
        root=path.parent,
        manifest=manifest,
        model_path=path,
        digest=digest,
        version=f"sha256:{digest[:12]}",
        synthesized=True,
    )


def _digest(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise BundleError(f"{path.name}: cannot read ({exc.strerror})") from None


def _inside(root: Path, relative: str) -> Path:
    path = root.joinpath(*relative.split("/"))
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise BundleError(f"{relative}: points outside the bundle")
    if not resolved.is_file():
        raise BundleError(f"{relative}: no such file in the bundle")
    return resolved


def _load_labels(root: Path, manifest: Manifest) -> tuple[str, ...] | None:
    post = manifest.postprocessing
    if not isinstance(post, ClassificationPostprocessing | DetectionPostprocessing):
        return None
    if post.labels is None or isinstance(post.labels, list):
        return tuple(post.labels) if post.labels is not None else None
    path = _inside(root, post.labels)
    if path.stat().st_size > MAX_LABELS_BYTES:
        raise BundleError(f"{post.labels}: labels file over {MAX_LABELS_BYTES} bytes")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise BundleError(f"{post.labels}: labels file is not UTF-8 text") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise BundleError(f"{post.labels}: labels file is empty")
    return tuple(lines)
