"""The LiteRT backend, on real LiteRT interpreters and real models."""

from __future__ import annotations

import ctypes.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ConfigError, InferenceError, ModelLoadError, ProviderError
from agent.runtimes import ProviderSpec, Quantization, Runtime, RuntimeOptions, get_backend
from agent.runtimes.litert import PROBE_MODEL, LiteRTBackend
from tests import modelgen

needs_no_edgetpu = pytest.mark.skipif(
    ctypes.util.find_library("edgetpu") is not None, reason="an Edge TPU runtime is installed"
)


def chain(*names: str) -> RuntimeOptions:
    return RuntimeOptions(providers=tuple(ProviderSpec(n) for n in names), intra_op_threads=1)


@pytest.fixture(scope="module")
def backend() -> LiteRTBackend:
    return LiteRTBackend()


@pytest.fixture(scope="module")
def add_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return modelgen.make_tflite_add(tmp_path_factory.mktemp("tflite") / "add.tflite")


# --- the backend ---------------------------------------------------------------------


def test_registry_serves_this_backend() -> None:
    backend = get_backend("tflite")
    assert isinstance(backend, LiteRTBackend)
    assert backend.format == "tflite" and backend.suffixes == (".tflite",)
    assert backend.available()
    assert {"XNNPACK", "CPU"} <= set(backend.available_providers())


def test_probe_model_ships_and_adds_one(backend: LiteRTBackend) -> None:
    assert PROBE_MODEL.is_file() and PROBE_MODEL.stat().st_size < 1024
    rt = backend.load(PROBE_MODEL, chain("cpu"))
    x = np.array([[0.0, 1.5, -2.0, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(rt.run({"x": x})[0], x + 1)


# --- exact outputs and specs on tiny models ----------------------------------------------


@pytest.mark.parametrize(("link", "provider"), [("xnnpack", "XNNPACK"), ("cpu", "CPU")])
def test_add_on_each_link(
    backend: LiteRTBackend, add_model: Path, link: str, provider: str
) -> None:
    rt = backend.load(add_model, chain(link))
    assert isinstance(rt, Runtime)
    assert rt.provider == provider
    assert [(a.provider, a.ok) for a in rt.attempts] == [(provider, True)]
    assert [(s.name, s.shape, s.dtype, s.quantization) for s in rt.inputs] == [
        ("x", (1, 4), "float32", None)
    ]
    assert [(s.name, s.shape) for s in rt.outputs] == [("y", (1, 4))]
    x = np.array([[1.0, -2.0, 0.25, 100.0]], dtype=np.float32)
    (y,) = rt.run({"x": x})
    np.testing.assert_array_equal(y, x + modelgen.tflite_add_constant(4))


def test_fully_connected_exact(backend: LiteRTBackend, tmp_path: Path) -> None:
    path = modelgen.make_tflite_fully_connected(tmp_path / "fc.tflite", in_dim=3, out_dim=2)
    rt = backend.load(path, chain("cpu"))
    w, b = modelgen.affine_weights(3, 2)
    x = np.array([[1.0, -3.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(rt.run({"x": x})[0], x @ w + b)


def test_two_inputs(backend: LiteRTBackend, tmp_path: Path) -> None:
    rt = backend.load(modelgen.make_tflite_two_inputs(tmp_path / "two.tflite"), chain("xnnpack"))
    assert [s.name for s in rt.inputs] == ["a", "b"]
    a = np.array([[1, 2, 3, 4]], dtype=np.float32)
    b = np.array([[0.5, -1, 2, 10]], dtype=np.float32)
    np.testing.assert_array_equal(rt.run({"b": b, "a": a})[0], a + b)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("link", ["xnnpack", "cpu"])
def test_quantized_add(backend: LiteRTBackend, tmp_path: Path, dtype: str, link: str) -> None:
    path = modelgen.make_tflite_quantized_add(tmp_path / f"q{dtype}.tflite", dtype=dtype)
    rt = backend.load(path, chain(link))
    params = modelgen.QUANT_ADD_PARAMS[dtype]
    (x_spec,) = rt.inputs
    (y_spec,) = rt.outputs
    assert (x_spec.dtype, y_spec.dtype) == (dtype, dtype)
    assert x_spec.quantization == Quantization((params["x"][0],), (params["x"][1],), 0)
    assert y_spec.quantization == Quantization((params["y"][0],), (params["y"][1],), 0)
    assert x_spec.quantization.per_tensor
    # Every value of the type, four at a time: outputs are exact, saturating at the ends.
    info = np.iinfo(dtype)
    values = np.arange(info.min, info.max + 1).astype(dtype).reshape(-1, 1, 4)
    for x in values:
        np.testing.assert_array_equal(
            rt.run({"x": x})[0], modelgen.quantized_add_reference(x, dtype)
        )


def test_dynamic_batch_resizes(backend: LiteRTBackend, tmp_path: Path) -> None:
    path = modelgen.make_tflite_add(tmp_path / "dyn.tflite", dim=4, dynamic_batch=True)
    rt = backend.load(path, chain("xnnpack"))
    assert rt.inputs[0].shape == (None, 4)
    assert rt.outputs[0].shape == (None, 4)
    c = modelgen.tflite_add_constant(4)
    for batch in (1, 3, 3, 5, 1):
        x = np.arange(batch * 4, dtype=np.float32).reshape(batch, 4)
        (y,) = rt.run({"x": x})
        assert y.shape == (batch, 4)
        np.testing.assert_array_equal(y, x + c)


def test_static_dims_cannot_be_resized(backend: LiteRTBackend, tmp_path: Path) -> None:
    path = modelgen.make_tflite_add(tmp_path / "dyn.tflite", dim=4, dynamic_batch=True)
    rt = backend.load(path, chain("cpu"))
    with pytest.raises(InferenceError):
        rt.run({"x": np.ones((1, 5), dtype=np.float32)})  # dim 1 is not dynamic
    np.testing.assert_array_equal(
        rt.run({"x": np.zeros((2, 4), np.float32)})[0][1], [0.5, 1, 1.5, 2]
    )


# --- real models ---------------------------------------------------------------------------


def test_face_detection_short_range(backend: LiteRTBackend, models_dir: Path) -> None:
    path = models_dir / "face_detection_short_range.tflite"
    on_xnnpack = backend.load(path, chain("xnnpack"))
    on_cpu = backend.load(path, chain("cpu"))
    assert (on_xnnpack.provider, on_cpu.provider) == ("XNNPACK", "CPU")
    assert [(s.name, s.shape, s.dtype) for s in on_cpu.inputs] == [
        ("input", (1, 128, 128, 3), "float32")
    ]
    assert [(s.name, s.shape) for s in on_cpu.outputs] == [
        ("regressors", (1, 896, 16)),
        ("classificators", (1, 896, 1)),
    ]
    image = np.random.default_rng(4).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    boxes, scores = on_cpu.run({"input": image})
    assert boxes.shape == (1, 896, 16) and scores.shape == (1, 896, 1)
    assert np.all(np.isfinite(boxes)) and np.all(np.isfinite(scores))
    # XNNPACK and the reference kernels compute the same network.
    boxes_x, scores_x = on_xnnpack.run({"input": image})
    np.testing.assert_allclose(boxes_x, boxes, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(scores_x, scores, rtol=1e-3, atol=1e-3)
    # Outputs are copies: a second run does not change the first one's arrays.
    kept = scores.copy()
    on_cpu.run({"input": np.zeros_like(image)})
    np.testing.assert_array_equal(scores, kept)


# --- the delegate chain --------------------------------------------------------------------


@needs_no_edgetpu
def test_missing_edgetpu_is_a_failed_attempt(backend: LiteRTBackend, add_model: Path) -> None:
    options = RuntimeOptions(
        providers=(
            ProviderSpec("edgetpu", {"device": "usb"}),
            ProviderSpec("cuda"),
            ProviderSpec("xnnpack"),
        )
    )
    rt = backend.load(add_model, options)
    assert rt.provider == "XNNPACK"
    assert [(a.provider, a.ok, a.reason) for a in rt.attempts] == [
        ("EdgeTPU", False, "libedgetpu.so.1 not found"),
        ("cuda", False, "not a LiteRT delegate"),
        ("XNNPACK", True, ""),
    ]


def test_nothing_usable_is_a_provider_error(backend: LiteRTBackend, add_model: Path) -> None:
    options = RuntimeOptions(
        providers=(
            ProviderSpec("gpu", {"library": "libno_such_gpu_delegate.so"}),
            ProviderSpec("tensorrt"),
        )
    )
    with pytest.raises(ProviderError) as info:
        backend.load(add_model, options)
    assert info.value.message == (
        "add.tflite: no delegate could serve the model "
        "(GPU: libno_such_gpu_delegate.so not found; tensorrt: not a LiteRT delegate)"
    )


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_delegate_that_fails_to_start(
    backend: LiteRTBackend, add_model: Path, tmp_path: Path
) -> None:
    # A real delegate plugin (the ABI load_delegate speaks) that finds no device.
    source = tmp_path / "nodevice.c"
    source.write_text(
        "#include <stddef.h>\n"
        "typedef void (*report_fn)(const char*);\n"
        "void* tflite_plugin_create_delegate(char** k, char** v, int n, report_fn report) {\n"
        '  report("no Edge TPU found on usb"); return NULL; }\n'
        "void tflite_plugin_destroy_delegate(void* d) { (void)d; }\n"
    )
    library = tmp_path / "libnodevice.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    options = RuntimeOptions(
        providers=(
            ProviderSpec("edgetpu", {"library": str(library), "device": "usb"}),
            ProviderSpec("cpu"),
        )
    )
    rt = backend.load(add_model, options)
    assert rt.provider == "CPU"
    assert rt.attempts[0].reason == f"{library} failed to start: no Edge TPU found on usb"


# --- broken files ----------------------------------------------------------------------------


def _broken(kind: str, tmp_path: Path, models_dir: Path) -> Path:
    path = tmp_path / f"{kind}.tflite"
    real = (models_dir / "face_detection_short_range.tflite").read_bytes()
    if kind == "truncated":
        path.write_bytes(real[: len(real) // 3])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(5).bytes(4096))
    elif kind == "onnx":
        path.write_bytes((models_dir / "ppocr_cls.onnx").read_bytes())
    elif kind == "text":
        path.write_text("this is not a model\n")
    return path  # "missing": never written


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "onnx", "text", "missing"])
@pytest.mark.parametrize("links", [("xnnpack",), ("cpu",), ("edgetpu", "gpu", "cpu")])
def test_broken_files_are_model_load_errors(
    backend: LiteRTBackend, tmp_path: Path, models_dir: Path, kind: str, links: tuple[str, ...]
) -> None:
    path = _broken(kind, tmp_path, models_dir)
    with pytest.raises(ModelLoadError) as info:
        backend.load(path, chain(*links))
    assert info.value.code == "model_load_failed"
    assert info.value.message.startswith(f"{kind}.tflite: ")
    assert "\n" not in info.value.message


# --- run-time failures -----------------------------------------------------------------------


def test_run_time_failure_is_an_inference_error(backend: LiteRTBackend, tmp_path: Path) -> None:
    rt = backend.load(modelgen.make_tflite_fixed_reshape(tmp_path / "r.tflite"), chain("xnnpack"))
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    np.testing.assert_array_equal(rt.run({"x": x})[0], [[0, 1], [2, 3]])
    with pytest.raises(InferenceError) as info:  # batch 2 cannot become [2, 2]
        rt.run({"x": np.ones((2, 4), dtype=np.float32)})
    assert info.value.code == "inference_failed" and "\n" not in info.value.message
    # The interpreter recovers once the shape is valid again.
    np.testing.assert_array_equal(rt.run({"x": x})[0], [[0, 1], [2, 3]])


def test_closed_runtime_refuses_to_run(backend: LiteRTBackend, add_model: Path) -> None:
    rt = backend.load(add_model, chain("cpu"))
    rt.close()
    with pytest.raises(InferenceError, match="closed"):
        rt.run({"x": np.ones((1, 4), dtype=np.float32)})


@needs_no_edgetpu
def test_edgetpu_model_without_an_edgetpu(backend: LiteRTBackend, tmp_path: Path) -> None:
    path = modelgen.make_tflite_edgetpu_compiled(tmp_path / "etpu.tflite")
    with pytest.raises(ProviderError) as info:
        backend.load(path, chain("edgetpu", "xnnpack", "cpu"))
    assert info.value.message == (
        "etpu.tflite: no delegate could serve the model (EdgeTPU: libedgetpu.so.1 not found; "
        "XNNPACK: the model is compiled for the Edge TPU; "
        "CPU: the model is compiled for the Edge TPU)"
    )


def test_options_on_a_plain_link_are_a_config_error(
    backend: LiteRTBackend, add_model: Path
) -> None:
    options = RuntimeOptions(providers=(ProviderSpec("xnnpack", {"num_threads": 4}),))
    with pytest.raises(ConfigError, match="num_threads"):
        backend.load(add_model, options)
