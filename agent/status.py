"""The retained status document, and when a device counts as ``degraded``.

A device is ``degraded`` when it runs but something is wrong: a model failed to load,
or a model fell back from the accelerator its profile requires (for example TensorRT
on a Jetson) to a provider the profile does not count as accelerated. Every fallback
is also listed under the model (``fallbacks``: provider and reason), an extra field
that clients ignore unless they look for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import agent
from agent.protocol import ModelStatus, StatusDocument, format_timestamp, utc_now
from agent.serving import ModelSlot

#: Short provider names (as profiles write them) -> what the runtimes report.
_SERVED_NAMES: dict[str, tuple[str, ...]] = {
    "tensorrt": ("TensorrtExecutionProvider",),
    "cuda": ("CUDAExecutionProvider",),
    "openvino": ("OpenVINOExecutionProvider",),
    "xnnpack": ("XnnpackExecutionProvider", "XNNPACK"),
    "coreml": ("CoreMLExecutionProvider",),
    "edgetpu": ("EdgeTPU",),
    "gpu": ("GPU",),
}


def accelerated(provider: str, required: Iterable[str]) -> bool:
    """Whether ``provider`` (a served name) is one of the ``required`` short names."""
    return any(provider in _SERVED_NAMES.get(name, (name,)) for name in required)


def model_problems(slot: ModelSlot, required: tuple[str, ...]) -> list[str]:
    """Why this slot makes the device degraded (empty when it does not)."""
    if slot.status.state == "failed":
        err = slot.status.error or {}
        return [f"model {slot.name}: failed ({err.get('code', 'error')})"]
    model = slot.model
    if model is None or not required:
        return []
    if not accelerated(model.provider, required):
        return [f"model {slot.name}: served by {model.provider}, not {' or '.join(required)}"]
    return []


def build_status(
    *,
    state: str,
    profile: str,
    started_at: datetime,
    slots: Mapping[str, ModelSlot],
    required: tuple[str, ...],
) -> dict[str, Any]:
    """The status document as a JSON-able dict (validated by :class:`StatusDocument`).

    ``state`` is ``online`` unless the caller passes ``offline``; ``online`` becomes
    ``degraded`` when any slot has a problem.
    """
    models: dict[str, ModelStatus] = {}
    extras: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, slot in slots.items():
        model = slot.model
        models[name] = ModelStatus(
            version=model.version if model is not None else "",
            state=slot.status.state,  # type: ignore[arg-type]
            format=model.format if model is not None else "",
            provider=model.provider if model is not None else "",
        )
        extra: dict[str, Any] = {}
        if model is not None:
            fallbacks = [
                {"provider": a.provider, "reason": a.reason}
                for a in model.runtime.attempts
                if not a.ok
            ]
            if fallbacks:
                extra["fallbacks"] = fallbacks
        if slot.status.error is not None:
            extra["error"] = slot.status.error
        if extra:
            extras[name] = extra
        problems.extend(model_problems(slot, required))
    if state == "online" and problems:
        state = "degraded"
    doc = StatusDocument(
        state=state,  # type: ignore[arg-type]
        ts=utc_now(),
        agent_version=agent.__version__,
        profile=profile,
        started_at=started_at,
        models=models,
    ).model_dump(mode="json")
    for name, extra in extras.items():
        doc["models"][name].update(extra)
    if problems:
        doc["problems"] = problems
    return doc


def offline_status() -> dict[str, Any]:
    """The Last Will / clean-shutdown document."""
    return {"state": "offline", "ts": format_timestamp(utc_now())}
