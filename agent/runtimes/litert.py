"""The LiteRT (TensorFlow Lite) backend: ``.tflite`` files on a delegate chain.

The interpreter comes from ``ai_edge_litert.interpreter`` and, failing that, from
``tflite_runtime.interpreter`` (a documented fallback for old devices: tflite-runtime
2.14 and older is built against numpy 1 and breaks under numpy 2).

============ ==================================================================
link         interpreter
============ ==================================================================
``edgetpu``  ``load_delegate(library, options)``; ``library`` defaults to
             ``libedgetpu.so.1``, other keys (``device: usb``...) go to the delegate
``gpu``      the same with ``libtensorflowlite_gpu_delegate.so``
``xnnpack``  the default interpreter (XNNPACK is applied by default), ``num_threads``
``cpu``      built-in kernels with default delegates off
             (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``): no XNNPACK
============ ==================================================================

Links of other backends (``cuda``, ``tensorrt``...) are recorded as failed attempts; a
missing or failing delegate library too. The provider reported is ``EdgeTPU``, ``GPU``,
``XNNPACK`` or ``CPU``. ``xnnpack`` and ``cpu`` links take no options (threads come
from :class:`RuntimeOptions`): any key there is a :class:`ConfigError`. A model compiled
for the Edge TPU fails on the plain links as a failed attempt, so that a device without
its TPU reports a :class:`ProviderError`, not a broken model.

Dynamic shapes: a dimension that is -1 in a tensor's ``shape_signature`` is ``None`` in
its :class:`TensorSpec`. When a run's inputs differ in shape from the interpreter's
current ones, the inputs are resized (``strict``: only dynamic dims may change) and
the tensors re-allocated; the current shapes are cached so a steady shape costs nothing.

A :class:`LiteRTRuntime` is not thread-safe: the agent gives each model one worker,
which is the only caller of :meth:`LiteRTRuntime.run`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Final

import numpy as np

from agent.errors import ConfigError, InferenceError, ModelLoadError, ProviderError
from agent.runtimes.base import (
    Array,
    ProviderAttempt,
    ProviderSpec,
    Quantization,
    RuntimeOptions,
    TensorSpec,
)

#: Interpreter modules, in order of preference.
INTERPRETER_MODULES: Final = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")
EDGETPU_LIBRARY: Final = "libedgetpu.so.1"
GPU_LIBRARY: Final = "libtensorflowlite_gpu_delegate.so"
#: Short link names -> the provider name a runtime reports.
DELEGATE_NAMES: Final[dict[str, str]] = {
    "edgetpu": "EdgeTPU",
    "gpu": "GPU",
    "xnnpack": "XNNPACK",
    "cpu": "CPU",
}
_DEFAULT_LIBRARIES: Final = {"edgetpu": EDGETPU_LIBRARY, "gpu": GPU_LIBRARY}
#: The tiny probe model ``edge-agent doctor`` loads on each link (``y = x + 1``, ``[1, 4]``).
PROBE_MODEL: Final[Path] = Path(__file__).resolve().parent.parent / "data" / "probe.tflite"

#: Messages of LiteRT errors that mean the file itself is unreadable, whatever the link.
_FILE_ERRORS: Final = ("not a valid Flatbuffer", "allocation is null/empty", "Could not open")
_EDGETPU_OP: Final = "edgetpu-custom-op"
_MAX_REASON: Final = 300


def _import_interpreter() -> ModuleType | None:
    for name in INTERPRETER_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


_tfl: Any = _import_interpreter()


def _one_line(exc: BaseException, text: str | None = None) -> str:
    """The first non-blank line of ``text`` (default: the error's message), capped."""
    text = str(exc) if text is None else text
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


def _quantization(params: dict[str, Any]) -> Quantization | None:
    scales = params.get("scales")
    if scales is None or len(scales) == 0:
        return None
    return Quantization(
        scale=tuple(float(s) for s in scales),
        zero_point=tuple(int(z) for z in params["zero_points"]),
        axis=int(params.get("quantized_dimension", 0)),
    )


def _tensor_spec(detail: dict[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(
        name=detail["name"],
        shape=tuple(int(d) if d >= 0 else None for d in dims),
        dtype=_dtype_name(detail["dtype"]),
        quantization=_quantization(detail.get("quantization_parameters", {})),
    )


def _dtype_name(dtype: Any) -> str:
    return str(np.dtype(dtype).name)


class LiteRTRuntime:
    """A model loaded in one LiteRT interpreter."""

    format: ClassVar[str] = "tflite"

    def __init__(self, interpreter: Any, provider: str, attempts: Sequence[ProviderAttempt]):
        self._interpreter = interpreter
        in_details = interpreter.get_input_details()
        out_details = interpreter.get_output_details()
        self._inputs = tuple(_tensor_spec(d) for d in in_details)
        self._outputs = tuple(_tensor_spec(d) for d in out_details)
        self._provider = provider
        self._attempts = tuple(attempts)
        self._in_index = [(d["name"], int(d["index"])) for d in in_details]
        self._out_index = [int(d["index"]) for d in out_details]
        self._dynamic = any(None in spec.shape for spec in self._inputs)
        self._shapes: dict[str, tuple[int, ...]] = {
            d["name"]: tuple(int(x) for x in d["shape"]) for d in in_details
        }
        self._set = interpreter.set_tensor
        self._invoke = interpreter.invoke
        self._get = interpreter.get_tensor

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
        """Set the inputs, invoke, and return copies of the outputs.

        Raises:
            InferenceError: LiteRT failed (resize, set_tensor, invoke), or the runtime was closed.
        """
        if self._interpreter is None:
            raise InferenceError("the runtime was closed")
        try:
            if self._dynamic:
                self._resize(feeds)
            for name, index in self._in_index:
                self._set(index, feeds[name])
            self._invoke()
            return [self._get(index) for index in self._out_index]
        except Exception as exc:
            raise InferenceError(_one_line(exc)) from exc

    def _resize(self, feeds: dict[str, Array]) -> None:
        shapes = {name: feeds[name].shape for name, _ in self._in_index}
        if shapes == self._shapes:
            return
        self._shapes = {}  # unknown until allocate_tensors succeeds: retry on the next run
        for name, index in self._in_index:
            self._interpreter.resize_tensor_input(index, list(shapes[name]), strict=True)
        self._interpreter.allocate_tensors()
        self._shapes = shapes

    def close(self) -> None:
        """Drop the interpreter (and its delegates); a later :meth:`run` raises."""
        self._interpreter = None
        self._set = self._invoke = self._get = None


class LiteRTBackend:
    """Loads TFLite models with the LiteRT interpreter."""

    format: ClassVar[str] = "tflite"
    suffixes: ClassVar[tuple[str, ...]] = (".tflite",)

    def available(self) -> bool:
        """True when an interpreter module (LiteRT or tflite-runtime) can be imported."""
        return _tfl is not None

    def available_providers(self) -> list[str]:
        """``XNNPACK`` and ``CPU``, plus ``EdgeTPU`` / ``GPU`` when their libraries are found."""
        if _tfl is None:
            return []
        found = ["XNNPACK", "CPU"]
        if ctypes.util.find_library("edgetpu"):
            found.insert(0, "EdgeTPU")
        if ctypes.util.find_library("tensorflowlite_gpu_delegate"):
            found.insert(0, "GPU")
        return found

    def load(self, path: Path, options: RuntimeOptions) -> LiteRTRuntime:
        """Build an interpreter on the first link of ``options.providers`` that works.

        Raises:
            ModelLoadError: the file is missing, empty, corrupt, not TFLite, or uses an
                operator the interpreter does not have.
            ProviderError: no link of the chain could serve the model (a delegate library
                missing or failing, a link of another backend).
            ConfigError: options on an ``xnnpack`` or ``cpu`` link (threads come from
                ``RuntimeOptions``).
        """
        if _tfl is None:
            raise ModelLoadError("no LiteRT interpreter is installed", code="runtime_missing")
        if not path.is_file():
            raise ModelLoadError(f"{path.name}: no such model file")
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{path.name}: the model file is empty")
        attempts: list[ProviderAttempt] = []
        for link in options.providers:
            provider = DELEGATE_NAMES.get(link.name)
            if provider is None:
                attempts.append(ProviderAttempt(link.name, False, "not a LiteRT delegate"))
                continue
            if link.name not in _DEFAULT_LIBRARIES and link.options:
                keys = ", ".join(sorted(link.options))
                raise ConfigError(f"delegate {link.name!r} takes no options (got {keys})")
            try:
                interpreter = self._interpreter(path, link, options)
            except _DelegateUnavailableError as exc:
                attempts.append(ProviderAttempt(provider, False, str(exc)))
                continue
            except Exception as exc:
                reason = _one_line(exc)
                if _EDGETPU_OP in str(exc):
                    # Compiled for the Edge TPU: only its delegate can run it.
                    reason = "the model is compiled for the Edge TPU"
                elif link.name in ("cpu", "xnnpack") or any(m in reason for m in _FILE_ERRORS):
                    # Unreadable file, or a plain interpreter refusing it: the model's fault.
                    raise ModelLoadError(f"{path.name}: {reason}") from exc
                attempts.append(ProviderAttempt(provider, False, reason))
                continue
            attempts.append(ProviderAttempt(provider, True))
            return LiteRTRuntime(interpreter, provider, attempts)
        tried = "; ".join(f"{a.provider}: {a.reason}" for a in attempts) or "empty chain"
        raise ProviderError(f"{path.name}: no delegate could serve the model ({tried})")

    @staticmethod
    def _interpreter(path: Path, link: ProviderSpec, options: RuntimeOptions) -> Any:
        kwargs: dict[str, Any] = {"model_path": str(path)}
        if options.intra_op_threads:
            kwargs["num_threads"] = options.intra_op_threads
        if link.name in _DEFAULT_LIBRARIES:
            delegate_options = dict(link.options)
            library = str(delegate_options.pop("library", _DEFAULT_LIBRARIES[link.name]))
            kwargs["experimental_delegates"] = [_load_delegate(library, delegate_options)]
        elif link.name == "cpu":
            resolver = getattr(_tfl, "OpResolverType", None)
            if resolver is not None:
                kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        interpreter = _tfl.Interpreter(**kwargs)
        interpreter.allocate_tensors()
        return interpreter


class _DelegateUnavailableError(Exception):
    """A delegate library that is missing or refuses to start (a failed attempt)."""


def _load_delegate(library: str, options: dict[str, Any]) -> Any:
    # dlopen it first: LiteRT's Delegate leaves a half-built object (and a noisy
    # AttributeError from its __del__) behind when the library is missing.
    try:
        ctypes.CDLL(library)
    except OSError as exc:
        reason = _one_line(exc)
        if "No such file" in reason:
            raise _DelegateUnavailableError(f"{library} not found") from exc
        raise _DelegateUnavailableError(f"{library} cannot be loaded: {reason}") from exc
    try:
        return _tfl.load_delegate(library, {k: str(v) for k, v in options.items()} or None)
    except (OSError, ValueError, RuntimeError) as exc:  # the library is there, the device not
        # LiteRT words it "Failed to load delegate from <library>\n<the delegate's reason>".
        text = str(exc)
        if text.startswith("Failed to load delegate from"):
            text = text.partition("\n")[2]
        detail = _one_line(exc, text) if text.strip() else "no reason given"
        raise _DelegateUnavailableError(f"{library} failed to start: {detail}") from exc


__all__ = [
    "DELEGATE_NAMES",
    "EDGETPU_LIBRARY",
    "GPU_LIBRARY",
    "INTERPRETER_MODULES",
    "PROBE_MODEL",
    "LiteRTBackend",
    "LiteRTRuntime",
]
