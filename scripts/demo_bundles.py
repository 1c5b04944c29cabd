"""The demo's model bundles, built from the real models ``scripts/fetch_models.py`` fetched.

* ``text-direction``: PP-OCR's text-line direction classifier (ONNX): a PNG or JPEG of a
  line of text in, ``0°`` or ``180°`` out, with a golden vector (an upright line).
* ``face``: MediaPipe BlazeFace short range (TFLite): an image in, face boxes out.

Each is written as a ``.tar.gz`` (what ``edge-fleet model push`` uploads and what an agent
config may name), so the same file can be the devices' starting point and a release.
``benchmarks/ota_e2e.py`` uses them too.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml


def text_png(text: str, upside_down: bool = False) -> bytes:
    """A PNG of one line of black text on white (rotated 180° when ``upside_down``)."""
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_DUPLEX, 1.2, 2)
    img = np.full((h + base + 20, w + 20, 3), 255, np.uint8)
    cv2.putText(img, text, (10, h + 10), cv2.FONT_HERSHEY_DUPLEX, 1.2, (0, 0, 0), 2, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", cv2.rotate(img, cv2.ROTATE_180) if upside_down else img)
    if not ok:
        raise RuntimeError("cv2 could not encode a PNG")
    return bytes(png.tobytes())


def face_jpeg() -> bytes | None:
    """A real photo with a face (scikit-image's astronaut, shipped in its wheel), or None
    when scikit-image is not installed (``scripts/setup --demo`` installs it)."""
    try:
        from skimage import data
    except ImportError:
        return None
    bgr = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # type: ignore[no-untyped-call]
    return bytes(cv2.imencode(".jpg", bgr)[1].tobytes())


def _tgz(dest: Path, files: dict[str, bytes]) -> Path:
    """``files`` as a gzipped tar; the same files always make the same bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(dest, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


def text_direction_bundle(models: Path, dest_dir: Path, version: str = "1.0.0") -> Path:
    """PP-OCR's classifier as ``text-direction-{version}.tar.gz`` in ``dest_dir``."""
    manifest: dict[str, Any] = {
        "name": "text-direction",
        "version": version,
        "format": "onnx",
        "model": "model.onnx",
        "description": "PP-OCR mobile v2 text-line direction classifier (0 or 180 degrees)",
        "preprocessing": {
            "kind": "image", "width": 192, "height": 48, "resize": "letterbox",
            "pad_value": 128, "color": "rgb", "scale": 1 / 255, "mean": 0.5, "std": 0.5,
            "layout": "nchw",
        },
        "postprocessing": {"kind": "classification", "top_k": 2, "labels": ["0°", "180°"]},
        "golden": [{"name": "upright", "image": "upright.png", "top_label": "0°"}],
    }  # fmt: skip
    files = {
        "model.yaml": yaml.safe_dump(manifest, allow_unicode=True).encode(),
        "model.onnx": (models / "ppocr_cls.onnx").read_bytes(),
        "upright.png": text_png("edge fleet 2026"),
    }
    return _tgz(dest_dir / f"text-direction-{version}.tar.gz", files)


def face_bundle(models: Path, dest_dir: Path, version: str = "1.0.0") -> Path:
    """BlazeFace as ``face-{version}.tar.gz`` in ``dest_dir``: boxes in original pixels."""
    manifest: dict[str, Any] = {
        "name": "face",
        "version": version,
        "format": "tflite",
        "model": "face_detection_short_range.tflite",
        "description": "MediaPipe BlazeFace (short range) face detector",
        "preprocessing": {
            "kind": "image", "width": 128, "height": 128, "resize": "letterbox", "pad_value": 0,
            "color": "rgb", "scale": 1 / 127.5, "mean": 1.0, "layout": "nhwc",
        },
        "postprocessing": {
            "kind": "detection", "decoder": "ssd", "labels": ["face"], "score_threshold": 0.5,
            "iou_threshold": 0.3,
            "anchors": {"input_size": 128, "strides": [8, 16, 16, 16],
                        "boxes_output": "regressors", "scores_output": "classificators",
                        "box_scale": 128},
        },
    }  # fmt: skip
    files = {
        "model.yaml": yaml.safe_dump(manifest).encode(),
        manifest["model"]: (models / manifest["model"]).read_bytes(),
    }
    return _tgz(dest_dir / f"face-{version}.tar.gz", files)
