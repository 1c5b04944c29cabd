"""Model bundles: a directory (or ``.tar``/``.tgz``/``.tar.gz`` of one) holding a model
file and its ``model.yaml`` manifest; or a bare ``.onnx``/``.tflite`` file.

The format is documented for users in ``docs/bundles.md``. Nothing here imports a
runtime or OpenCV, so the fleet server can validate bundles too.
"""

from __future__ import annotations

from agent.bundle.extract import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MEMBERS,
    ExtractLimits,
    extract_archive,
)
from agent.bundle.loader import ARCHIVE_SUFFIXES, Bundle, open_bundle, sha256_file
from agent.bundle.manifest import (
    MANIFEST_NAME,
    GoldenVector,
    Manifest,
    TensorDecl,
    load_manifest,
    parse_manifest,
)
from agent.bundle.semver import SemVer, is_semver

__all__ = [
    "ARCHIVE_SUFFIXES",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_MEMBERS",
    "MANIFEST_NAME",
    "Bundle",
    "ExtractLimits",
    "GoldenVector",
    "Manifest",
    "SemVer",
    "TensorDecl",
    "extract_archive",
    "is_semver",
    "load_manifest",
    "open_bundle",
    "parse_manifest",
    "sha256_file",
]
