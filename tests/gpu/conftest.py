"""The NVIDIA GPU tests run only where onnxruntime offers NVIDIA's execution providers.

At collection, every test under ``tests/gpu`` is marked skipped, with the reason, when
``onnxruntime.get_available_providers()`` lacks ``CUDAExecutionProvider`` (the reason names
each missing provider: the CPU ``onnxruntime`` wheel has neither). Where the providers are
listed, the ``gpu`` fixture probes which of them can actually build a session (an
``onnxruntime-gpu`` wheel lists them even without the CUDA, cuDNN or TensorRT libraries):
TensorRT-specific checks skip, saying why, where only CUDA works. See docs/gpu.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.errors import ProviderError
from agent.runtimes import ProviderAttempt, ProviderSpec, RuntimeOptions, get_backend
from agent.runtimes.onnx import PROBE_MODEL

TENSORRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
GPU_EPS = (TENSORRT_EP, CUDA_EP)
_HERE = Path(__file__).resolve().parent
_HOW = "install onnxruntime-gpu on a machine with an NVIDIA GPU; see docs/gpu.md"


def missing_gpu_providers() -> str | None:
    """Why the GPU tests cannot run here (None when onnxruntime lists the CUDA EP)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return f"onnxruntime is not installed ({_HOW})"
    available = list(ort.get_available_providers())
    if CUDA_EP in available:
        return None
    missing = " and ".join(ep for ep in GPU_EPS if ep not in available)
    return (
        f"no NVIDIA GPU execution provider: onnxruntime {ort.__version__} offers "
        f"{', '.join(available)}; {missing} missing ({_HOW})"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = missing_gpu_providers()
    if reason is None:
        return
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.skip(reason=reason))


@dataclass(frozen=True)
class Gpu:
    """Which NVIDIA execution providers can serve a model here, and why the others cannot."""

    #: ``{ep: reason}`` for a GPU EP that onnxruntime lists but that cannot build a session.
    unusable: dict[str, str]

    @property
    def tensorrt(self) -> bool:
        return TENSORRT_EP not in self.unusable

    @property
    def usable(self) -> tuple[str, ...]:
        """The GPU EPs that work, in the order of a GPU profile's chain (TensorRT first)."""
        return tuple(ep for ep in GPU_EPS if ep not in self.unusable)

    @property
    def best(self) -> str:
        """The EP a ``tensorrt -> cuda -> cpu`` chain serves with."""
        return self.usable[0]

    def require_tensorrt(self) -> None:
        """Skip the calling test, saying why, where TensorRT cannot build a session."""
        if not self.tensorrt:
            pytest.skip(f"{TENSORRT_EP} is not usable here: {self.unusable[TENSORRT_EP]}")


def _probe(ep: str, cache_dir: Path) -> ProviderAttempt:
    """Load the agent's probe model (``y = x + 1``) on ``ep`` alone; the attempt."""
    link = {TENSORRT_EP: "tensorrt", CUDA_EP: "cuda"}[ep]
    options = RuntimeOptions(providers=(ProviderSpec(link),), cache_dir=cache_dir)
    try:
        runtime = get_backend("onnx").load(PROBE_MODEL, options)
    except ProviderError as exc:  # the chain of one link failed
        return ProviderAttempt(ep, False, exc.message)
    runtime.close()
    return runtime.attempts[-1]


@pytest.fixture(scope="session")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gpu]:
    """The usable NVIDIA EPs (skips every test that needs one where even CUDA cannot start).

    Probing also initialises CUDA once, so later timings do not include it.
    """
    import onnxruntime as ort

    cache = tmp_path_factory.mktemp("gpu-probe")
    listed = set(ort.get_available_providers())
    unusable: dict[str, str] = {}
    for ep in GPU_EPS:
        if ep not in listed:
            unusable[ep] = "not in onnxruntime.get_available_providers()"
            continue
        attempt = _probe(ep, cache)
        if not attempt.ok:
            unusable[ep] = attempt.reason or "no session"
    if CUDA_EP in unusable:
        pytest.skip(
            f"{CUDA_EP} is listed but cannot build a session ({unusable[CUDA_EP]}): no GPU, or "
            "the driver or the CUDA/cuDNN libraries this onnxruntime-gpu needs are missing; "
            "see docs/gpu.md"
        )
    yield Gpu(unusable)
