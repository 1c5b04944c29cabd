"""The steps of the update machine, one method per state.

Each step does its work and then fires exactly one trigger (or none, when the updater is
stopping: the state stays persisted and the next start resumes or rolls back):

=============  ====================================================================
DOWNLOADING    free-disk check, resumable download into the store (skipped when present)
VERIFYING      signed length and hashes, on the read-only store path
VALIDATING     load from that same path, golden vectors, latency budget, memory headroom
ACTIVATING     hot swap; the old model stays loaded
PROBATION      error rate and latency p95 against the old model's, for ``probation_s``
COMMITTED      the installed version is recorded (with the entry); close the old model, prune
FAILED         drop the candidate; the old model never stopped serving
ROLLED_BACK    swap the old model back (or, after a restart, it already serves)
=============  ====================================================================

A failure worth retrying (:data:`RETRYABLE_CODES`: the network, the disk, a corrupted
download) is tried again at the next check; any other refuses the target for good.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import EdgeError, UpdateError
from agent.telemetry.histogram import HistogramSnapshot
from agent.telemetry.stats import StatsSnapshot
from agent.updater.config import UpdateConfig
from agent.updater.fetch import Downloader, DownloadStopped
from agent.updater.install import (
    Activation,
    Probation,
    activate,
    retire,
    roll_back,
    validate_candidate,
)
from agent.updater.machine import (
    REASON_STATES,
    Installed,
    State,
    Trigger,
    UpdateMachine,
    UpdateRecord,
)
from agent.updater.store import ArtifactStore, verify_artifact

if TYPE_CHECKING:
    from agent.daemon import Agent
    from agent.loader import LoadedModel

log = logging.getLogger("agent.updater")

#: Failures worth trying again at the next check; any other refuses the target for good
#: (until the director names another artifact, or the agent is upgraded).
RETRYABLE_CODES = frozenset(
    {
        "update_failed",
        "metadata_unavailable",
        "download_failed",
        "disk_full",
        "insufficient_disk",
        "store_failed",
        "state_unwritable",
        "target_mismatch",
        "insufficient_memory",
    }
)
_NOTHING = StatsSnapshot(0, {}, HistogramSnapshot.empty())


class UpdateSteps:
    """Runs the machine's steps against a live agent; owns the candidate and the activation."""

    def __init__(
        self,
        agent_: Agent,
        config: UpdateConfig,
        machine: UpdateMachine,
        store: ArtifactStore,
        *,
        downloader: Downloader,
        stop: threading.Event,
    ) -> None:
        self.agent = agent_
        self.config = config
        self.machine = machine
        self.store = store
        self.downloader = downloader
        self._stop = stop
        self._candidate: LoadedModel | None = None
        self._activation: Activation | None = None
        self._verified: set[str] = set()  # artifacts verified by this process
        #: When each model's serving version began, and when an update of it began: the
        #: old model's probation baseline lies between the two.
        self._epoch: dict[str, StatsSnapshot] = {}
        self._update_began: dict[str, StatsSnapshot] = {}
        self._steps: dict[State, Callable[[UpdateRecord], None]] = {
            State.DOWNLOADING: self._download,
            State.VERIFYING: self._verify,
            State.VALIDATING: self._validate,
            State.ACTIVATING: self._activate,
            State.PROBATION: self._probation,
            State.COMMITTED: self._commit,
            State.FAILED: self._fail,
            State.ROLLED_BACK: self._roll_back,
        }

    def begin_epochs(self) -> None:
        """Start every model's baseline now (call before the models serve)."""
        for name in self.agent.slots:
            self._new_epoch(name)

    def drive(self) -> None:
        """Run steps until the machine is IDLE again (or the updater stops)."""
        while not self._stop.is_set() and (record := self.machine.update) is not None:
            state = record.state
            try:
                self._steps[state](record)
            except Exception as exc:
                log.exception("update step %s failed unexpectedly", state)
                if self.machine.state is state and state not in REASON_STATES:
                    err = UpdateError(f"{type(exc).__name__} in {state}", code="internal")
                    self.machine.fire(Trigger.FAIL, err, refuse=True)
                elif self.machine.state is state:
                    self.machine.fire(Trigger.DONE)

    # --- steps ---------------------------------------------------------------------------

    def _download(self, record: UpdateRecord) -> None:
        if record.model not in self._update_began:
            self._update_began[record.model] = self.agent.stats.model(record.model).snapshot()
        if not self.store.has(record.sha256, record.file):
            url = f"{self.config.artifacts_url}{_artifact_name(record)}"
            try:
                self.store.check_space(
                    record.sha256, record.length, self.config.min_free_disk_bytes
                )
                self.downloader.download(url, self.store.partial(record.sha256), record.length)
                self.store.commit(record.sha256, record.file)
            except DownloadStopped:
                return
            except UpdateError as exc:
                self.machine.fire(Trigger.FAIL, exc, refuse=exc.code not in RETRYABLE_CODES)
                return
        self.machine.fire(Trigger.DONE)

    def _verify(self, record: UpdateRecord) -> None:
        try:
            self._check_artifact(record)
        except UpdateError as exc:
            self.store.remove(record.sha256)
            self.machine.fire(Trigger.FAIL, exc)
            return
        self.machine.fire(Trigger.DONE)

    def _check_artifact(self, record: UpdateRecord) -> Path:
        path = self.store.path(record.sha256, record.file)
        if record.sha256 not in self._verified:
            verify_artifact(path, record.target_path, record.length, record.hashes)
            self._verified.add(record.sha256)
        return path

    def _validate(self, record: UpdateRecord) -> None:
        try:
            path = self._check_artifact(record)  # again only after a restart
            self._candidate = validate_candidate(
                path,
                record,
                profile=self.agent.profile,
                work_dir=self.agent.work_dir,
                cache_dir=self.agent.cache_dir,
                latency_runs=self.config.latency_runs,
            )
        except EdgeError as exc:
            self.machine.fire(Trigger.FAIL, exc, refuse=exc.code not in RETRYABLE_CODES)
            return
        self.machine.fire(Trigger.DONE)

    def _activate(self, record: UpdateRecord) -> None:
        candidate, slot = self._candidate, self.agent.slots.get(record.model)
        if candidate is None or slot is None:
            err = UpdateError("the validated model is gone", code="internal")
            self.machine.fire(Trigger.FAIL, err, refuse=False)
            return
        stats = self.agent.stats.model(record.model)
        baseline_from = self._epoch.get(record.model) or _NOTHING
        baseline_to = self._update_began.pop(record.model, None)
        self._activation = activate(slot, candidate.model, stats, baseline_from, baseline_to)
        self._candidate = None
        self._status_changed()
        self.machine.fire(Trigger.DONE)

    def _probation(self, record: UpdateRecord) -> None:
        activation = self._activation
        if activation is None:  # cannot happen: a restart turns PROBATION into ROLLED_BACK
            self.machine.fire(Trigger.FAIL, UpdateError("no activation", code="internal"))
            return
        stats = self.agent.stats.model(record.model)
        try:
            breach = Probation(activation, stats, self.config).run(self._stop)
        except InterruptedError:
            return  # stays PROBATION: the next start rolls back
        if breach is not None:
            self.machine.fire(Trigger.FAIL, breach, refuse=True)
            return
        self.machine.fire(Trigger.DONE, installed=self._installed(record))

    def _installed(self, record: UpdateRecord) -> Installed:
        before = self.machine.data.installed.get(record.model)
        previous = [record.from_sha256] if record.from_sha256 and before else []
        if before is not None:
            previous += [s for s in before.previous if s not in previous]
        previous = [s for s in previous if s != record.sha256][: self.config.keep_versions]
        config_path = before.config_path if before is not None else self._config_path(record)
        return Installed(
            version=record.to_version,
            sha256=record.sha256,
            path=self.store.path(record.sha256, record.file),
            target_path=record.target_path,
            rollout_id=record.rollout_id,
            config_path=config_path,
            previous=previous,
        )

    def _config_path(self, record: UpdateRecord) -> Path | None:
        for mc in self.agent.config.models:
            if mc.name == record.model:
                return mc.path
        return None

    def _commit(self, record: UpdateRecord) -> None:
        if self._activation is not None:
            retire(self._activation.old)
            self._activation = None
        self._new_epoch(record.model)
        keep = {record.sha256}
        for installed in self.machine.data.installed.values():
            keep |= {installed.sha256, *installed.previous}
        for sha256 in self.store.prune(keep):
            self._forget_extraction(sha256)
        self._status_changed()
        self.machine.fire(Trigger.DONE)

    def _fail(self, record: UpdateRecord) -> None:
        self._update_began.pop(record.model, None)
        self._drop_candidate()
        self._forget_extraction(record.sha256)
        self.machine.fire(Trigger.DONE)

    def _roll_back(self, record: UpdateRecord) -> None:
        if self._activation is not None:
            reason = record.reason
            err = UpdateError(reason.message, code=reason.code) if reason else UpdateError("")
            roll_back(self._activation, err)
            self._activation = None
            self._new_epoch(record.model)
            self._status_changed()
        self._drop_candidate()
        referenced = {
            s for i in self.machine.data.installed.values() for s in (i.sha256, *i.previous)
        }
        if record.sha256 not in referenced:
            self.store.remove(record.sha256)
            self._forget_extraction(record.sha256)
        self.machine.fire(Trigger.DONE)

    # --- helpers -------------------------------------------------------------------------

    def _drop_candidate(self) -> None:
        if self._candidate is not None:
            retire(self._candidate.model)
            self._candidate = None

    def _forget_extraction(self, sha256: str) -> None:
        """Delete the loader's extraction of a bundle archive that will not serve."""
        shutil.rmtree(self.agent.work_dir / sha256, ignore_errors=True)

    def _new_epoch(self, name: str) -> None:
        self._epoch[name] = self.agent.stats.model(name).snapshot()

    def _status_changed(self) -> None:
        self.agent._status_changed.set()


def _artifact_name(record: UpdateRecord) -> str:
    """``{dir}/{sha256}.{file}``: the TUF consistent-targets name of the artifact."""
    folder = record.target_path.rsplit("/", 1)[0]
    return f"{folder}/{record.sha256}.{record.file}"
