"""How far an int8 model is from its fp32 original, measured on held-out data.

Both models run on the real onnxruntime CPU execution provider. For every output:
max and mean absolute error, and the cosine similarity of each sample's flattened
output (mean and worst). For a classifier output — a 2-D ``[batch, classes]`` output
with at least two classes — the top-1 agreement of the two models. With labelled
data, the accuracy of each model on the first output against the labels. Latency is
the p50/p95 of single-sample runs on a fixed number of CPU threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleet_server.quantize.calibration import Array, CalibrationSet, Feeds, InputInfo
from fleet_server.quantize.errors import CalibrationError, QuantizeError

_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class OutputDelta:
    """fp32 vs int8 on one output, over every held-out sample."""

    name: str
    max_abs_error: float
    mean_abs_error: float
    cosine_mean: float
    cosine_min: float
    #: Share of rows whose argmax agrees; None unless a ``[batch, classes]`` output.
    top1_agreement: float | None
    finite: bool


@dataclass(frozen=True)
class Latency:
    """Single-sample latency in milliseconds."""

    p50_ms: float
    p95_ms: float
    runs: int
    threads: int


@dataclass(frozen=True)
class Evaluation:
    """Everything measured on the held-out data."""

    samples: int
    outputs: tuple[OutputDelta, ...]
    accuracy_fp32: float | None
    accuracy_int8: float | None
    latency_fp32: Latency
    latency_int8: Latency

    @property
    def accuracy_drop(self) -> float | None:
        """Accuracy lost to quantization: against the labels when there are labels, else
        ``1 - top-1 agreement`` of the first output; None when neither is defined."""
        if self.accuracy_fp32 is not None and self.accuracy_int8 is not None:
            return self.accuracy_fp32 - self.accuracy_int8
        first = self.outputs[0].top1_agreement if self.outputs else None
        return None if first is None else 1.0 - first


def open_session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session on ``path`` with ``threads`` intra-op threads.

    Raises:
        QuantizeError: ``model_invalid`` — onnxruntime cannot load the file.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizeError(
            f"{path.name}: onnxruntime cannot load it: {reason}", code="model_invalid"
        ) from None


def input_infos(session: Any) -> list[InputInfo]:
    """The inputs of an onnxruntime session, with dynamic dims as None.

    Raises:
        QuantizeError: ``model_invalid`` — an input of a type the tool cannot feed.
    """
    infos = []
    for arg in session.get_inputs():
        dtype = _ONNX_DTYPES.get(arg.type)
        if dtype is None:
            raise QuantizeError(
                f"input {arg.name!r} has unsupported type {arg.type}", code="model_invalid"
            )
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
        infos.append(InputInfo(arg.name, shape, dtype))
    return infos


def is_classifier_output(arrays: list[Array]) -> bool:
    """True when every array of one output is 2-D ``[batch, classes]`` with 2+ classes."""
    return bool(arrays) and all(a.ndim == 2 and a.shape[1] >= 2 for a in arrays)


def evaluate(
    fp32: Path, int8: Path, held_out: CalibrationSet, *, runs: int, threads: int
) -> Evaluation:
    """Run both models on every held-out sample and compare them (module docstring).

    Raises:
        QuantizeError: a model does not load or fails on a sample.
        CalibrationError: labels are given but the first output is not ``[1, classes]``.
    """
    if not held_out.samples:
        raise CalibrationError("no held-out samples to evaluate on")
    ref_session, q_session = open_session(fp32, threads), open_session(int8, threads)
    names = [o.name for o in ref_session.get_outputs()]
    ref = [run_model(ref_session, s.feeds, fp32.name) for s in held_out.samples]
    got = [run_model(q_session, s.feeds, int8.name) for s in held_out.samples]
    deltas = tuple(
        _delta(name, [r[i] for r in ref], [g[i] for g in got]) for i, name in enumerate(names)
    )
    acc_ref = acc_got = None
    if held_out.labelled:
        labels = np.array([s.label for s in held_out.samples])
        acc_ref, acc_got = _accuracy(ref, labels), _accuracy(got, labels)
    first = held_out.samples[0].feeds
    return Evaluation(
        samples=len(held_out),
        outputs=deltas,
        accuracy_fp32=acc_ref,
        accuracy_int8=acc_got,
        latency_fp32=measure_latency(ref_session, first, runs, threads),
        latency_int8=measure_latency(q_session, first, runs, threads),
    )


def measure_latency(session: Any, feeds: Feeds, runs: int, threads: int) -> Latency:
    """p50/p95 of ``runs`` timed runs of ``feeds``, after three untimed warm-up runs."""
    for _ in range(3):
        session.run(None, feeds)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times[i] = time.perf_counter() - start
    p50, p95 = np.percentile(times * 1000.0, [50, 95])
    return Latency(float(p50), float(p95), runs, threads)


def run_model(session: Any, feeds: Feeds, model_name: str) -> list[Array]:
    """Every output of one run of ``session`` on ``feeds``, as numpy arrays.

    Raises:
        QuantizeError: onnxruntime failed on these feeds.
    """
    try:
        return [np.asarray(o) for o in session.run(None, feeds)]
    except Exception as exc:  # onnxruntime's own exception types are not importable stably
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizeError(f"{model_name} failed on a sample: {reason}") from None


def _delta(name: str, ref: list[Array], got: list[Array]) -> OutputDelta:
    r = [a.astype(np.float64).ravel() for a in ref]
    g = [a.astype(np.float64).ravel() for a in got]
    finite = all(bool(np.isfinite(a).all()) for a in g)
    abs_err = np.concatenate([np.abs(a - b) for a, b in zip(r, g, strict=True)])
    cosines = np.array([_cosine(a, b) for a, b in zip(r, g, strict=True)])
    agreement = None
    if is_classifier_output(ref):
        ref_top = np.concatenate([a.argmax(1) for a in ref])
        got_top = np.concatenate([a.argmax(1) for a in got])
        agreement = float((ref_top == got_top).mean())
    return OutputDelta(
        name=name,
        max_abs_error=float(abs_err.max()) if abs_err.size else 0.0,
        mean_abs_error=float(abs_err.mean()) if abs_err.size else 0.0,
        cosine_mean=float(cosines.mean()),
        cosine_min=float(cosines.min()),
        top1_agreement=agreement,
        finite=finite,
    )


def _cosine(a: Array, b: Array) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0 or not np.isfinite(na * nb):
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _accuracy(outputs: list[list[Array]], labels: Array) -> float:
    firsts = [o[0] for o in outputs]
    if any(f.ndim != 2 or f.shape[0] != 1 for f in firsts):
        raise CalibrationError(
            "labels need the model's first output to be [1, classes] for every sample"
        )
    predicted = np.array([int(f[0].argmax()) for f in firsts])
    return float((predicted == labels).mean())
