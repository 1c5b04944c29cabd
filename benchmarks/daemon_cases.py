"""The models and payloads of the daemon benchmarks, for the agent and for the floor.

Each :class:`Case` is one real model with the requests both servers get: the agent's
in every payload kind worth timing (binary ETNS with binary outputs, JSON, ``.npy``,
JPEG) and the floor's raw bytes. The agent serves every model under several names
(without and with micro-batching, a short queue for the overload run), all from one
process; the floor serves each model once.
"""

from __future__ import annotations

import importlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from daemon_rig import ModelEntry, write_face_bundle

from agent.protocol import RequestParameters, encode_request

ETNS = "application/x-edge-tensors"
JSON = "application/json"
NPY = "application/x-npy"
JPEG = "image/jpeg"
BINARY_OUT = RequestParameters(binary_outputs=True)


@dataclass(frozen=True)
class Variant:
    """One way to ask the agent: a label for the table, the payload, its content type."""

    label: str
    payload: bytes
    content_type: str
    #: Requests per round in the latency run (JSON of big tensors is slow).
    per_round: int = 200


@dataclass(frozen=True)
class Case:
    """One real model, its agent names and payloads, and its floor spec and payload."""

    label: str
    model: str  # the agent's name, max_batch 1
    variants: tuple[Variant, ...]
    floor_spec: dict[str, Any]
    floor_payload: bytes
    floor_label: str
    floor_per_round: int = 200


def _npy(array: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _etns_and_json(inputs: list[tuple[str | None, Any]], json_rounds: int) -> list[Variant]:
    return [
        Variant("ETNS -> ETNS", encode_request(inputs, parameters=BINARY_OUT, binary=True), ETNS),
        Variant("JSON -> JSON", encode_request(inputs), JSON, json_rounds),
    ]


def vad_case(models: Path) -> Case:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 576)) * 0.1).astype(np.float32)
    state = np.zeros((2, 1, 128), np.float32)
    inputs: list[tuple[str | None, Any]] = [
        ("input", x),
        ("state", state),
        ("sr", np.array(16000, np.int64)),
    ]
    spec = {
        "name": "vad",
        "path": str(models / "silero_vad.onnx"),
        "kind": "tensors",
        "inputs": [
            {"name": "input", "shape": [1, 576], "dtype": "float32"},
            {"name": "state", "shape": [2, 1, 128], "dtype": "float32"},
        ],
        "constants": {"sr": {"value": 16000, "dtype": "int64"}},
    }
    variants = tuple(_etns_and_json(inputs, 200))
    return Case("silero VAD", "vad", variants, spec, x.tobytes() + state.tobytes(), "raw bytes")


def cls_case(models: Path) -> Case:
    x = np.random.default_rng(1).random((1, 3, 48, 192), np.float32)
    spec = {
        "name": "cls",
        "path": str(models / "ppocr_cls.onnx"),
        "kind": "tensors",
        "inputs": [{"name": "x", "shape": [1, 3, 48, 192], "dtype": "float32"}],
    }
    variants = (*_etns_and_json([(None, x)], 30), Variant("npy -> JSON", _npy(x), NPY))
    return Case("PP-OCR cls", "cls", variants, spec, x.tobytes(), "raw bytes")


def face_jpeg() -> bytes:
    """A 512x512 portrait as a JPEG (scikit-image's astronaut; a drawn face without it)."""
    try:
        data = importlib.import_module("skimage.data")  # shipped in the wheel, not fetched
        rgb = np.asarray(data.astronaut(), np.uint8)
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    except ModuleNotFoundError:
        bgr = np.full((512, 512, 3), 90, np.uint8)
        cv2.ellipse(bgr, (256, 220), (90, 120), 0, 0, 360, (120, 160, 210), -1)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def face_case(models: Path) -> Case:
    jpeg = face_jpeg()
    spec = {
        "name": "face",
        "path": str(models / "face_detection_short_range.tflite"),
        "kind": "jpeg",
        "width": 128,
        "height": 128,
        "scale": 1 / 127.5,
        "mean": 1.0,
    }
    variants = (Variant("JPEG -> JSON", jpeg, JPEG, 100),)
    return Case("BlazeFace", "face", variants, spec, jpeg, "JPEG (cv2)", 100)


@dataclass(frozen=True)
class BatchCase:
    """A model with a dynamic batch dimension, served without and with micro-batching."""

    label: str
    unbatched: str  # agent model name, max_batch 1
    batched: str  # agent model name, micro-batching on
    batching: str  # e.g. "max_batch 16, 2 ms"
    request: bytes  # ETNS, binary outputs
    floor_topic: str
    floor_payload: bytes


def batch_cases(affine: Path) -> tuple[list[BatchCase], list[dict[str, Any]]]:
    """The throughput cases and the floor specs they add (the affine model)."""
    x = np.random.default_rng(2).random((1, 3, 48, 192), np.float32)
    a = np.random.default_rng(3).random((1, 64), np.float32)
    cases = [
        BatchCase(
            "PP-OCR cls",
            "cls",
            "cls_b16",
            "max_batch 16, 2 ms",
            encode_request([(None, x)], parameters=BINARY_OUT, binary=True),
            "floor/cls",
            x.tobytes(),
        ),
        BatchCase(
            "affine 64->8 (sub-ms)",
            "affine",
            "affine_b32",
            "max_batch 32, 1 ms",
            encode_request([(None, a)], parameters=BINARY_OUT, binary=True),
            "floor/affine",
            a.tobytes(),
        ),
    ]
    spec = {
        "name": "affine",
        "path": str(affine),
        "kind": "tensors",
        "inputs": [{"name": "x", "shape": [1, 64], "dtype": "float32"}],
    }
    return cases, [spec]


#: The agent name of the model the overload run floods (a short, default-sized queue).
OVERLOAD_MODEL = "cls_q64"


def agent_models(models: Path, workdir: Path, affine: Path) -> list[ModelEntry]:
    """Every model the agent serves in the e2e run."""
    cls = models / "ppocr_cls.onnx"
    face = write_face_bundle(workdir / "face-bundle", models / "face_detection_short_range.tflite")
    return [
        ModelEntry("vad", models / "silero_vad.onnx"),
        ModelEntry("cls", cls, queue_size=256),
        ModelEntry("cls_b16", cls, queue_size=256, max_batch=16, max_delay_ms=2.0),
        ModelEntry(OVERLOAD_MODEL, cls, queue_size=64),
        ModelEntry("face", face),
        ModelEntry("affine", affine, queue_size=256),
        ModelEntry("affine_b32", affine, queue_size=256, max_batch=32, max_delay_ms=1.0),
    ]


def make_affine(dest: Path) -> Path:
    """A tiny ONNX model with a dynamic batch: ``y = x @ W + b``, 64 -> 8 (tests/modelgen)."""
    from tests.modelgen import make_onnx_affine

    return make_onnx_affine(dest, in_dim=64, out_dim=8, dynamic_batch=True)
