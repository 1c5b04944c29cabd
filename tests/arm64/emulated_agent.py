"""What the one emulated agent of the arm64 tests serves, and what its start showed.

- ``affine`` (ONNX ``y = x @ W + b``) and ``fc`` (TFLite FULLY_CONNECTED, the same ``W``, ``b``),
  ``q`` (int8 TFLite ADD): exact known outputs;
- ``colors`` (an image bundle: the PNG decoding runs in the aarch64 OpenCV);
- ``cls`` (PP-OCR's real direction classifier, ONNX) and ``face`` (MediaPipe's real short-range
  face detector, TFLite): compared with a native x86 run of the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import modelgen
from tests.agent.agent_process import AgentProcess
from tests.agent.daemon_models import make_color_bundle

DEVICE = "arm64-emulated"
#: Generous: the emulated start (imports, loads, warm-ups, the first status) takes ~10-20 s.
READY_TIMEOUT_S = 240.0
TELEMETRY_INTERVAL_S = 1.0


def arm64_models(folder: Path, models_dir: Path) -> dict[str, Path]:
    """The models the emulated agent serves, by name (see the module docstring)."""
    return {
        "affine": modelgen.make_onnx_affine(folder / "affine.onnx"),
        "fc": modelgen.make_tflite_fully_connected(folder / "fc.tflite"),
        "q": modelgen.make_tflite_quantized_add(folder / "q_int8.tflite", "int8"),
        "colors": make_color_bundle(folder / "colors"),
        "cls": models_dir / "ppocr_cls.onnx",
        "face": models_dir / "face_detection_short_range.tflite",
    }


@dataclass
class EmulatedAgent:
    """The running aarch64 agent and what its start showed."""

    process: AgentProcess
    models: dict[str, Path]
    #: From starting qemu to the first status in which every model is ready or failed.
    start_to_ready_s: float
    #: That status.
    first_status: dict[str, Any]
