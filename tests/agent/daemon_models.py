"""Models the daemon tests serve: a slow ONNX model with a tunable run time, an image bundle.

The slow model runs an ONNX ``Loop`` whose trip count is an input, so each request picks
how long it runs (on one core; the loop body is two tiny ops): ``y = n * x``, exactly.
:func:`calibrate_slow` measures the cost of one iteration here, so a test asks for a
duration rather than a count.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests import modelgen


def make_onnx_slow(path: Path) -> Path:
    """``y = n * x``: ``x`` ``[1, 4]`` float32, ``n`` an int64 scalar, by ``n`` Loop iterations."""
    value = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc", "x"], ["acc_out"]),
        ],
        "body",
        [
            value("i", TensorProto.INT64, []),
            value("cond_in", TensorProto.BOOL, []),
            value("acc", TensorProto.FLOAT, [1, 4]),
        ],
        [value("cond_out", TensorProto.BOOL, []), value("acc_out", TensorProto.FLOAT, [1, 4])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "zero"], ["y"], body=body)],
        "slow",
        [value("x", TensorProto.FLOAT, [1, 4]), value("n", TensorProto.INT64, [])],
        [value("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.zeros((1, 4), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", modelgen.ONNX_OPSET)])
    model.ir_version = modelgen.ONNX_IR_VERSION
    onnx.save_model(model, str(path))
    return path


def calibrate_slow(path: Path) -> float:
    """Seconds one Loop iteration of :func:`make_onnx_slow` takes on this machine."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ones((1, 4), np.float32)
    n = 100_000
    session.run(None, {"x": x, "n": np.array(n, np.int64)})
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        session.run(None, {"x": x, "n": np.array(n, np.int64)})
        best = min(best, time.perf_counter() - t0)
    return best / n


def solid_image(bgr: tuple[int, int, int], ext: str, size: tuple[int, int] = (12, 16)) -> bytes:
    """A solid-colour image encoded as ``ext`` (``.png`` or ``.jpg``)."""
    img = np.zeros((*size, 3), np.uint8)
    img[:, :] = bgr
    ok, data = cv2.imencode(ext, img)
    assert ok
    return bytes(data.tobytes())


COLOR_LABELS = ["red", "green", "blue"]
#: BGR colours whose classification by :func:`make_color_bundle` is the label.
BGR = {"red": (0, 0, 255), "green": (0, 255, 0), "blue": (255, 0, 0)}


def make_color_bundle(root: Path, version: str = "1.2.0") -> Path:
    """A bundle folder: an 8x8 RGB classifier with image preprocessing and top-2 classes.

    ``probs = softmax(mean_rgb @ W)``, so a solid red image is ``red`` with a score near 1.
    """
    root.mkdir(parents=True)
    modelgen.make_onnx_classifier(root / "model.onnx", num_classes=3, size=8)
    (root / "blue.png").write_bytes(solid_image(BGR["blue"], ".png"))
    manifest = {
        "name": "colors",
        "version": version,
        "format": "onnx",
        "model": "model.onnx",
        "preprocessing": {
            "kind": "image",
            "width": 8,
            "height": 8,
            "color": "rgb",
            "scale": 1 / 255,
        },
        "postprocessing": {"kind": "classification", "top_k": 2, "labels": COLOR_LABELS},
        "golden": [{"name": "blue", "image": "blue.png", "top_label": "blue"}],
    }
    (root / "model.yaml").write_text(yaml.safe_dump(manifest))
    return root


def color_probs(rgb: tuple[int, int, int]) -> np.ndarray:
    """The classifier's exact output for a solid image of colour ``rgb`` (0-255)."""
    mean = np.asarray(rgb, np.float32)[None, :] / 255.0
    return modelgen.softmax(mean @ modelgen.classifier_weights(3, 3))


def standard_models(folder: Path) -> list[dict[str, Any]]:
    """The models of the daemon tests' agent, as config entries.

    ``affine`` (ONNX, dynamic batch, micro-batches of up to 8), ``q`` (int8 TFLite),
    ``colors`` (an image bundle), ``two`` (two named inputs), ``slow`` (a queue of 4),
    ``nan`` (``log(x)``: NaN for x < 0) and ``broken`` (a corrupt file: state ``failed``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    broken = folder / "broken.onnx"
    broken.write_bytes(b"\x08\x07this is not a model" * 20)
    return [
        {
            "name": "affine",
            "path": modelgen.make_onnx_affine(folder / "affine.onnx"),
            "max_batch": 8,
            "max_delay_ms": 5,
        },
        {"name": "q", "path": modelgen.make_tflite_quantized_add(folder / "q_int8.tflite", "int8")},
        {"name": "colors", "path": make_color_bundle(folder / "colors")},
        {"name": "two", "path": modelgen.make_onnx_two_inputs(folder / "two.onnx")},
        {"name": "slow", "path": make_onnx_slow(folder / "slow.onnx"), "queue_size": 4},
        {"name": "nan", "path": modelgen.make_onnx_log(folder / "log.onnx")},
        {"name": "broken", "path": broken},
    ]
