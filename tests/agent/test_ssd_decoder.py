"""The ``ssd`` detection decoder on the real MediaPipe BlazeFace model, through a bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from agent.errors import BundleError
from agent.loader import load_model
from agent.processing.detection import ssd_anchors
from tests.realdata import ASTRONAUT_FACE_BOX, face_photo

BLAZEFACE_POST = {
    "kind": "detection",
    "decoder": "ssd",
    "labels": ["face"],
    "score_threshold": 0.5,
    "iou_threshold": 0.3,
    "anchors": {
        "input_size": 128,
        "strides": [8, 16, 16, 16],
        "boxes_output": "regressors",
        "scores_output": "classificators",
        "box_scale": 128,
    },
}


def _bundle(models_dir: Path, root: Path, post: dict) -> Path:  # type: ignore[type-arg]
    root.mkdir()
    shutil.copy(models_dir / "face_detection_short_range.tflite", root / "face.tflite")
    manifest = {
        "name": "face",
        "version": "1.0.0",
        "format": "tflite",
        "model": "face.tflite",
        "preprocessing": {
            "kind": "image", "width": 128, "height": 128, "resize": "letterbox", "pad_value": 0,
            "color": "rgb", "scale": 1 / 127.5, "mean": 1.0, "layout": "nhwc",
        },
        "postprocessing": post,
    }  # fmt: skip
    (root / "model.yaml").write_text(yaml.safe_dump(manifest))
    return root


def test_mediapipe_anchor_layout() -> None:
    anchors = ssd_anchors(128, (8, 16, 16, 16), 2, 0.5)
    assert anchors.shape == (896, 2)
    np.testing.assert_allclose(anchors[0], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(anchors[1], anchors[0])  # 2 anchors per cell
    np.testing.assert_allclose(anchors[2], [1.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(anchors[512], [0.5 / 8, 0.5 / 8])  # the 8x8 grid, 6 per cell
    np.testing.assert_allclose(anchors[517], anchors[512])
    np.testing.assert_allclose(anchors[-1], [7.5 / 8, 7.5 / 8])


def test_blazeface_finds_the_face_in_original_pixels(models_dir: Path, tmp_path: Path) -> None:
    model = load_model(
        _bundle(models_dir, tmp_path / "b", BLAZEFACE_POST), work_dir=tmp_path / "w"
    ).model
    photo = cv2.cvtColor(face_photo(), cv2.COLOR_RGB2BGR)  # 512x512
    wide = cv2.copyMakeBorder(photo, 0, 0, 128, 128, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    for image, dx in ((photo, 0), (wide, 128)):  # letterbox undone in both
        png = cv2.imencode(".png", image)[1].tobytes()
        dets = model.infer_image(png).result["detections"]  # type: ignore[index]
        assert len(dets) == 1, dets
        face = dets[0]
        assert face["label"] == "face" and face["score"] > 0.55
        x1, y1, x2, y2 = face["box"]
        fx1, fy1, fx2, fy2 = ASTRONAUT_FACE_BOX
        cx, cy = (x1 + x2) / 2 - dx, (y1 + y2) / 2
        assert fx1 < cx < fx2 and fy1 < cy < fy2
        assert 0.5 < (x2 - x1) / (fx2 - fx1) < 2.0
    noise = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    empty = model.infer_image(cv2.imencode(".png", noise)[1].tobytes()).result
    assert empty == {"detections": []}


def test_ssd_needs_anchors(models_dir: Path, tmp_path: Path) -> None:
    post = {k: v for k, v in BLAZEFACE_POST.items() if k != "anchors"}
    with pytest.raises(BundleError, match="anchors"):
        load_model(_bundle(models_dir, tmp_path / "b", post), work_dir=tmp_path / "w")
