"""Golden vectors, run through real onnxruntime sessions on tiny models with known weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from agent.bundle import Bundle, open_bundle
from agent.errors import BundleError
from agent.golden import RunFn, check_golden
from agent.runtimes import Runtime, RuntimeOptions, get_backend
from tests import modelgen

Array = np.ndarray[Any, Any]
X = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], np.float32)


def affine_expected(x: Array) -> Array:
    w, b = modelgen.affine_weights(3, 2)
    return np.asarray(x @ w + b, np.float32)


def make_bundle(root: Path, manifest: dict[str, Any], arrays: dict[str, Array]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, array in arrays.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / rel, array)
    (root / "model.yaml").write_text(yaml.safe_dump(manifest))
    return root


def affine_bundle(tmp_path: Path, expected: Array, **vector: Any) -> Bundle:
    root = tmp_path / "affine"
    root.mkdir(parents=True, exist_ok=True)
    modelgen.make_onnx_affine(root / "model.onnx")
    manifest = {
        "name": "affine",
        "version": "1.0.0",
        "format": "onnx",
        "model": "model.onnx",
        "golden": [
            {"name": "pair", "inputs": {"x": "g/x.npy"}, "outputs": {"y": "g/y.npy"}, **vector}
        ],
    }
    make_bundle(root, manifest, {"g/x.npy": X, "g/y.npy": expected})
    return open_bundle(root, tmp_path / "work")


@pytest.fixture
def session(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A factory: ``session(bundle)`` -> (run callable, runtime), closed after the test."""
    opened: list[Runtime] = []

    def make(bundle: Bundle) -> RunFn:
        runtime = get_backend("onnx").load(bundle.model_path, RuntimeOptions())
        opened.append(runtime)
        names = [o.name for o in runtime.outputs]

        def run(feeds: dict[str, Array]) -> dict[str, Array]:
            return dict(zip(names, runtime.run(feeds), strict=True))

        return run

    yield make
    for runtime in opened:
        runtime.close()


def test_matching_vectors_pass(tmp_path: Path, session: Any) -> None:
    bundle = affine_bundle(tmp_path, affine_expected(X))
    report = check_golden(bundle, session(bundle))
    assert report.ok
    assert report.results[0].name == "pair"
    assert report.results[0].max_abs_error == {"y": 0.0}
    report.raise_for_failure()  # does nothing
    assert report.to_dict() == {
        "bundle": "affine 1.0.0",
        "ok": True,
        "vectors": [{"name": "pair", "ok": True, "failures": []}],
    }


def test_a_wrong_value_fails_with_the_vector_output_and_error(tmp_path: Path, session: Any) -> None:
    expected = affine_expected(X)
    expected[1, 0] += 0.5
    bundle = affine_bundle(tmp_path, expected)
    report = check_golden(bundle, session(bundle))
    assert not report.ok
    assert report.failures == [
        "vector 'pair': output 'y': 1 of 4 values off, max abs error 0.5 (rtol=0.001, atol=1e-05)"
    ]
    with pytest.raises(BundleError, match=r"affine 1\.0\.0: golden vector 'pair': output 'y'") as e:
        report.raise_for_failure()
    assert e.value.code == "golden_mismatch"


def test_tolerances_are_the_isclose_rule(tmp_path: Path, session: Any) -> None:
    expected = affine_expected(X) + np.float32(0.01)
    loose = affine_bundle(tmp_path / "a", expected, atol=0.011, rtol=0)
    assert check_golden(loose, session(loose)).ok
    tight = affine_bundle(tmp_path / "b", expected, atol=0.009, rtol=0)
    assert not check_golden(tight, session(tight)).ok
    scaled = affine_expected(X) * np.float32(1.01)  # off by 1% of each value
    relative = affine_bundle(tmp_path / "c", scaled, atol=0, rtol=0.011)
    assert check_golden(relative, session(relative)).ok
    too_tight = affine_bundle(tmp_path / "d", scaled, atol=0, rtol=0.009)
    assert "3 of 4 values off" in check_golden(too_tight, session(too_tight)).failures[0]


def test_shape_mismatch_missing_output_and_nan(tmp_path: Path, session: Any) -> None:
    bundle = affine_bundle(tmp_path, affine_expected(X)[:1])
    assert check_golden(bundle, session(bundle)).failures == [
        "vector 'pair': output 'y' has shape [2, 2], expected [1, 2]"
    ]
    run = session(bundle)
    missing = check_golden(bundle, lambda feeds: {"z": run(feeds)["y"]})
    assert missing.failures == ["vector 'pair': output 'y' is missing"]
    nan = check_golden(bundle, lambda feeds: {"y": np.full((1, 2), np.nan, np.float32)})
    assert not nan.ok and "2 of 2 values off" in nan.failures[0]


def test_pickled_npy_is_refused(tmp_path: Path, session: Any) -> None:
    bundle = affine_bundle(tmp_path, affine_expected(X))
    target = bundle.root / "g" / "y.npy"
    target.unlink()
    np.save(target, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BundleError, match=r"g/y\.npy: not a valid \.npy array"):
        check_golden(bundle, session(bundle))


def classifier_bundle(tmp_path: Path, top_label: str, **pre: Any) -> Bundle:
    """A colour classifier whose golden vector is a rendered red PNG."""
    root = tmp_path / "cls"
    root.mkdir(parents=True, exist_ok=True)
    modelgen.make_onnx_classifier(root / "model.onnx", num_classes=3, size=8)
    img = np.zeros((16, 16, 3), np.uint8)
    img[:] = (0, 0, 255)  # red, BGR
    cv2.imwrite(str(root / "red.png"), img)
    # mean_hw(image) = [1, 0, 0] -> logits [4.25, 0.25, 0.25] -> softmax
    logits = np.array([4.25, 0.25, 0.25])
    probs = (np.exp(logits) / np.exp(logits).sum()).astype(np.float32)[None]
    manifest = {
        "name": "colours",
        "version": "2.0.0-rc.1",
        "format": "onnx",
        "model": "model.onnx",
        "preprocessing": {"kind": "image", "width": 8, "height": 8, "scale": 1 / 255, **pre},
        "postprocessing": {"kind": "classification", "labels": ["red", "green", "blue"]},
        "golden": [
            {
                "name": "red",
                "image": "red.png",
                "outputs": {"probs": "probs.npy"},
                "top_label": top_label,
                "rtol": 1e-4,
                "atol": 1e-6,
            }
        ],
    }
    make_bundle(root, manifest, {"probs.npy": probs})
    return open_bundle(root, tmp_path / "work")


def test_image_vector_with_top_label(tmp_path: Path, session: Any) -> None:
    bundle = classifier_bundle(tmp_path / "ok", "red", input="image")
    assert check_golden(bundle, session(bundle)).ok
    wrong = classifier_bundle(tmp_path / "wrong", "green", input="image")
    assert check_golden(wrong, session(wrong)).failures == [
        "vector 'red': top label is 'red', expected 'green'"
    ]


def test_image_vector_input_name(tmp_path: Path, session: Any) -> None:
    bundle = classifier_bundle(tmp_path, "red")  # neither preprocessing.input nor inputs
    run = session(bundle)
    with pytest.raises(BundleError, match=r"set preprocessing\.input"):
        check_golden(bundle, run)
    assert check_golden(bundle, run, image_input="image").ok


def test_undecodable_golden_image_is_a_bundle_error(tmp_path: Path, session: Any) -> None:
    bundle = classifier_bundle(tmp_path, "red", input="image")
    (bundle.root / "red.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(BundleError, match=r"golden vector 'red': red\.png: image does not decode"):
        check_golden(bundle, session(bundle))
