"""The agent's loader on NVIDIA's execution providers, with a GPU profile's chain.

Every load goes through :func:`agent.loader.load_model` with the :class:`RuntimeOptions` of
the ``jetson-orin`` profile (``tensorrt`` fp16 -> ``cuda`` -> ``cpu``) and a ``cache_dir``,
as the agent loads on a GPU device. Skipped, with the reason, where onnxruntime lists no
CUDA EP (conftest.py); the TensorRT checks skip where only CUDA works.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ProviderError
from agent.loader import LoadedModel, load_model
from agent.profiles import load_profile, runtime_options
from agent.runtimes import ProviderSpec, RuntimeOptions
from agent.runtimes.onnx import EP_NAMES, OnnxRuntime, build_session_options, provider_options
from tests.gpu.conftest import CPU_EP, CUDA_EP, TENSORRT_EP, Gpu
from tests.gpu.gpu_models import DET_X, DET_Y, GPU_PROFILE, Array, det_model, real_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CPU_ONLY = RuntimeOptions(providers=(ProviderSpec("cpu"),))


def gpu_options(
    cache_dir: Path, *, without: tuple[str, ...] = (), strict: bool = False
) -> RuntimeOptions:
    """The GPU profile's ONNX options, minus the links named in ``without``."""
    options = runtime_options(load_profile(GPU_PROFILE), "onnx", cache_dir)
    chain = tuple(link for link in options.providers if link.name not in without)
    return dataclasses.replace(options, providers=chain, strict_placement=strict)


def load(path: Path, options: RuntimeOptions, work: Path) -> LoadedModel:
    return load_model(path, work_dir=work, options=options)


def outputs(loaded: LoadedModel, tensors: list[tuple[str | None, Array]]) -> dict[str, Array]:
    return dict(loaded.model.infer(tensors).outputs)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One engine cache for the module, so a model's TensorRT engine is built once."""
    return tmp_path_factory.mktemp("gpu-cache")


# --- the provider a GPU profile's chain serves with ----------------------------------------


@pytest.mark.parametrize("without", [(), ("tensorrt",)], ids=["tensorrt-cuda-cpu", "cuda-cpu"])
def test_the_gpu_profile_chain_serves_on_the_gpu(
    gpu: Gpu, models_dir: Path, shared_cache: Path, tmp_path: Path, without: tuple[str, ...]
) -> None:
    loaded = load(
        models_dir / "ppocr_cls.onnx", gpu_options(shared_cache, without=without), tmp_path
    )
    try:
        expected = CUDA_EP if without else gpu.best
        assert loaded.model.provider == expected
        attempts = [(a.provider, a.ok) for a in loaded.model.runtime.attempts]
        if expected == CUDA_EP and not without:  # TensorRT listed but unusable: recorded
            assert attempts == [(TENSORRT_EP, False), (CUDA_EP, True)]
        else:
            assert attempts == [(expected, True)]
        if expected == TENSORRT_EP:  # the profile's fp16 and the agent's cache reached the EP
            runtime = loaded.model.runtime
            assert isinstance(runtime, OnnxRuntime)
            native = runtime._session.get_provider_options()[TENSORRT_EP]
            assert native["trt_fp16_enable"] == "1"
            assert native["trt_engine_cache_enable"] == "1"
            assert Path(native["trt_engine_cache_path"]) == shared_cache / "tensorrt"
    finally:
        loaded.model.close()


# --- the TensorRT engine cache ------------------------------------------------------------


def cache_files(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: relative path -> (sha256, mtime_ns)."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_tensorrt_engine_cache_is_reused_on_a_second_start(
    gpu: Gpu, models_dir: Path, tmp_path: Path
) -> None:
    gpu.require_tensorrt()
    cache = tmp_path / "cache"
    x = real_inputs("ppocr_cls")
    timings, results = [], []
    for start in ("first", "second"):
        t0 = time.perf_counter()
        loaded = load(models_dir / "ppocr_cls.onnx", gpu_options(cache), tmp_path / start)
        timings.append(time.perf_counter() - t0)
        assert loaded.model.provider == TENSORRT_EP
        results.append(outputs(loaded, x))
        loaded.model.close()
        if start == "first":
            built = cache_files(cache / "tensorrt")
            assert any(name.endswith(".engine") for name in built), sorted(built)
    first, second = timings
    print(f"\nTensorRT ppocr_cls: first load {first:.2f} s (engine built), second {second:.2f} s")
    assert cache_files(cache / "tensorrt") == built, "the second start rebuilt or rewrote the cache"
    assert second < first / 2, f"the cached engine did not speed up the start ({timings})"
    for name, y in results[0].items():  # the same engine: the same answers
        np.testing.assert_array_equal(results[1][name], y, err_msg=name)


# --- strict placement: a model the GPU cannot run whole ------------------------------------


def test_strict_placement_refuses_a_model_the_gpu_runs_only_in_part(
    gpu: Gpu, shared_cache: Path, tmp_path: Path
) -> None:
    model = det_model(tmp_path / "det.onnx")

    # The GPU links alone, strict: no link may put Det on the CPU, so none serves.
    with pytest.raises(ProviderError) as refused:
        load(model, gpu_options(shared_cache, without=("cpu",), strict=True), tmp_path / "a")
    message = refused.value.message
    assert refused.value.code == "provider_unavailable"
    assert "no provider could serve the model" in message
    for ep in gpu.usable:
        assert ep in message
    assert "fallback to CPU EP has been explicitly disabled" in message, message

    # The whole chain, strict: served by the CPU, and the refusals are recorded.
    loaded = load(model, gpu_options(shared_cache, strict=True), tmp_path / "b")
    try:
        assert loaded.model.provider == CPU_EP
        attempts = loaded.model.runtime.attempts
        assert [(a.provider, a.ok) for a in attempts] == [
            (TENSORRT_EP, False),
            (CUDA_EP, False),
            (CPU_EP, True),
        ]
        for attempt in attempts[:2]:
            if attempt.provider in gpu.usable:
                assert "explicitly disabled" in attempt.reason, attempt
        np.testing.assert_allclose(outputs(loaded, [("x", DET_X)])["y"], DET_Y, rtol=1e-5)
    finally:
        loaded.model.close()


def test_without_strict_placement_the_cpu_fallback_is_silent(
    gpu: Gpu, shared_cache: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort

    model = det_model(tmp_path / "det.onnx")
    options = gpu_options(shared_cache)
    loaded = load(model, options, tmp_path / "work")
    try:  # the agent sees the GPU EP serving, and nothing failed...
        assert loaded.model.provider == gpu.best
        assert [(a.provider, a.ok) for a in loaded.model.runtime.attempts][-1] == (gpu.best, True)
        np.testing.assert_allclose(outputs(loaded, [("x", DET_X)])["y"], DET_Y, rtol=1e-3)
    finally:
        loaded.model.close()

    # ...yet onnxruntime's profiler shows Det ran on the CPU EP.
    link = next(spec for spec in options.providers if EP_NAMES[spec.name] == gpu.best)
    so = build_session_options(options)
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(
        str(model), so, providers=[(gpu.best, provider_options(link, options)), CPU_EP]
    )
    session.run(None, {"x": DET_X})
    events = json.loads(Path(session.end_profiling()).read_text())
    placed = {
        e["args"]["op_name"]: e["args"]["provider"]
        for e in events
        if e.get("cat") == "Node" and "op_name" in e.get("args", {})
    }
    assert placed.get("Det") == CPU_EP, placed
    assert gpu.best in placed.values(), placed


# --- real models: the GPU answers as the CPU does -----------------------------------------


@pytest.mark.parametrize("name", ["ppocr_cls", "silero_vad"])
def test_real_models_match_the_cpu(
    gpu: Gpu, models_dir: Path, shared_cache: Path, tmp_path: Path, name: str
) -> None:
    path, x = models_dir / f"{name}.onnx", real_inputs(name)
    cpu = load(path, CPU_ONLY, tmp_path / "cpu")
    on_gpu = load(path, gpu_options(shared_cache), tmp_path / "gpu")
    try:
        assert on_gpu.model.provider == gpu.best
        want, got = outputs(cpu, x), outputs(on_gpu, x)
    finally:
        cpu.model.close()
        on_gpu.model.close()
    # TensorRT runs the profile's fp16: about 3 significant digits. CUDA runs fp32, but
    # convolutions may use TF32 (10-bit mantissa) on Ampere and later.
    loose = gpu.best == TENSORRT_EP
    assert sorted(got) == sorted(want)
    for key, y in want.items():
        scale = float(np.abs(y).max()) or 1.0
        diff = float(np.abs(got[key] - y).max())
        print(f"{name}.{key} on {gpu.best}: max |gpu - cpu| = {diff:.3g} (max |y| = {scale:.3g})")
        assert got[key].shape == y.shape, key
        np.testing.assert_allclose(
            got[key], y, rtol=0, atol=(3e-2 if loose else 5e-3) * scale, err_msg=key
        )
