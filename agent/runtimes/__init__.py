"""The registry of runtime backends, keyed by model format.

Backends register themselves lazily: importing this package imports neither
onnxruntime nor LiteRT. ``get_backend("onnx")`` imports the backend module on
first use, so a device without LiteRT still serves ONNX models.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from agent.errors import ModelLoadError
from agent.runtimes.base import (
    Backend,
    ProviderAttempt,
    ProviderSpec,
    Quantization,
    Runtime,
    RuntimeOptions,
    TensorSpec,
)

__all__ = [
    "Backend",
    "ProviderAttempt",
    "ProviderSpec",
    "Quantization",
    "Runtime",
    "RuntimeOptions",
    "TensorSpec",
    "format_for_path",
    "formats",
    "get_backend",
]

#: format -> (module, class name). The one registry of backends.
_BACKENDS: dict[str, tuple[str, str]] = {
    "onnx": ("agent.runtimes.onnx", "OnnxBackend"),
    "tflite": ("agent.runtimes.litert", "LiteRTBackend"),
}
_SUFFIXES: dict[str, str] = {".onnx": "onnx", ".ort": "onnx", ".tflite": "tflite"}
_instances: dict[str, Backend] = {}


def formats() -> list[str]:
    """Every model format the agent knows (whether or not its library is installed)."""
    return sorted(_BACKENDS)


def format_for_path(path: Path) -> str:
    """The model format of a bare model file, from its suffix.

    Raises:
        ModelLoadError: the suffix is not one of a known format.
    """
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(_SUFFIXES))
        raise ModelLoadError(f"{path.name}: unknown model file type (expected one of {known})")
    return fmt


def get_backend(fmt: str) -> Backend:
    """The backend for ``fmt``, imported on first use.

    Raises:
        ModelLoadError: ``fmt`` is unknown, or its runtime library is not installed.
    """
    if fmt in _instances:
        return _instances[fmt]
    entry = _BACKENDS.get(fmt)
    if entry is None:
        raise ModelLoadError(f"unknown model format {fmt!r} (known: {', '.join(formats())})")
    module = importlib.import_module(entry[0])
    backend: Backend = getattr(module, entry[1])()
    if not backend.available():
        raise ModelLoadError(
            f"no runtime for {fmt!r} models is installed on this device", code="runtime_missing"
        )
    _instances[fmt] = backend
    return backend
