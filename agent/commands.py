"""Operator commands on ``{prefix}/{device}/cmd``, answered on ``.../cmd/reply``.

A command is ``{"id", "command", "args", "ts"}``. Commands run one at a time on their
own thread (never on the network thread: ``reload`` loads models). The registry maps a
command name to a handler; each handler returns a JSON-able ``result`` or raises an
:class:`~agent.errors.EdgeError`, whose code and message become the reply's ``error``.

| command       | result                                                               |
|---------------|----------------------------------------------------------------------|
| `ping`        | `{"pong": true, "uptime_s": ...}`                                    |
| `reload`      | re-reads the config file: the models `added`, `removed`, `reloaded`, |
|               | `unchanged`, and `failed` (name -> error; the old version serves on) |
| `diagnostics` | what `edge-agent doctor` prints, plus each model's tensors and state |
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.errors import BadRequest, EdgeError
from agent.protocol import (
    Command,
    CommandReply,
    ErrorInfo,
    cmd_reply_topic,
    decode_document,
    utc_now,
)
from agent.transport import Message

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("agent.commands")

Handler = Callable[["Agent", dict[str, Any]], dict[str, Any]]


def _ping(agent: Agent, _args: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "uptime_s": round(agent.uptime_s, 3)}


def _reload(agent: Agent, _args: dict[str, Any]) -> dict[str, Any]:
    return agent.reload()


def _diagnostics(agent: Agent, _args: dict[str, Any]) -> dict[str, Any]:
    return agent.diagnostics()


#: command name -> handler. The one registry of operator commands.
COMMANDS: dict[str, Handler] = {
    "ping": _ping,
    "reload": _reload,
    "diagnostics": _diagnostics,
}

#: Commands waiting to run; more are refused with ``overloaded``.
MAX_PENDING = 16


class CommandRunner:
    """Takes commands from the network thread and runs them on one worker thread."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._queue: queue.Queue[Command | None] = queue.Queue(MAX_PENDING)
        self._thread = threading.Thread(target=self._work, name="commands", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(5.0)

    def on_message(self, msg: Message) -> None:
        """Network thread: parse and queue, or answer the error at once. Never raises."""
        try:
            cmd = decode_document(Command, msg.payload)
        except BadRequest as exc:
            self._reply(_recover_id(msg.payload), error=exc)
            return
        except Exception:
            log.exception("command on %s: unexpected error", msg.topic)
            return
        if cmd.command not in COMMANDS:
            known = ", ".join(sorted(COMMANDS))
            self._reply(
                cmd.id, error=BadRequest(f"unknown command {cmd.command!r} (known: {known})")
            )
            return
        try:
            self._queue.put_nowait(cmd)
        except queue.Full:
            self._reply(cmd.id, error=EdgeError("too many commands waiting", code="overloaded"))

    def _work(self) -> None:
        while True:
            cmd = self._queue.get()
            if cmd is None:
                return
            try:
                result = COMMANDS[cmd.command](self.agent, dict(cmd.args))
            except EdgeError as exc:
                self._reply(cmd.id, error=exc)
            except Exception as exc:
                log.exception("command %s failed", cmd.command)
                self._reply(cmd.id, error=EdgeError(f"{type(exc).__name__}: {exc}"))
            else:
                self._reply(cmd.id, result=result)

    def _reply(
        self, cmd_id: str, *, result: dict[str, Any] | None = None, error: EdgeError | None = None
    ) -> None:
        reply = CommandReply(
            id=cmd_id,
            ts=utc_now(),
            result=result,
            error=ErrorInfo(code=error.code, message=error.message) if error else None,
        )
        topic = cmd_reply_topic(self.agent.device_id, self.agent.prefix)
        self.agent.transport.publish(topic, reply.to_json(), qos=1, content_type="application/json")


def _recover_id(payload: bytes) -> str:
    import json

    try:
        doc = json.loads(payload)
        if isinstance(doc, dict) and isinstance(doc.get("id"), str) and doc["id"]:
            return str(doc["id"])[:128]
    except (ValueError, UnicodeDecodeError):
        pass
    return ""
