"""Post-training int8 quantization of ONNX models, refused when it costs too much accuracy.

    from fleet_server.quantize import QuantizeSettings, quantize_onnx
    report = quantize_onnx(Path("m.onnx"), Path("m.int8.onnx"), Path("calib/"),
                           QuantizeSettings(max_accuracy_drop=0.01))
    print(report.to_text())

The command line is :func:`fleet_server.quantize.cli.main` (``edge-fleet model quantize``).
"""

from __future__ import annotations

from fleet_server.quantize.calibration import CalibrationSet, InputInfo, Sample, load_folder
from fleet_server.quantize.errors import AccuracyBoundExceeded, CalibrationError, QuantizeError
from fleet_server.quantize.evaluate import Evaluation, Latency, OutputDelta
from fleet_server.quantize.pipeline import quantize_onnx
from fleet_server.quantize.report import QuantizeReport
from fleet_server.quantize.settings import QuantizeSettings

__all__ = [
    "AccuracyBoundExceeded",
    "CalibrationError",
    "CalibrationSet",
    "Evaluation",
    "InputInfo",
    "Latency",
    "OutputDelta",
    "QuantizeError",
    "QuantizeReport",
    "QuantizeSettings",
    "Sample",
    "load_folder",
    "quantize_onnx",
]
