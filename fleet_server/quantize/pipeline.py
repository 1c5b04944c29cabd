"""Static int8 quantization of an ONNX model, gated on measured accuracy.

The run, in order: load and check the fp32 model; read the calibration data (and a
held-out set, or split one off); upgrade the default-domain opset to 13 when it is
older; ``quant_pre_process`` (symbolic shape inference, optimisation, ONNX shape
inference — retried without the symbolic pass when that fails); ``quantize_static``
in the QDQ format; evaluate fp32 against int8 on the held-out data; and only when
every bound holds, move the int8 model to the output path. Work happens in a
temporary folder beside the output, so a refused or failed run leaves nothing there.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx import version_converter

from agent.processing.config import ImagePreprocessing
from fleet_server.quantize.calibration import CalibrationSet, Feeds, load_folder
from fleet_server.quantize.errors import AccuracyBoundExceeded, QuantizeError
from fleet_server.quantize.evaluate import (
    Evaluation,
    evaluate,
    input_infos,
    is_classifier_output,
    open_session,
    run_model,
)
from fleet_server.quantize.report import QuantizeReport
from fleet_server.quantize.settings import QuantizeSettings

#: The lowest default-domain opset the QDQ quantizer is given (per-channel QDQ needs 13).
MIN_OPSET = 13
_QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
    }
)


def quantize_onnx(
    model_in: Path,
    model_out: Path,
    calibration: Path | CalibrationSet,
    settings: QuantizeSettings | None = None,
    *,
    held_out: Path | CalibrationSet | None = None,
    preprocess: ImagePreprocessing | None = None,
) -> QuantizeReport:
    """Quantize ``model_in`` to int8 and write it to ``model_out`` if it stays accurate.

    ``calibration`` and ``held_out`` are data folders (see
    :mod:`fleet_server.quantize.calibration`) or ready sample sets; ``preprocess`` turns
    the images of a folder into model inputs. Without ``held_out``, a
    ``settings.held_out_fraction`` share of the calibration data is held out instead.

    Raises:
        AccuracyBoundExceeded: the int8 model breaks a bound of ``settings``; its
            ``report`` has the measurements and nothing was written.
        CalibrationError: the data is missing, malformed or does not fit the model.
        QuantizeError: the model is invalid (``model_invalid``) or already quantized
            (``already_quantized``), the output exists (``output_exists``), the data
            gives no way to measure accuracy and no other bound is set
            (``no_accuracy_metric``), or onnxruntime failed (``quantize_failed``).
    """
    settings = settings or QuantizeSettings()
    model_in, model_out = Path(model_in), Path(model_out)
    _check_paths(model_in, model_out, settings)
    model = _load_model(model_in)
    reference = open_session(model_in, settings.threads)
    inputs = input_infos(reference)

    def load(data: Path | CalibrationSet) -> CalibrationSet:
        return data if isinstance(data, CalibrationSet) else load_folder(data, inputs, preprocess)

    calib_set = load(calibration)
    if held_out is None:
        calib_set, held_set = calib_set.split(settings.held_out_fraction, settings.seed)
    else:
        held_set = load(held_out)
    _check_measurable(reference, held_set, settings)

    try:
        with tempfile.TemporaryDirectory(prefix=".quantize-", dir=model_out.parent) as tmp:
            return _quantize_and_gate(
                model,
                Path(tmp),
                model_in=model_in,
                model_out=model_out,
                calib_set=calib_set,
                held_set=held_set,
                settings=settings,
            )
    except OSError as exc:
        raise QuantizeError(
            f"cannot write beside {model_out}: {exc.strerror or exc}", code="output_invalid"
        ) from None


def _quantize_and_gate(
    model: onnx.ModelProto,
    work: Path,
    *,
    model_in: Path,
    model_out: Path,
    calib_set: CalibrationSet,
    held_set: CalibrationSet,
    settings: QuantizeSettings,
) -> QuantizeReport:
    """Quantize in ``work``, evaluate, and move the model to ``model_out`` if it passes."""
    prepared, notes = _prepare(model, work)
    int8_path = work / "model.int8.onnx"
    _quantize(prepared, int8_path, calib_set, settings)
    evaluation = evaluate(
        model_in, int8_path, held_set, runs=settings.latency_runs, threads=settings.threads
    )
    violations = tuple(_violations(evaluation, settings))
    report = QuantizeReport(
        model_in=model_in,
        model_out=model_out,
        settings=settings,
        calibration_samples=len(calib_set),
        evaluation=evaluation,
        size_fp32=model_in.stat().st_size,
        size_int8=int8_path.stat().st_size,
        notes=tuple(notes),
        violations=violations,
        written=not violations,
    )
    if violations:
        raise AccuracyBoundExceeded("the int8 model is refused: " + "; ".join(violations), report)
    os.replace(int8_path, model_out)
    return report


def _check_paths(model_in: Path, model_out: Path, settings: QuantizeSettings) -> None:
    if not model_in.is_file():
        raise QuantizeError(f"{model_in}: no such model file", code="model_invalid")
    if model_out.resolve() == model_in.resolve():
        raise QuantizeError(
            "the output path must differ from the input model", code="output_invalid"
        )
    if not model_out.parent.is_dir():
        raise QuantizeError(
            f"{model_out.parent}: output folder does not exist", code="output_invalid"
        )
    if model_out.exists() and not settings.overwrite:
        raise QuantizeError(f"{model_out} exists (overwrite it with --force)", code="output_exists")


def _load_model(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise QuantizeError(
            f"{path.name}: not an ONNX model ({type(exc).__name__})", code="model_invalid"
        ) from None
    found = sorted({n.op_type for n in model.graph.node} & _QUANTIZED_OPS)
    if found:
        raise QuantizeError(
            f"{path.name} is already quantized (it has {', '.join(found)})",
            code="already_quantized",
        )
    return model


def _check_measurable(reference: Any, held: CalibrationSet, settings: QuantizeSettings) -> None:
    """Refuse up front when no bound could ever be checked on this model and data."""
    if held.labelled or settings.max_abs_error is not None or settings.min_cosine is not None:
        return
    outputs = run_model(reference, held.samples[0].feeds, "the fp32 model")
    if not is_classifier_output(outputs[:1]):
        raise QuantizeError(
            "the model's first output is not [batch, classes] and the data has no labels, "
            "so accuracy cannot be measured: set a bound on min cosine or max abs error",
            code="no_accuracy_metric",
        )


def _prepare(model: onnx.ModelProto, work: Path) -> tuple[Path, list[str]]:
    """Upgrade the opset if needed and run onnxruntime's pre-processing; returns the
    prepared model's path and notes on what was done."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors and others
            raise QuantizeError(
                f"cannot upgrade the model from opset {opset} to {MIN_OPSET}: {_first_line(exc)}",
                code="model_invalid",
            ) from None
        notes.append(f"opset {opset} upgraded to {MIN_OPSET}")
    upgraded = work / "model.fp32.onnx"
    onnx.save(model, str(upgraded))
    prepared = work / "model.prep.onnx"
    try:
        quant_pre_process(str(upgraded), str(prepared))
        return prepared, notes
    except Exception as exc:  # symbolic shape inference fails with asserts on some graphs
        notes.append(
            f"symbolic shape inference failed ({_first_line(exc)}); used ONNX shape inference"
        )
    try:
        quant_pre_process(str(upgraded), str(prepared), skip_symbolic_shape=True)
        return prepared, notes
    except Exception as exc:
        notes.append(f"pre-processing failed ({_first_line(exc)}); quantized the model as is")
    return upgraded, notes


def _quantize(model: Path, out: Path, data: CalibrationSet, settings: QuantizeSettings) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    activations = QuantType.QInt8 if settings.activation_type == "int8" else QuantType.QUInt8
    # The histogram calibrators print progress to stdout, which belongs to the report.
    try:
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                str(model),
                str(out),
                _Reader(data),
                quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                activation_type=activations,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[settings.calibration_method],
                calibration_providers=["CPUExecutionProvider"],
            )
    except Exception as exc:  # onnxruntime raises many unrelated types here
        raise QuantizeError(
            f"onnxruntime could not quantize the model: {_first_line(exc)}"
        ) from None


def _violations(ev: Evaluation, settings: QuantizeSettings) -> Iterator[str]:
    for out in ev.outputs:
        if not out.finite:
            yield f"output {out.name!r} of the int8 model is not finite"
    drop = ev.accuracy_drop
    if drop is not None and drop > settings.max_accuracy_drop + 1e-9:
        kind = "accuracy drop" if ev.accuracy_fp32 is not None else "top-1 disagreement"
        yield f"{kind} {drop:.1%} exceeds the bound {settings.max_accuracy_drop:.1%}"
    for out in ev.outputs:
        if settings.max_abs_error is not None and out.max_abs_error > settings.max_abs_error:
            yield (
                f"output {out.name!r}: max abs error {out.max_abs_error:.4g} exceeds "
                f"{settings.max_abs_error:.4g}"
            )
        if settings.min_cosine is not None and out.cosine_min < settings.min_cosine:
            yield (
                f"output {out.name!r}: cosine similarity {out.cosine_min:.4f} is below "
                f"{settings.min_cosine:.4f}"
            )


class _Reader:
    """An onnxruntime ``CalibrationDataReader`` (it checks the ``get_next`` method only)."""

    def __init__(self, data: CalibrationSet) -> None:
        self._samples = iter(data.samples)

    def get_next(self) -> Feeds | None:
        sample = next(self._samples, None)
        return None if sample is None else sample.feeds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
