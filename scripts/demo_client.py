#!/usr/bin/env python3
"""An inference client for the demo: sends real requests to an agent over MQTT and prints
what comes back.

    demo_client.py --port PORT --device ID --image photo.jpg [--model face]   # one request
    demo_client.py --port PORT --device ID --tour [--face photo.jpg]          # the demo's tour
    ... [--mqtt 3.1.1]     for a broker without MQTT 5 (the demo's amqtt fallback)

MQTT 5: each request carries a Response Topic of this client's own and a Correlation Data.
MQTT 3.1.1 has neither, and an image cannot carry ``reply_to`` in its body, so requests go
one at a time and the answer is the next message on the default reply topic
``edge/{device}/infer/{model}/reply`` (PROTOCOL.md). Uses paho-mqtt and the project's own
codecs (``agent.protocol``).
"""

from __future__ import annotations

import argparse
import io
import queue
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_bundles import text_png

from agent.protocol import ErrorReply, InferResponse, decode_response


class Client:
    """One paho client talking to one device (see the module docstring)."""

    def __init__(self, port: int, device: str, protocol: str = "5") -> None:
        self.device = device
        self.v5 = protocol == "5"
        self.replies: queue.Queue[tuple[str, bytes | None, bytes]] = queue.Queue()
        self.reply_topic = f"demo/replies/{uuid.uuid4().hex[:8]}"
        version = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=version)
        self.c.on_message = lambda _c, _u, m: self.replies.put(
            (m.topic, getattr(m.properties, "CorrelationData", None), bytes(m.payload))
        )
        self.c.on_socket_open = _no_delay
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        topic = self.reply_topic if self.v5 else f"edge/{device}/infer/+/reply"
        self.c.subscribe(topic, qos=1)
        time.sleep(0.2)

    def ask(
        self, model: str, payload: bytes, content_type: str | None = None, timeout: float = 10
    ) -> tuple[float, InferResponse | ErrorReply]:
        """Send one request; (milliseconds to the answer, the decoded answer).

        Raises:
            TimeoutError: no answer within ``timeout`` seconds.
        """
        topic = f"edge/{self.device}/infer/{model}"
        cid = uuid.uuid4().bytes
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = cid
            if content_type:
                props.ContentType = content_type
        t0 = time.perf_counter()
        self.c.publish(topic, payload, qos=1, properties=props)
        deadline = t0 + timeout
        while True:
            try:
                got_topic, got_cid, body = self.replies.get(timeout=deadline - time.perf_counter())
            except (queue.Empty, ValueError):
                raise TimeoutError(f"no answer from {self.device} within {timeout} s") from None
            if (self.v5 and got_cid == cid) or (not self.v5 and got_topic == f"{topic}/reply"):
                return (time.perf_counter() - t0) * 1000, decode_response(body)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Without TCP_NODELAY, Nagle's algorithm holds small requests back ~40 ms."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def describe(reply: InferResponse | ErrorReply) -> str:
    """One line: the classes, the detections, the first output, or the error."""
    if isinstance(reply, ErrorReply):
        return f"error {reply.code}: {reply.message}"
    result: dict[str, Any] | None = reply.result
    if result is not None and "classes" in result:
        top = result["classes"][0]
        detail = f"{top['label']} ({top['score']:.3f})"
    elif result is not None:
        boxes = [f"{d['label']} {d['score']:.2f} at {d['box']}" for d in result["detections"]]
        detail = "; ".join(boxes) or "no detections"
    else:
        name, arr = reply.outputs[0].name, reply.outputs[0].array
        detail = f"{name} {list(arr.shape)} max {float(arr.max()):.3f}"
    return f"{detail}  [{reply.model} {reply.model_version} on {reply.provider}]"


def tour(c: Client, face: Path | None) -> None:
    """The demo's requests: text lines, a photo, noise, a wrong tensor, an unknown model."""

    def show(what: str, ms: float, reply: InferResponse | ErrorReply) -> None:
        print(f"    {what:<46} {ms:7.2f} ms  -> {describe(reply)}", flush=True)

    lines = (("edge fleet rollout", False), ("hello world", True), ("Total amount 19.99", False))
    for text, flip in lines:
        what = f"text-direction  PNG '{text}'{' upside down' if flip else ''}"
        show(what, *c.ask("text-direction", text_png(text, flip), "image/png"))
    if face is not None:
        show(
            "face            JPEG photo (astronaut)",
            *c.ask("face", face.read_bytes(), "image/jpeg"),
        )
    noise = np.random.default_rng(2).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    show(
        "face            PNG of noise (no face)",
        *c.ask("face", cv2.imencode(".png", noise)[1].tobytes()),
    )
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 4), np.float32))
    show(
        "face            .npy of the wrong shape",
        *c.ask("face", buf.getvalue(), "application/x-npy"),
    )
    ask = b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}'
    show("nope            (no such model)", *c.ask("nope", ask, "application/json"))


def main() -> int:
    p = argparse.ArgumentParser(description="Send requests to an edge agent over MQTT.")
    p.add_argument("--port", type=int, default=1883, help="the broker on 127.0.0.1")
    p.add_argument("--device", required=True)
    p.add_argument("--mqtt", choices=["5", "3.1.1"], default="5", help="MQTT version")
    p.add_argument("--image", type=Path, help="send this image and print the answer")
    p.add_argument("--model", default="face", help="the model --image goes to (face)")
    p.add_argument("--tour", action="store_true", help="the demo's series of requests")
    p.add_argument("--face", type=Path, help="a photo with a face, for --tour")
    args = p.parse_args()
    c = Client(args.port, args.device, args.mqtt)
    try:
        if args.image is not None:
            ms, reply = c.ask(args.model, args.image.read_bytes())
            print(f"{describe(reply)}  ({ms:.1f} ms)")
            return 1 if isinstance(reply, ErrorReply) else 0
        if args.tour:
            tour(c, args.face)
            return 0
        p.error("give --image FILE or --tour")
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        c.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
