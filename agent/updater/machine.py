"""The update state machine: every state, every transition in one table, persisted atomically.

Modelled on Mender's update state machine: the state is written to disk *before* the step
it names runs, so a process that dies anywhere finds, at start-up, the step it was in and
either resumes it or rolls back::

    IDLE ─start─▶ DOWNLOADING ─▶ VERIFYING ─▶ VALIDATING ─▶ ACTIVATING ─▶ PROBATION ─▶ COMMITTED
      │               │              │             │              │             │          │
      └─fail─┐        └──────fail────┴─────────────┘        fail/restart   fail/restart    │
             ▼                       ▼                             ▼             ▼          │
           FAILED ◀──────────────────┘                        ROLLED_BACK ◀──────┘          │
             │                                                     │                        │
             └────────────────────────────▶ IDLE ◀─────────────────┴────────────────────────┘

A restart (``resume``) continues DOWNLOADING (from the partial file), VERIFYING and
VALIDATING; it turns ACTIVATING and PROBATION into ROLLED_BACK (the new model was never
committed, so the agent started on the old one); it finishes COMMITTED, FAILED and
ROLLED_BACK. After ``max_resumes`` restarts in one update (a crash loop) the update gives
up (``give_up``). A cap on transitions per update catches any other loop.

The whole updater state is one JSON file, ``{state_dir}/updates/state.json``, written with
tempfile + fsync + ``os.replace`` + fsync of the folder: the update in progress, the
installed version of each model (changed only on entering COMMITTED, in the same write) and
the targets refused for good.

Test hook (never for production): with ``EDGE_AGENT_CRASH_AT=<state>`` in the environment,
the process exits at once with status 137 (as if killed) right after persisting its entry
into ``<state>``. The crash-table tests use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import agent
from agent.errors import EdgeError, UpdateError
from agent.protocol import ErrorInfo, utc_now

log = logging.getLogger("agent.updater")

#: The test hook: exit with 137 right after persisting entry into this state.
CRASH_ENV = "EDGE_AGENT_CRASH_AT"
#: Transitions one update may take before it is declared a loop.
MAX_TRANSITIONS = 64
#: Refused targets remembered (oldest forgotten first).
MAX_REFUSED = 100


class State(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    VALIDATING = "validating"
    ACTIVATING = "activating"
    PROBATION = "probation"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class Trigger(StrEnum):
    START = "start"  # a new verified target to install
    DONE = "done"  # the step succeeded
    FAIL = "fail"  # the step failed, with a reason
    RESUME = "resume"  # the agent restarted and found this state
    GIVE_UP = "give_up"  # too many restarts in one update


S, T = State, Trigger

#: Every transition of the machine. Anything else is a bug and raises.
TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (S.IDLE, T.START): S.DOWNLOADING,
    (S.IDLE, T.FAIL): S.FAILED,  # refused before any download (unknown model, old agent)
    (S.DOWNLOADING, T.DONE): S.VERIFYING,
    (S.DOWNLOADING, T.FAIL): S.FAILED,
    (S.DOWNLOADING, T.RESUME): S.DOWNLOADING,
    (S.DOWNLOADING, T.GIVE_UP): S.FAILED,
    (S.VERIFYING, T.DONE): S.VALIDATING,
    (S.VERIFYING, T.FAIL): S.FAILED,
    (S.VERIFYING, T.RESUME): S.VERIFYING,
    (S.VERIFYING, T.GIVE_UP): S.FAILED,
    (S.VALIDATING, T.DONE): S.ACTIVATING,
    (S.VALIDATING, T.FAIL): S.FAILED,
    (S.VALIDATING, T.RESUME): S.VALIDATING,
    (S.VALIDATING, T.GIVE_UP): S.FAILED,
    (S.ACTIVATING, T.DONE): S.PROBATION,
    (S.ACTIVATING, T.FAIL): S.ROLLED_BACK,
    (S.ACTIVATING, T.RESUME): S.ROLLED_BACK,
    (S.ACTIVATING, T.GIVE_UP): S.ROLLED_BACK,
    (S.PROBATION, T.DONE): S.COMMITTED,
    (S.PROBATION, T.FAIL): S.ROLLED_BACK,
    (S.PROBATION, T.RESUME): S.ROLLED_BACK,
    (S.PROBATION, T.GIVE_UP): S.ROLLED_BACK,
    (S.COMMITTED, T.DONE): S.IDLE,
    (S.COMMITTED, T.RESUME): S.COMMITTED,
    (S.COMMITTED, T.GIVE_UP): S.IDLE,
    (S.FAILED, T.DONE): S.IDLE,
    (S.FAILED, T.RESUME): S.FAILED,
    (S.FAILED, T.GIVE_UP): S.IDLE,
    (S.ROLLED_BACK, T.DONE): S.IDLE,
    (S.ROLLED_BACK, T.RESUME): S.ROLLED_BACK,
    (S.ROLLED_BACK, T.GIVE_UP): S.IDLE,
}

#: States whose entry needs a reason (the protocol's ``failed`` and ``rolled_back``).
REASON_STATES = frozenset({S.FAILED, S.ROLLED_BACK})


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Installed(_Doc):
    """A model version installed by an update, the one the agent loads at start-up."""

    version: str
    sha256: str
    path: Path
    target_path: str
    rollout_id: str | None = None
    #: The config's path for this model when it was installed: an operator who changes it
    #: afterwards overrides the update.
    config_path: Path | None = None
    #: Older artifacts (sha256), newest first, kept for rollback.
    previous: list[str] = Field(default_factory=list)


class UpdateRecord(_Doc):
    """The update in progress: what is installed, why, and how far it got."""

    state: State
    model: str
    target_path: str
    file: str
    length: int
    hashes: dict[str, str]
    format: str
    rollout_id: str | None = None
    from_version: str | None = None
    to_version: str
    #: The sha256 of the artifact serving before (None: a model loaded from the config only).
    from_sha256: str | None = None
    resumes: int = 0
    transitions: int = 0
    reason: ErrorInfo | None = None
    started_at: datetime = Field(default_factory=utc_now)

    @property
    def sha256(self) -> str:
        return self.hashes["sha256"]


class Refusal(_Doc):
    """A target this device will not try again (until the director names another)."""

    model: str
    version: str
    code: str
    message: str
    at: datetime = Field(default_factory=utc_now)
    #: The agent that refused: an upgraded agent tries again.
    agent_version: str = agent.__version__


class UpdaterState(_Doc):
    """Everything the updater persists (``updates/state.json``)."""

    format_version: int = 1
    update: UpdateRecord | None = None
    installed: dict[str, Installed] = Field(default_factory=dict)
    refused: dict[str, Refusal] = Field(default_factory=dict)

    @property
    def state(self) -> State:
        return self.update.state if self.update is not None else State.IDLE


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one.

    Raises:
        OSError: the folder cannot be written.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_state(path: Path) -> UpdaterState:
    """The persisted state, or a fresh one when there is no file.

    A file that cannot be parsed is moved aside (``state.json.corrupt``) and a fresh state
    returned: the agent then serves what its config names, which is always safe.

    Raises:
        UpdateError: the file exists but cannot be read.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return UpdaterState()
    except OSError as exc:
        raise UpdateError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return UpdaterState.model_validate_json(raw)
    except ValidationError as exc:
        log.error("%s is corrupt (%s); it is moved aside", path, exc.errors()[0]["msg"])
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".corrupt"))
        return UpdaterState()


#: Called after each persisted transition with the record (for the ``update`` event).
Listener = Callable[[UpdateRecord], None]


class UpdateMachine:
    """The persisted machine. Not thread-safe: one updater thread drives it."""

    def __init__(self, path: Path, listener: Listener | None = None) -> None:
        """Load ``path`` (created on the first save).

        Raises:
            UpdateError: the state file exists but cannot be read.
        """
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data = load_state(path)
        self._listener = listener

    @property
    def state(self) -> State:
        return self.data.state

    @property
    def update(self) -> UpdateRecord | None:
        return self.data.update

    def start(self, record: UpdateRecord) -> None:
        """Begin ``record`` (IDLE → DOWNLOADING).

        Raises:
            UpdateError: an update is already in progress.
        """
        if self.data.update is not None:
            raise UpdateError(f"an update of {self.data.update.model} is in progress")
        self.data.update = record.model_copy(update={"state": State.IDLE})
        self.fire(Trigger.START)

    def refuse(self, record: UpdateRecord, reason: EdgeError) -> None:
        """Refuse ``record`` for good, before any download (IDLE → FAILED)."""
        self.data.update = record.model_copy(update={"state": State.IDLE})
        self.fire(Trigger.FAIL, reason, refuse=True)

    def fire(
        self,
        trigger: Trigger,
        reason: EdgeError | None = None,
        *,
        installed: Installed | None = None,
        refuse: bool = False,
    ) -> State:
        """Take the transition of ``trigger`` from the current state, persist it, report it.

        ``installed`` is written with the entry into COMMITTED (one atomic write);
        ``refuse`` remembers the target as refused for good. Entering IDLE ends the update.

        Raises:
            UpdateError: no such transition (a bug), or the state cannot be written.
        """
        record = self.data.update
        if record is None:
            raise UpdateError(f"no update in progress to {trigger}")
        target = TRANSITIONS.get((record.state, trigger))
        if target is None:
            raise UpdateError(f"no transition from {record.state} on {trigger}")
        looping = record.transitions >= MAX_TRANSITIONS and record.state not in _FINISHING
        if looping and target is not State.IDLE:
            reason = UpdateError("the update went round in a loop", code="state_loop")
            target = State.ROLLED_BACK if record.state in _LIVE else State.FAILED
        changes: dict[str, object] = {"state": target, "transitions": record.transitions + 1}
        if target in REASON_STATES and not (target is record.state and record.reason):
            err = reason or UpdateError(f"{trigger} from {record.state}")
            changes["reason"] = ErrorInfo(code=err.code, message=err.message)
        if trigger is Trigger.RESUME:
            changes["resumes"] = record.resumes + 1
        record = record.model_copy(update=changes)
        if refuse:
            self._remember_refusal(record)
        if installed is not None:
            self.data.installed[record.model] = installed
        self.data.update = None if target is State.IDLE else record
        self.save()
        log.info("update of %s to %s: %s", record.model, record.to_version, target)
        if os.environ.get(CRASH_ENV) == target.value:
            log.critical("%s=%s: exiting as if killed (test hook)", CRASH_ENV, target.value)
            logging.shutdown()
            os._exit(137)
        if self._listener is not None and target is not State.IDLE:
            self._listener(record)
        return target

    def _remember_refusal(self, record: UpdateRecord) -> None:
        reason = record.reason or ErrorInfo(code="refused", message="refused")
        refused = self.data.refused
        refused[record.sha256] = Refusal(
            model=record.model, version=record.to_version, code=reason.code, message=reason.message
        )
        while len(refused) > MAX_REFUSED:
            del refused[next(iter(refused))]

    def save(self) -> None:
        """Persist the whole state atomically.

        Raises:
            UpdateError: the state dir cannot be written.
        """
        payload = self.data.model_dump_json(indent=1).encode()
        try:
            write_atomically(self.path, payload)
        except OSError as exc:
            raise UpdateError(
                f"cannot write {self.path}: {exc.strerror or exc}", code="state_unwritable"
            ) from None


#: States in which the new model may be serving.
_LIVE = frozenset({State.ACTIVATING, State.PROBATION})
#: States whose step only finishes the update.
_FINISHING = frozenset({State.COMMITTED, State.FAILED, State.ROLLED_BACK})


def describe(data: UpdaterState) -> dict[str, object]:
    """A JSON-able summary of the persisted state (for diagnostics)."""
    summary: dict[str, object] = json.loads(data.model_dump_json())
    return summary
