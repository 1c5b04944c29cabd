"""The onnxruntime backend, on real onnxruntime sessions and real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.errors import ConfigError, InferenceError, ModelLoadError, ProviderError
from agent.runtimes import ProviderSpec, Runtime, RuntimeOptions, get_backend
from agent.runtimes.onnx import (
    PROBE_MODEL,
    OnnxBackend,
    build_session_options,
    provider_options,
)
from tests import modelgen

CPU = "CPUExecutionProvider"
AVAILABLE = set(ort.get_available_providers())
needs_no_gpu_eps = pytest.mark.skipif(
    bool({"TensorrtExecutionProvider", "CUDAExecutionProvider"} & AVAILABLE),
    reason="this onnxruntime build has GPU providers",
)


def chain(*names: str) -> RuntimeOptions:
    return RuntimeOptions(providers=tuple(ProviderSpec(n) for n in names), intra_op_threads=1)


@pytest.fixture(scope="module")
def backend() -> OnnxBackend:
    return OnnxBackend()


@pytest.fixture(scope="module")
def affine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return modelgen.make_onnx_affine(tmp_path_factory.mktemp("onnx") / "affine.onnx")


# --- the backend ---------------------------------------------------------------------


def test_registry_serves_this_backend() -> None:
    backend = get_backend("onnx")
    assert isinstance(backend, OnnxBackend)
    assert backend.format == "onnx"
    assert ".onnx" in backend.suffixes
    assert backend.available()
    assert CPU in backend.available_providers()


def test_probe_model_ships_and_adds_one(backend: OnnxBackend) -> None:
    assert PROBE_MODEL.is_file() and PROBE_MODEL.stat().st_size < 1024
    rt = backend.load(PROBE_MODEL, chain("cpu"))
    x = np.array([[0.0, 1.5, -2.0, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(rt.run({"x": x})[0], x + 1)


# --- exact outputs and specs on tiny models ----------------------------------------------


def test_affine_exact_outputs_and_specs(backend: OnnxBackend, affine: Path) -> None:
    rt = backend.load(affine, chain("cpu"))
    assert isinstance(rt, Runtime)
    assert rt.provider == CPU
    assert [(s.name, s.shape, s.dtype) for s in rt.inputs] == [("x", (None, 3), "float32")]
    assert [(s.name, s.shape, s.dtype) for s in rt.outputs] == [("y", (None, 2), "float32")]
    assert rt.inputs[0].quantization is None
    w, b = modelgen.affine_weights(3, 2)
    for batch in (1, 4, 1):
        x = np.arange(batch * 3, dtype=np.float32).reshape(batch, 3) - 2
        (y,) = rt.run({"x": x})
        np.testing.assert_array_equal(y, x @ w + b)


def test_static_batch_is_a_known_dim(backend: OnnxBackend, tmp_path: Path) -> None:
    path = modelgen.make_onnx_affine(tmp_path / "static.onnx", 5, 3, dynamic_batch=False)
    rt = backend.load(path, chain("cpu"))
    assert rt.inputs[0].shape == (1, 5)
    assert rt.outputs[0].shape == (1, 3)


def test_two_inputs_two_outputs_in_output_order(backend: OnnxBackend, tmp_path: Path) -> None:
    rt = backend.load(modelgen.make_onnx_two_inputs(tmp_path / "two.onnx"), chain("cpu"))
    assert [s.name for s in rt.inputs] == ["a", "b"]
    assert [s.name for s in rt.outputs] == ["sum", "prod"]
    a = np.array([[1, 2, 3, 4]], dtype=np.float32)
    b = np.array([[0.5, -1, 2, 10]], dtype=np.float32)
    total, product = rt.run({"b": b, "a": a})
    np.testing.assert_array_equal(total, a + b)
    np.testing.assert_array_equal(product, a * b)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_integer_input(backend: OnnxBackend, tmp_path: Path, dtype: str) -> None:
    path = modelgen.make_onnx_integer_input(tmp_path / f"{dtype}.onnx", dtype=dtype, scale=0.5)
    rt = backend.load(path, chain("cpu"))
    assert rt.inputs[0].dtype == dtype
    assert rt.inputs[0].np_dtype == np.dtype(dtype)
    info = np.iinfo(dtype)
    x = np.array([[info.min, 0, 7, info.max]], dtype=dtype)
    np.testing.assert_array_equal(rt.run({"x": x})[0], x.astype(np.float32) * 0.5)


def test_classifier_softmax(backend: OnnxBackend, tmp_path: Path) -> None:
    rt = backend.load(modelgen.make_onnx_classifier(tmp_path / "cls.onnx"), chain("cpu"))
    assert rt.inputs[0].shape == (1, 3, 8, 8)
    image = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    expected = modelgen.softmax(image.mean(axis=(2, 3)) @ modelgen.classifier_weights(3, 3))
    (probs,) = rt.run({"image": image})
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    assert probs.argmax() == expected.argmax()


def test_backend_does_not_judge_values(backend: OnnxBackend, tmp_path: Path) -> None:
    # NaN/Inf detection belongs to the model layer: the runtime returns what the model computes.
    rt = backend.load(modelgen.make_onnx_log(tmp_path / "log.onnx"), chain("cpu"))
    (y,) = rt.run({"x": np.array([[1.0, -1.0, 0.0, np.e]], dtype=np.float32)})
    assert y[0, 0] == 0.0 and np.isnan(y[0, 1]) and y[0, 2] == -np.inf
    assert y[0, 3] == pytest.approx(1.0)


def test_string_tensors_are_refused(backend: OnnxBackend, tmp_path: Path) -> None:
    path = modelgen.make_onnx_string_input(tmp_path / "str.onnx")
    with pytest.raises(ModelLoadError, match=r"str\.onnx: tensor 'x' has type tensor\(string\)"):
        backend.load(path, chain("cpu"))


# --- real models ---------------------------------------------------------------------------


def test_silero_vad_with_state(backend: OnnxBackend, models_dir: Path) -> None:
    rt = backend.load(models_dir / "silero_vad.onnx", chain("cpu"))
    specs = {s.name: (s.shape, s.dtype) for s in rt.inputs}
    assert specs == {
        "input": ((None, None), "float32"),
        "state": ((2, None, 128), "float32"),
        "sr": ((), "int64"),
    }
    assert [s.name for s in rt.outputs] == ["output", "stateN"]
    rng = np.random.default_rng(0)
    state = np.zeros((2, 1, 128), dtype=np.float32)
    sr = np.array(16000, dtype=np.int64)
    t = np.arange(512, dtype=np.float32) / 16000
    probs = []
    for chunk in range(4):
        audio = (0.05 * rng.standard_normal(512)).astype(np.float32)
        if chunk >= 2:  # a loud tone, after noise: the state carries across chunks
            audio += (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        prob, state = rt.run({"input": audio[None, :], "state": state, "sr": sr})
        assert prob.shape == (1, 1) and state.shape == (2, 1, 128)
        assert 0.0 <= float(prob[0, 0]) <= 1.0
        probs.append(float(prob[0, 0]))
    assert np.all(np.isfinite(state))
    assert probs[0] < 0.5  # quiet noise is not speech


def test_ppocr_cls_dynamic_dims(backend: OnnxBackend, models_dir: Path) -> None:
    rt = backend.load(models_dir / "ppocr_cls.onnx", chain("cpu"))
    (spec,) = rt.inputs
    assert spec.name == "x" and spec.dtype == "float32"
    assert spec.shape == (None, 3, None, None)  # the file leaves H and W symbolic
    assert rt.outputs[0].shape == (None, 2)
    x = np.random.default_rng(2).random((2, 3, 48, 192), dtype=np.float32)
    (y,) = rt.run({"x": x})
    assert y.shape == (2, 2)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)  # a softmax over two angles


# --- the provider chain --------------------------------------------------------------------


@needs_no_gpu_eps
def test_chain_falls_back_to_cpu(backend: OnnxBackend, affine: Path) -> None:
    rt = backend.load(affine, chain("tensorrt", "cuda", "cpu"))
    assert rt.provider == CPU
    assert [(a.provider, a.ok, a.reason) for a in rt.attempts] == [
        ("TensorrtExecutionProvider", False, "not available on this device"),
        ("CUDAExecutionProvider", False, "not available on this device"),
        (CPU, True, ""),
    ]


def test_links_of_other_backends_are_failed_attempts(backend: OnnxBackend, affine: Path) -> None:
    rt = backend.load(affine, chain("edgetpu", "cpu"))
    assert rt.attempts[0].provider == "edgetpu"
    assert not rt.attempts[0].ok and "not an onnxruntime provider" in rt.attempts[0].reason
    assert rt.provider == CPU


@needs_no_gpu_eps
def test_nothing_usable_is_a_provider_error(backend: OnnxBackend, affine: Path) -> None:
    with pytest.raises(ProviderError) as info:
        backend.load(affine, chain("tensorrt", "cuda", "edgetpu"))
    message = info.value.message
    assert "affine.onnx" in message
    assert "TensorrtExecutionProvider: not available on this device" in message
    assert "CUDAExecutionProvider: not available on this device" in message
    assert "\n" not in message
    assert info.value.code == "provider_unavailable"


def test_strict_placement_on_cpu_works(backend: OnnxBackend, affine: Path) -> None:
    options = RuntimeOptions(providers=(ProviderSpec("cpu"),), strict_placement=True)
    rt = backend.load(affine, options)
    assert rt.provider == CPU
    x = np.ones((2, 3), dtype=np.float32)
    w, b = modelgen.affine_weights(3, 2)
    np.testing.assert_array_equal(rt.run({"x": x})[0], x @ w + b)


def test_options_on_a_cpu_link_are_a_config_error(backend: OnnxBackend, affine: Path) -> None:
    options = RuntimeOptions(providers=(ProviderSpec("cpu", {"fp16": True}),))
    with pytest.raises(ConfigError, match="fp16"):
        backend.load(affine, options)


def test_tensorrt_options_are_translated(tmp_path: Path) -> None:
    link = ProviderSpec(
        "tensorrt",
        {"fp16": True, "workspace_bytes": 1 << 30, "trt_builder_optimization_level": 3},
    )
    opts = provider_options(link, RuntimeOptions(cache_dir=tmp_path))
    cache = tmp_path / "tensorrt"
    assert cache.is_dir()
    assert opts == {
        "trt_fp16_enable": "1",
        "trt_max_workspace_size": str(1 << 30),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(cache),
        "trt_builder_optimization_level": "3",
    }
    no_cache = provider_options(ProviderSpec("tensorrt"), RuntimeOptions(cache_dir=None))
    assert no_cache == {}


def test_xnnpack_gets_the_thread_count() -> None:
    opts = provider_options(ProviderSpec("xnnpack"), RuntimeOptions(intra_op_threads=3))
    assert opts == {"intra_op_num_threads": "3"}


def test_session_options() -> None:
    so = build_session_options(RuntimeOptions(intra_op_threads=2, inter_op_threads=1))
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.use_env_allocators") == "1"
    strict = build_session_options(RuntimeOptions(), strict=True)
    assert strict.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"


# --- broken files ----------------------------------------------------------------------------


def _broken(kind: str, tmp_path: Path, models_dir: Path) -> Path:
    path = tmp_path / f"{kind}.onnx"
    real = (models_dir / "ppocr_cls.onnx").read_bytes()
    if kind == "truncated":
        path.write_bytes(real[: len(real) // 3])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(3).bytes(4096))
    elif kind == "tflite":
        path.write_bytes((models_dir / "face_detection_short_range.tflite").read_bytes())
    elif kind == "text":
        path.write_text("this is not a model\n")
    return path  # "missing": never written


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "tflite", "text", "missing"])
def test_broken_files_are_model_load_errors(
    backend: OnnxBackend, tmp_path: Path, models_dir: Path, kind: str
) -> None:
    path = _broken(kind, tmp_path, models_dir)
    with pytest.raises(ModelLoadError) as info:
        backend.load(path, chain("cuda", "cpu"))
    assert info.value.code == "model_load_failed"
    assert info.value.message.startswith(f"{kind}.onnx: ")
    assert "\n" not in info.value.message
    assert "[ONNXRuntimeError]" not in info.value.message


@pytest.mark.parametrize("domain", ["", "com.example"])
def test_unknown_operator_is_a_model_load_error(
    backend: OnnxBackend, tmp_path: Path, domain: str
) -> None:
    path = modelgen.make_onnx_unknown_op(tmp_path / "op.onnx", domain=domain)
    with pytest.raises(ModelLoadError, match=r"op\.onnx: .*NoSuchOp"):
        backend.load(path, chain("cpu"))


# --- run-time failures -----------------------------------------------------------------------


def test_run_time_failure_is_an_inference_error(backend: OnnxBackend, tmp_path: Path) -> None:
    rt = backend.load(modelgen.make_onnx_fixed_reshape(tmp_path / "reshape.onnx"), chain("cpu"))
    with pytest.raises(InferenceError) as info:
        rt.run({"x": np.ones(3, dtype=np.float32)})
    assert info.value.code == "inference_failed"
    assert "cannot be reshaped" in info.value.message
    assert "\n" not in info.value.message and "onnxruntime_src" not in info.value.message
    # The session is still usable afterwards.
    (y,) = rt.run({"x": np.arange(4, dtype=np.float32)})
    np.testing.assert_array_equal(y, [[0, 1], [2, 3]])


def test_closed_runtime_refuses_to_run(backend: OnnxBackend, affine: Path) -> None:
    rt = backend.load(affine, chain("cpu"))
    rt.close()
    with pytest.raises(InferenceError, match="closed"):
        rt.run({"x": np.ones((1, 3), dtype=np.float32)})
