"""Typed config of the pre- and postprocessing kinds, as a bundle manifest declares them.

These schemas are plain pydantic (no OpenCV), so that the fleet server can validate a
manifest without the agent's image stack installed. Each config has a ``kind`` field;
:data:`PreprocessingConfig` and :data:`PostprocessingConfig` are the discriminated
unions the manifest uses, and the registries in :mod:`agent.processing` map each kind
to the class that runs it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Pixel dtypes an image preprocessor may produce.
PixelDtype = Literal["float32", "float16", "uint8", "int8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImagePreprocessing(_Strict):
    """``kind: image``: decode, resize, reorder colours, normalise, lay out one image.

    The value fed to the model is ``(pixel * scale - mean) / std``, per channel, in
    the ``color`` order, cast to ``dtype`` (rounded and clipped for integer dtypes).
    """

    kind: Literal["image"]
    #: The model input this image feeds; may be left out for a single-input model.
    input: str | None = None
    width: int = Field(ge=1, le=16384)
    height: int = Field(ge=1, le=16384)
    resize: Literal["stretch", "letterbox"] = "stretch"
    #: Border value (0-255, before normalisation) of the letterbox padding.
    pad_value: int = Field(114, ge=0, le=255)
    interpolation: Literal["linear", "nearest", "area", "cubic"] = "linear"
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    scale: float = 1.0
    mean: float | list[float] = 0.0
    std: float | list[float] = 1.0
    layout: Literal["nchw", "nhwc"] = "nchw"
    dtype: PixelDtype = "float32"

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @field_validator("std")
    @classmethod
    def _std_nonzero(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if any(x == 0 for x in values):
            raise ValueError("must not contain 0")
        return v

    @model_validator(mode="after")
    def _per_channel_lengths(self) -> ImagePreprocessing:
        for field in ("mean", "std"):
            value = getattr(self, field)
            if isinstance(value, list) and len(value) != self.channels:
                raise ValueError(
                    f"{field} has {len(value)} values but color {self.color!r} has "
                    f"{self.channels} channel(s)"
                )
        return self


class _Labelled(_Strict):
    #: Class names: an inline list, or the name of a UTF-8 text file inside the bundle
    #: holding one label per line (line ``i`` is class ``i``).
    labels: list[str] | str | None = None
    #: The model output to read; may be left out for a single-output model.
    output: str | None = None

    @field_validator("labels")
    @classmethod
    def _labels_not_empty(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, list) and not v:
            raise ValueError("labels must not be an empty list")
        if isinstance(v, str) and not v:
            raise ValueError("labels file name must not be empty")
        return v


class ClassificationPostprocessing(_Labelled):
    """``kind: classification``: the ``top_k`` classes of one score vector."""

    kind: Literal["classification"]
    top_k: int = Field(5, ge=1, le=1000)
    #: Apply a softmax to the output first (for a model that returns logits).
    softmax: bool = False


class SsdAnchors(_Strict):
    """SSD anchors as MediaPipe generates them (``SsdAnchorsCalculator`` with a fixed
    anchor size), for the ``ssd`` decoder. BlazeFace short range: ``input_size: 128``,
    ``strides: [8, 16, 16, 16]`` (896 anchors)."""

    input_size: int = Field(ge=1, le=16384)
    strides: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    #: Anchors per grid cell that each stride adds (2 for MediaPipe's face models).
    per_stride: int = Field(2, ge=1, le=64)
    offset: float = Field(0.5, ge=0.0, le=1.0)
    #: The model output holding ``[1, N, >=4]`` box regressions, and the one with
    #: ``[1, N, C]`` class logits.
    boxes_output: str
    scores_output: str
    #: Regressions are in pixels of this size (MediaPipe: the input size).
    box_scale: float = Field(gt=0)
    #: Scores are logits: apply a sigmoid.
    sigmoid: bool = True


class DetectionPostprocessing(_Labelled):
    """``kind: detection``: decode boxes, drop weak ones, class-aware NMS, map back.

    The ``yolo`` decoder reads rows ``[cx, cy, w, h, (objectness,) class scores...]``
    (YOLOv5 with ``objectness: true``; YOLOv8/11 with ``objectness: false``). A model
    that emits ``[1, 4+C, N]`` (the YOLOv8 export) sets ``transposed: true``. The
    ``ssd`` decoder reads SSD regressions against generated ``anchors`` (MediaPipe's
    BlazeFace and similar); its boxes are normalized to the model input.
    """

    kind: Literal["detection"]
    decoder: Literal["yolo", "ssd"] = "yolo"
    anchors: SsdAnchors | None = None
    objectness: bool = False
    transposed: bool = False
    box_format: Literal["cxcywh", "xyxy"] = "cxcywh"
    #: Box coordinates are fractions of the model input size instead of pixels.
    normalized_boxes: bool = False
    score_threshold: float = Field(0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(0.45, gt=0.0, le=1.0)
    max_detections: int = Field(100, ge=1, le=10000)
    #: Suppress overlapping boxes across classes too (default: per class).
    class_agnostic: bool = False

    @model_validator(mode="after")
    def _anchors_for_ssd(self) -> DetectionPostprocessing:
        if (self.decoder == "ssd") != (self.anchors is not None):
            raise ValueError("'anchors' is required by decoder 'ssd', and only by it")
        return self


class RawPostprocessing(_Strict):
    """``kind: raw``: no postprocessing; the reply carries the raw outputs only."""

    kind: Literal["raw"]


#: Every preprocessing kind (one so far; becomes a discriminated union like the one below).
PreprocessingConfig = ImagePreprocessing
PostprocessingConfig = Annotated[
    ClassificationPostprocessing | DetectionPostprocessing | RawPostprocessing,
    Field(discriminator="kind"),
]
