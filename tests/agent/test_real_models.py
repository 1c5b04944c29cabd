"""Real models give the right answers on real inputs, through the agent's runtime backends.

- OCR: PP-OCRv4 reads words rendered with OpenCV, and its detector boxes them where
  they were drawn.
- VAD: Silero VAD hears espeak-ng speech and not silence, noise or hum.
- Face: MediaPipe BlazeFace finds the face in a real photo and none in blank images.

Measured values, for the margins chosen below: OCR word confidences 0.5-1.0; VAD speech
max 1.00, leading silence 0.009, noise/hum max 0.11; BlazeFace 0.92 on the face,
0.31 at most on face-free crops and noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest

from agent.runtimes import Runtime, RuntimeOptions, get_backend
from tests.realdata import ASTRONAUT_FACE_BOX, espeak_path, face_photo, render_text, speech

Array = Any


@contextmanager
def _loaded(fmt: str, path: Path) -> Iterator[Runtime]:
    runtime = get_backend(fmt).load(path, RuntimeOptions())
    try:
        yield runtime
    finally:
        runtime.close()


# --- OCR: PP-OCRv4 recognizer and detector --------------------------------------------


@pytest.fixture(scope="module")
def rec(models_dir: Path) -> Iterator[Runtime]:
    with _loaded("onnx", models_dir / "ppocr_rec.onnx") as runtime:
        yield runtime


@pytest.fixture(scope="module")
def charset(models_dir: Path) -> list[str]:
    """The recognizer's classes: CTC blank, the dictionary shipped in the model's
    ``character`` metadata (one character a line), then the space."""
    model = onnx.load(str(models_dir / "ppocr_rec.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


def _ctc_greedy(probs: Array, charset: list[str]) -> str:
    best = probs.argmax(axis=1)
    keep = (best != 0) & np.r_[True, best[1:] != best[:-1]]
    return "".join(charset[i] for i in best[keep])


def _ocr_input(img: Array, mean: float = 0.5, std: float = 0.5) -> Array:
    x = (img.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def test_recognizer_dictionary_ships_in_the_model(rec: Runtime, charset: list[str]) -> None:
    assert rec.outputs[0].shape[-1] == len(charset) == 6625
    assert {"E", "D", "G", "2", "0", "6", "h", "e", "l", "o"} <= set(charset)


@pytest.mark.parametrize(
    ("word", "font"),
    [
        ("EDGE2026", cv2.FONT_HERSHEY_SIMPLEX),
        ("hello", cv2.FONT_HERSHEY_DUPLEX),
        ("fleet update 42", cv2.FONT_HERSHEY_SIMPLEX),
        ("Total: 19.99", cv2.FONT_HERSHEY_COMPLEX),
    ],
)
def test_recognizer_reads_rendered_words(
    rec: Runtime, charset: list[str], word: str, font: int
) -> None:
    strip = render_text(word, font=font, height=48, scale=1.0, thickness=2)
    probs = rec.run({"x": _ocr_input(strip)})[0][0]
    assert _ctc_greedy(probs, charset) == word


def test_recognizer_does_not_read_a_blank_strip(rec: Runtime, charset: list[str]) -> None:
    blank = np.full((48, 200, 3), 255, np.uint8)
    assert _ctc_greedy(rec.run({"x": _ocr_input(blank)})[0][0], charset) == ""


def test_detector_boxes_text_where_it_was_drawn(models_dir: Path) -> None:
    page = np.full((320, 480, 3), 255, np.uint8)  # sides: multiples of 32
    drawn = {}
    for word, (x, y) in {"EDGE2026": (30, 70), "hello fleet": (200, 250)}.items():
        (w, h), base = cv2.getTextSize(word, cv2.FONT_HERSHEY_SIMPLEX, 1.2, 2)
        cv2.putText(page, word, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (0, 0, 0), 2, cv2.LINE_AA)
        drawn[word] = (x, y - h, x + w, y + base)
    with _loaded("onnx", models_dir / "ppocr_det.onnx") as det:
        prob = det.run({"x": _ocr_input(page)})[0][0, 0]
        empty = det.run({"x": _ocr_input(np.full_like(page, 255))})[0][0, 0]
    assert prob.shape == page.shape[:2]
    assert empty.max() < 0.3  # nothing on a blank page

    _, _, stats, _ = cv2.connectedComponentsWithStats((prob > 0.3).astype(np.uint8))
    boxes = [(x, y, x + w, y + h) for x, y, w, h, area in stats[1:] if area > 50]
    assert len(boxes) == len(drawn)
    for x1, y1, x2, y2 in drawn.values():
        # DB detectors predict a shrunk text kernel: inside the drawn box, most of its width
        match = [
            b
            for b in boxes
            if x1 - 4 <= b[0] and b[2] <= x2 + 4 and y1 - 4 <= b[1] and b[3] <= y2 + 4
        ]
        assert len(match) == 1, (drawn, boxes)
        assert match[0][2] - match[0][0] >= 0.7 * (x2 - x1)


# --- VAD: Silero ------------------------------------------------------------------------

RATE = 16000
CHUNK = 512  # samples per call at 16 kHz
CONTEXT = 64  # Silero v5+ wants the previous chunk's last 64 samples in front of each chunk


def _vad_probabilities(vad: Runtime, audio: Array) -> Array:
    """Speech probability of each 32 ms chunk, carrying the state and context along."""
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, CONTEXT), np.float32)
    rate = np.array(RATE, np.int64)
    probs = []
    for start in range(0, len(audio) - CHUNK + 1, CHUNK):
        chunk = audio[None, start : start + CHUNK].astype(np.float32)
        out, state = vad.run(
            {"input": np.concatenate([context, chunk], axis=1), "state": state, "sr": rate}
        )
        context = chunk[:, -CONTEXT:]
        probs.append(float(out[0, 0]))
    return np.array(probs)


@pytest.fixture(scope="module")
def vad(models_dir: Path) -> Iterator[Runtime]:
    with _loaded("onnx", models_dir / "silero_vad.onnx") as runtime:
        yield runtime


def test_vad_hears_speech_after_silence(vad: Runtime) -> None:
    if espeak_path() is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    voice = speech("Turn on the lights in the kitchen, please.", RATE)
    second = np.zeros(RATE, np.float32)
    probs = _vad_probabilities(vad, np.concatenate([second, voice, second]))
    lead = RATE // CHUNK
    speaking = probs[lead : lead + len(voice) // CHUNK]
    assert probs[:lead].max() < 0.1
    assert speaking.max() > 0.5
    assert (speaking > 0.5).mean() > 0.4  # most of the sentence, not a blip


@pytest.mark.parametrize("kind", ["silence", "quiet noise", "loud noise", "hum"])
def test_vad_ignores_silence_noise_and_hum(vad: Runtime, kind: str) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(2 * RATE) / RATE
    audio = {
        "silence": np.zeros(2 * RATE),
        "quiet noise": rng.normal(0.0, 0.003, 2 * RATE),
        "loud noise": rng.normal(0.0, 0.1, 2 * RATE),
        "hum": 0.1 * np.sin(2 * np.pi * 50 * t),
    }[kind]
    limit = 0.1 if kind == "silence" else 0.3
    assert _vad_probabilities(vad, audio).max() < limit


# --- Face: MediaPipe BlazeFace short range ------------------------------------------------


def _blazeface_anchors() -> Array:
    """The 896 anchor centres (x, y) in [0, 1]: a 16x16 grid with 2 anchors per cell
    (stride 8), then an 8x8 grid with 6 per cell (three stride-16 layers merged)."""
    centres = []
    for grid, per_cell in ((16, 2), (8, 6)):
        for y in range(grid):
            for x in range(grid):
                centres += [((x + 0.5) / grid, (y + 0.5) / grid)] * per_cell
    return np.array(centres, np.float32)


@pytest.fixture(scope="module")
def face(models_dir: Path) -> Iterator[Runtime]:
    with _loaded("tflite", models_dir / "face_detection_short_range.tflite") as runtime:
        yield runtime


def _best_face(face: Runtime, rgb: Array) -> tuple[float, Array]:
    """The best anchor's score and its decoded box ``(cx, cy, w, h)`` in [0, 1] units."""
    x = cv2.resize(rgb, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32) / 127.5 - 1.0
    outs = dict(zip((o.name for o in face.outputs), face.run({"input": x[None]}), strict=True))
    scores = 1.0 / (1.0 + np.exp(-np.clip(outs["classificators"][0, :, 0], -80, 80)))
    best = int(scores.argmax())
    reg = outs["regressors"][0, best]
    anchor = _blazeface_anchors()[best]
    box = np.array([anchor[0] + reg[0] / 128, anchor[1] + reg[1] / 128, reg[2] / 128, reg[3] / 128])
    return float(scores[best]), box


def test_blazeface_finds_the_face_in_a_photo(face: Runtime) -> None:
    photo = face_photo()
    score, (cx, cy, w, h) = _best_face(face, photo)
    height, width = photo.shape[:2]
    x1, y1, x2, y2 = ASTRONAUT_FACE_BOX
    assert score > 0.5
    assert x1 <= cx * width <= x2 and y1 <= cy * height <= y2
    assert 0.5 * (x2 - x1) <= w * width <= 1.5 * (x2 - x1)
    assert 0.5 * (y2 - y1) <= h * height <= 1.5 * (y2 - y1)


@pytest.mark.parametrize("kind", ["white", "black", "noise", "rocket crop", "suit crop"])
def test_blazeface_finds_no_face_where_there_is_none(face: Runtime, kind: str) -> None:
    rng = np.random.default_rng(0)
    photo = face_photo()
    image = {
        "white": np.full((256, 256, 3), 255, np.uint8),
        "black": np.zeros((256, 256, 3), np.uint8),
        "noise": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "rocket crop": photo[0:300, 330:512],
        "suit crop": photo[256:, :],
    }[kind]
    score, _ = _best_face(face, np.ascontiguousarray(image))
    assert score < 0.5
