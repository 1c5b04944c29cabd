"""What the one emulated agent of the arm64 tests serves, and what its start showed.

- ``affine`` (ONNX ``y = x @ W + b``) and ``fc`` (TFLite FULLY_CONNECTED, the same ``W``, ``b``),
  ``q`` (int8 TFLite ADD): exact known outputs;
- ``colors`` (an image bundle: the PNG decoding runs in the aarch64 OpenCV);
- ``cls`` (PP-OCR's real direction classifier, ONNX) and ``face`` (MediaPipe's real short-range
  face detector, TFLite): compared with a native x86 run of the same model;
- ``ota`` (ONNX ``y = 2x``): the model ``test_ota_arm64.py`` updates to ``y = 3x`` over the air,
  from the fleet server of :func:`update_section`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import modelgen
from tests.agent.agent_process import AgentProcess
from tests.agent.daemon_models import make_color_bundle
from tests.agent.updater_models import scale_model
from tests.agent.updater_rig import Fleet

DEVICE = "arm64-emulated"
#: Generous: the emulated start (imports, loads, warm-ups, the first status) takes ~10-20 s.
READY_TIMEOUT_S = 240.0
TELEMETRY_INTERVAL_S = 1.0
#: What the emulated agent detects; an OTA target must be signed for this profile.
PROFILE = "generic-arm64"
#: The model the OTA test updates, and its probation: short, so the update commits in seconds.
OTA_MODEL = "ota"
PROBATION_S = 4.0
PROBATION_MIN_REQUESTS = 5


def arm64_models(folder: Path, models_dir: Path) -> dict[str, Path]:
    """The models the emulated agent serves, by name (see the module docstring)."""
    return {
        "affine": modelgen.make_onnx_affine(folder / "affine.onnx"),
        "fc": modelgen.make_tflite_fully_connected(folder / "fc.tflite"),
        "q": modelgen.make_tflite_quantized_add(folder / "q_int8.tflite", "int8"),
        "colors": make_color_bundle(folder / "colors"),
        "cls": models_dir / "ppocr_cls.onnx",
        "face": models_dir / "face_detection_short_range.tflite",
        OTA_MODEL: scale_model(folder / "ota.onnx", 2.0),
    }


def update_section(fleet: Fleet) -> dict[str, Any]:
    """The config's ``updates:`` section: ``fleet``'s HTTP server and trust roots.

    No polling (the start-up check and the ``desired`` hint only), a short probation that
    judges once it has :data:`PROBATION_MIN_REQUESTS`, and a latency bound loose enough for
    emulation, whose timings jitter far more than a real device's.
    """
    return {
        "server_url": fleet.http.url,
        "image_root_file": str(fleet.root / "image-root.json"),
        "director_root_file": str(fleet.root / "director-root.json"),
        "poll_interval_s": 3600,
        "min_check_interval_s": 0,
        "min_free_disk_bytes": 0,
        "retry_backoff_s": 0.1,
        "probation_s": PROBATION_S,
        "probation_check_s": 0.5,
        "probation_min_requests": PROBATION_MIN_REQUESTS,
        "max_latency_ratio": 5.0,
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
