"""The ``detection`` postprocessor: decode boxes, threshold, class-aware NMS, map back.

Result shape::

    {"detections": [{"label": "person", "class_id": 0, "score": 0.87,
                     "box": [x1, y1, x2, y2]}, ...]}

best first, at most ``max_detections`` entries. ``box`` is in pixels of the original
image (letterbox or stretch undone, clipped to the image) when the request was an
image; for a tensor request it stays in model-input coordinates. ``label`` is null
when the bundle has no labels. Scores are rounded to 6 decimals, boxes to 2.

Everything is vectorised numpy; NMS is OpenCV's ``_dnn.NMSBoxesBatched`` (per
class) or ``NMSBoxes`` (``class_agnostic: true``), which suppress a box whose IoU
with a better one is above ``iou_threshold``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from agent.errors import InferenceError
from agent.processing.base import Array, ImageMeta, select_output
from agent.processing.config import DetectionPostprocessing

#: OpenCV's stubs type the NMS arguments as sequences; the binding takes numpy arrays
#: natively (no copy), which is what we pass.
_dnn: Any = cv2.dnn

#: Candidates kept for NMS after the score threshold, best first (as YOLOv5/v8 do).
MAX_CANDIDATES = 30000


@dataclass(frozen=True)
class Candidates:
    """Decoded detections before NMS: ``boxes`` are ``[N, 4]`` xyxy in model-input units."""

    boxes: Array
    scores: Array
    class_ids: Array
    num_classes: int


def decode_yolo(outputs: dict[str, Array], config: DetectionPostprocessing) -> Candidates:
    """Decode one YOLO output (``[1, N, K]``, ``[N, K]``, or ``[1, K, N]`` when
    ``transposed``) into boxes, best class scores and class ids.

    Raises:
        InferenceError: the output shape does not fit the config.
    """
    output = select_output(outputs, config.output, "detection")
    rows = np.asarray(output)
    if rows.ndim == 3:
        if rows.shape[0] != 1:
            raise InferenceError(f"detection: expected batch 1, got shape {list(rows.shape)}")
        rows = rows[0]
    if rows.ndim != 2:
        raise InferenceError(f"detection: expected a 2-D or 3-D output, got {list(output.shape)}")
    if config.transposed:
        rows = rows.T
    first_class = 5 if config.objectness else 4
    if rows.shape[1] <= first_class:
        raise InferenceError(
            f"detection: rows of {rows.shape[1]} values leave no class scores "
            f"(objectness: {str(config.objectness).lower()}, transposed: "
            f"{str(config.transposed).lower()})"
        )
    rows = rows.astype(np.float32, copy=False)
    class_scores = rows[:, first_class:]
    class_ids = class_scores.argmax(axis=1)
    scores = np.take_along_axis(class_scores, class_ids[:, None], axis=1)[:, 0]
    if config.objectness:
        scores = scores * rows[:, 4]
    boxes = rows[:, :4]
    if config.box_format == "cxcywh":
        half = boxes[:, 2:4] / 2
        boxes = np.concatenate([boxes[:, 0:2] - half, boxes[:, 0:2] + half], axis=1)
    return Candidates(boxes, scores, class_ids.astype(np.int32), class_scores.shape[1])


@functools.lru_cache(maxsize=16)
def ssd_anchors(input_size: int, strides: tuple[int, ...], per_stride: int, offset: float) -> Array:
    """``[N, 2]`` anchor centres (normalized) in MediaPipe's order: strides in turn, a
    stride repeated in a row sharing one grid (its anchors interleaved per cell)."""
    centres: list[Array] = []
    i = 0
    while i < len(strides):
        stride, repeat = strides[i], 0
        while i < len(strides) and strides[i] == stride:
            repeat += 1
            i += 1
        cells = -(-input_size // stride)  # ceil
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grid = (np.stack([xs, ys], axis=-1).reshape(-1, 2) + offset) / cells
        centres.append(np.repeat(grid, repeat * per_stride, axis=0))
    return np.concatenate(centres).astype(np.float32)


def decode_ssd(outputs: dict[str, Array], config: DetectionPostprocessing) -> Candidates:
    """Decode SSD regressions (``[cx, cy, w, h, ...]`` offsets in ``box_scale`` units)
    against the generated anchors into normalized xyxy boxes and class scores.

    Raises:
        InferenceError: a named output is missing or the anchor count does not match.
    """
    a = config.anchors
    assert a is not None  # checked by the config
    raw_boxes: Array = select_output(outputs, a.boxes_output, "detection").astype(np.float32)
    raw_scores: Array = select_output(outputs, a.scores_output, "detection").astype(np.float32)
    raw_boxes = raw_boxes.reshape(-1, raw_boxes.shape[-1])
    raw_scores = raw_scores.reshape(raw_boxes.shape[0], -1)
    anchors = ssd_anchors(a.input_size, tuple(a.strides), a.per_stride, a.offset)
    if anchors.shape[0] != raw_boxes.shape[0] or raw_boxes.shape[1] < 4:
        raise InferenceError(
            f"detection: {raw_boxes.shape[0]} box rows of {raw_boxes.shape[1]} values, "
            f"but the anchors config gives {anchors.shape[0]} anchors"
        )
    centre = raw_boxes[:, 0:2] / a.box_scale + anchors
    half = raw_boxes[:, 2:4] / a.box_scale / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    if a.sigmoid:
        raw_scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores, -80.0, 80.0)))
    class_ids = raw_scores.argmax(axis=1)
    scores = np.take_along_axis(raw_scores, class_ids[:, None], axis=1)[:, 0]
    return Candidates(boxes, scores, class_ids.astype(np.int32), raw_scores.shape[1])


Decoder = Callable[[dict[str, Array], DetectionPostprocessing], Candidates]

#: decoder name -> function. The one registry of box decoders.
DECODERS: dict[str, Decoder] = {
    "yolo": decode_yolo,
    "ssd": decode_ssd,
}


class DetectionPostprocessor:
    """Runs one :class:`DetectionPostprocessing` config. Stateless and thread-safe."""

    def __init__(self, config: DetectionPostprocessing, labels: Sequence[str] | None):
        self.config = config
        self.labels = tuple(labels) if labels is not None else None
        self._decode = DECODERS[config.decoder]

    def __call__(self, outputs: dict[str, Array], meta: ImageMeta | None) -> dict[str, Any]:
        """The ``{"detections": [...]}`` result; see the module docstring.

        Raises:
            InferenceError: the output shape does not fit the config, or a class id is
                beyond the bundle's labels.
        """
        cfg = self.config
        cand = self._decode(outputs, cfg)
        if self.labels is not None and cand.num_classes != len(self.labels):
            raise InferenceError(
                f"detection: the output has {cand.num_classes} classes but the bundle has "
                f"{len(self.labels)} labels"
            )
        keep = np.isfinite(cand.scores) & (cand.scores >= cfg.score_threshold)
        keep &= np.isfinite(cand.boxes).all(axis=1)
        boxes, scores, class_ids = cand.boxes[keep], cand.scores[keep], cand.class_ids[keep]
        if scores.size > MAX_CANDIDATES:
            best = np.argpartition(-scores, MAX_CANDIDATES)[:MAX_CANDIDATES]
            boxes, scores, class_ids = boxes[best], scores[best], class_ids[best]
        if (cfg.normalized_boxes or cfg.decoder == "ssd") and meta is not None:
            boxes = boxes * np.array([meta.input_width, meta.input_height] * 2, dtype=np.float32)
        chosen = self._nms(boxes, scores, class_ids)
        boxes, scores, class_ids = boxes[chosen], scores[chosen], class_ids[chosen]
        if meta is not None:
            boxes = meta.to_original(boxes)
        return {"detections": self._rows(boxes, scores, class_ids)}

    def _nms(self, boxes: Array, scores: Array, class_ids: Array) -> Array:
        """Indices kept by NMS, best score first, at most ``max_detections``."""
        if scores.size == 0:
            return np.zeros(0, dtype=np.int64)
        cfg = self.config
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        # OpenCV drops scores <= its threshold; ours (>=) was applied above, so pass 0.
        # Its ``top_k`` caps the candidates *before* NMS, so it is not used: the cap on
        # detections is applied to what NMS keeps.
        if cfg.class_agnostic:
            idx = _dnn.NMSBoxes(xywh, scores, 0.0, cfg.iou_threshold)
        else:
            idx = _dnn.NMSBoxesBatched(xywh, scores, class_ids, 0.0, cfg.iou_threshold)
        chosen = np.asarray(idx, dtype=np.int64).reshape(-1)
        # Best first (OpenCV's batched variant returns indices in per-class order).
        order = np.argsort(-scores[chosen], kind="stable")
        return chosen[order][: cfg.max_detections]

    def _rows(self, boxes: Array, scores: Array, class_ids: Array) -> list[dict[str, Any]]:
        labels = self.labels
        return [
            {
                "label": labels[c] if labels is not None else None,
                "class_id": c,
                "score": round(s, 6),
                "box": [round(v, 2) for v in box],
            }
            for c, s, box in zip(
                class_ids.tolist(), scores.astype(np.float64).tolist(), boxes.tolist(), strict=True
            )
        ]
