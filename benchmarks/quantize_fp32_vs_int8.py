#!/usr/bin/env python3
"""fp32 vs int8 on a real model: PP-OCR's text-direction classifier (ppocr_cls.onnx).

Quantizes the model with the project's tool (static QDQ, per-channel int8 weights;
int8 activations = S8S8, and uint8 activations = U8S8) on text lines rendered with
OpenCV, every other one upside down, then prints for each model: file size, latency
p50/p95 of one [1, 3, 48, 192] input on the onnxruntime CPU provider, and accuracy on
held-out lines against their real labels (plus top-1 agreement with fp32).

    .venv/bin/python benchmarks/quantize_fp32_vs_int8.py [--runs 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fleet_server.quantize import (  # noqa: E402
    AccuracyBoundExceeded,
    CalibrationSet,
    QuantizeSettings,
    Sample,
    quantize_onnx,
)
from fleet_server.quantize.evaluate import measure_latency, open_session  # noqa: E402
from tests.realdata import paddle_cls_input, text_lines  # noqa: E402


def _models_dir() -> Path:
    spec = importlib.util.spec_from_file_location("fetch_models", REPO / "scripts/fetch_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.fetch(module.cache_root() / "models"))


def _cpu() -> str:
    """The CPU model and whether it has the VNNI int8 dot-product instructions."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
        platform.machine(),
    )
    vnni = "VNNI" if ("avx512_vnni" in info or "avx_vnni" in info) else "no VNNI"
    return f"{name}, {vnni}"


def _lines(n: int, seed: int) -> CalibrationSet:
    return CalibrationSet(
        tuple(
            Sample({"x": paddle_cls_input(img)}, f"line{i}", label)
            for i, (img, label) in enumerate(text_lines(n, seed))
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="timed runs per model")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--calibration", type=int, default=128, help="calibration lines")
    parser.add_argument("--held-out", type=int, default=300, help="evaluation lines")
    args = parser.parse_args()

    model = _models_dir() / "ppocr_cls.onnx"
    calib, held = _lines(args.calibration, seed=1), _lines(args.held_out, seed=2)
    x = np.concatenate([s.feeds["x"] for s in held.samples])
    labels = np.array([s.label for s in held.samples])
    fp32_top = open_session(model, args.threads).run(None, {"x": x})[0].argmax(1)

    print(f"ppocr_cls.onnx, onnxruntime CPU, {args.threads} thread(s), {args.runs} runs, {_cpu()}")
    print(f"calibration {len(calib)} lines, held out {len(held)} lines (real labels)")
    header = f"{'model':<22}{'size KiB':>10}{'p50 ms':>9}{'p95 ms':>9}{'accuracy':>10}{'agree':>8}"
    print(header)
    print("-" * len(header))
    first = held.samples[0].feeds
    rows = [("fp32", model)]
    with tempfile.TemporaryDirectory() as tmp:
        for activations in ("int8", "uint8"):
            out = Path(tmp) / f"cls.{activations}.onnx"
            settings = QuantizeSettings(
                activation_type=activations, max_accuracy_drop=1.0, latency_runs=1
            )
            try:
                quantize_onnx(model, out, calib, settings, held_out=held)
            except AccuracyBoundExceeded as exc:  # cannot happen with a bound of 1.0
                print(f"int8 ({activations} activations) refused: {exc}", file=sys.stderr)
                continue
            rows.append((f"int8 QDQ ({'S8S8' if activations == 'int8' else 'U8S8'})", out))
        for name, path in rows:
            session = open_session(path, args.threads)
            lat = measure_latency(session, first, args.runs, args.threads)
            top = session.run(None, {"x": x})[0].argmax(1)
            print(
                f"{name:<22}{path.stat().st_size / 1024:>10.1f}{lat.p50_ms:>9.3f}"
                f"{lat.p95_ms:>9.3f}{(top == labels).mean():>10.1%}{(top == fp32_top).mean():>8.1%}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
