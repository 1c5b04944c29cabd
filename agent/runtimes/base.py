"""The ``Runtime`` seam: one small protocol that every model-format backend implements.

A backend (``onnx``, ``litert``) turns a model file plus :class:`RuntimeOptions` into a
:class:`Runtime`. A runtime reports its tensors, runs raw model-native arrays, and
says which provider or delegate actually serves it.

Conversions that are the same for every backend (float <-> quantized integers, input
checks, pre/postprocessing) live above this seam, in :mod:`agent.model`, so that the
run path of a backend stays as close to the raw ``session.run`` / ``invoke`` as possible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``.

    ``scale`` and ``zero_point`` hold one value for per-tensor quantization, or one
    value per channel along ``axis`` for per-channel quantization.
    """

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    @property
    def per_tensor(self) -> bool:
        return len(self.scale) == 1


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model, as the runtime reports it.

    ``shape`` holds ``None`` for a dynamic dimension (a symbolic or -1 dim).
    ``dtype`` is the numpy dtype name the model takes or returns (``"float32"``,
    ``"int8"``...). ``quantization`` is set when the tensor is a quantized integer
    tensor whose scale and zero point are known from the model file.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    quantization: Quantization | None = None

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.quantization is not None:
            d["quantization"] = {
                "scale": list(self.quantization.scale),
                "zero_point": list(self.quantization.zero_point),
                "axis": self.quantization.axis,
            }
        return d


@dataclass(frozen=True)
class ProviderSpec:
    """One link of a profile's provider/delegate chain, with its options.

    ``name`` is a short, backend-neutral name: ``tensorrt``, ``cuda``, ``openvino``,
    ``xnnpack``, ``cpu`` (onnxruntime execution providers), ``edgetpu``, ``gpu``,
    ``xnnpack``, ``cpu`` (LiteRT delegates). A backend ignores links it does not know,
    recording them as skipped.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeOptions:
    """How to load a model. Built from the device profile and the agent config."""

    providers: tuple[ProviderSpec, ...] = (ProviderSpec("cpu"),)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = 1
    #: Where backends may keep caches (TensorRT engines and timing caches...).
    cache_dir: Path | None = None
    #: Fail instead of placing nodes on the CPU behind the chosen accelerator's back
    #: (onnxruntime ``session.disable_cpu_ep_fallback``).
    strict_placement: bool = False
    #: Runs made by ``warm_up`` before a model is called ready.
    warmup_runs: int = 2


@dataclass(frozen=True)
class ProviderAttempt:
    """The outcome of trying one link of the chain at load time."""

    provider: str
    ok: bool
    reason: str = ""


@runtime_checkable
class Runtime(Protocol):
    """A loaded model, ready to run. Not thread-safe unless the backend says so."""

    #: The model format this runtime serves (``onnx``, ``tflite``).
    format: ClassVar[str]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def provider(self) -> str:
        """The provider/delegate that actually serves the model (``CPUExecutionProvider``...)."""
        ...

    @property
    def attempts(self) -> tuple[ProviderAttempt, ...]:
        """Every link of the chain that was tried, in order, and why the failed ones failed."""
        ...

    def run(self, feeds: dict[str, Array]) -> list[Array]:
        """Run one inference on model-native arrays; returns outputs in ``outputs`` order.

        ``feeds`` must already have the right names, shapes and dtypes.

        Raises:
            InferenceError: the runtime failed.
        """
        ...

    def close(self) -> None:
        """Release the model's memory. The runtime must not be used afterwards."""
        ...


class Backend(Protocol):
    """Loads model files of one format. One instance of each lives in the registry."""

    #: The format key (``onnx``, ``tflite``), also the bundle manifest's ``format``.
    format: ClassVar[str]
    #: File suffixes this backend loads (``.onnx``).
    suffixes: ClassVar[tuple[str, ...]]

    def available(self) -> bool:
        """True when the backend's library can be imported on this machine."""
        ...

    def available_providers(self) -> list[str]:
        """The providers/delegates this machine can offer, in the backend's own names."""
        ...

    def load(self, path: Path, options: RuntimeOptions) -> Runtime:
        """Load ``path`` with the first usable link of ``options.providers``.

        Raises:
            ModelLoadError: the file is corrupt, truncated or uses an unsupported op.
            ProviderError: no link of the chain could serve the model.
        """
        ...
