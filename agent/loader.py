"""Load a model source (bundle or bare file) into a :class:`~agent.model.ServedModel`.

The steps, each with its own error:
1. open the source (:func:`agent.bundle.open_bundle`: safe extraction, manifest);
2. load the model file with the profile's provider chain (:mod:`agent.runtimes`);
3. check the tensors the bundle declares against what the runtime reports;
4. build the bundle's pre/postprocessing;
5. run the golden vectors within their tolerances;
6. warm up, so the first request is not the slow one.

Nothing here loads code from a bundle: a bundle holds a model file, YAML, labels and
arrays, and the runtimes never register custom-op libraries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.bundle import Bundle, open_bundle
from agent.errors import EdgeError, InferenceError, ModelLoadError
from agent.golden import GoldenReport, check_golden
from agent.model import ServedModel
from agent.processing import build_postprocessor, build_preprocessor
from agent.runtimes import RuntimeOptions, get_backend
from agent.runtimes.base import Array

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A served model together with the bundle it came from and its golden report."""

    model: ServedModel
    bundle: Bundle
    golden: GoldenReport | None


def load_model(
    source: Path,
    *,
    work_dir: Path,
    options: RuntimeOptions | None = None,
    name: str | None = None,
    profile: str | None = None,
    check_golden_vectors: bool = True,
    warmup: bool = True,
) -> LoadedModel:
    """Open ``source`` and load it, ready to serve.

    ``name`` overrides the bundle's name (the agent config names its models).
    ``profile`` is the device profile: a bundle that lists ``compatible_profiles`` or a
    ``min_agent_version`` is refused on a device it does not fit.

    Raises:
        BundleError: the bundle is malformed or unsafe, does not fit this device
            (``incompatible_bundle``), its declared tensors differ
            from the model's, or a golden vector fails (``golden_mismatch``).
        ModelLoadError: the model file is corrupt or uses an unsupported op.
        ProviderError: no link of the provider chain can serve the model.
        InferenceError: the model fails on a plain warm-up input.
    """
    t0 = time.perf_counter()
    bundle = open_bundle(source, work_dir)
    if profile is not None:
        bundle.check_compatible(profile)
    opts = options or RuntimeOptions()
    runtime = get_backend(bundle.format).load(bundle.model_path, opts)
    try:
        bundle.manifest.check_tensors(runtime.inputs, runtime.outputs)
        manifest = bundle.manifest
        pre = build_preprocessor(manifest.preprocessing) if manifest.preprocessing else None
        post = (
            build_postprocessor(manifest.postprocessing, bundle.labels)
            if manifest.postprocessing is not None and manifest.postprocessing.kind != "raw"
            else None
        )
        image_input = None
        if manifest.preprocessing is not None:
            image_input = manifest.preprocessing.input or runtime.inputs[0].name
        model = ServedModel(
            name=name or bundle.name,
            version=bundle.version,
            runtime=runtime,
            digest=bundle.digest,
            source=str(source),
            preprocess=pre,
            postprocess=post,
            image_input=image_input,
        )
        report = None
        if check_golden_vectors and manifest.golden:
            report = check_golden(bundle, _golden_runner(model), image_input=image_input)
            report.raise_for_failure()
        if warmup:
            _warm_up(model, opts.warmup_runs)
    except EdgeError:
        runtime.close()
        raise
    except Exception as exc:  # a runtime or OpenCV failure we did not foresee
        runtime.close()
        raise ModelLoadError(f"{source.name}: {type(exc).__name__}: {exc}") from exc
    model.load_ms = (time.perf_counter() - t0) * 1000.0
    return LoadedModel(model, bundle, report)


def _warm_up(model: ServedModel, runs: int) -> None:
    """Warm up on zeros. A model with dynamic dims may reject all-ones shapes and zeros
    (silero VAD needs 512 samples and a real sample rate): that is logged, not fatal,
    since real requests will have real shapes. A fixed-shape model that fails on zeros
    is broken, and the error stands.
    """
    try:
        model.warm_up(runs)
    except InferenceError as exc:
        if all(None not in s.shape for s in model.inputs):
            raise
        log.warning(
            "model %s: warm-up on placeholder inputs failed (%s); skipped", model.name, exc.message
        )


def _golden_runner(model: ServedModel) -> Callable[[dict[str, Array]], dict[str, Array]]:
    """Golden vectors hold model-ready inputs: feed them through the model's own checks."""

    def run(feeds: dict[str, Array]) -> dict[str, Array]:
        return dict(model.infer(list(feeds.items())).outputs)

    return run
