"""Real inputs for real models: rendered text lines, synthesized speech, a face photo.

Nothing here is downloaded: text is drawn with OpenCV, speech comes from the
``espeak-ng`` program (Debian package ``espeak-ng``), and the photo is scikit-image's
``astronaut.png``, which ships inside the scikit-image wheel (no fetching).
"""

from __future__ import annotations

import importlib
import json
import random
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_PLAIN,
)
WORDS = (
    "hello", "EDGE2026", "fleet", "Quantize", "model 42", "invoice", "Total: 19.99",
    "camera", "sensor", "update", "Berlin", "ROLLOUT", "device-7", "sample", "rollback",
    "October", "Station 9", "kiosk", "TICKET", "warehouse",
)  # fmt: skip

#: The face in :func:`face_photo`, as ``(x1, y1, x2, y2)`` pixels of the 512x512 image
#: (forehead to chin, ear to ear, measured by eye on the photo).
ASTRONAUT_FACE_BOX = (170, 70, 285, 190)


def render_text(
    text: str,
    *,
    font: int = cv2.FONT_HERSHEY_SIMPLEX,
    scale: float = 1.0,
    thickness: int = 2,
    height: int | None = None,
    margin: int = 10,
) -> Array:
    """Black ``text`` on a white BGR uint8 strip; ``height`` fixes the strip height
    (the text is centred vertically), else it is the text height plus margins."""
    (width, text_h), baseline = cv2.getTextSize(text, font, scale, thickness)
    strip_h = height if height is not None else text_h + baseline + 2 * margin
    img = np.full((strip_h, width + 2 * margin, 3), 255, np.uint8)
    y = (strip_h + text_h) // 2
    cv2.putText(img, text, (margin, y), font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return img


def text_lines(n: int, seed: int, *, noise: float = 0.0) -> list[tuple[Array, int]]:
    """``n`` varied text lines and their label: 0 upright, 1 rotated by 180 degrees
    (every other line). ``noise`` adds Gaussian pixel noise of that standard deviation."""
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        img = render_text(
            rng.choice(WORDS),
            font=rng.choice(FONTS),
            scale=rng.uniform(0.8, 2.0),
            thickness=rng.choice((1, 2, 3)),
        )
        label = i % 2
        if label:
            img = cv2.rotate(img, cv2.ROTATE_180)
        if noise > 0:
            noisy = img.astype(np.float32) + noise_rng.normal(0.0, noise, img.shape)
            img = np.clip(noisy, 0, 255).astype(np.uint8)
        lines.append((img, label))
    return lines


def write_image_folder(dest: Path, images: list[tuple[Array, int]], *, labels: bool = True) -> Path:
    """Write ``images`` as PNGs into ``dest`` (created), with ``labels.json`` if asked."""
    dest.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, (img, label) in enumerate(images):
        name = f"line{i:04d}.png"
        if not cv2.imwrite(str(dest / name), img):
            raise OSError(f"cannot write {dest / name}")
        names[name] = label
    if labels:
        (dest / "labels.json").write_text(json.dumps(names), encoding="utf-8")
    return dest


def paddle_cls_input(img: Array) -> Array:
    """PaddleOCR's own direction-classifier input: height 48, width up to 192 keeping the
    aspect ratio, ``(x/255 - 0.5) / 0.5``, zero-padded on the right; ``[1, 3, 48, 192]``."""
    h, w = img.shape[:2]
    new_w = min(192, int(np.ceil(48 * w / h)))
    resized = cv2.resize(img, (new_w, 48)).astype(np.float32) / 255.0
    out = np.zeros((3, 48, 192), np.float32)
    out[:, :, :new_w] = ((resized - 0.5) / 0.5).transpose(2, 0, 1)
    return out[None]


# --- speech -----------------------------------------------------------------------------


def espeak_path() -> str | None:
    """The ``espeak-ng`` (or ``espeak``) program, or None when neither is installed."""
    return shutil.which("espeak-ng") or shutil.which("espeak")


def speech(text: str, rate: int = 16000) -> Array:
    """``text`` spoken by espeak-ng, as mono float32 samples in [-1, 1] at ``rate`` Hz.

    Raises:
        FileNotFoundError: espeak-ng is not installed.
        RuntimeError: espeak-ng failed.
    """
    program = espeak_path()
    if program is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "speech.wav"
        proc = subprocess.run(
            [program, "-w", str(wav_path), text], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not wav_path.is_file():
            raise RuntimeError(f"espeak-ng failed: {proc.stderr.strip()}")
        with wave.open(str(wav_path), "rb") as wav:
            source_rate = wav.getframerate()
            channels, width = wav.getnchannels(), wav.getsampwidth()
            frames = wav.readframes(wav.getnframes())
    if width != 2:
        raise RuntimeError(f"espeak-ng wrote {8 * width}-bit audio, expected 16-bit")
    audio = np.frombuffer(frames, np.int16).reshape(-1, channels).mean(axis=1) / 32768.0
    return resample(audio.astype(np.float32), source_rate, rate)


def resample(audio: Array, source_rate: int, rate: int) -> Array:
    """Linear-interpolation resampling of mono ``audio`` (good enough for speech tests)."""
    if source_rate == rate:
        return audio.astype(np.float32)
    n = round(len(audio) * rate / source_rate)
    positions = np.arange(n) * (source_rate / rate)
    resampled: Array = np.interp(positions, np.arange(len(audio)), audio).astype(np.float32)
    return resampled


# --- faces ------------------------------------------------------------------------------


def face_photo() -> Array:
    """A real 512x512 RGB uint8 portrait photo (scikit-image's astronaut, Eileen Collins).

    Raises:
        ModuleNotFoundError: scikit-image is not installed.
    """
    data = importlib.import_module("skimage.data")  # shipped in the wheel, not fetched
    return np.asarray(data.astronaut(), dtype=np.uint8)
