"""Golden vectors: a bundle's own known inputs and outputs, checked before it serves.

:func:`check_golden` feeds every vector of a bundle through a ``run`` callable that the
model layer supplies (model-ready float inputs in, float outputs out, keyed by tensor
name) and compares each expected output within the vector's ``rtol``/``atol``, the
``numpy.isclose`` rule: ``|actual - expected| <= atol + rtol * |expected|``; NaN never
matches. A vector may also name the label its classification must rank first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.bundle import Bundle, GoldenVector
from agent.errors import BadInput, BundleError, InferenceError
from agent.processing import (
    Array,
    ImageMeta,
    Postprocessor,
    build_postprocessor,
    build_preprocessor,
)

RunFn = Callable[[dict[str, Array]], dict[str, Array]]


@dataclass(frozen=True)
class VectorResult:
    """The outcome of one golden vector."""

    name: str
    #: One line per problem; empty when the vector passed.
    failures: tuple[str, ...] = ()
    #: output name -> largest absolute difference from the expected values.
    max_abs_error: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class GoldenReport:
    """Every vector's outcome for one bundle."""

    bundle: str
    results: tuple[VectorResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> list[str]:
        """``"vector 'name': problem"`` for every problem of every vector."""
        return [f"vector {r.name!r}: {f}" for r in self.results for f in r.failures]

    def raise_for_failure(self) -> None:
        """Raise when any vector failed; do nothing when all passed.

        Raises:
            BundleError: ``golden_mismatch``, naming the first failure and the count.
        """
        failures = self.failures
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise BundleError(f"{self.bundle}: golden {failures[0]}{more}", code="golden_mismatch")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (for update events and the CLI)."""
        return {
            "bundle": self.bundle,
            "ok": self.ok,
            "vectors": [
                {"name": r.name, "ok": r.ok, "failures": list(r.failures)} for r in self.results
            ],
        }


def check_golden(bundle: Bundle, run: RunFn, *, image_input: str | None = None) -> GoldenReport:
    """Run every golden vector of ``bundle`` through ``run`` and compare the outputs.

    ``image_input`` names the model input an ``image`` vector feeds when the manifest
    says neither ``preprocessing.input`` nor a single declared input (the model layer
    passes the model's only input name).

    Raises:
        BundleError: a vector's files do not load, its image does not decode, or the
            input an image feeds cannot be told.
        EdgeError: whatever ``run`` raises (``InferenceError``...) is not caught.
    """
    manifest = bundle.manifest
    post: Postprocessor | None = None
    if any(v.top_label is not None for v in manifest.golden):
        post = build_postprocessor(manifest.postprocessing, bundle.labels)
    results = []
    for i, vector in enumerate(manifest.golden):
        name = manifest.golden_name(i)
        feeds, meta = _feeds(bundle, vector, name, image_input)
        outputs = run(feeds)
        failures: list[str] = []
        errors: dict[str, float] = {}
        for out_name, rel in vector.outputs.items():
            expected = bundle.load_array(rel)
            problem, err = _compare(out_name, outputs.get(out_name), expected, vector)
            if err is not None:
                errors[out_name] = err
            if problem:
                failures.append(problem)
        if post is not None and vector.top_label is not None:
            failures.extend(_check_label(post, outputs, meta, vector.top_label))
        results.append(VectorResult(name, tuple(failures), errors))
    return GoldenReport(f"{bundle.name} {bundle.version}", tuple(results))


def _feeds(
    bundle: Bundle, vector: GoldenVector, name: str, image_input: str | None
) -> tuple[dict[str, Array], ImageMeta | None]:
    if vector.inputs is not None:
        return {k: bundle.load_array(rel) for k, rel in vector.inputs.items()}, None
    cfg = bundle.manifest.preprocessing
    if cfg is None or vector.image is None:  # ruled out by the manifest schema
        raise BundleError(f"golden vector {name!r}: no input")
    declared = bundle.manifest.inputs
    key = cfg.input or (declared[0].name if declared and len(declared) == 1 else image_input)
    if key is None:
        raise BundleError(
            f"golden vector {name!r}: set preprocessing.input to name the input the image feeds"
        )
    data = bundle.path_of(vector.image).read_bytes()
    try:
        tensor, meta = build_preprocessor(cfg)(data)
    except BadInput as exc:
        raise BundleError(f"golden vector {name!r}: {vector.image}: {exc.message}") from None
    return {key: tensor}, meta


def _compare(
    name: str, actual: Array | None, expected: Array, vector: GoldenVector
) -> tuple[str, float | None]:
    if actual is None:
        return f"output {name!r} is missing", None
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return (
            f"output {name!r} has shape {list(actual.shape)}, expected {list(expected.shape)}",
            None,
        )
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    diff = np.abs(a - e)
    within = diff <= vector.atol + vector.rtol * np.abs(e)  # False where NaN
    err = float(diff.max()) if diff.size else 0.0
    if bool(within.all()):
        return "", err
    bad = int(within.size - np.count_nonzero(within))
    return (
        f"output {name!r}: {bad} of {within.size} values off, max abs error {err:.4g} "
        f"(rtol={vector.rtol:g}, atol={vector.atol:g})",
        err,
    )


def _check_label(
    post: Postprocessor, outputs: dict[str, Array], meta: ImageMeta | None, want: str
) -> list[str]:
    try:
        result = post(outputs, meta) or {}
    except InferenceError as exc:
        return [f"classification failed: {exc.message}"]
    classes = result.get("classes") or []
    got = classes[0]["label"] if classes else None
    return [] if got == want else [f"top label is {got!r}, expected {want!r}"]
