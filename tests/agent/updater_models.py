"""Real ONNX models and bundles for the updater tests; ``y = k * x`` tells versions apart.

* :func:`scale_model`: ``y = k * x`` (optionally padded with weights, to make it big);
* :func:`log_model`: ``y = log(x)``, NaN for negative inputs;
* :func:`slow_model`: ``y = k * x`` behind a Loop, slow on purpose;
* :func:`bundle`: a ``.tar.gz`` bundle with one golden vector.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests import modelgen


def _save(path: Path, nodes: list[Any], inits: list[Any], extra: list[Any] | None = None) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph(nodes, path.stem, [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", modelgen.ONNX_OPSET)])
    model.ir_version = modelgen.ONNX_IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def scale_model(path: Path, k: float, pad_bytes: int = 0) -> Path:
    """``y = k * x`` over ``x`` ``[N, 4]`` float32; ``pad_bytes`` of unused weights make it big.

    The padding is a second input-free branch (``y = k * x + 0 * sum(pad)``), so no runtime
    drops it as unused.
    """
    inits = [numpy_helper.from_array(np.array(k, np.float32), "k")]
    nodes = [helper.make_node("Mul", ["x", "k"], ["y"])]
    if pad_bytes:
        rng = np.random.default_rng(int(k * 1000))
        pad = rng.standard_normal(pad_bytes // 4).astype(np.float32)
        inits += [
            numpy_helper.from_array(pad, "pad"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ]
        nodes = [
            helper.make_node("Mul", ["x", "k"], ["kx"]),
            helper.make_node("ReduceSum", ["pad"], ["pad_sum"], keepdims=0),
            helper.make_node("Mul", ["pad_sum", "zero"], ["nothing"]),
            helper.make_node("Add", ["kx", "nothing"], ["y"]),
        ]
    return _save(path, nodes, inits)


def log_model(path: Path) -> Path:
    """``y = log(x)``: fine for positive inputs, NaN for negative ones."""
    return _save(path, [helper.make_node("Log", ["x"], ["y"])], [])


def slow_model(path: Path, k: float, iterations: int) -> Path:
    """``y = k * x`` computed by a Loop of ``iterations`` steps (slow on purpose)."""
    value = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc", "zero_row"], ["acc_out"]),
        ],
        "body",
        [
            value("i", TensorProto.INT64, []),
            value("cond_in", TensorProto.BOOL, []),
            value("acc", TensorProto.FLOAT, [1, 4]),
        ],
        [value("cond_out", TensorProto.BOOL, []), value("acc_out", TensorProto.FLOAT, [1, 4])],
    )
    nodes = [
        helper.make_node("Loop", ["n", "", "zero_row"], ["spent"], body=body),
        helper.make_node("Mul", ["x", "k"], ["kx"]),
        helper.make_node("Add", ["kx", "spent"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(iterations, np.int64), "n"),
        numpy_helper.from_array(np.zeros((1, 4), np.float32), "zero_row"),
        numpy_helper.from_array(np.array(k, np.float32), "k"),
    ]
    return _save(path, nodes, inits)


def bundle(
    path: Path,
    model: Path,
    version: str,
    *,
    golden_x: list[float] | None = None,
    golden_y: list[float] | None = None,
    name: str = "m",
    **manifest: Any,
) -> Path:
    """A ``.tar.gz`` bundle of ``model`` with one golden vector ``golden_x`` → ``golden_y``."""
    doc: dict[str, Any] = {"name": name, "version": version, "format": "onnx", "model": "m.onnx"}
    files = {"m.onnx": model.read_bytes()}
    if golden_x is not None and golden_y is not None:
        for key, values in (("x", golden_x), ("y", golden_y)):
            buf = io.BytesIO()
            np.save(buf, np.array([values], np.float32))
            files[f"golden/{key}.npy"] = buf.getvalue()
        doc["golden"] = [{"inputs": {"x": "golden/x.npy"}, "outputs": {"y": "golden/y.npy"}}]
    doc.update(manifest)
    files["model.yaml"] = yaml.safe_dump(doc).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name_, data in files.items():
            info = tarfile.TarInfo(name_)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
