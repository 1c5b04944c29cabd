"""Models, inputs and profiles for the GPU tests.

* :func:`det_model`: ``y = det(2x)`` over ``x`` ``[1, 2, 2]``. ``Det`` has a CPU kernel but
  no CUDA kernel (onnxruntime's ``docs/OperatorKernels.md``) and no TensorRT importer
  (onnx-tensorrt's ``docs/operators.md``: ``Det | N``), so a GPU session can place ``Mul``
  on the GPU but must run ``Det`` on the CPU: the partial placement ``strict_placement``
  refuses.
* :func:`real_inputs`: inputs for the real models of ``models_dir``.
* :func:`strict_gpu_profile`: the ``jetson-orin`` chain with ``strict_placement: true``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from agent.profiles import load_profile
from tests import modelgen

Array = npt.NDArray[Any]
#: The GPU profile whose chain the tests load with: ``tensorrt (fp16) -> cuda -> cpu``.
GPU_PROFILE = "jetson-orin"


def det_model(path: Path) -> Path:
    """``y = det(2 * x)``, ``x`` float32 ``[1, 2, 2]``, ``y`` ``[1]``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["x2"], name="scale"),
            helper.make_node("Det", ["x2"], ["y"], name="det"),
        ],
        "det",
        [x],
        [y],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", modelgen.ONNX_OPSET)])
    model.ir_version = modelgen.ONNX_IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


#: A matrix with a well-conditioned determinant: det(2 * DET_X) = 4 * (2*5 - 3*1) = 28.
DET_X = np.array([[[2.0, 3.0], [1.0, 5.0]]], np.float32)
DET_Y = np.array([28.0], np.float32)


def real_inputs(model: str) -> list[tuple[str | None, Array]]:
    """Fixed, seeded inputs for ``ppocr_cls``, ``ppocr_rec``, ``ppocr_det`` or ``silero_vad``."""
    rng = np.random.default_rng(7)
    if model == "silero_vad":  # 64 samples of context + one 512-sample chunk at 16 kHz
        return [
            ("input", (rng.standard_normal((1, 576)) * 0.1).astype(np.float32)),
            ("state", np.zeros((2, 1, 128), np.float32)),
            ("sr", np.array(16000, np.int64)),
        ]
    shapes = {
        "ppocr_cls": (1, 3, 48, 192),
        "ppocr_rec": (1, 3, 48, 320),
        "ppocr_det": (1, 3, 640, 640),
    }
    return [(None, rng.uniform(-1, 1, shapes[model]).astype(np.float32))]


def strict_gpu_profile(folder: Path, name: str = "nvidia-gpu-strict") -> Path:
    """Write :data:`GPU_PROFILE` as ``folder/{name}.yaml``, with ``strict_placement: true``.

    Its chain, threads, memory and ``required_accelerator`` are the Jetson's; it has no detect
    rules (the agent config names it) and runs on either arch.
    """
    source = load_profile(GPU_PROFILE).source
    assert source is not None
    doc = yaml.safe_load(source.read_text())
    doc.update(name=name, strict_placement=True, arch=["x86_64", "aarch64"])
    doc.pop("detect", None)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
