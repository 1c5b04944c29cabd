"""The agent's model slots: create them, load models into them, apply a new model list.

One :class:`~agent.serving.ModelSlot` per configured model name. Loading happens off the
network thread (the loader thread at start-up, the command thread on ``reload``, the
updater's thread for OTA). A load that fails leaves the slot serving what it had; a
slot that never had a model is ``failed`` with the error.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bundle import MANIFEST_NAME, load_manifest, open_bundle, sha256_file
from agent.config import ModelConfig
from agent.errors import EdgeError
from agent.loader import load_model
from agent.profiles import Profile, runtime_options
from agent.runtimes import format_for_path
from agent.serving import ModelSlot, Send, SlotState
from agent.status import accelerated
from agent.telemetry import AgentStats

log = logging.getLogger("agent.models")


@dataclass(frozen=True)
class _Loaded:
    config: ModelConfig
    digest: str


class ModelRegistry:
    """The slots of one agent, keyed by model name. Thread-safe."""

    def __init__(
        self,
        *,
        profile: Profile,
        work_dir: Path,
        cache_dir: Path,
        stats: AgentStats,
        send: Send,
        on_change: Callable[[], None],
    ) -> None:
        self.profile = profile
        self.work_dir = work_dir
        self.cache_dir = cache_dir
        self.stats = stats
        self.send = send
        self.on_change = on_change
        #: name -> slot. The same dict object for the agent's lifetime (the intake reads it).
        self.slots: dict[str, ModelSlot] = {}
        self.lock = threading.RLock()
        self._loaded: dict[str, _Loaded] = {}

    def add(self, mc: ModelConfig) -> ModelSlot:
        """Create and start the slot for ``mc`` (state ``loading``, no model yet)."""
        stats = self.stats.model(mc.name)

        def record(ms: float | None, code: str | None) -> None:
            if code is None and ms is not None:
                stats.record_ok(ms)
            else:
                stats.record_error(code or "internal")

        slot = ModelSlot(
            name=mc.name,
            send=self.send,
            record=record,
            queue_size=mc.queue_size,
            max_batch=mc.max_batch,
            max_delay_ms=mc.max_delay_ms,
            inline_below_ms=mc.inline_below_ms,
        )
        slot.start()
        with self.lock:
            self.slots[mc.name] = slot
        return slot

    def load(self, mc: ModelConfig) -> EdgeError | None:
        """Load ``mc`` and swap it into its slot; on failure the slot keeps what it had.

        Returns the error that stopped the load, or None once the model serves.
        """
        slot = self.slots[mc.name]
        if slot.model is None:
            slot.status = SlotState("loading")
        self.on_change()
        try:
            options = runtime_options(self.profile, format_of(mc.path), self.cache_dir)
            loaded = load_model(
                mc.path,
                work_dir=self.work_dir,
                options=options,
                name=mc.name,
                profile=self.profile.name,
            )
        except EdgeError as exc:
            log.error("model %s: %s", mc.name, exc)
            if slot.model is None:
                slot.status = SlotState("failed", exc.to_dict())
            self.on_change()
            return exc
        model = loaded.model
        for attempt in model.runtime.attempts:
            if not attempt.ok:
                log.warning("model %s: %s unusable (%s)", mc.name, attempt.provider, attempt.reason)
        required = self.profile.required_accelerator
        if required and not accelerated(model.provider, required):
            log.warning(
                "model %s: served by %s, not the required %s: device degraded",
                mc.name,
                model.provider,
                " or ".join(required),
            )
        old = slot.swap(model)
        if old is not None:
            old.close()
        self._loaded[mc.name] = _Loaded(mc, model.digest)
        log.info(
            "model %s %s ready on %s (%.0f ms)",
            mc.name,
            model.version,
            model.provider,
            model.load_ms,
        )
        self.on_change()
        return None

    def apply(self, models: list[ModelConfig], drain_timeout_s: float) -> dict[str, Any]:
        """Make the slots match ``models``: add, remove, reload changed files, keep the rest.

        Returns the names ``added``, ``removed``, ``reloaded`` and ``unchanged``, and
        ``failed``: name -> error of the models that could not be (re)loaded (each keeps
        serving its previous version, if it had one).
        """
        wanted = {m.name: m for m in models}
        result: dict[str, Any] = {"added": [], "removed": [], "reloaded": [], "unchanged": []}
        failed: dict[str, dict[str, str]] = {}
        for name in list(self.slots):
            if name not in wanted:
                with self.lock:
                    slot = self.slots.pop(name)
                slot.stop(drain_timeout_s)
                slot.close()
                self._loaded.pop(name, None)
                result["removed"].append(name)
        for name, mc in wanted.items():
            existing = self.slots.get(name)
            if existing is None:
                self.add(mc)
                result["added"].append(name)
            else:
                existing.queue_size = mc.queue_size
                existing.max_batch = mc.max_batch
                existing.max_delay_ms = mc.max_delay_ms
                existing.inline_below_ms = mc.inline_below_ms
                if self._unchanged(mc):
                    result["unchanged"].append(name)
                    continue
            error = self.load(mc)
            if error is not None:
                failed[name] = error.to_dict()
            elif existing is not None:
                result["reloaded"].append(name)
        result["failed"] = failed
        self.on_change()
        return result

    def _unchanged(self, mc: ModelConfig) -> bool:
        before = self._loaded.get(mc.name)
        if before is None or before.config.path != mc.path:
            return False
        try:
            if mc.path.is_file() and mc.path.suffix in (".onnx", ".tflite", ".ort"):
                return sha256_file(mc.path) == before.digest
        except OSError:
            return False
        return False

    def stop_all(self, drain_timeout_s: float) -> None:
        """Stop taking requests; let queued ones finish within the shared bound."""
        import time

        deadline = time.monotonic() + drain_timeout_s
        for slot in list(self.slots.values()):
            slot.stop(max(0.0, deadline - time.monotonic()))

    def close_all(self) -> None:
        for slot in list(self.slots.values()):
            slot.close()


def format_of(path: Path) -> str:
    """The model format of a source: a bundle folder, an archive, or a bare file.

    Raises:
        BundleError: a bundle whose manifest cannot be read.
        ModelLoadError: a file of no known model type.
    """
    if path.is_dir():
        return load_manifest(path / MANIFEST_NAME).format
    if path.name.lower().endswith((".tar", ".tgz", ".tar.gz")):
        with tempfile.TemporaryDirectory() as tmp:
            return open_bundle(path, Path(tmp)).format
    return format_for_path(path)
