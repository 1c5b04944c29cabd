#!/usr/bin/env python3
"""The floor: the least a Python process must do to serve an inference over MQTT.

One paho client (MQTT 5, TCP_NODELAY), one thread: ``loop_forever`` reads a request,
``np.frombuffer`` cuts the payload into the model's inputs (or ``cv2`` decodes and
preprocesses a JPEG), the session runs inline on that same thread, and the raw bytes
of every output go back to the request's Response Topic with its Correlation Data, at
the request's QoS. No queue, no validation, no batching, no JSON: whatever the agent
spends above this on the same broker and the same model is its overhead.

Run by :mod:`daemon_e2e` (not meant to be started by hand)::

    mqtt_floor.py --port P --threads N --spec '[{"name": "cls", "path": ..., ...}]'

Each spec entry serves ``floor/{name}``. Kinds:

- ``tensors``: ``inputs`` lists ``{name, shape, dtype}`` in payload order (the payload is
  their raw bytes, concatenated); ``constants`` maps input names to ``{value, dtype}``.
- ``jpeg``: an encoded image, resized to ``width`` x ``height`` (stretch, linear), RGB,
  ``pixel * scale - mean``, NHWC float32, for the model's only input.

Prints ``ready`` on stdout once subscribed; SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: A model call: the inputs by name -> the outputs, in the model's order.
Run = Callable[[dict[str, Any]], list[Any]]
#: A request handler: payload -> reply payload.
Handler = Callable[[bytes | bytearray], bytes]


def onnx_runner(path: str, threads: int) -> tuple[Run, list[str]]:
    """An onnxruntime session built with the agent's own session options."""
    import onnxruntime as ort

    from agent.runtimes import ProviderSpec, RuntimeOptions
    from agent.runtimes.onnx import build_session_options

    options = RuntimeOptions(providers=(ProviderSpec("cpu"),), intra_op_threads=threads)
    session = ort.InferenceSession(
        path, build_session_options(options), providers=["CPUExecutionProvider"]
    )

    def run(feeds: dict[str, Any]) -> list[Any]:
        return list(session.run(None, feeds))

    return run, [i.name for i in session.get_inputs()]


def tflite_runner(path: str, threads: int) -> tuple[Run, list[str]]:
    """A LiteRT interpreter on XNNPACK (its default delegate), as the agent builds it."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path, num_threads=threads)
    interp.allocate_tensors()
    ins = [(d["name"], d["index"]) for d in interp.get_input_details()]
    outs = [d["index"] for d in interp.get_output_details()]

    def run(feeds: dict[str, Any]) -> list[Any]:
        for name, index in ins:
            interp.set_tensor(index, feeds[name])
        interp.invoke()
        return [interp.get_tensor(i) for i in outs]

    return run, [name for name, _ in ins]


def tensor_handler(spec: dict[str, Any], run: Run) -> Handler:
    """Raw concatenated input bytes in, raw concatenated output bytes out."""
    cuts = []
    offset = 0
    for inp in spec["inputs"]:
        dtype = np.dtype(inp["dtype"])
        count = math.prod(inp["shape"])
        cuts.append((inp["name"], dtype, count, offset, tuple(inp["shape"])))
        offset += count * dtype.itemsize
    constants = {
        k: np.asarray(v["value"], dtype=v["dtype"]) for k, v in spec.get("constants", {}).items()
    }

    def handle(payload: bytes | bytearray) -> bytes:
        feeds = dict(constants)
        for name, dtype, count, at, shape in cuts:
            feeds[name] = np.frombuffer(payload, dtype, count, at).reshape(shape)
        return b"".join(o.tobytes() for o in run(feeds))

    return handle


def jpeg_handler(spec: dict[str, Any], run: Run, input_name: str) -> Handler:
    """JPEG in (decoded and preprocessed with cv2 here), raw output bytes out."""
    size = (int(spec["width"]), int(spec["height"]))
    scale, mean = np.float32(spec["scale"]), np.float32(spec["mean"])

    def handle(payload: bytes | bytearray) -> bytes:
        img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None, "the JPEG does not decode"
        img = cv2.cvtColor(cv2.resize(img, size, interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
        x = img.astype(np.float32)
        x *= scale
        x -= mean
        return b"".join(o.tobytes() for o in run({input_name: x[None]}))

    return handle


def build_handlers(specs: list[dict[str, Any]], threads: int) -> dict[str, Handler]:
    """``floor/{name}`` -> its handler, for every spec entry."""
    handlers = {}
    for spec in specs:
        loader = tflite_runner if spec["path"].endswith(".tflite") else onnx_runner
        run, input_names = loader(spec["path"], threads)
        if spec["kind"] == "jpeg":
            handler = jpeg_handler(spec, run, input_names[0])
        else:
            handler = tensor_handler(spec, run)
        handlers[f"floor/{spec['name']}"] = handler
    return handlers


def serve(port: int, handlers: dict[str, Handler]) -> None:
    """Answer requests until SIGTERM, all on this thread."""
    client = paho.Client(CallbackAPIVersion.VERSION2, "edge-floor", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)

    def on_socket_open(_c: paho.Client, _u: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_connect(c: paho.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        c.subscribe([(topic, 1) for topic in handlers])

    def on_subscribe(_c: paho.Client, _u: Any, _mid: int, _rc: Any, _p: Any) -> None:
        print("ready", flush=True)

    def on_message(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        reply = handlers[msg.topic](msg.payload)
        request = msg.properties
        assert request is not None  # MQTT 5: always there
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = getattr(request, "CorrelationData", None)
        c.publish(getattr(request, "ResponseTopic", ""), reply, msg.qos, properties=props)

    client.on_socket_open = on_socket_open
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--spec", required=True, help="JSON list of models (see the module doc)")
    args = parser.parse_args()
    serve(args.port, build_handlers(json.loads(args.spec), args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
