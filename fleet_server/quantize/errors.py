"""Errors of the quantization tool, under the fleet server's :class:`FleetError`.

    QuantizeError             quantize_failed            the tool could not do its job
    ├── CalibrationError      calibration_invalid        unusable calibration / held-out data
    └── AccuracyBoundExceeded accuracy_bound_exceeded    int8 too far from fp32: nothing written

Other codes set on a plain :class:`QuantizeError`: ``model_invalid``,
``already_quantized``, ``output_exists``, ``output_invalid``, ``options_invalid``,
``no_accuracy_metric``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleet_server.errors import FleetError

if TYPE_CHECKING:
    from fleet_server.quantize.report import QuantizeReport


class QuantizeError(FleetError):
    """The model could not be quantized (bad model, bad options, onnxruntime failure)."""

    code = "quantize_failed"
    status = 422


class CalibrationError(QuantizeError):
    """The calibration or held-out data is missing, unreadable or does not fit the model."""

    code = "calibration_invalid"


class AccuracyBoundExceeded(QuantizeError):
    """The int8 model strays further from fp32 than allowed; it was not written.

    ``report`` holds every measurement, so the caller can still show them.
    """

    code = "accuracy_bound_exceeded"

    def __init__(self, message: str, report: QuantizeReport) -> None:
        super().__init__(message)
        self.report = report
