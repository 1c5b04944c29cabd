"""Validation of an uploaded bundle or model before anything is stored.

The check is the agent's own load path (:func:`agent.loader.load_model`) on the CPU:
safe extraction and the manifest (:func:`agent.bundle.open_bundle`), loading with the
agent's runtimes, the declared tensors, the golden vectors within their tolerances, and
one warm-up run. What passes here loads on a device the same way.

By default the check runs in a separate process (one warm worker, spawned on first
use), so a model that crashes or bloats the runtime cannot take the API replica down.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fleet_server.domain import ArtifactKind
from fleet_server.errors import BundleRejected

log = logging.getLogger("fleet_server.validation")


@dataclass(frozen=True)
class CheckedModel:
    """What validation learnt about an upload."""

    name: str
    #: The manifest's version; ``None`` for a bare model file (the uploader names it).
    version: str | None
    format: str
    kind: ArtifactKind
    manifest: dict[str, Any]
    model_sha256: str
    golden_vectors: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


@dataclass(frozen=True)
class _Outcome:
    """Crosses the process boundary: a result, or an error's code and message."""

    checked: CheckedModel | None = None
    code: str = ""
    message: str = ""


def check_file(path: str) -> _Outcome:
    """Open, load and check one bundle or model file on the CPU. Never raises.

    Runs in the validation worker (or inline): imports the agent lazily.
    """
    try:
        from agent.errors import EdgeError
        from agent.loader import load_model
        from agent.runtimes import ProviderSpec, RuntimeOptions
    except ImportError as exc:  # pragma: no cover - the agent ships with the server
        return _Outcome(code="validation_unavailable", message=f"cannot import the agent: {exc}")
    options = RuntimeOptions(providers=(ProviderSpec("cpu"),), intra_op_threads=1, warmup_runs=1)
    try:
        with tempfile.TemporaryDirectory(prefix="fleet-validate-") as work:
            loaded = load_model(Path(path), work_dir=Path(work), options=options)
            try:
                bundle, model = loaded.bundle, loaded.model
                checked = CheckedModel(
                    name=bundle.name,
                    version=None if bundle.synthesized else bundle.version,
                    format=bundle.format,
                    kind=ArtifactKind.MODEL if bundle.synthesized else ArtifactKind.BUNDLE,
                    manifest=bundle.manifest.model_dump(mode="json", exclude_none=True),
                    model_sha256=bundle.digest,
                    golden_vectors=len(bundle.manifest.golden),
                    inputs=[s.to_dict() for s in model.inputs],
                    outputs=[s.to_dict() for s in model.outputs],
                )
            finally:
                loaded.model.close()
    except EdgeError as exc:
        return _Outcome(code=exc.code, message=exc.message)
    except Exception as exc:  # the runtime failed in a way the agent did not name
        return _Outcome(code="bundle_invalid", message=f"{type(exc).__name__}: {exc}"[:500])
    return _Outcome(checked=checked)


class Validator:
    """Runs :func:`check_file` inline or in a worker process, with a time limit."""

    def __init__(
        self, *, isolation: Literal["process", "inline"] = "process", timeout_s: float = 120.0
    ) -> None:
        self.isolation = isolation
        self.timeout_s = timeout_s
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> cf.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                ctx = multiprocessing.get_context("spawn")
                self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx)
            return self._pool

    def _reset(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def check(self, path: Path) -> CheckedModel:
        """Validate the bundle or model at ``path`` (its suffix tells which).

        Raises:
            BundleRejected: it does not open, load, match its declared tensors, or pass its
                golden vectors; the code is the agent's (``golden_mismatch``...), or
                ``validation_crashed`` / ``validation_timeout``.
        """
        if self.isolation == "inline":
            outcome = check_file(str(path))
        else:
            future = self._executor().submit(check_file, str(path))
            try:
                outcome = future.result(timeout=self.timeout_s)
            except cf.TimeoutError:
                self._reset()
                raise BundleRejected(
                    f"validation took longer than {self.timeout_s:.0f}s", code="validation_timeout"
                ) from None
            except cf.process.BrokenProcessPool:
                self._reset()
                raise BundleRejected(
                    "the model crashed the runtime while loading", code="validation_crashed"
                ) from None
        if outcome.checked is None:
            raise BundleRejected(outcome.message, code=outcome.code or "bundle_invalid")
        return outcome.checked

    def close(self) -> None:
        """Stop the worker process, if one was started."""
        self._reset()
