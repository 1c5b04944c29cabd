"""Installing a verified artifact: validate it on this device, swap it in, watch it, or undo it.

* :func:`validate_candidate` loads the artifact from its read-only store path with the
  device's provider chain (golden vectors run inside the loader) and checks what only the
  device can: the signed format and version are what loaded, the latency budget of this
  profile is met, and the memory headroom is left.
* :func:`activate` hot-swaps it into the model's slot: the batch in flight finishes on the
  old model, the next one runs on the new. The old model stays loaded for a rollback.
* :class:`Probation` watches both models' counters until the window ends or a breach.
* :func:`roll_back` swaps the old model back and closes the new one; :func:`retire` closes
  the old one after a commit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.bench import random_input
from agent.bundle import Bundle
from agent.errors import ConfigError, EdgeError, UpdateError
from agent.loader import LoadedModel, load_model
from agent.model import ServedModel
from agent.profiles import Profile, runtime_options
from agent.serving import ModelSlot, SlotState
from agent.telemetry.stats import ModelStats, StatsSnapshot
from agent.updater.config import UpdateConfig
from agent.updater.machine import UpdateRecord
from agent.updater.probation import ProbationFailed, Window, judge

log = logging.getLogger("agent.updater.install")


class ValidationFailed(UpdateError):
    """The candidate loaded, but does not fit this device or is not what was signed."""

    code = "validation_failed"


def validate_candidate(
    path: Path,
    record: UpdateRecord,
    *,
    profile: Profile,
    work_dir: Path,
    cache_dir: Path | None,
    latency_runs: int,
) -> LoadedModel:
    """Load ``path`` as the next version of ``record.model`` and check it on this device.

    Raises:
        BundleError, ModelLoadError, ProviderError, InferenceError: from the loader, with
            their codes (``golden_mismatch``, ``incompatible_bundle``, ``model_load_failed``...).
        ValidationFailed: ``format_mismatch``, ``version_mismatch``, ``target_mismatch``
            (the loaded bytes are not the verified ones), ``latency_budget_exceeded`` or
            ``insufficient_memory``.
    """
    try:
        options = runtime_options(profile, record.format, cache_dir)
    except ConfigError as exc:
        raise ValidationFailed(exc.message, code="unsupported_format") from None
    loaded = load_model(
        path, work_dir=work_dir, options=options, name=record.model, profile=profile.name
    )
    try:
        _check_identity(loaded.bundle, record)
        budget = loaded.bundle.latency_budget_ms(profile.name)
        if budget is not None:
            p95 = measure_p95_ms(loaded.model, loaded.bundle, latency_runs)
            if p95 > budget:
                raise ValidationFailed(
                    f"latency p95 {p95:.2f} ms over {latency_runs} runs exceeds the budget of "
                    f"{budget:g} ms for profile {profile.name}",
                    code="latency_budget_exceeded",
                )
        _check_memory(profile)
    except BaseException:
        loaded.model.close()
        raise
    return loaded


def _check_identity(bundle: Bundle, record: UpdateRecord) -> None:
    if bundle.format != record.format:
        raise ValidationFailed(
            f"the artifact is a {bundle.format} model, signed as {record.format}",
            code="format_mismatch",
        )
    if bundle.synthesized:
        if bundle.digest != record.sha256:  # a bare file: the loaded bytes are the verified ones
            raise ValidationFailed(
                f"loaded bytes {bundle.digest[:12]} are not the verified {record.sha256[:12]}",
                code="target_mismatch",
            )
    elif bundle.version != record.to_version:
        raise ValidationFailed(
            f"the bundle says version {bundle.version}, signed as {record.to_version}",
            code="version_mismatch",
        )


def _check_memory(profile: Profile) -> None:
    """The profile's headroom must still be free with the candidate loaded."""
    import psutil

    memory = psutil.virtual_memory()
    headroom = profile.memory.headroom_bytes
    if memory.available < headroom:
        raise ValidationFailed(
            f"{memory.available // 2**20} MiB free with the new model loaded; profile "
            f"{profile.name} keeps {headroom // 2**20} MiB free",
            code="insufficient_memory",
        )
    limit = profile.memory.limit_bytes(memory.total)
    rss = psutil.Process().memory_info().rss
    if limit is not None and rss > limit:
        raise ValidationFailed(
            f"the agent uses {rss // 2**20} MiB with the new model loaded, over its limit of "
            f"{limit // 2**20} MiB",
            code="insufficient_memory",
        )


def measure_p95_ms(model: ServedModel, bundle: Bundle, runs: int) -> float:
    """The p95 (nearest rank) of ``runs`` timed inferences, on a golden input when there is one.

    Raises:
        EdgeError: the model fails on the input.
    """
    run = _latency_input(model, bundle)
    run()  # not timed: first-run costs are the warm-up's business
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1000.0)
    samples.sort()
    return samples[max(0, int(np.ceil(0.95 * len(samples))) - 1)]


def _latency_input(model: ServedModel, bundle: Bundle) -> Callable[[], object]:
    for vector in bundle.manifest.golden:
        if vector.inputs is not None:
            feeds = [(k, bundle.load_array(rel)) for k, rel in vector.inputs.items()]
            return lambda: model.infer(list(feeds))
        if vector.image is not None:
            image = bundle.path_of(vector.image).read_bytes()
            return lambda: model.infer_image(image)
    tensors = [(s.name, random_input(s, seed=i)) for i, s in enumerate(model.inputs)]
    return lambda: model.infer(list(tensors))


# --- activation, probation, rollback -------------------------------------------------------


@dataclass
class Activation:
    """A swap in effect: the new model serves, the old one waits for a commit or a rollback."""

    slot: ModelSlot
    new: ServedModel
    old: ServedModel | None
    baseline: Window
    at_swap: StatsSnapshot
    started: float = field(default_factory=time.monotonic)


def activate(
    slot: ModelSlot,
    new: ServedModel,
    stats: ModelStats,
    baseline_from: StatsSnapshot,
    baseline_to: StatsSnapshot | None = None,
) -> Activation:
    """Swap ``new`` into ``slot``; the old model stays loaded (returned in the activation).

    The old model's baseline runs from ``baseline_from`` to ``baseline_to`` (default: the
    swap). Ending it when the update began keeps out the download and the validation, whose
    load on the CPU is no fault of the old model.
    """
    at_swap = stats.snapshot()
    old = slot.swap(new)
    baseline = Window.between(baseline_from, baseline_to or at_swap)
    return Activation(slot, new, old, baseline, at_swap)


class Probation:
    """Watches an activation for ``config.probation_s``: a breach ends it early."""

    def __init__(self, activation: Activation, stats: ModelStats, config: UpdateConfig) -> None:
        self.activation = activation
        self.stats = stats
        self.config = config

    def current(self) -> Window:
        """The new model's window so far."""
        return Window.between(self.activation.at_swap, self.stats.snapshot())

    def run(self, stop: threading.Event) -> ProbationFailed | None:
        """Wait out the window; the breach, or None when it passed.

        Raises:
            InterruptedError: ``stop`` was set before the window ended.
        """
        end = self.activation.started + self.config.probation_s
        while True:
            breach = judge(self.activation.baseline, self.current(), self.config)
            if breach is not None:
                return breach
            left = end - time.monotonic()
            if left <= 0:
                answered = self.current().requests
                if answered < self.config.probation_min_requests:
                    log.warning(
                        "model %s: probation ended with %d requests, too few to judge; committed",
                        self.activation.new.name,
                        answered,
                    )
                return None
            if stop.wait(min(left, self.config.probation_check_s)):
                raise InterruptedError("the updater is stopping")


def roll_back(activation: Activation, reason: EdgeError) -> None:
    """Serve the old model again and close the new one (a slot that had none fails)."""
    slot = activation.slot
    if activation.old is not None:
        slot.swap(activation.old)  # waits for a batch in flight on the new model
        _close_after_swap(activation.new)
    else:
        slot.close()  # waits for a batch in flight, closes the new model
        slot.status = SlotState("failed", reason.to_dict())


def retire(model: ServedModel | None) -> None:
    """Close the old model after a commit."""
    if model is not None:
        _close_after_swap(model)


def _close_after_swap(model: ServedModel) -> None:
    try:
        model.close()
    except Exception as exc:  # a runtime that fails to close must not stop the update
        log.warning("closing %s %s: %s", model.name, model.version, exc)
