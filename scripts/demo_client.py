#!/usr/bin/env python3
"""A small MQTT client for the demo: sends real requests to a running agent, prints replies.

    demo_client.py --port PORT --device ID --models DIR

Uses paho-mqtt with MQTT 5 (Response Topic + Correlation Data) and the project's own
protocol codecs (``agent.protocol.encode_request`` / ``decode_response``).
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

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.protocol import ErrorReply, decode_response, encode_request


class Client:
    def __init__(self, port: int, device: str) -> None:
        self.device = device
        self.replies: queue.Queue[tuple[bytes, bytes]] = queue.Queue()
        self.reply_topic = f"edge/{device}/infer/demo/reply/{uuid.uuid4().hex[:8]}"
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = lambda _c, _u, m: self.replies.put(
            (m.properties.CorrelationData, m.payload)
        )
        # Without TCP_NODELAY, Nagle's algorithm holds small requests back ~40 ms.
        self.c.on_socket_open = lambda _c, _u, sock: sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(self.reply_topic, qos=1)
        self.c.loop_start()
        time.sleep(0.2)

    def ask(
        self, model: str, payload: bytes, content_type: str | None = None
    ) -> tuple[float, object]:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        cid = uuid.uuid4().bytes
        props.CorrelationData = cid
        if content_type:
            props.ContentType = content_type
        t0 = time.perf_counter()
        self.c.publish(f"edge/{self.device}/infer/{model}", payload, qos=1, properties=props)
        while True:
            got, body = self.replies.get(timeout=10)
            if got == cid:
                return (time.perf_counter() - t0) * 1000, decode_response(body)


def text_png(text: str, upside_down: bool) -> bytes:
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_DUPLEX, 1.2, 2)
    img = np.full((h + base + 20, w + 20, 3), 255, np.uint8)
    cv2.putText(img, text, (10, h + 10), cv2.FONT_HERSHEY_DUPLEX, 1.2, (0, 0, 0), 2, cv2.LINE_AA)
    if upside_down:
        img = cv2.rotate(img, cv2.ROTATE_180)
    return cv2.imencode(".png", img)[1].tobytes()


def show(what: str, ms: float, reply: object) -> None:
    if isinstance(reply, ErrorReply):
        print(f"    {what:<44} {ms:7.2f} ms  error {reply.code}: {reply.message}")
        return
    detail = ""
    result = reply.result  # type: ignore[attr-defined]
    if result is not None and "classes" in result:
        top = result["classes"][0]
        detail = f"-> {top['label']} ({top['score']:.3f})"
    elif result is not None:
        boxes = [f"{d['label']} {d['score']:.2f} at {d['box']}" for d in result["detections"]]
        detail = "-> " + ("; ".join(boxes) or "no detections")
    else:
        name, arr = reply.outputs[0].name, reply.outputs[0].array  # type: ignore[attr-defined]
        detail = f"-> {name} {list(arr.shape)} max {float(arr.max()):.3f}"
    print(f"    {what:<44} {ms:7.2f} ms  {detail}  [{reply.provider}]")  # type: ignore[attr-defined]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--face", default="", help="a JPEG with a face (optional)")
    args = p.parse_args()
    c = Client(args.port, args.device)
    lines = (("edge fleet rollout", False), ("hello world", True), ("Total amount 19.99", False))
    for text, flip in lines:
        what = f"text-direction  PNG '{text}'{' upside down' if flip else ''}"
        show(what, *c.ask("text-direction", text_png(text, flip)))
    rng = np.random.default_rng(1)
    vad = encode_request(
        [
            ("input", (rng.standard_normal((1, 576)) * 0.01).astype(np.float32)),
            ("state", np.zeros((2, 1, 128), np.float32)),
            ("sr", np.array(16000, np.int64)),
        ],
        binary=True,
    )
    show("vad             ETNS binary tensors (quiet noise)", *c.ask("vad", vad))
    if args.face:
        jpeg = Path(args.face).read_bytes()
        show("face            JPEG photo (astronaut, 512x512)", *c.ask("face", jpeg, "image/jpeg"))
    noise = np.random.default_rng(2).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    png = cv2.imencode(".png", noise)[1].tobytes()
    show("face            PNG of noise (no face)", *c.ask("face", png))
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 4), np.float32))
    show(
        "face            .npy of the wrong shape",
        *c.ask("face", buf.getvalue(), "application/x-npy"),
    )
    ask = b'{"id": "r-9", "inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}'
    show("nope            (no such model)", *c.ask("nope", ask))
    c.c.loop_stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
