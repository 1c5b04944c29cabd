"""Pre- and postprocessing kinds, one registry each.

A bundle manifest names a kind (``preprocessing.kind: image``,
``postprocessing.kind: classification | detection | raw``); :func:`build_preprocessor`
and :func:`build_postprocessor` look the kind up in :data:`PREPROCESSORS` /
:data:`POSTPROCESSORS` and build the object that runs it. Modules that need OpenCV are
imported on first use, so importing this package (and the config schemas in
:mod:`agent.processing.config`, which the bundle manifest uses) does not need OpenCV.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from agent.errors import BundleError
from agent.processing.base import Array, ImageMeta, Postprocessor, Preprocessor
from agent.processing.config import (
    ClassificationPostprocessing,
    DetectionPostprocessing,
    ImagePreprocessing,
    PostprocessingConfig,
    PreprocessingConfig,
    RawPostprocessing,
)

__all__ = [
    "POSTPROCESSORS",
    "PREPROCESSORS",
    "Array",
    "ClassificationPostprocessing",
    "DetectionPostprocessing",
    "ImageMeta",
    "ImagePreprocessing",
    "PostprocessingConfig",
    "Postprocessor",
    "PreprocessingConfig",
    "Preprocessor",
    "RawPostprocessing",
    "build_postprocessor",
    "build_preprocessor",
]

PreprocessorFactory = Callable[[Any], Preprocessor]
PostprocessorFactory = Callable[[Any, Sequence[str] | None], Postprocessor]


def _image(cfg: ImagePreprocessing) -> Preprocessor:
    from agent.processing.image import ImagePreprocessor

    return ImagePreprocessor(cfg)


def _classification(
    cfg: ClassificationPostprocessing, labels: Sequence[str] | None
) -> Postprocessor:
    from agent.processing.classification import ClassificationPostprocessor

    return ClassificationPostprocessor(cfg, labels)


def _detection(cfg: DetectionPostprocessing, labels: Sequence[str] | None) -> Postprocessor:
    from agent.processing.detection import DetectionPostprocessor

    return DetectionPostprocessor(cfg, labels)


def _raw(cfg: RawPostprocessing | None, labels: Sequence[str] | None) -> Postprocessor:
    from agent.processing.raw import RawPostprocessor

    return RawPostprocessor()


#: kind -> factory(config). The one registry of preprocessing kinds.
PREPROCESSORS: dict[str, PreprocessorFactory] = {"image": _image}
#: kind -> factory(config, labels). The one registry of postprocessing kinds.
POSTPROCESSORS: dict[str, PostprocessorFactory] = {
    "classification": _classification,
    "detection": _detection,
    "raw": _raw,
}


def build_preprocessor(cfg: PreprocessingConfig) -> Preprocessor:
    """The preprocessor for a manifest's ``preprocessing`` section.

    Raises:
        BundleError: no preprocessor is registered for ``cfg.kind``.
    """
    factory = PREPROCESSORS.get(cfg.kind)
    if factory is None:
        raise BundleError(f"preprocessing: unknown kind {cfg.kind!r}")
    return factory(cfg)


def build_postprocessor(
    cfg: PostprocessingConfig | None, labels: Sequence[str] | None = None
) -> Postprocessor:
    """The postprocessor for a manifest's ``postprocessing`` section (``raw`` when None).

    ``labels`` are the class names already resolved by the bundle
    (:attr:`agent.bundle.Bundle.labels`).

    Raises:
        BundleError: no postprocessor is registered for ``cfg.kind``.
    """
    kind = "raw" if cfg is None else cfg.kind
    factory = POSTPROCESSORS.get(kind)
    if factory is None:
        raise BundleError(f"postprocessing: unknown kind {kind!r}")
    return factory(cfg, labels)
