#!/usr/bin/env python3
"""The local demo: a broker, an edge agent serving real models, and a client talking to it.

Run it through ``scripts/demo`` (which installs what is missing first). It:
1. runs ``edge-agent infer`` once on a real model, locally;
2. starts Mosquitto on a free local port with its own config (not the system's);
3. builds a bundle of PP-OCR's text-direction classifier (image in, label out);
4. starts ``edge-agent run`` with that bundle, silero VAD and MediaPipe BlazeFace;
5. sends requests over MQTT (an image, a .npy array, binary tensors) and prints replies;
6. prints one-liners to try by hand, and keeps running until Ctrl-C (or ``--once``).

Ctrl-C stops everything it started; nothing is left running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from fetch_models import cache_root, fetch  # noqa: E402

DEVICE = "demo-cam-01"


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        sys.exit("demo: mosquitto is not installed (scripts/setup installs it with apt-get)")
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "set_tcp_nodelay true\nmax_queued_messages 10000\nmax_inflight_messages 200\n"
        f"log_dest file {work / 'mosquitto.log'}\n"
    )
    proc = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    import socket

    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    sys.exit("demo: mosquitto did not start (see mosquitto.log)")


def text_image(text: str, upside_down: bool = False) -> bytes:
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_DUPLEX, 1.2, 2)
    img = np.full((h + base + 20, w + 20, 3), 255, np.uint8)
    cv2.putText(img, text, (10, h + 10), cv2.FONT_HERSHEY_DUPLEX, 1.2, (0, 0, 0), 2, cv2.LINE_AA)
    if upside_down:
        img = cv2.rotate(img, cv2.ROTATE_180)
    ok, png = cv2.imencode(".png", img)
    assert ok
    return png.tobytes()


def build_text_direction_bundle(models: Path, dest: Path) -> Path:
    """PP-OCR's classifier as a bundle: PNG/JPEG in, ``0°``/``180°`` out, with a golden vector."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(models / "ppocr_cls.onnx", dest / "model.onnx")
    (dest / "upright.png").write_bytes(text_image("edge fleet 2026"))
    manifest = {
        "name": "text-direction",
        "version": "1.0.0",
        "format": "onnx",
        "model": "model.onnx",
        "description": "PP-OCR mobile v2 text-line direction classifier (0 or 180 degrees)",
        "preprocessing": {
            "kind": "image",
            "width": 192,
            "height": 48,
            "resize": "letterbox",
            "pad_value": 128,
            "color": "rgb",
            "scale": 1 / 255,
            "mean": 0.5,
            "std": 0.5,
            "layout": "nchw",
        },
        "postprocessing": {"kind": "classification", "top_k": 2, "labels": ["0°", "180°"]},
        "golden": [{"name": "upright", "image": "upright.png", "top_label": "0°"}],
    }
    (dest / "model.yaml").write_text(yaml.safe_dump(manifest, allow_unicode=True))
    return dest


FACE_BUNDLE = {
    "name": "face",
    "version": "1.0.0",
    "format": "tflite",
    "model": "face_detection_short_range.tflite",
    "description": "MediaPipe BlazeFace (short range) face detector",
    "preprocessing": {
        "kind": "image", "width": 128, "height": 128, "resize": "letterbox", "pad_value": 0,
        "color": "rgb", "scale": 1 / 127.5, "mean": 1.0, "layout": "nhwc",
    },
    "postprocessing": {
        "kind": "detection", "decoder": "ssd", "labels": ["face"], "score_threshold": 0.5,
        "iou_threshold": 0.3,
        "anchors": {"input_size": 128, "strides": [8, 16, 16, 16], "boxes_output": "regressors",
                    "scores_output": "classificators", "box_scale": 128},
    },
}  # fmt: skip


def build_face_bundle(models: Path, dest: Path) -> Path:
    """BlazeFace as a bundle: an image in, face boxes (original pixels) out."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(models / "face_detection_short_range.tflite", dest)
    (dest / "model.yaml").write_text(yaml.safe_dump(FACE_BUNDLE))
    return dest


def face_jpeg(dest: Path) -> Path | None:
    """A real photo with a face (scikit-image's astronaut, shipped in its wheel)."""
    try:
        from skimage import data
    except ImportError:
        return None
    bgr = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    dest.write_bytes(cv2.imencode(".jpg", bgr)[1].tobytes())
    return dest


def wait_ready(port: int, models: list[str], timeout: float = 60.0) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    got: dict[str, Any] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda _c, _u, m: got.update(json.loads(m.payload))
    client.connect("127.0.0.1", port)
    client.subscribe(f"edge/{DEVICE}/status", 1)
    client.loop_start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            states = {n: got.get("models", {}).get(n, {}).get("state") for n in models}
            if all(s in ("ready", "failed") for s in states.values()):
                return got
            time.sleep(0.1)
    finally:
        client.loop_stop()
        client.disconnect()
    sys.exit("demo: the agent did not get its models ready in time (see agent.log)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="exit after the requests")
    args = parser.parse_args()
    models = fetch(cache_root() / "models")
    work = Path(tempfile.mkdtemp(prefix="edge-fleet-demo-"))
    procs: list[subprocess.Popen[bytes]] = []

    def cleanup(*_: object) -> None:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        say("1/4 a local inference: edge-agent infer on PP-OCR's classifier")
        bundle = build_text_direction_bundle(models, work / "text-direction")
        (work / "upside-down.png").write_bytes(text_image("hello world", upside_down=True))
        subprocess.run(
            [str(VENV_BIN / "edge-agent"), "infer", str(bundle), str(work / "upside-down.png")],
            check=True,
        )

        say("2/4 a broker: Mosquitto on a free local port")
        broker, port = start_broker(work)
        procs.append(broker)
        print(f"    mqtt://127.0.0.1:{port}")

        say("3/4 an edge agent serving three real models")
        config = {
            "device_id": DEVICE,
            "state_dir": str(work / "state"),
            "mqtt": {"url": f"mqtt://127.0.0.1:{port}"},
            "telemetry": {"interval_s": 5},
            "models": [
                {"name": "text-direction", "path": str(bundle), "max_batch": 8},
                {"name": "vad", "path": str(models / "silero_vad.onnx")},
                {"name": "face", "path": str(build_face_bundle(models, work / "face"))},
            ],
        }
        (work / "agent.yaml").write_text(yaml.safe_dump(config))
        log = (work / "agent.log").open("wb")
        procs.append(
            subprocess.Popen(
                [str(VENV_BIN / "edge-agent"), "run", "--config", str(work / "agent.yaml")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        status = wait_ready(port, [m["name"] for m in config["models"]])
        for name, m in status["models"].items():
            row = f"{name:<15} {m['state']:<6} {m['version']:<22} {m['format']:<7}"
            print(f"    {row} {m['provider']}")

        say("4/4 requests over MQTT")
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "demo_client.py"), "--port", str(port),
             "--device", DEVICE, "--face", str(face_jpeg(work / "astronaut.jpg") or "")],
            check=True,
        )  # fmt: skip
        print()
        print("Try it yourself:")
        print(f"  mosquitto_sub -p {port} -t 'edge/{DEVICE}/#' -v")
        pub = f"  mosquitto_pub -p {port} -t edge/{DEVICE}"
        print(f"{pub}/infer/text-direction -f {work}/upside-down.png")
        if (work / "astronaut.jpg").exists():
            print(f"{pub}/infer/face -f {work}/astronaut.jpg   # prints the face box")
        cmd = {"id": "c1", "command": "diagnostics", "args": {}, "ts": "2026-01-01T00:00:00Z"}
        print(f"{pub}/cmd -m '{json.dumps(cmd)}'")
        print(f"  (agent log: {work}/agent.log)")
        if args.once:
            return 0
        print("\nRunning. Ctrl-C stops the agent and the broker.")
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        print()
        return 0
    finally:
        cleanup()
        os.environ.pop("EDGE_FLEET_DEMO", None)


if __name__ == "__main__":
    raise SystemExit(main())
