"""Serve one decoded request on one model: the step shared by the CLI and the daemon.

:func:`serve_request` picks the path by payload kind (image → preprocess and
postprocess; tensors → checked, converted and run), and :class:`Reply` encodes the
protocol's response. The daemon's workers use :meth:`ServedModel.prepare` and
:meth:`ServedModel.run_feeds` directly when they micro-batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from agent.model import RunResult, ServedModel
from agent.protocol import InferRequest, Timing, encode_response
from agent.runtimes.base import Array


@dataclass(frozen=True)
class Reply:
    """A successful inference, ready to encode."""

    model: str
    model_version: str
    provider: str
    #: ``None`` when the bundle's postprocessing gives a ``result`` and the client did
    #: not ask for ``raw_outputs``.
    outputs: list[tuple[str, Array]] | None
    result: dict[str, Any] | None
    timing: Timing

    def encode(self, request_id: str | None, *, binary: bool = False) -> bytes:
        """The response payload (JSON, or ETNS when ``binary``)."""
        return encode_response(
            request_id=request_id,
            model=self.model,
            model_version=self.model_version,
            outputs=self.outputs,
            result=self.result,
            provider=self.provider,
            timing=self.timing,
            binary=binary,
        )

    def to_dict(self, *, full: bool = False) -> dict[str, Any]:
        """A JSON-able summary (``full`` lists every output value)."""
        outs = []
        for name, value in self.outputs or []:
            item: dict[str, Any] = {
                "name": name,
                "shape": list(value.shape),
                "dtype": str(value.dtype),
            }
            if full:
                item["data"] = value.ravel().tolist()
            outs.append(item)
        return {
            "model": self.model,
            "model_version": self.model_version,
            "provider": self.provider,
            "outputs": outs,
            "result": self.result,
            "timing_ms": self.timing.to_dict(),
        }


def run_request(model: ServedModel, request: InferRequest) -> RunResult:
    """Run ``request`` on ``model`` (image or tensors).

    Raises:
        BadInput: the tensors do not fit the model, or the image does not decode or the
            model takes no images.
        InferenceError: the runtime failed or produced NaN/Inf.
    """
    if request.image is not None:
        return model.infer_image(request.image)
    quantized = request.parameters.quantized
    result = model.infer([(t.name, t.array) for t in request.tensors], quantized=quantized)
    if model.postprocess is not None:
        return RunResult(
            result.outputs, result.inference_ms, model.postprocess_outputs(result.outputs)
        )
    return result


def make_reply(
    model: ServedModel, request: InferRequest, result: RunResult, queue_ms: float, started: float
) -> Reply:
    """Wrap ``result`` in a :class:`Reply`; ``started`` is the ``perf_counter`` at dequeue."""
    total = queue_ms + (time.perf_counter() - started) * 1000.0
    keep_outputs = result.result is None or request.parameters.raw_outputs
    return Reply(
        model=model.name,
        model_version=model.version,
        provider=model.provider,
        outputs=result.outputs if keep_outputs else None,
        result=result.result,
        timing=Timing(queue_ms, result.inference_ms, total),
    )


def serve_request(model: ServedModel, request: InferRequest, *, queue_ms: float = 0.0) -> Reply:
    """Run ``request`` on ``model`` and build its reply.

    Raises:
        BadInput, InferenceError: see :func:`run_request`.
    """
    started = time.perf_counter()
    return make_reply(model, request, run_request(model, request), queue_ms, started)
