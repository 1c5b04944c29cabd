"""The model layer: input checks, quantization, NaN outputs, bundles end to end (real runtimes)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from agent.errors import BadInput, BundleError, InferenceError, ModelLoadError
from agent.loader import load_model
from agent.protocol import decode_request
from agent.serve_request import serve_request
from tests import modelgen


def _load(path: Path, tmp_path: Path, **kw: object):  # type: ignore[no-untyped-def]
    return load_model(path, work_dir=tmp_path / "work", **kw).model  # type: ignore[arg-type]


def test_affine_exact_outputs_and_version_of_a_bare_file(tmp_path: Path) -> None:
    model = _load(modelgen.make_onnx_affine(tmp_path / "affine.onnx"), tmp_path)
    w, b = modelgen.affine_weights(3, 2)
    x = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], np.float32)
    ((name, y),) = model.infer([(None, x)]).outputs
    assert name == "y"
    np.testing.assert_array_equal(y, x @ w + b)
    assert model.version.startswith("sha256:") and len(model.version) == len("sha256:") + 12
    assert model.provider == "CPUExecutionProvider"
    assert model.batch_dynamic


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ([("nope", np.zeros((1, 3), np.float32))], "unknown input 'nope'"),
        ([("x", np.zeros((1, 4), np.float32))], "expected shape [?,3], got [1, 4]"),
        ([("x", np.zeros((3,), np.float32))], "expected shape [?,3], got [3]"),
        ([("x", np.zeros((1, 3), np.int32))], "expected datatype FP32, got INT32"),
        ([("x", np.zeros((1, 3), np.float64))], "expected datatype FP32, got FP64"),
        ([], "takes 1 input(s) (x), got 0"),
    ],
)
def test_wrong_inputs_are_bad_input(tmp_path: Path, tensors: list, message: str) -> None:  # type: ignore[type-arg]
    model = _load(modelgen.make_onnx_affine(tmp_path / "affine.onnx"), tmp_path)
    with pytest.raises(BadInput) as err:
        model.infer(tensors)
    assert message in err.value.message


def test_two_inputs_need_names(tmp_path: Path) -> None:
    model = _load(modelgen.make_onnx_two_inputs(tmp_path / "two.onnx"), tmp_path)
    a = np.ones((2, 4), np.float32)
    with pytest.raises(BadInput, match="input name required"):
        model.infer([(None, a), (None, a)])
    with pytest.raises(BadInput, match="given twice"):
        model.infer([("a", a), ("a", a)])
    outs = dict(model.infer([("a", a), ("b", a * 3)]).outputs)
    np.testing.assert_array_equal(outs["sum"], a * 4)
    np.testing.assert_array_equal(outs["prod"], a * 3)


def test_nan_output_is_an_inference_error(tmp_path: Path) -> None:
    model = _load(modelgen.make_onnx_log(tmp_path / "log.onnx"), tmp_path)
    assert model.infer([(None, np.ones((1, 4), np.float32))]).outputs[0][1].sum() == 0
    with pytest.raises(InferenceError, match="NaN or Inf"):
        model.infer([(None, -np.ones((1, 4), np.float32))])


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_quantized_tflite_takes_and_returns_floats(tmp_path: Path, dtype: str) -> None:
    model = _load(
        modelgen.make_tflite_quantized_add(tmp_path / f"q_{dtype}.tflite", dtype), tmp_path
    )
    p = modelgen.QUANT_ADD_PARAMS[dtype]
    x = np.array([[0.5, 1.0, -1.5, 2.0]], np.float32)
    y = model.infer([(None, x)]).outputs[0][1]
    assert y.dtype == np.float32
    # The exact answer through the model's own quantization.
    x_q = np.clip(np.round(x / p["x"][0]) + p["x"][1], *_range(dtype)).astype(dtype)
    ref = p["y"][0] * (modelgen.quantized_add_reference(x_q, dtype).astype(np.float32) - p["y"][1])
    np.testing.assert_allclose(y, ref)
    np.testing.assert_allclose(y, x + np.arange(1, 5), atol=p["y"][0])
    # Raw integers in and out with parameters.quantized.
    raw = model.infer([(None, x_q)], quantized=True).outputs[0][1]
    assert raw.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(raw, modelgen.quantized_add_reference(x_q, dtype))
    with pytest.raises(BadInput, match="quantized"):
        model.infer([(None, x_q.astype(np.int32))])


def _range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def test_corrupt_and_truncated_models_fail_with_one_line(tmp_path: Path) -> None:
    good = modelgen.make_onnx_affine(tmp_path / "good.onnx").read_bytes()
    for name, data in {
        "trunc.onnx": good[: len(good) // 2],
        "junk.tflite": b"\x00junk" * 50,
    }.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelLoadError) as err:
            _load(path, tmp_path)
        assert "\n" not in err.value.message


def _classifier_bundle(tmp_path: Path, *, expect: str = "blue", tgz: bool = False) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    modelgen.make_onnx_classifier(root / "model.onnx", num_classes=3, size=8)
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, :] = (255, 0, 0)  # BGR: pure blue
    cv2.imwrite(str(root / "blue.png"), img)
    manifest = {
        "name": "colors",
        "version": "1.2.0",
        "format": "onnx",
        "model": "model.onnx",
        "preprocessing": {
            "kind": "image",
            "width": 8,
            "height": 8,
            "color": "rgb",
            "scale": 1 / 255,
        },
        "postprocessing": {
            "kind": "classification",
            "top_k": 2,
            "labels": ["red", "green", "blue"],
        },
        "golden": [{"name": "blue", "image": "blue.png", "top_label": expect}],
    }
    (root / "model.yaml").write_text(yaml.safe_dump(manifest))
    if not tgz:
        return root
    archive = tmp_path / "colors.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="colors")
    return archive


@pytest.mark.parametrize("tgz", [False, True])
def test_image_bundle_end_to_end(tmp_path: Path, tgz: bool) -> None:
    loaded = load_model(_classifier_bundle(tmp_path, tgz=tgz), work_dir=tmp_path / "work")
    assert loaded.golden is not None and loaded.golden.ok
    model = loaded.model
    assert (model.name, model.version, model.accepts_images) == ("colors", "1.2.0", True)
    img = np.zeros((10, 10, 3), np.uint8)
    img[:, :] = (0, 0, 255)  # BGR: red
    ok, png = cv2.imencode(".png", img)
    assert ok
    reply = serve_request(model, decode_request(png.tobytes()))
    assert reply.outputs is None  # the result replaces raw outputs unless raw_outputs is asked
    top = reply.result["classes"][0]  # type: ignore[index]
    assert top["label"] == "red" and top["score"] > 0.9
    with pytest.raises(BadInput, match="does not decode"):
        model.infer_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


def test_failing_golden_vector_refuses_the_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as err:
        load_model(_classifier_bundle(tmp_path, expect="red"), work_dir=tmp_path / "work")
    assert err.value.code == "golden_mismatch"
    assert "top label is 'blue', expected 'red'" in err.value.message


def test_image_sent_to_a_model_without_preprocessing(tmp_path: Path) -> None:
    model = _load(modelgen.make_onnx_affine(tmp_path / "affine.onnx"), tmp_path)
    with pytest.raises(BadInput, match="does not take images"):
        model.infer_image(b"\xff\xd8\xff\xe0fakejpeg")


def test_real_model_through_the_full_path(models_dir: Path, tmp_path: Path) -> None:
    model = _load(models_dir / "silero_vad.onnx", tmp_path)
    t = np.arange(512, dtype=np.float32) / 16000
    chunk = (0.001 * np.sin(2 * np.pi * 50 * t)).astype(np.float32)[None, :]
    state = np.zeros((2, 1, 128), np.float32)
    outs = dict(
        model.infer([("input", chunk), ("state", state), ("sr", np.array(16000, np.int64))]).outputs
    )
    assert outs["output"].shape == (1, 1) and 0.0 <= float(outs["output"][0, 0]) < 0.2
    assert outs["stateN"].shape == (2, 1, 128)
