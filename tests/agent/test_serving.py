"""ModelSlot: ordering, micro-batching, overload, deadlines, errors, draining and the hot swap.

Real onnxruntime and LiteRT models throughout. :class:`GatedRuntime` wraps a real runtime
(the ``Runtime`` seam) to hold the worker inside a run while the test fills the queue,
and to record the batch size of every run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from agent.errors import ModelNotReady, Overloaded
from agent.loader import load_model
from agent.model import ServedModel
from agent.protocol import (
    ErrorReply,
    InferResponse,
    RequestParameters,
    decode_request,
    decode_response,
    encode_request,
)
from agent.runtimes.base import Array, ProviderAttempt, Runtime, TensorSpec
from agent.serving import Job, ModelSlot
from tests import modelgen

W, B = modelgen.affine_weights(3, 2)


class GatedRuntime:
    """A real runtime whose runs wait for :attr:`gate` and record their batch sizes."""

    format: ClassVar[str] = "onnx"

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[int] = []

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.inner.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.inner.outputs

    @property
    def provider(self) -> str:
        return self.inner.provider

    @property
    def attempts(self) -> tuple[ProviderAttempt, ...]:
        return self.inner.attempts

    def run(self, feeds: dict[str, Array]) -> list[Array]:
        self.batches.append(int(next(iter(feeds.values())).shape[0]))
        self.entered.set()
        assert self.gate.wait(10)
        return self.inner.run(feeds)

    def close(self) -> None:
        self.inner.close()

    def hold(self) -> None:
        """Make the next run wait (call :meth:`wait_entered`, then ``gate.set()``)."""
        self.entered.clear()
        self.gate.clear()

    def wait_entered(self) -> None:
        assert self.entered.wait(5), "the worker never started a run"


class Replies:
    """The ``send`` and ``record`` callables of a slot: what it answered, decoded."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[Job, InferResponse | ErrorReply, str]] = queue.Queue()
        self.records: list[tuple[float | None, str | None]] = []

    def send(self, job: Job, payload: bytes, content_type: str) -> None:
        self.q.put((job, decode_response(payload), content_type))

    def record(self, ms: float | None, code: str | None) -> None:
        self.records.append((ms, code))

    def take(self, n: int, timeout: float = 10.0) -> dict[str, InferResponse | ErrorReply]:
        """The next ``n`` replies, by request id."""
        got = {}
        for _ in range(n):
            job, reply, _ = self.q.get(timeout=timeout)
            assert job.request.id is not None and reply.id == job.request.id
            got[job.request.id] = reply
        return got


def job(rid: str, x: np.ndarray, *, deadline: float | None = None, **params: Any) -> Job:
    parameters = RequestParameters(**params) if params else None
    request = decode_request(encode_request([(None, x)], request_id=rid, parameters=parameters))
    return Job(request, f"replies/{rid}", time.monotonic(), deadline=deadline, qos=1)


def outputs(reply: InferResponse | ErrorReply) -> Array:
    assert isinstance(reply, InferResponse), reply
    return reply.outputs[0].array


@pytest.fixture
def replies() -> Replies:
    return Replies()


def load(path: Path, tmp_path: Path) -> ServedModel:
    return load_model(path, work_dir=tmp_path / "work").model


@pytest.fixture
def affine(tmp_path: Path) -> ServedModel:
    return load(modelgen.make_onnx_affine(tmp_path / "affine.onnx"), tmp_path)


def gated(model: ServedModel) -> tuple[ServedModel, GatedRuntime]:
    runtime = GatedRuntime(model.runtime)
    return ServedModel(name=model.name, version=model.version, runtime=runtime), runtime


@pytest.fixture
def slot(replies: Replies) -> Iterator[ModelSlot]:
    s = ModelSlot(name="m", send=replies.send, record=replies.record, queue_size=4)
    s.start()
    yield s
    s.stop(1.0)
    s.close()


def test_answers_in_order_with_exact_outputs(
    slot: ModelSlot, replies: Replies, affine: ServedModel
) -> None:
    slot.swap(affine)
    xs = [np.array([[i, 2 * i, -i]], np.float32) for i in range(4)]
    for i, x in enumerate(xs):
        slot.submit(job(f"r{i}", x))
    got = [replies.q.get(timeout=5) for _ in xs]
    assert [j.request.id for j, _, _ in got] == ["r0", "r1", "r2", "r3"]
    for x, (_, reply, ctype) in zip(xs, got, strict=True):
        assert ctype == "application/json"
        np.testing.assert_array_equal(outputs(reply), x @ W + B)
    assert [code for _, code in replies.records] == [None] * 4


def test_micro_batches_merge_up_to_max_batch_and_split_exactly(
    slot: ModelSlot, replies: Replies, affine: ServedModel
) -> None:
    model, runtime = gated(affine)
    slot.swap(model)
    slot.queue_size, slot.max_batch, slot.max_delay_ms = 64, 8, 50
    runtime.hold()
    slot.submit(job("first", np.ones((1, 3), np.float32)))
    runtime.wait_entered()
    xs = {f"r{i}": np.full((1 + i % 2, 3), i, np.float32) for i in range(11)}
    xs["wrong"] = np.ones((1, 4), np.float32)
    for rid, x in xs.items():
        slot.submit(job(rid, x))
    runtime.gate.set()
    got = replies.take(1 + len(xs))
    # The first run held one request; the next took 8 requests (12 rows), the last the 4
    # that were left, less "wrong", refused on its own before the run (4 rows).
    assert runtime.batches == [1, 12, 4]
    for rid, x in xs.items():
        if rid == "wrong":
            assert isinstance(got[rid], ErrorReply) and got[rid].code == "bad_input"  # type: ignore[union-attr]
        else:
            np.testing.assert_array_equal(outputs(got[rid]), x @ W + B)


def test_a_failing_batch_is_rerun_one_by_one(
    slot: ModelSlot, replies: Replies, tmp_path: Path
) -> None:
    model, runtime = gated(load(modelgen.make_onnx_log(tmp_path / "log.onnx"), tmp_path))
    slot.swap(model)
    slot.max_batch, slot.max_delay_ms = 4, 50
    runtime.hold()
    slot.submit(job("first", np.ones((1, 4), np.float32)))
    runtime.wait_entered()
    xs = {
        "a": np.full((1, 4), np.e, np.float32),
        "nan": -np.ones((1, 4), np.float32),
        "b": np.ones((1, 4), np.float32),
    }
    for rid, x in xs.items():
        slot.submit(job(rid, x))
    runtime.gate.set()
    got = replies.take(4)
    assert runtime.batches == [1, 3, 1, 1, 1]  # the merged run failed: each alone
    np.testing.assert_allclose(outputs(got["a"]), np.ones((1, 4)), rtol=1e-6)
    np.testing.assert_array_equal(outputs(got["b"]), np.zeros((1, 4)))
    err = got["nan"]
    assert isinstance(err, ErrorReply) and err.code == "internal"
    assert "produced NaN or Inf in output 'y'" in err.message
    assert sorted(str(c) for _, c in replies.records) == ["None"] * 3 + ["internal"]


def test_a_full_queue_refuses_at_once_and_queued_requests_still_run(
    slot: ModelSlot, replies: Replies, affine: ServedModel
) -> None:
    model, runtime = gated(affine)
    slot.swap(model)
    runtime.hold()
    slot.submit(job("busy", np.ones((1, 3), np.float32)))
    runtime.wait_entered()
    for i in range(4):
        slot.submit(job(f"q{i}", np.ones((1, 3), np.float32)))
    assert slot.queue_depth == 4
    t0 = time.perf_counter()
    with pytest.raises(Overloaded, match="4 requests waiting"):
        slot.submit(job("over", np.ones((1, 3), np.float32)))
    assert time.perf_counter() - t0 < 0.01
    runtime.gate.set()
    got = replies.take(5)
    assert all(isinstance(r, InferResponse) for r in got.values())


def test_a_request_whose_deadline_passed_in_the_queue_is_not_run(
    slot: ModelSlot, replies: Replies, affine: ServedModel
) -> None:
    model, runtime = gated(affine)
    slot.swap(model)
    runtime.hold()
    slot.submit(job("busy", np.ones((1, 3), np.float32)))
    runtime.wait_entered()
    slot.submit(job("late", np.ones((1, 3), np.float32), deadline=time.monotonic() + 0.02))
    slot.submit(job("in-time", np.ones((1, 3), np.float32), deadline=time.monotonic() + 60))
    time.sleep(0.05)
    runtime.gate.set()
    got = replies.take(3)
    late = got["late"]
    assert isinstance(late, ErrorReply) and late.code == "deadline_exceeded"
    assert "the deadline passed after" in late.message
    assert isinstance(got["in-time"], InferResponse)
    assert runtime.batches == [1, 1]  # "late" never reached the runtime
    assert "deadline_exceeded" in [c for _, c in replies.records]


def test_no_model_is_not_ready(slot: ModelSlot) -> None:
    with pytest.raises(ModelNotReady, match="'m' is loading"):
        slot.submit(job("r", np.ones((1, 3), np.float32)))


def test_stop_drains_within_its_bound_and_refuses_the_rest(
    replies: Replies, affine: ServedModel
) -> None:
    model, runtime = gated(affine)
    slot = ModelSlot(name="m", send=replies.send, record=replies.record, model=model)
    slot.start()
    runtime.hold()
    slot.submit(job("busy", np.ones((1, 3), np.float32)))
    runtime.wait_entered()
    for i in range(3):
        slot.submit(job(f"q{i}", np.ones((1, 3), np.float32)))
    assert slot.stop(0.05) == 3  # the run in flight outlives the bound
    left = replies.take(3)
    assert {r.code for r in left.values() if isinstance(r, ErrorReply)} == {"overloaded"}
    with pytest.raises(Overloaded, match="shutting down"):
        slot.submit(job("after", np.ones((1, 3), np.float32)))
    runtime.gate.set()
    assert isinstance(replies.take(1)["busy"], InferResponse)
    slot.close()


def test_hot_swap_under_load_answers_every_request(replies: Replies, tmp_path: Path) -> None:
    onnx = modelgen.make_onnx_affine(tmp_path / "v1.onnx")
    tflite = modelgen.make_tflite_fully_connected(tmp_path / "v2.tflite")  # same W and b
    slot = ModelSlot(
        name="m",
        send=replies.send,
        record=replies.record,
        queue_size=10_000,
        max_batch=4,
        max_delay_ms=0.5,
    )
    slot.swap(load(onnx, tmp_path))
    slot.start()
    n = 400
    xs = [np.array([[i % 7, -(i % 5), 0.25 * i]], np.float32) for i in range(n)]

    def submit_all() -> None:
        for i, x in enumerate(xs):
            slot.submit(job(f"r{i}", x))
            if i % 20 == 0:
                time.sleep(0.001)

    feeder = threading.Thread(target=submit_all)
    feeder.start()
    versions = set()
    for i in range(6):  # swap back and forth while requests flow; close the old at once
        new = load(tflite if i % 2 == 0 else onnx, tmp_path / str(i))
        versions.add(new.version)
        old = slot.swap(new)
        assert old is not None
        old.close()
    feeder.join()
    got = replies.take(n, timeout=30)
    slot.stop(5.0)
    slot.close()
    for i, x in enumerate(xs):
        reply = got[f"r{i}"]
        assert isinstance(reply, InferResponse), reply  # never "the runtime was closed"
        np.testing.assert_allclose(reply.outputs[0].array, x @ W + B, rtol=1e-6)
    served = {r.model_version for r in got.values() if isinstance(r, InferResponse)}
    assert len(served) >= 2 and served <= versions | {"sha256:" + _digest(onnx)[:12]}
    assert all(code is None for _, code in replies.records)


def _digest(path: Path) -> str:
    from agent.bundle import sha256_file

    return sha256_file(path)


def test_fast_idle_models_run_inline_on_the_calling_thread(
    slot: ModelSlot, replies: Replies, affine: ServedModel
) -> None:
    model, runtime = gated(affine)
    slot.swap(model)
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    assert not slot.try_inline(job("first", x))  # no timing yet: the worker runs it
    slot.submit(job("first", x))
    replies.take(1)
    caller = threading.get_ident()
    ran_on: list[int] = []
    slot.send = lambda j, p, c: (ran_on.append(threading.get_ident()), replies.send(j, p, c))  # type: ignore[assignment,func-returns-value]
    assert slot.try_inline(job("inline", x))  # answered before try_inline returns
    np.testing.assert_array_equal(outputs(replies.take(1)["inline"]), x @ W + B)
    assert ran_on == [caller]
    # A busy worker, micro-batching, or a slow model: the job goes to the queue instead.
    runtime.hold()
    slot.submit(job("held", x))
    runtime.wait_entered()
    assert not slot.try_inline(job("while-busy", x))
    runtime.gate.set()
    replies.take(1)
    slot.max_batch = 8
    assert not slot.try_inline(job("batching", x))
    slot.max_batch, slot.inline_below_ms = 1, 0.0
    assert not slot.try_inline(job("off", x))
