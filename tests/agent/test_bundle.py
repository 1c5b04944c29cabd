"""Bundles: manifest validation, safe archive extraction, bare model files."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.bundle import (
    Bundle,
    ExtractLimits,
    SemVer,
    is_semver,
    open_bundle,
    parse_manifest,
)
from agent.errors import BundleError
from agent.runtimes import RuntimeOptions, get_backend
from tests import modelgen

CLASSIFIER: dict[str, Any] = {
    "name": "tiny-classifier",
    "version": "1.2.0",
    "format": "onnx",
    "model": "model.onnx",
    "description": "a tiny colour classifier",
    "inputs": [{"name": "image", "shape": [1, 3, 8, 8], "dtype": "float32"}],
    "outputs": [{"name": "probs", "shape": [1, 3], "dtype": "float32"}],
    "preprocessing": {
        "kind": "image",
        "width": 8,
        "height": 8,
        "scale": 1 / 255,
    },
    "postprocessing": {"kind": "classification", "top_k": 2, "labels": "labels.txt"},
    "latency_budget_ms": {"default": 50, "rpi5": 20},
    "compatible_profiles": ["rpi5", "jetson-orin-nano"],
    "min_agent_version": "0.1.0",
}


def write_bundle(root: Path, manifest: dict[str, Any] | None = None) -> Path:
    """A classifier bundle directory: model.onnx, labels.txt, model.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    modelgen.make_onnx_classifier(root / "model.onnx")
    (root / "labels.txt").write_text("red\ngreen\nblue\n\n", encoding="utf-8")
    (root / "model.yaml").write_text(yaml.safe_dump(manifest or CLASSIFIER), encoding="utf-8")
    return root


def tar_of(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def file_member(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def special_member(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.devmajor, info.devminor = 1, 3
    return info, None


# --- directories and archives that work ----------------------------------------------------


def test_directory_bundle_opens_with_everything_resolved(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b")
    bundle = open_bundle(root, tmp_path / "work")
    model_bytes = (root / "model.onnx").read_bytes()
    assert bundle.root == root
    assert bundle.model_path == (root / "model.onnx").resolve()
    assert bundle.digest == hashlib.sha256(model_bytes).hexdigest()
    assert (bundle.name, bundle.version, bundle.format) == ("tiny-classifier", "1.2.0", "onnx")
    assert bundle.labels == ("red", "green", "blue")  # trailing blank line dropped
    assert not bundle.synthesized
    assert not (tmp_path / "work").exists()  # nothing extracted for a directory
    # The manifest file itself is also accepted as the source.
    assert open_bundle(root / "model.yaml", tmp_path / "work").digest == bundle.digest


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_tgz_bundle_is_extracted_under_the_archive_digest(tmp_path: Path, layout: str) -> None:
    root = write_bundle(tmp_path / "mybundle")
    archive = tmp_path / "mybundle-1.2.0.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        if layout == "flat":  # tar czf x.tgz -C mybundle .
            tf.add(root, arcname=".")
        else:  # tar czf x.tgz mybundle
            tf.add(root, arcname="mybundle")
    work = tmp_path / "work"
    bundle = open_bundle(archive, work)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    expected_root = work / digest if layout == "flat" else work / digest / "mybundle"
    assert bundle.root == expected_root
    assert bundle.digest == hashlib.sha256((root / "model.onnx").read_bytes()).hexdigest()
    assert bundle.labels == ("red", "green", "blue")
    mode = stat.S_IMODE(bundle.model_path.stat().st_mode)
    assert mode == 0o444  # extracted read-only, whatever the archive said
    # Opening again extracts afresh into the same place; no staging directory is left.
    again = open_bundle(archive, work)
    assert again.root == bundle.root
    assert sorted(p.name for p in work.iterdir()) == [digest]


def test_plain_tar_bundle_works(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b")
    archive = tmp_path / "b.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(root, arcname=".")
    assert open_bundle(archive, tmp_path / "work").name == "tiny-classifier"


# --- unsafe archives -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (file_member("../evil.txt"), "'..'"),
        (file_member("a/../../evil.txt"), "'..'"),
        (file_member("/tmp/evil.txt"), "absolute"),
        (file_member("a\\..\\evil.txt"), "backslash"),
        (special_member("link", tarfile.SYMTYPE, "/etc/passwd"), "links"),
        (special_member("inside-link", tarfile.SYMTYPE, "model.yaml"), "links"),
        (special_member("hard", tarfile.LNKTYPE, "model.yaml"), "links"),
        (special_member("null", tarfile.CHRTYPE), "device"),
        (special_member("disk", tarfile.BLKTYPE), "device"),
        (special_member("pipe", tarfile.FIFOTYPE), "FIFO"),
        (file_member("customop.so", b"\0" * 8), "shared libraries"),
        (file_member("libx.so.1", b"\0" * 8), "shared libraries"),
        (file_member("hook.py", b"print(1)"), "Python"),
        (file_member("renamed.bin", b"\x7fELF\x02\x01\x01" + b"\0" * 64), "executables"),
        (file_member("model.yaml", b"again"), "twice"),
    ],
)
def test_unsafe_archive_is_refused_and_nothing_is_left(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None], message: str
) -> None:
    archive = tar_of(tmp_path / "bad.tgz", [file_member("model.yaml", b"name: x\n"), member])
    work = tmp_path / "work"
    with pytest.raises(BundleError, match=message) as err:
        open_bundle(archive, work)
    assert err.value.code == "unsafe_archive"
    assert list(work.iterdir()) == []  # the staging directory was removed
    assert not (tmp_path / "evil.txt").exists()


def test_oversize_archive_is_refused(tmp_path: Path) -> None:
    archive = tar_of(
        tmp_path / "big.tgz", [file_member("a.bin", b"\0" * 600), file_member("b.bin", b"\0" * 600)]
    )
    limits = ExtractLimits(max_bytes=1000)
    with pytest.raises(BundleError, match="more than 1000 bytes") as err:
        open_bundle(archive, tmp_path / "work", limits=limits)
    assert err.value.code == "unsafe_archive"
    # Compression does not hide the size: 600 zero bytes compress to almost nothing.
    assert archive.stat().st_size < 1000


def test_archive_with_too_many_members_is_refused(tmp_path: Path) -> None:
    archive = tar_of(tmp_path / "many.tgz", [file_member(f"f{i}") for i in range(6)])
    with pytest.raises(BundleError, match="more than 5 members"):
        open_bundle(archive, tmp_path / "work", limits=ExtractLimits(max_members=5))


def test_corrupt_and_non_tar_archives_are_bad_archives(tmp_path: Path) -> None:
    not_tar = tmp_path / "x.tgz"
    not_tar.write_bytes(b"this is not a tarball at all" * 20)
    with pytest.raises(BundleError) as err:
        open_bundle(not_tar, tmp_path / "work")
    assert err.value.code == "bad_archive"
    good = tar_of(tmp_path / "g.tgz", [file_member("model.yaml", os.urandom(50_000))])
    truncated = tmp_path / "t.tgz"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(BundleError) as err:
        open_bundle(truncated, tmp_path / "work")
    assert err.value.code == "bad_archive"
    assert list((tmp_path / "work").iterdir()) == []


def test_archive_without_manifest_at_top_is_refused(tmp_path: Path) -> None:
    archive = tar_of(tmp_path / "x.tgz", [file_member("a/b/model.yaml"), file_member("c.txt")])
    with pytest.raises(BundleError, match=r"no model\.yaml at the top"):
        open_bundle(archive, tmp_path / "work")


# --- manifest validation --------------------------------------------------------------------


def with_(path: str, value: Any) -> dict[str, Any]:
    """CLASSIFIER with ``path`` (``a.b`` or ``a[0].b``) set to ``value`` (deleted if ...)."""
    data: Any = yaml.safe_load(yaml.safe_dump(CLASSIFIER))
    keys = path.replace("[", ".").replace("]", "").split(".")
    node = data
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last: Any = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    assert isinstance(data, dict)
    return data


GOLDEN_OK = {"inputs": {"image": "g/x.npy"}, "outputs": {"probs": "g/y.npy"}}


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (with_("name", ...), "name: required field is missing"),
        (with_("name", "my model"), "name: 'my model' must be 1-64 characters"),
        (with_("name", "x" * 65), "name: 'x{65}' must be"),
        (with_("version", "1.2"), "version: '1.2' is not a semantic version"),
        (with_("version", 1.2), r"version: expected a string, got 1\.2 \(quote it"),
        (with_("version", "v1.0.0"), "version: 'v1.0.0' is not a semantic version"),
        (with_("format", "pytorch"), "format: unknown format 'pytorch'"),
        (with_("model", "sub/model.onnx"), "model: 'sub/model.onnx' must be a plain file name"),
        (with_("model", ".."), "model: '..' must be a plain file name"),
        (with_("model", "model.tflite"), "'model.tflite' is not a onnx file name"),
        (with_("model", "model.bin"), "model: model.bin: unknown model file type"),
        (with_("colour", "red"), "colour: unknown field"),
        (with_("inputs[0].shape", [1, 0, 8, 8]), r"inputs\[0\].shape\[1\]: Input should be"),
        (with_("inputs[0].dtype", "float128"), r"inputs\[0\].dtype: Input should be"),
        (
            with_("inputs", [{"name": "image"}, {"name": "image"}]),
            "inputs: a tensor name is declared twice",
        ),
        (with_("preprocessing.layout", "chw"), "preprocessing.layout: Input should be"),
        (with_("preprocessing.width", 0), "preprocessing.width: Input should be greater"),
        (with_("preprocessing.height", ...), "preprocessing.height: required field is missing"),
        (with_("preprocessing.std", [1, 0, 1]), "preprocessing.std: must not contain 0"),
        (with_("preprocessing.mean", [0.5, 0.5]), "mean has 2 values but color 'rgb' has 3"),
        (with_("preprocessing.input", "pixels"), "preprocessing.input: 'pixels' is not declared"),
        (with_("preprocessing.kind", "audio"), "preprocessing.kind: Input should be 'image'"),
        (with_("postprocessing.kind", "segmentation"), "postprocessing: Input tag 'segmentation'"),
        (with_("postprocessing.top_k", 0), "postprocessing.top_k: Input should be greater"),
        (with_("postprocessing.labels", []), "labels must not be an empty list"),
        (with_("postprocessing.output", "logits"), "postprocessing.output: 'logits' is not"),
        (
            with_("postprocessing", {"kind": "detection", "iou_threshold": 0}),
            "postprocessing.iou_threshold: Input should be greater than 0",
        ),
        (
            with_("postprocessing", {"kind": "detection", "decoder": "retinanet"}),
            "postprocessing.decoder: Input should be 'yolo' or 'ssd'",
        ),
        (
            with_("postprocessing", {"kind": "raw", "top_k": 3}),
            "postprocessing.top_k: unknown field",
        ),
        (
            with_("golden", [{**GOLDEN_OK, "image": "g/cat.png"}]),
            "golden\\[0\\]: give exactly one of 'inputs' and 'image'",
        ),
        (with_("golden", [{"inputs": {"image": "g/x.npy"}}]), "give 'outputs' or 'top_label'"),
        (with_("golden", [{**GOLDEN_OK, "rtol": -1}]), r"golden\[0\].rtol: Input should be"),
        (
            with_("golden", [{**GOLDEN_OK, "outputs": {"probs": "../y.npy"}}]),
            "'../y.npy' must be a relative path inside the bundle",
        ),
        (
            with_("golden", [{**GOLDEN_OK, "inputs": {"image": "/etc/x.npy"}}]),
            "'/etc/x.npy' must be a relative path",
        ),
        (
            with_("golden", [{**GOLDEN_OK, "inputs": {"pixels": "g/x.npy"}}]),
            "golden\\[0\\]: no declared input 'pixels'",
        ),
        (with_("golden", [{**GOLDEN_OK, "name": "a"}] * 2), "golden: vector names must be unique"),
        (with_("latency_budget_ms.rpi5", -3), "latency_budget_ms.rpi5: Input should be greater"),
        (with_("latency_budget_ms", {"bad name": 3}), "must be 1-64 characters"),
        (with_("compatible_profiles", ["rpi5", "rpi5"]), "a profile is listed twice"),
        (with_("min_agent_version", "latest"), "min_agent_version: 'latest' is not a semantic"),
    ],
)
def test_manifest_errors_name_the_field(manifest: dict[str, Any], message: str) -> None:
    with pytest.raises(BundleError, match=message) as err:
        parse_manifest(yaml.safe_dump(manifest))
    assert err.value.code == "bundle_invalid"
    assert "\n" not in err.value.message


def test_golden_vectors_needing_preprocessing_or_labels() -> None:
    no_pre = with_("preprocessing", ...)
    no_pre["golden"] = [{"image": "g/cat.png", "outputs": {"probs": "g/y.npy"}}]
    with pytest.raises(BundleError, match="an 'image' vector needs a preprocessing section"):
        parse_manifest(yaml.safe_dump(no_pre))
    no_labels = with_("postprocessing.labels", ...)
    no_labels["golden"] = [{**GOLDEN_OK, "top_label": "red"}]
    with pytest.raises(BundleError, match="'top_label' needs classification with labels"):
        parse_manifest(yaml.safe_dump(no_labels))


def test_manifest_yaml_problems() -> None:
    with pytest.raises(BundleError, match=r"model\.yaml: not valid YAML \(line 2\)"):
        parse_manifest("name: x\n  version: : [\n")
    with pytest.raises(BundleError, match="must be a YAML mapping"):
        parse_manifest("- just\n- a list\n")
    with pytest.raises(BundleError, match="and 1 more"):
        parse_manifest(yaml.safe_dump({"format": "onnx", "model": "m.onnx", "a": 1, "b": 2}))


def test_minimal_manifest_defaults() -> None:
    m = parse_manifest("name: m\nversion: 0.1.0\nformat: tflite\nmodel: m.tflite\n")
    assert m.inputs is None and m.outputs is None and m.golden == []
    assert m.preprocessing is None and m.postprocessing is None
    assert m.compatible_profiles == [] and m.latency_budget_ms == {}


# --- files a manifest names ----------------------------------------------------------------


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b")
    (root / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx: no such file"):
        open_bundle(root, tmp_path / "work")


def test_labels_file_symlinked_outside_a_directory_bundle_is_refused(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b")
    (tmp_path / "secret.txt").write_text("a\nb\nc\n")
    (root / "labels.txt").unlink()
    (root / "labels.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(BundleError, match="outside the bundle"):
        open_bundle(root, tmp_path / "work")


def test_inline_labels_and_golden_files_are_checked(tmp_path: Path) -> None:
    manifest = {
        **CLASSIFIER,
        "postprocessing": {"kind": "classification", "labels": ["r", "g", "b"]},
        "golden": [{"inputs": {"image": "golden/x.npy"}, "top_label": "r"}],
    }
    root = write_bundle(tmp_path / "b", manifest)
    with pytest.raises(BundleError, match=r"golden/x\.npy: no such file"):
        open_bundle(root, tmp_path / "work")
    (root / "golden").mkdir()
    (root / "golden" / "x.npy").write_bytes(b"")
    assert open_bundle(root, tmp_path / "work").labels == ("r", "g", "b")
    manifest["golden"][0]["top_label"] = "purple"
    (root / "model.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(BundleError, match="'purple' is no label"):
        open_bundle(root, tmp_path / "work")


# --- bare model files ----------------------------------------------------------------------


def test_bare_onnx_file_gets_a_synthesized_manifest(tmp_path: Path) -> None:
    path = modelgen.make_onnx_affine(tmp_path / "my model (v2).onnx")
    bundle = open_bundle(path, tmp_path / "work")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert bundle.synthesized
    assert bundle.digest == digest
    assert bundle.version == "sha256:" + digest[:12]
    assert bundle.name == "my_model__v2_"
    assert bundle.format == "onnx"
    assert bundle.model_path == path
    assert bundle.manifest.golden == []
    assert bundle.manifest.preprocessing is None and bundle.manifest.postprocessing is None
    assert bundle.labels is None


def test_bare_tflite_file_is_a_model_source(tmp_path: Path) -> None:
    path = modelgen.make_tflite_add(tmp_path / "add.tflite")
    bundle = open_bundle(path, tmp_path / "work")
    assert (bundle.name, bundle.format) == ("add", "tflite")
    assert bundle.version.startswith("sha256:") and len(bundle.version) == 7 + 12


def test_unknown_file_kind_and_missing_path(tmp_path: Path) -> None:
    other = tmp_path / "weights.pt"
    other.write_bytes(b"\0")
    with pytest.raises(BundleError, match="neither a bundle"):
        open_bundle(other, tmp_path / "work")
    with pytest.raises(BundleError) as err:
        open_bundle(tmp_path / "absent.onnx", tmp_path / "work")
    assert err.value.code == "bundle_not_found"


# --- profiles, agent version, budgets, declared tensors -------------------------------------


def test_compatibility_and_latency_budget(tmp_path: Path) -> None:
    bundle = open_bundle(write_bundle(tmp_path / "b"), tmp_path / "work")
    bundle.check_compatible("rpi5", agent_version="0.1.0")
    with pytest.raises(BundleError, match="only on profiles") as err:
        bundle.check_compatible("x86-cpu", agent_version="0.1.0")
    assert err.value.code == "incompatible_bundle"
    with pytest.raises(BundleError, match=r"needs agent 0\.1\.0 or newer"):
        bundle.check_compatible("rpi5", agent_version="0.1.0-rc.1")
    assert bundle.latency_budget_ms("rpi5") == 20
    assert bundle.latency_budget_ms("jetson-orin-nano") == 50
    assert bundle.latency_budget_ms(None) == 50


def test_declared_tensors_are_checked_against_the_real_runtime(tmp_path: Path) -> None:
    bundle = open_bundle(write_bundle(tmp_path / "b"), tmp_path / "work")
    runtime = get_backend("onnx").load(bundle.model_path, RuntimeOptions())
    try:
        bundle.manifest.check_tensors(runtime.inputs, runtime.outputs)
        wrong = {**CLASSIFIER, "outputs": [{"name": "probs", "shape": [1, 4]}]}
        with pytest.raises(BundleError, match=r"output 'probs'.*\[1, 4\].*\[1, 3\]"):
            parse_manifest(yaml.safe_dump(wrong)).check_tensors(runtime.inputs, runtime.outputs)
        dyn = {**CLASSIFIER, "inputs": [{"name": "image", "shape": [None, 3, 8, 8]}]}
        parse_manifest(yaml.safe_dump(dyn)).check_tensors(runtime.inputs, runtime.outputs)
        typo = {**CLASSIFIER, "inputs": [{"name": "img", "dtype": "float32"}]}
        typo["preprocessing"] = {**CLASSIFIER["preprocessing"], "input": "img"}
        with pytest.raises(BundleError, match="input 'img', which the model lacks"):
            parse_manifest(yaml.safe_dump(typo)).check_tensors(runtime.inputs, runtime.outputs)
        dtype = {**CLASSIFIER, "inputs": [{"name": "image", "dtype": "uint8"}]}
        with pytest.raises(BundleError, match="says uint8, the model has float32"):
            parse_manifest(yaml.safe_dump(dtype)).check_tensors(runtime.inputs, runtime.outputs)
    finally:
        runtime.close()


def test_semver_precedence() -> None:
    order = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2"]
    order += ["1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "2.0.0"]
    parsed = [SemVer(v) for v in order]
    assert all(a < b for a, b in itertools.pairwise(parsed))
    assert SemVer("1.0.0+build.5") == SemVer("1.0.0")
    assert str(SemVer("1.2.3-rc.1+b7")) == "1.2.3-rc.1+b7"
    for bad in ["1.2", "01.2.3", "1.2.3-", "v1.2.3", "1.2.3-01", ""]:
        assert not is_semver(bad)


def test_bundle_is_a_frozen_value(tmp_path: Path) -> None:
    bundle = open_bundle(write_bundle(tmp_path / "b"), tmp_path / "work")
    assert isinstance(bundle, Bundle)
    with pytest.raises(AttributeError):
        bundle.version = "9.9.9"  # type: ignore[misc]


def test_the_examples_in_the_docs_are_valid_manifests() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "bundles.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    assert len(blocks) == 3
    face, classifier, detector = (parse_manifest(b) for b in blocks)
    assert face.postprocessing is not None and face.postprocessing.kind == "detection"
    assert face.postprocessing.decoder == "ssd"
    assert (
        classifier.postprocessing is not None and classifier.postprocessing.kind == "classification"
    )
    assert detector.postprocessing is not None and detector.postprocessing.kind == "detection"
