"""Model slots: a bounded queue and one worker thread per model, micro-batching, hot swap.

A :class:`ModelSlot` owns the model a name serves. The MQTT network thread only
decodes and calls :meth:`ModelSlot.submit`, which either queues the job or raises at
once (``overloaded``, ``model_not_ready``), so the transport keeps reading while models
run. The worker takes jobs in order, drops the ones whose deadline passed, gathers a
micro-batch when the model's batch dimension is dynamic, runs it, and hands each reply
to the ``send`` callable.

Hot swap: :meth:`ModelSlot.swap` replaces the model between two batches. A batch in
flight finishes on the old model; the next one runs on the new one; the old model is
closed only after that. No request fails or goes unanswered because of a swap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import EdgeError, ModelNotReady, Overloaded, protocol_code
from agent.model import RunResult, ServedModel
from agent.protocol import InferRequest, encode_exception
from agent.runtimes.base import Array
from agent.serve_request import make_reply, run_request

log = logging.getLogger("agent.serving")


@dataclass(eq=False)
class Job:
    """One request waiting for its model."""

    request: InferRequest
    #: Where the reply goes (None: nowhere to answer, count it only).
    reply_topic: str | None
    received_at: float  # time.monotonic()
    deadline: float | None = None  # time.monotonic() value
    correlation_data: bytes | None = None
    qos: int = 0


#: Publishes a reply: (job, payload, content type). Must not raise.
Send = Callable[[Job, bytes, str], None]
#: Records the outcome of one request: (latency ms or None, error code or None).
Record = Callable[[float | None, str | None], None]

JSON = "application/json"
ETNS = "application/x-edge-tensors"


@dataclass
class SlotState:
    """What ``status`` shows for a slot."""

    state: str = "loading"  # loading | validating | ready | failed
    error: dict[str, str] | None = None


@dataclass
class ModelSlot:
    """The serving end of one model name. Thread-safe."""

    name: str
    send: Send
    record: Record = lambda _ms, _code: None
    queue_size: int = 64
    max_batch: int = 1
    max_delay_ms: float = 2.0
    #: Run a tensor request on the network thread itself when the slot is idle and the
    #: model's recent inferences took less than this (ms); 0 turns it off. It saves the
    #: two thread hand-offs that dominate the latency of sub-millisecond models.
    inline_below_ms: float = 3.0
    model: ServedModel | None = None
    status: SlotState = field(default_factory=SlotState)
    _queue: deque[Job] = field(default_factory=deque, init=False, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)
    _busy: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _stopping: bool = field(default=False, init=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    #: ``time.monotonic()`` when the batch in flight started, or None when idle.
    in_flight_since: float | None = field(default=None, init=False)
    #: Moving average of the inference time (ms), for the inline decision.
    _recent_ms: float | None = field(default=None, init=False, repr=False)

    # --- lifetime --------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name=f"worker-{self.name}", daemon=True
            )
            self._thread.start()

    def stop(self, drain_timeout_s: float) -> int:
        """Stop taking jobs, let queued ones finish within the bound, stop the worker.

        Returns the number of jobs still queued at the deadline, which are answered
        ``overloaded`` ("the agent is shutting down") before returning.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + drain_timeout_s
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        for job in left:
            self._answer_error(job, Overloaded("the agent is shutting down"))
        return len(left)

    def close(self) -> None:
        """Close the model (after :meth:`stop`)."""
        with self._busy:
            if self.model is not None:
                self.model.close()
                self.model = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def provider(self) -> str:
        model = self.model
        return model.provider if model is not None else ""

    # --- the network thread's side -----------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse it at once.

        Raises:
            ModelNotReady: no model is serving (loading, validating or failed).
            Overloaded: the queue is full, or the agent is shutting down.
        """
        if self.model is None:
            raise ModelNotReady(f"model {self.name!r} is {self.status.state}")
        with self._cond:
            if self._stopping:
                raise Overloaded("the agent is shutting down")
            if len(self._queue) >= self.queue_size:
                raise Overloaded(f"model {self.name!r} has {self.queue_size} requests waiting")
            self._queue.append(job)
            self._cond.notify()

    def try_inline(self, job: Job) -> bool:
        """Run ``job`` now, on the calling (network) thread, if that is cheap and safe.

        Only when the slot is idle (nothing queued, no batch in flight), the model is
        fast (recent inferences under ``inline_below_ms``), the request carries tensors
        (an image's decoding is not cheap) and micro-batching is off. Returns True when
        the job was run and answered; False means: queue it with :meth:`submit`.
        """
        limit = self.inline_below_ms
        recent = self._recent_ms
        if (
            limit <= 0
            or recent is None
            or recent > limit
            or self.max_batch > 1
            or job.request.image is not None
            or self._queue
            or self._stopping
            or self.model is None
        ):
            return False
        if not self._busy.acquire(blocking=False):  # the worker is running a batch
            return False
        try:
            if self._queue:  # a job came in meanwhile: keep the queue's order
                return False
            self.in_flight_since = time.monotonic()
            try:
                self._run_batch([job])
            except Exception:  # never let the network thread die
                log.exception("model %s: unexpected error running inline", self.name)
            return True
        finally:
            self.in_flight_since = None
            self._busy.release()

    # --- hot swap ------------------------------------------------------------------------

    def swap(self, new: ServedModel) -> ServedModel | None:
        """Serve ``new`` from the next batch on; return the old model, no longer in use.

        The caller decides whether to close the old model (keep it for a rollback).
        """
        old = self.model
        self.model = new
        self.status = SlotState("ready")
        with self._busy:  # waits for a batch in flight on the old model
            pass
        return old

    # --- the worker --------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
        model = self.model
        if (
            self.max_batch > 1
            and model is not None
            and model.batch_dynamic
            and batch[0].request.image is None
        ):
            until = time.monotonic() + self.max_delay_ms / 1000.0
            with self._cond:
                while len(batch) < self.max_batch:
                    if not self._queue:
                        remaining = until - time.monotonic()
                        if remaining <= 0 or self._stopping:
                            break
                        self._cond.wait(remaining)
                        continue
                    if self._queue[0].request.image is not None:
                        break
                    batch.append(self._queue.popleft())
        return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            with self._busy:
                self.in_flight_since = time.monotonic()
                try:
                    self._run_batch(batch)
                except Exception:  # never let the worker die
                    log.exception("model %s: unexpected error in the worker", self.name)
                finally:
                    self.in_flight_since = None

    def _run_batch(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live: list[Job] = []
        for job in batch:
            if job.deadline is not None and now >= job.deadline:
                waited = (now - job.received_at) * 1000.0
                self._answer_error(job, _deadline(waited))
            else:
                live.append(job)
        model = self.model
        if not live:
            return
        if model is None:
            for job in live:
                self._answer_error(
                    job, ModelNotReady(f"model {self.name!r} is {self.status.state}")
                )
            return
        if len(live) > 1:
            self._run_merged(model, live)
        else:
            self._run_one(model, live[0])

    def _run_one(self, model: ServedModel, job: Job) -> None:
        started = time.perf_counter()
        queue_ms = (time.monotonic() - job.received_at) * 1000.0
        try:
            result = run_request(model, job.request)
            self._note_time(result.inference_ms)
            self._answer(model, job, result, queue_ms, started)
        except Exception as exc:
            self._answer_error(job, exc)

    def _note_time(self, ms: float) -> None:
        recent = self._recent_ms
        self._recent_ms = ms if recent is None else 0.8 * recent + 0.2 * ms

    def _run_merged(self, model: ServedModel, jobs: list[Job]) -> None:
        """Run compatible jobs as one batch; incompatible or bad ones run on their own."""
        groups: dict[tuple[Any, ...], list[tuple[Job, dict[str, Array]]]] = {}
        for job in jobs:
            try:
                feeds = model.prepare(
                    [(t.name, t.array) for t in job.request.tensors],
                    quantized=job.request.parameters.quantized,
                )
            except Exception as exc:
                self._answer_error(job, exc)
                continue
            shapes = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(feeds.items()))
            key = (job.request.parameters.quantized, *shapes)
            groups.setdefault(key, []).append((job, feeds))
        for members in groups.values():
            if len(members) == 1:
                self._run_one(model, members[0][0])
                continue
            self._run_group(model, members)

    def _run_group(self, model: ServedModel, members: list[tuple[Job, dict[str, Array]]]) -> None:
        started = time.perf_counter()
        quantized = members[0][0].request.parameters.quantized
        sizes = [next(iter(feeds.values())).shape[0] for _, feeds in members]
        merged = {k: np.concatenate([f[k] for _, f in members]) for k in members[0][1]}
        try:
            result = model.run_feeds(merged, quantized=quantized)
        except Exception:
            for job, _ in members:  # find the culprit: run them one by one
                self._run_one(model, job)
            return
        total = sum(sizes)
        if any(v.ndim == 0 or v.shape[0] != total for _, v in result.outputs):
            for job, _ in members:
                self._run_one(model, job)
            return
        offsets = np.cumsum([0, *sizes])
        for i, (job, _) in enumerate(members):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            outs = [(name, v[lo:hi]) for name, v in result.outputs]
            part = RunResult(outs, result.inference_ms, model.postprocess_outputs(outs))
            queue_ms = (time.monotonic() - job.received_at) * 1000.0
            self._answer(model, job, part, queue_ms, started)

    def _answer(
        self, model: ServedModel, job: Job, result: RunResult, queue_ms: float, started: float
    ) -> None:
        reply = make_reply(model, job.request, result, queue_ms, started)
        binary = job.request.parameters.binary_outputs
        try:
            payload = reply.encode(job.request.id, binary=binary)
        except EdgeError as exc:
            self._answer_error(job, exc)
            return
        self.record((time.monotonic() - job.received_at) * 1000.0, None)
        if job.reply_topic is not None:
            self.send(job, payload, ETNS if binary else JSON)

    def _answer_error(self, job: Job, exc: BaseException) -> None:
        code = protocol_code(exc)
        if code == "internal":
            log.warning("model %s: request %s failed: %s", self.name, job.request.id, exc)
        self.record(None, code)
        if job.reply_topic is not None:
            self.send(job, encode_exception(job.request.id, exc), JSON)


def _deadline(waited_ms: float) -> EdgeError:
    from agent.errors import DeadlineExceeded

    return DeadlineExceeded(f"the deadline passed after {waited_ms:.1f} ms in the queue")
