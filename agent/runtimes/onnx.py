"""The onnxruntime backend: ``.onnx`` / ``.ort`` files on an execution-provider chain.

Each link of the chain gets its own session: ``[that EP, CPU EP]``, so that nodes the
accelerator cannot take still run (on the CPU). With ``strict_placement`` the session is
``[that EP]`` alone and ``session.disable_cpu_ep_fallback`` is set, so a partial
placement fails loudly instead. The first link whose session builds serves the model,
and :attr:`OnnxRuntime.provider` says which EP actually serves it.

Link options. A few short, backend-neutral keys are translated (below); every other key
is forwarded verbatim as a native option of that EP, so an operator may use any option
their onnxruntime build documents. onnxruntime rejects unknown keys of the TensorRT,
CUDA and OpenVINO EPs when the session is built, which is recorded as that link's
failure. The CPU EP takes no options: any key on a ``cpu`` link is a :class:`ConfigError`.

=========== ===================================================================
link        translated keys (default)
=========== ===================================================================
tensorrt    ``fp16`` -> ``trt_fp16_enable``, ``int8`` -> ``trt_int8_enable``,
            ``workspace_bytes`` -> ``trt_max_workspace_size``, ``dla_core`` ->
            ``trt_dla_enable`` + ``trt_dla_core``; with a ``cache_dir``, engine and
            timing caches are enabled in ``cache_dir/tensorrt``
xnnpack     ``intra_op_num_threads`` (``RuntimeOptions.intra_op_threads``)
=========== ===================================================================

Memory. Every session allocates CPU memory from one process-wide arena registered
with the onnxruntime environment (``session.use_env_allocators``), configured with
``arena_extend_strategy = kSameAsRequested``: models share the memory they free (a
hot-swapped version reuses its predecessor's), and the arena grows by what is asked
instead of doubling, so resident memory stays close to what the models need. After the
warm-up runs of a fixed-shape model the arena no longer grows. Memory patterns stay on
(onnxruntime's default with sequential execution): they are cached per set of input
shapes, which micro-batching keeps to a handful.

Threads. ``intra_op_num_threads`` and ``inter_op_num_threads`` come from the options,
execution is sequential, and thread pools do not spin-wait between runs (an edge
device's CPU is shared with everything else on it).

A :class:`OnnxRuntime` may be called from one thread at a time (onnxruntime sessions
are thread-safe, but the agent gives each model one worker; nothing here relies on it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

from agent.errors import ConfigError, InferenceError, ModelLoadError, ProviderError
from agent.runtimes.base import Array, ProviderAttempt, ProviderSpec, RuntimeOptions, TensorSpec

try:  # onnxruntime is an optional dependency of the agent.
    import onnxruntime as ort
except ImportError:  # pragma: no cover - exercised only where onnxruntime is absent
    ort = None

#: Short link names -> onnxruntime execution providers.
EP_NAMES: Final[dict[str, str]] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
CPU_EP: Final = "CPUExecutionProvider"

#: The tiny probe model ``edge-agent doctor`` loads on each link (``y = x + 1``, ``[1, 4]``).
PROBE_MODEL: Final[Path] = Path(__file__).resolve().parent.parent / "data" / "probe.onnx"

#: onnxruntime tensor types -> numpy dtype names. Other types (strings, sequences,
#: maps, bfloat16...) cannot cross the device protocol and are refused at load.
_DTYPES: Final[dict[str, str]] = {
    f"tensor({ort_name})": np_name
    for ort_name, np_name in [
        ("float", "float32"),
        ("float16", "float16"),
        ("double", "float64"),
        ("bool", "bool"),
        ("int8", "int8"),
        ("uint8", "uint8"),
        ("int16", "int16"),
        ("uint16", "uint16"),
        ("int32", "int32"),
        ("uint32", "uint32"),
        ("int64", "int64"),
        ("uint64", "uint64"),
    ]
}
_MAX_REASON: Final = 300


def _one_line(exc: BaseException) -> str:
    """The first meaningful line of an onnxruntime error, without its status prefix."""
    text = str(exc).strip()
    if text.startswith("[ONNXRuntimeError]"):
        # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from x failed:Protobuf ..."
        text = text.split(" : ", 3)[-1]
    if " failed:" in text and text.startswith("Load model from"):
        text = text.split(" failed:", 1)[1]
    if "Status Message:" in text:
        # "Non-zero status code returned while running Reshape node. Name:'' Status Message:
        # /src/reshape_helper.h:91 onnxruntime::...(...) cond was false. The input tensor..."
        head, _, message = text.partition("Status Message:")
        head = head.split(" Name:", 1)[0].rstrip(". ")
        message = message.split(" was false. ", 1)[-1].strip()
        text = f"{head}: {message}"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


@functools.cache
def _register_shared_arena() -> None:
    """Register the process-wide CPU arena (once) that every session allocates from."""
    mem_info = ort.OrtMemoryInfo(
        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    # max_mem 0 (no cap), arena_extend_strategy 1 = kSameAsRequested,
    # initial_chunk_size_bytes and max_dead_bytes_per_chunk -1 = onnxruntime's defaults.
    ort.create_and_register_allocator(mem_info, ort.OrtArenaCfg(0, 1, -1, -1))


def build_session_options(options: RuntimeOptions, *, strict: bool = False) -> Any:
    """The ``onnxruntime.SessionOptions`` every session of this backend is built with.

    Public so that benchmarks can build a raw ``InferenceSession`` configured the same
    way. ``strict`` sets ``session.disable_cpu_ep_fallback``: pass it only for a session
    without the CPU EP, since onnxruntime refuses the two together. Raises nothing.
    """
    _register_shared_arena()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = options.intra_op_threads or 0  # 0: onnxruntime picks
    so.inter_op_num_threads = options.inter_op_threads or 0
    # Fatal only: every failure reaches the caller as an error with a code (an attempt, a
    # ModelLoadError, an InferenceError); onnxruntime's own copy would only duplicate it.
    so.log_severity_level = 4
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.add_session_config_entry("session.use_env_allocators", "1")
    if strict:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return so


def _option_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def provider_options(link: ProviderSpec, options: RuntimeOptions) -> dict[str, str]:
    """The native EP options of ``link`` (translated short keys plus verbatim native ones).

    Raises:
        ConfigError: a ``cpu`` link carries options (the CPU EP takes none).
    """
    raw = dict(link.options)
    if link.name == "cpu":
        if raw:
            raise ConfigError(f"provider 'cpu' takes no options (got {', '.join(sorted(raw))})")
        return {}
    out: dict[str, Any] = {}
    if link.name == "tensorrt":
        aliases = {
            "fp16": "trt_fp16_enable",
            "int8": "trt_int8_enable",
            "workspace_bytes": "trt_max_workspace_size",
        }
        for short, native in aliases.items():
            if short in raw:
                out[native] = raw.pop(short)
        if "dla_core" in raw:
            out["trt_dla_enable"] = True
            out["trt_dla_core"] = raw.pop("dla_core")
        if options.cache_dir is not None:
            cache = options.cache_dir / "tensorrt"
            cache.mkdir(parents=True, exist_ok=True)
            out.update(
                trt_engine_cache_enable=True,
                trt_engine_cache_path=str(cache),
                trt_timing_cache_enable=True,
                trt_timing_cache_path=str(cache),
            )
    elif link.name == "xnnpack" and options.intra_op_threads:
        out["intra_op_num_threads"] = options.intra_op_threads
    out.update(raw)
    return {key: _option_value(value) for key, value in out.items()}


def _tensor_spec(arg: Any) -> TensorSpec:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise ModelLoadError(f"tensor {arg.name!r} has type {arg.type}, which cannot be served")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorSpec(name=arg.name, shape=shape, dtype=dtype)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"{path.name}: no such model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path.name}: the model file is empty")


class OnnxRuntime:
    """A model loaded in one onnxruntime ``InferenceSession``."""

    format: ClassVar[str] = "onnx"

    def __init__(self, session: Any, attempts: Sequence[ProviderAttempt]) -> None:
        self._session = session
        self._inputs = tuple(_tensor_spec(a) for a in session.get_inputs())
        self._outputs = tuple(_tensor_spec(a) for a in session.get_outputs())
        self._provider: str = session.get_providers()[0]
        self._attempts = tuple(attempts)
        self._output_names = [o.name for o in self._outputs]
        self._run: Callable[[list[str], dict[str, Array]], list[Array]] = session.run

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def attempts(self) -> tuple[ProviderAttempt, ...]:
        return self._attempts

    def run(self, feeds: dict[str, Array]) -> list[Array]:
        """Run once: ``session.run`` with the precomputed output names.

        Raises:
            InferenceError: onnxruntime failed (or the runtime was closed).
        """
        try:
            return self._run(self._output_names, feeds)
        except Exception as exc:
            raise InferenceError(_one_line(exc)) from exc

    def close(self) -> None:
        """Drop the session; a later :meth:`run` raises :class:`InferenceError`."""
        self._session = None
        self._run = _closed


def _closed(names: list[str], feeds: dict[str, Array]) -> list[Array]:
    raise InferenceError("the runtime was closed")


class OnnxBackend:
    """Loads ONNX models with onnxruntime."""

    format: ClassVar[str] = "onnx"
    suffixes: ClassVar[tuple[str, ...]] = (".onnx", ".ort")

    def available(self) -> bool:
        """True when onnxruntime can be imported."""
        return ort is not None

    def available_providers(self) -> list[str]:
        """The execution providers this onnxruntime build offers (``CPUExecutionProvider``...)."""
        return list(ort.get_available_providers()) if ort is not None else []

    def load(self, path: Path, options: RuntimeOptions) -> OnnxRuntime:
        """Build a session on the first link of ``options.providers`` that works.

        Raises:
            ModelLoadError: the file is missing, empty, corrupt, not ONNX, uses an operator
                no runtime implements, or has inputs/outputs of a type that cannot be served.
            ProviderError: no link of the chain could serve the model.
            ConfigError: a link's options are invalid (options on a ``cpu`` link).
        """
        if ort is None:
            raise ModelLoadError("onnxruntime is not installed", code="runtime_missing")
        _check_file(path)
        available = set(ort.get_available_providers())
        attempts: list[ProviderAttempt] = []
        cpu_failure: str | None = None
        for link in options.providers:
            ep = EP_NAMES.get(link.name)
            if ep is None:
                attempts.append(ProviderAttempt(link.name, False, "not an onnxruntime provider"))
                continue
            if ep not in available:
                attempts.append(ProviderAttempt(ep, False, "not available on this device"))
                continue
            ep_options = provider_options(link, options)  # ConfigError: not a link failure
            try:
                session = self._session(path, ep, ep_options, options)
            except ModelLoadError:
                raise
            except Exception as exc:
                reason = _one_line(exc)
                if ep == CPU_EP:
                    cpu_failure = reason
                attempts.append(ProviderAttempt(ep, False, reason))
                continue
            served = session.get_providers()[0]
            if served != ep:  # onnxruntime swapped the EP out behind our back
                attempts.append(ProviderAttempt(ep, False, f"onnxruntime fell back to {served}"))
                continue
            attempts.append(ProviderAttempt(ep, True))
            try:
                return OnnxRuntime(session, attempts)
            except ModelLoadError as exc:
                raise ModelLoadError(f"{path.name}: {exc.message}") from None
        if cpu_failure is not None:
            # The CPU EP is always there: failing on it is the model's fault, not a device's.
            raise ModelLoadError(f"{path.name}: {cpu_failure}")
        tried = "; ".join(f"{a.provider}: {a.reason}" for a in attempts) or "empty chain"
        raise ProviderError(f"{path.name}: no provider could serve the model ({tried})")

    @staticmethod
    def _session(path: Path, ep: str, ep_options: dict[str, str], options: RuntimeOptions) -> Any:
        """One session for one link. File-level failures raise :class:`ModelLoadError`."""
        strict = options.strict_placement and ep != CPU_EP
        providers: list[tuple[str, dict[str, str]]] = [(ep, ep_options)]
        if ep != CPU_EP and not strict:
            providers.append((CPU_EP, {}))
        try:
            return ort.InferenceSession(
                str(path),
                sess_options=build_session_options(options, strict=strict),
                providers=providers,
                enable_fallback=0,  # no silent retry on the CPU behind the chain's back
                read_config_from_model=0,  # a model may not choose its own session config
            )
        except Exception as exc:
            # "Load model from ... failed": parsing and graph checks, before any EP is involved.
            if "Load model from" in str(exc):
                raise ModelLoadError(f"{path.name}: {_one_line(exc)}") from exc
            raise


__all__ = [
    "CPU_EP",
    "EP_NAMES",
    "PROBE_MODEL",
    "OnnxBackend",
    "OnnxRuntime",
    "build_session_options",
    "provider_options",
]
