"""Builders of tiny, real ONNX and TFLite models with known weights.

Used by the tests, the benchmarks and ``scripts/build_probe_models.py``. Every
builder is deterministic (same arguments, same bytes), writes one model file and
returns its path. The weights are exposed (:func:`affine_weights`,
:func:`classifier_weights`...) so that a test can compute the exact expected output.

ONNX models are built with ``onnx.helper`` (opset 17, IR version 8, so that older
onnxruntime builds on devices load them too). TFLite models are built with the
flatbuffer object API shipped in ``ai_edge_litert.schema_py_generated``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flatbuffers  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
import onnx
from ai_edge_litert import schema_py_generated as s
from onnx import TensorProto, helper, numpy_helper

ONNX_OPSET = 17
ONNX_IR_VERSION = 8

Array = npt.NDArray[Any]


# --- known weights ---------------------------------------------------------------------


def affine_weights(in_dim: int, out_dim: int) -> tuple[Array, Array]:
    """The ``(W, b)`` of :func:`make_onnx_affine` / :func:`make_tflite_fully_connected`.

    ``W`` is ``[in_dim, out_dim]`` and ``b`` is ``[out_dim]``; ``y = x @ W + b``. The values
    are small multiples of 1/4 so that float32 results are exact.
    """
    w = (np.arange(in_dim * out_dim, dtype=np.float32).reshape(in_dim, out_dim) - 2.0) / 4.0
    b = np.arange(out_dim, dtype=np.float32) / 2.0 - 0.5
    return w, b


def classifier_weights(channels: int, num_classes: int) -> Array:
    """The ``[channels, num_classes]`` matrix of :func:`make_onnx_classifier`."""
    return np.eye(channels, num_classes, dtype=np.float32) * 4.0 + 0.25


def softmax(x: Array) -> Array:
    """Row-wise softmax, the reference for the classifier model's output."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


# --- ONNX --------------------------------------------------------------------------------


def _onnx_batch(dynamic_batch: bool, batch: int = 1) -> int | str:
    return "N" if dynamic_batch else batch


def _save_onnx(
    path: Path,
    nodes: list[Any],
    inputs: list[Any],
    outputs: list[Any],
    *,
    initializers: Sequence[Any] = (),
    extra_opsets: Sequence[tuple[str, int]] = (),
) -> Path:

    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", ONNX_OPSET)]
    opsets += [helper.make_opsetid(domain, version) for domain, version in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edge-fleet-tests")
    model.ir_version = ONNX_IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def _value(name: str, elem_type: int, shape: Sequence[int | str]) -> Any:

    return helper.make_tensor_value_info(name, elem_type, list(shape))


def make_onnx_affine(
    path: Path, in_dim: int = 3, out_dim: int = 2, dynamic_batch: bool = True
) -> Path:
    """``y = x @ W + b`` (MatMul + Add) with :func:`affine_weights`.

    Input ``x`` ``[N, in_dim]`` float32 (``N`` symbolic, or 1), output ``y`` ``[N, out_dim]``.
    """

    w, b = affine_weights(in_dim, out_dim)
    n = _onnx_batch(dynamic_batch)
    return _save_onnx(
        path,
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        [_value("x", TensorProto.FLOAT, [n, in_dim])],
        [_value("y", TensorProto.FLOAT, [n, out_dim])],
        initializers=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )


def make_onnx_two_inputs(path: Path, dim: int = 4) -> Path:
    """Two inputs ``a``, ``b`` ``[N, dim]`` float32; outputs ``sum = a + b``, ``prod = a * b``."""

    return _save_onnx(
        path,
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["prod"]),
        ],
        [_value("a", TensorProto.FLOAT, ["N", dim]), _value("b", TensorProto.FLOAT, ["N", dim])],
        [
            _value("sum", TensorProto.FLOAT, ["N", dim]),
            _value("prod", TensorProto.FLOAT, ["N", dim]),
        ],
    )


def make_onnx_log(path: Path, dim: int = 4) -> Path:
    """``y = log(x)`` over ``[N, dim]`` float32: a negative input gives NaN, zero gives -inf."""

    return _save_onnx(
        path,
        [helper.make_node("Log", ["x"], ["y"])],
        [_value("x", TensorProto.FLOAT, ["N", dim])],
        [_value("y", TensorProto.FLOAT, ["N", dim])],
    )


def make_onnx_integer_input(
    path: Path, dtype: str = "uint8", dim: int = 4, scale: float = 0.5
) -> Path:
    """An integer-input model: ``y = float(x) * scale``, ``x`` ``[N, dim]`` of ``dtype``.

    ``dtype`` is ``uint8`` or ``int8``; the output is float32.
    """

    elem = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}[dtype]
    return _save_onnx(
        path,
        [
            helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["xf", "scale"], ["y"]),
        ],
        [_value("x", elem, ["N", dim])],
        [_value("y", TensorProto.FLOAT, ["N", dim])],
        initializers=[numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale")],
    )


def make_onnx_classifier(
    path: Path, num_classes: int = 3, size: int = 8, dynamic_batch: bool = False
) -> Path:
    """A tiny image classifier: ``image`` ``[1, 3, size, size]`` -> ``probs`` ``[1, num_classes]``.

    GlobalAveragePool -> Flatten -> MatMul(:func:`classifier_weights`) -> Softmax, so
    ``probs = softmax(mean_hw(image) @ W)``.
    """

    w = classifier_weights(3, num_classes)
    n = _onnx_batch(dynamic_batch)
    return _save_onnx(
        path,
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        [_value("image", TensorProto.FLOAT, [n, 3, size, size])],
        [_value("probs", TensorProto.FLOAT, [n, num_classes])],
        initializers=[numpy_helper.from_array(w, "W")],
    )


def make_onnx_fixed_reshape(path: Path) -> Path:
    """``x`` ``[N]`` reshaped to a constant ``[2, 2]``: loads, fails at run time unless N == 4."""

    return _save_onnx(
        path,
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [_value("x", TensorProto.FLOAT, ["N"])],
        [_value("y", TensorProto.FLOAT, [2, 2])],
        initializers=[numpy_helper.from_array(np.array([2, 2], dtype=np.int64), "shape")],
    )


def make_onnx_unknown_op(path: Path, domain: str = "") -> Path:
    """A model whose only node is an operator no runtime implements (``NoSuchOp``)."""

    return _save_onnx(
        path,
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain=domain)],
        [_value("x", TensorProto.FLOAT, [1, 4])],
        [_value("y", TensorProto.FLOAT, [1, 4])],
        extra_opsets=[(domain, 1)] if domain else (),
    )


def make_onnx_probe(path: Path) -> Path:
    """The probe model: ``y = x + 1`` over ``x`` ``[1, 4]`` float32 (a few hundred bytes)."""

    return _save_onnx(
        path,
        [helper.make_node("Add", ["x", "one"], ["y"])],
        [_value("x", TensorProto.FLOAT, [1, 4])],
        [_value("y", TensorProto.FLOAT, [1, 4])],
        initializers=[numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")],
    )


# --- TFLite ------------------------------------------------------------------------------

_TFL_TYPES = {"float32": 0, "int32": 2, "uint8": 3, "int8": 9}


def _tfl_tensor(
    name: str,
    dtype: str,
    shape: Sequence[int],
    *,
    buffer: int = 0,
    quant: tuple[float, int] | None = None,
    signature: Sequence[int] | None = None,
) -> Any:

    t = s.TensorT()
    t.name = name
    t.type = _TFL_TYPES[dtype]
    t.shape = list(shape)
    t.buffer = buffer
    if signature is not None:
        t.shapeSignature = list(signature)
    if quant is not None:
        q = s.QuantizationParametersT()
        q.scale = [quant[0]]
        q.zeroPoint = [quant[1]]
        q.quantizedDimension = 0
        t.quantization = q
    return t


def _save_tflite(
    path: Path,
    tensors: list[Any],
    inputs: list[int],
    outputs: list[int],
    ops: list[tuple[int | str, list[int], list[int], int, Any]],
    *,
    constants: Sequence[Array] = (),
) -> Path:
    """Write a one-subgraph model. ``ops`` are ``(builtin code or custom op name, inputs,
    outputs, options type, options)``; constant ``k`` is stored in buffer ``k + 1`` (buffer 0
    is empty)."""

    codes: list[int | str] = []
    operators = []
    for code, op_in, op_out, opt_type, opt in ops:
        if code not in codes:
            codes.append(code)
        op = s.OperatorT()
        op.opcodeIndex = codes.index(code)
        op.inputs, op.outputs = op_in, op_out
        op.builtinOptionsType, op.builtinOptions = opt_type, opt
        operators.append(op)
    opcodes = []
    for code in codes:
        oc = s.OperatorCodeT()
        builtin = s.BuiltinOperator.CUSTOM if isinstance(code, str) else code
        if isinstance(code, str):
            oc.customCode = code
        oc.builtinCode = builtin
        oc.deprecatedBuiltinCode = min(builtin, 127)
        oc.version = 1
        opcodes.append(oc)
    buffers = [s.BufferT()]
    for const in constants:
        buf = s.BufferT()
        buf.data = list(np.ascontiguousarray(const).tobytes())
        buffers.append(buf)
    sub = s.SubGraphT()
    sub.tensors, sub.inputs, sub.outputs, sub.operators = tensors, inputs, outputs, operators
    sub.name = "main"
    model = s.ModelT()
    model.version = 3
    model.operatorCodes, model.subgraphs, model.buffers = opcodes, [sub], buffers
    model.description = "edge-fleet test model"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(builder.Output()))
    return path


def _add_op(a: int, b: int, out: int) -> tuple[int | str, list[int], list[int], int, Any]:

    return (s.BuiltinOperator.ADD, [a, b], [out], s.BuiltinOptions.AddOptions, s.AddOptionsT())


def tflite_add_constant(dim: int) -> Array:
    """The ``[1, dim]`` constant that :func:`make_tflite_add` adds: ``0.5, 1.0, 1.5...``."""
    return (np.arange(1, dim + 1, dtype=np.float32) / 2.0).reshape(1, dim)


def make_tflite_add(
    path: Path, dim: int = 4, dynamic_batch: bool = False, constant: Array | None = None
) -> Path:
    """Float ``y = x + c`` with ``c`` = :func:`tflite_add_constant` (or ``constant``, ``[1, dim]``);
    ``x``, ``y`` ``[1, dim]``.

    With ``dynamic_batch`` the input's shape signature is ``[-1, dim]`` (the constant broadcasts).
    """
    c = tflite_add_constant(dim) if constant is None else np.asarray(constant, dtype=np.float32)
    sig = [-1, dim] if dynamic_batch else None
    tensors = [
        _tfl_tensor("x", "float32", [1, dim], signature=sig),
        _tfl_tensor("c", "float32", [1, dim], buffer=1),
        _tfl_tensor("y", "float32", [1, dim], signature=sig),
    ]
    return _save_tflite(path, tensors, [0], [2], [_add_op(0, 1, 2)], constants=[c.reshape(1, dim)])


def make_tflite_two_inputs(path: Path, dim: int = 4) -> Path:
    """Float ``sum = a + b`` over two ``[1, dim]`` inputs."""
    tensors = [
        _tfl_tensor("a", "float32", [1, dim]),
        _tfl_tensor("b", "float32", [1, dim]),
        _tfl_tensor("sum", "float32", [1, dim]),
    ]
    return _save_tflite(path, tensors, [0, 1], [2], [_add_op(0, 1, 2)])


def make_tflite_fully_connected(path: Path, in_dim: int = 3, out_dim: int = 2) -> Path:
    """Float FULLY_CONNECTED ``y = x @ W + b`` (:func:`affine_weights`), ``x`` ``[1, in_dim]``."""

    w, b = affine_weights(in_dim, out_dim)
    tensors = [
        _tfl_tensor("x", "float32", [1, in_dim]),
        _tfl_tensor("W", "float32", [out_dim, in_dim], buffer=1),
        _tfl_tensor("b", "float32", [out_dim], buffer=2),
        _tfl_tensor("y", "float32", [1, out_dim]),
    ]
    op = (
        s.BuiltinOperator.FULLY_CONNECTED,
        [0, 1, 2],
        [3],
        s.BuiltinOptions.FullyConnectedOptions,
        s.FullyConnectedOptionsT(),
    )
    return _save_tflite(path, tensors, [0], [3], [op], constants=[w.T.copy(), b])


#: Quantization of :func:`make_tflite_quantized_add`: (input, constant, output) ``(scale, zp)``.
QUANT_ADD_PARAMS: dict[str, dict[str, tuple[float, int]]] = {
    "int8": {"x": (0.5, -3), "c": (0.5, 2), "y": (0.25, 5)},
    "uint8": {"x": (0.5, 128), "c": (0.5, 130), "y": (0.25, 120)},
}


def quantized_add_constant(dtype: str, dim: int = 4) -> Array:
    """The quantized constant of :func:`make_tflite_quantized_add` (real values 1, 2, 3...)."""
    scale, zp = QUANT_ADD_PARAMS[dtype]["c"]
    real = np.arange(1, dim + 1, dtype=np.float64)
    return (np.round(real / scale) + zp).astype(dtype).reshape(1, dim)


def quantized_add_reference(x_q: Array, dtype: str = "int8") -> Array:
    """The exact output of :func:`make_tflite_quantized_add` for quantized input ``x_q``."""
    p = QUANT_ADD_PARAMS[dtype]
    dim = x_q.shape[-1]
    c_q = quantized_add_constant(dtype, dim)
    real = p["x"][0] * (x_q.astype(np.float64) - p["x"][1])
    real += p["c"][0] * (c_q.astype(np.float64) - p["c"][1])
    info = np.iinfo(np.dtype(dtype))
    q = np.round(real / p["y"][0]) + p["y"][1]
    return np.clip(q, info.min, info.max).astype(dtype)


def make_tflite_quantized_add(path: Path, dtype: str = "int8", dim: int = 4) -> Path:
    """Fully quantized ADD: ``y = x + c`` over ``[1, dim]`` ``dtype`` tensors (int8 or uint8).

    Input, constant and output carry the scales and zero points of :data:`QUANT_ADD_PARAMS`;
    :func:`quantized_add_reference` gives the exact expected output.
    """
    p = QUANT_ADD_PARAMS[dtype]
    tensors = [
        _tfl_tensor("x", dtype, [1, dim], quant=p["x"]),
        _tfl_tensor("c", dtype, [1, dim], buffer=1, quant=p["c"]),
        _tfl_tensor("y", dtype, [1, dim], quant=p["y"]),
    ]
    return _save_tflite(
        path, tensors, [0], [2], [_add_op(0, 1, 2)], constants=[quantized_add_constant(dtype, dim)]
    )


def make_tflite_fixed_reshape(path: Path) -> Path:
    """``x`` ``[1, 4]`` (signature ``[-1, 4]``) reshaped to a constant ``[2, 2]``.

    Runs at batch 1; resizing to any other batch makes the interpreter fail.
    """

    opts = s.ReshapeOptionsT()
    opts.newShape = [2, 2]
    tensors = [
        _tfl_tensor("x", "float32", [1, 4], signature=[-1, 4]),
        _tfl_tensor("shape", "int32", [2], buffer=1),
        _tfl_tensor("y", "float32", [2, 2]),
    ]
    op = (s.BuiltinOperator.RESHAPE, [0, 1], [2], s.BuiltinOptions.ReshapeOptions, opts)
    return _save_tflite(path, tensors, [0], [2], [op], constants=[np.array([2, 2], dtype=np.int32)])


def make_tflite_edgetpu_compiled(path: Path) -> Path:
    """A model whose only operator is ``edgetpu-custom-op``, as the Edge TPU compiler emits:
    it runs only with the Edge TPU delegate."""
    tensors = [_tfl_tensor("x", "uint8", [1, 4]), _tfl_tensor("y", "uint8", [1, 4])]
    return _save_tflite(path, tensors, [0], [1], [("edgetpu-custom-op", [0], [1], 0, None)])


def make_tflite_probe(path: Path) -> Path:
    """The probe model: float ``y = x + 1`` over ``x`` ``[1, 4]``, like :func:`make_onnx_probe`."""
    return make_tflite_add(path, dim=4, constant=np.ones((1, 4), dtype=np.float32))


def make_onnx_string_input(path: Path) -> Path:
    """``y = Identity(x)`` over a string tensor: a type the device protocol cannot carry."""

    return _save_onnx(
        path,
        [helper.make_node("Identity", ["x"], ["y"])],
        [_value("x", TensorProto.STRING, [1])],
        [_value("y", TensorProto.STRING, [1])],
    )
