"""A served model: a runtime plus what the bundle declares around it.

:class:`ServedModel` is what the CLI and the daemon run. It checks inputs against the
model's tensors (name, shape, dtype), converts float <-> quantized integers with the
model's own scale and zero point, runs the runtime, rejects non-finite outputs, and
applies the bundle's image preprocessing and result postprocessing.

The checks are a few dict and tuple comparisons per input, so the run path stays
within a few microseconds of the raw ``session.run`` / ``invoke`` (see
``benchmarks/runtime_overhead.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import BadInput, InferenceError
from agent.runtimes.base import Array, Quantization, Runtime, TensorSpec

#: numpy dtypes a client may send for a quantized or half-precision input: the agent
#: converts them to what the model takes.
_FLOAT_KINDS = frozenset({np.dtype("float32"), np.dtype("float64"), np.dtype("float16")})


@dataclass(frozen=True)
class RunResult:
    """The outputs of one inference, in the runtime's output order."""

    outputs: list[tuple[str, Array]]
    inference_ms: float
    result: dict[str, Any] | None = None


@dataclass
class _InputPlan:
    spec: TensorSpec
    dtype: np.dtype[Any]
    rank: int
    fixed: tuple[tuple[int, int], ...]  # (axis, size) of the static dims
    quant: Quantization | None
    float_ok: bool  # FP32 may be sent and converted (quantized or fp16 input)


def _plan(spec: TensorSpec) -> _InputPlan:
    dtype = spec.np_dtype
    fixed = tuple((i, d) for i, d in enumerate(spec.shape) if d is not None)
    quant = spec.quantization if dtype.kind in "iu" else None
    float_ok = quant is not None or dtype == np.dtype("float16")
    return _InputPlan(spec, dtype, len(spec.shape), fixed, quant, float_ok)


def quantize(
    x: Array, q: Quantization, dtype: np.dtype[Any], axis_size: int | None = None
) -> Array:
    """Float -> integer with ``q``'s scale and zero point, rounded and clipped to ``dtype``."""
    info = np.iinfo(dtype)
    if q.per_tensor:
        scaled = np.round(x / q.scale[0]) + q.zero_point[0]
    else:
        shape = [1] * x.ndim
        shape[q.axis] = len(q.scale)
        scale = np.asarray(q.scale, np.float32).reshape(shape)
        zp = np.asarray(q.zero_point, np.float32).reshape(shape)
        scaled = np.round(x / scale) + zp
    return np.clip(scaled, info.min, info.max).astype(dtype)


def dequantize(x: Array, q: Quantization) -> Array:
    """Integer -> float32 with ``q``'s scale and zero point."""
    if q.per_tensor:
        return ((x.astype(np.float32) - q.zero_point[0]) * q.scale[0]).astype(np.float32)
    shape = [1] * x.ndim
    shape[q.axis] = len(q.scale)
    scale = np.asarray(q.scale, np.float32).reshape(shape)
    zp = np.asarray(q.zero_point, np.float32).reshape(shape)
    return ((x.astype(np.float32) - zp) * scale).astype(np.float32)


@dataclass
class ServedModel:
    """One loaded model, ready to serve. Use one instance from one thread at a time.

    Build it with :func:`agent.loader.load_model`; tests may build it around any
    :class:`Runtime`.
    """

    name: str
    version: str
    runtime: Runtime
    format: str = ""
    digest: str = ""
    source: str = ""
    preprocess: Any = None  # agent.processing Preprocessor, when the bundle declares one
    postprocess: Any = None  # agent.processing Postprocessor, when the bundle declares one
    image_input: str | None = None
    load_ms: float = 0.0
    _plans: dict[str, _InputPlan] = field(default_factory=dict, init=False, repr=False)
    _order: tuple[str, ...] = field(default=(), init=False, repr=False)
    _out_specs: tuple[TensorSpec, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.format:
            self.format = self.runtime.format
        self._plans = {s.name: _plan(s) for s in self.runtime.inputs}
        self._order = tuple(s.name for s in self.runtime.inputs)
        self._out_specs = tuple(self.runtime.outputs)

    # --- introspection ---------------------------------------------------------------

    @property
    def provider(self) -> str:
        return self.runtime.provider

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(p.spec for p in self._plans.values())

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._out_specs

    @property
    def batch_dynamic(self) -> bool:
        """True when every input's first dimension is dynamic (micro-batching is possible)."""
        return all(p.rank > 0 and p.spec.shape[0] is None for p in self._plans.values())

    @property
    def accepts_images(self) -> bool:
        return self.preprocess is not None

    # --- the run path ------------------------------------------------------------------

    def prepare(
        self, tensors: Sequence[tuple[str | None, Array]], *, quantized: bool = False
    ) -> dict[str, Array]:
        """Check wire tensors against the model and convert them to model-native feeds.

        ``tensors`` are (name or None, array) pairs; a None name is allowed only for a
        single-input model.

        Raises:
            BadInput: a wrong or missing input name, a wrong rank, shape or datatype.
        """
        plans = self._plans
        if len(tensors) != len(plans):
            want = ", ".join(self._order)
            raise BadInput(
                f"model {self.name!r} takes {len(plans)} input(s) ({want}), got {len(tensors)}"
            )
        feeds: dict[str, Array] = {}
        for given, arr in tensors:
            name = given
            if name is None:
                if len(plans) != 1:
                    raise BadInput(
                        f"input name required: model {self.name!r} takes {', '.join(self._order)}"
                    )
                name = self._order[0]
            plan = plans.get(name)
            if plan is None:
                raise BadInput(
                    f"unknown input {name!r}: model {self.name!r} takes {', '.join(self._order)}"
                )
            if name in feeds:
                raise BadInput(f"input {name!r} given twice")
            feeds[name] = self._convert(plan, arr, quantized)
        return feeds

    def _convert(self, plan: _InputPlan, arr: Array, quantized: bool) -> Array:
        shape = arr.shape
        if len(shape) != plan.rank:
            raise BadInput(
                f"input {plan.spec.name!r}: expected shape {_fmt_shape(plan.spec.shape)}, "
                f"got {list(shape)}"
            )
        for axis, size in plan.fixed:
            if shape[axis] != size:
                raise BadInput(
                    f"input {plan.spec.name!r}: expected shape {_fmt_shape(plan.spec.shape)}, "
                    f"got {list(shape)}"
                )
        dtype = arr.dtype
        if dtype == plan.dtype:
            return arr
        if plan.float_ok and not quantized and dtype in _FLOAT_KINDS:
            if plan.quant is not None:
                return quantize(arr, plan.quant, plan.dtype)
            return arr.astype(plan.dtype)
        want = _datatype(plan.dtype)
        if plan.quant is not None and not quantized:
            want = f"FP32 (quantized to {want} by the agent) or {want} with parameters.quantized"
        raise BadInput(
            f"input {plan.spec.name!r}: expected datatype {want}, got {_datatype(dtype)}"
        )

    def run_feeds(self, feeds: Mapping[str, Array], *, quantized: bool = False) -> RunResult:
        """Run prepared feeds (see :meth:`prepare`); dequantize outputs unless ``quantized``.

        Raises:
            InferenceError: the runtime failed, or an output holds NaN or Inf.
        """
        clock = time.perf_counter
        t0 = clock()
        raw = self.runtime.run(feeds if isinstance(feeds, dict) else dict(feeds))
        ms = (clock() - t0) * 1000.0
        outs: list[tuple[str, Array]] = []
        for spec, value in zip(self._out_specs, raw, strict=True):
            kind = value.dtype.kind
            if kind == "f":
                # One reduction instead of an isfinite() mask: NaN and +-Inf propagate
                # into the float64 sum, which cannot overflow for real outputs.
                if not math.isfinite(value.sum(dtype=np.float64)):
                    raise InferenceError(
                        f"model {self.name!r} produced NaN or Inf in output {spec.name!r}"
                    )
            elif spec.quantization is not None and not quantized and kind in "iu":
                value = dequantize(value, spec.quantization)  # noqa: PLW2901
            outs.append((spec.name, value))
        return RunResult(outs, ms)

    def infer(
        self, tensors: Sequence[tuple[str | None, Array]], *, quantized: bool = False
    ) -> RunResult:
        """Check, convert and run one request's tensors.

        Raises:
            BadInput: see :meth:`prepare`.
            InferenceError: see :meth:`run_feeds`.
        """
        return self.run_feeds(self.prepare(tensors, quantized=quantized), quantized=quantized)

    def infer_image(self, image: bytes) -> RunResult:
        """Decode and preprocess an encoded image, run it, and postprocess the outputs.

        Raises:
            BadInput: the model has no image preprocessing, or the image does not decode.
            InferenceError: see :meth:`run_feeds`.
        """
        if self.preprocess is None:
            raise BadInput(
                f"model {self.name!r} does not take images "
                "(its bundle declares no image preprocessing)"
            )
        tensor, meta = self.preprocess(image)
        name = self.image_input or self._order[0]
        res = self.run_feeds(self.prepare([(name, tensor)]))
        return RunResult(res.outputs, res.inference_ms, self.postprocess_outputs(res.outputs, meta))

    def postprocess_outputs(
        self, outputs: list[tuple[str, Array]], meta: Any = None
    ) -> dict[str, Any] | None:
        """The bundle's postprocessing ``result`` object, or None when it declares none."""
        if self.postprocess is None:
            return None
        result: dict[str, Any] | None = self.postprocess(dict(outputs), meta)
        return result

    def warm_up(self, runs: int = 2) -> None:
        """Run ``runs`` inferences on zeros (dynamic dims as 1) so the first request is not slow.

        Raises:
            InferenceError: the model fails on a plain input.
        """
        feeds = {}
        for p in self._plans.values():
            shape = tuple(1 if d is None else d for d in p.spec.shape)
            feeds[p.spec.name] = np.zeros(shape, dtype=p.dtype)
        for _ in range(runs):
            self.runtime.run(feeds)

    def close(self) -> None:
        self.runtime.close()

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (for ``status``, ``diagnostics`` and the CLI)."""
        return {
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "provider": self.provider,
            "digest": self.digest,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "image_input": self.accepts_images,
            "load_ms": round(self.load_ms, 2),
        }


_DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "uint16": "UINT16",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}


def _datatype(dtype: np.dtype[Any]) -> str:
    return _DATATYPES.get(dtype.name, dtype.name)


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"
