#!/usr/bin/env python3
"""In-process overhead of the agent's run path over the raw runtime call, on real models.

For each model, the SAME loaded session / interpreter is timed two ways, interleaved in
small blocks so that drift and noise hit both alike:

- raw:   ``session.run(None, feeds)``, or ``set_tensor`` / ``invoke`` / ``get_tensor``;
- agent: ``ServedModel.infer(...)`` — input checks, conversions, the runtime, the
  NaN/Inf check of outputs, exactly what a request pays in-process.

Also: load-to-ready time (open, load, check, warm up) and RSS per model, and the
agent's idle RSS with no model loaded (measured in a fresh subprocess).

    .venv/bin/python benchmarks/runtime_overhead.py [--runs 2000] [--threads 1]

Prints a table; record it in benchmarks/RESULTS.md with the date and machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.loader import load_model  # noqa: E402
from agent.runtimes import ProviderSpec, RuntimeOptions  # noqa: E402


def _models(models_dir: Path) -> list[tuple[str, Path, list[tuple[str | None, Any]]]]:
    rng = np.random.default_rng(0)
    vad = [
        ("input", (rng.standard_normal((1, 576)) * 0.1).astype(np.float32)),
        ("state", np.zeros((2, 1, 128), np.float32)),
        ("sr", np.array(16000, np.int64)),
    ]
    return [
        ("silero VAD (onnx)", models_dir / "silero_vad.onnx", vad),
        (
            "PP-OCR cls (onnx)",
            models_dir / "ppocr_cls.onnx",
            [(None, rng.random((1, 3, 48, 192), np.float32))],
        ),
        (
            "PP-OCR rec (onnx)",
            models_dir / "ppocr_rec.onnx",
            [(None, rng.random((1, 3, 48, 320), np.float32))],
        ),
        (
            "BlazeFace (tflite)",
            models_dir / "face_detection_short_range.tflite",
            [(None, rng.random((1, 128, 128, 3), np.float32) * 2 - 1)],
        ),
    ]


def _raw_call(model: Any, feeds: dict[str, Any]) -> Any:
    rt = model.runtime
    if model.format == "onnx":
        session, names = rt._session, rt._output_names

        def run_onnx() -> Any:
            return session.run(names, feeds)

        return run_onnx
    interp, in_index, out_index = rt._interpreter, rt._in_index, rt._out_index

    def run_tflite() -> Any:
        for name, index in in_index:
            interp.set_tensor(index, feeds[name])
        interp.invoke()
        return [interp.get_tensor(i) for i in out_index]

    return run_tflite


def _rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def _bench(label: str, path: Path, tensors: list[Any], runs: int, threads: int) -> dict[str, Any]:
    gc.collect()
    rss0 = _rss()
    opts = RuntimeOptions(providers=(ProviderSpec("cpu"),), intra_op_threads=threads)
    if path.suffix == ".tflite":
        opts = RuntimeOptions(providers=(ProviderSpec("xnnpack"),), intra_op_threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = load_model(path, work_dir=Path(tmp), options=opts).model
        load_ms = (time.perf_counter() - t0) * 1000
    rss1 = _rss()
    feeds = model.prepare(tensors)
    raw = _raw_call(model, feeds)
    for _ in range(20):
        raw()
        model.infer(tensors)
    raw_s: list[float] = []
    agent_s: list[float] = []
    block = 10
    pc = time.perf_counter
    for i in range(runs // block):
        first, second = (raw_s, agent_s) if i % 2 == 0 else (agent_s, raw_s)
        for target in (first, second):
            call = raw if target is raw_s else (lambda: model.infer(tensors))
            for _ in range(block):
                t = pc()
                call()
                target.append(pc() - t)
    raw_ms = np.asarray(raw_s) * 1000
    agent_ms = np.asarray(agent_s) * 1000
    p50r, p50a = float(np.median(raw_ms)), float(np.median(agent_ms))
    result = {
        "model": label,
        "provider": model.provider,
        "raw_p50_ms": p50r,
        "agent_p50_ms": p50a,
        "raw_p99_ms": float(np.percentile(raw_ms, 99)),
        "agent_p99_ms": float(np.percentile(agent_ms, 99)),
        "overhead_ms": p50a - p50r,
        "overhead_pct": (p50a - p50r) / p50r * 100,
        "load_ms": load_ms,
        "rss_mib": (rss1 - rss0) / 2**20,
    }
    model.close()
    return result


_IDLE = """
import os, sys, psutil
sys.path.insert(0, {repo!r})
import {modules}
print(psutil.Process(os.getpid()).memory_info().rss)
"""

#: What an idle agent has imported: the daemon alone (runtimes are imported on first
#: use), then with the ONNX runtime, then with both runtimes.
IDLE_CASES = {
    "daemon, no runtime": "agent.daemon",
    "daemon + onnxruntime": "agent.daemon, agent.runtimes.onnx",
    "daemon + onnxruntime + LiteRT": "agent.daemon, agent.runtimes.onnx, agent.runtimes.litert",
}


def idle_rss() -> dict[str, int]:
    """RSS of fresh processes that imported the agent but loaded no model."""
    rss = {}
    for label, modules in IDLE_CASES.items():
        out = subprocess.run(
            [sys.executable, "-c", _IDLE.format(repo=str(REPO), modules=modules)],
            capture_output=True,
            text=True,
            check=True,
        )
        rss[label] = int(out.stdout.strip().splitlines()[-1])
    return rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "scripts"))
    from fetch_models import cache_root, fetch

    models_dir = fetch(cache_root() / "models")
    results = [_bench(*m, args.runs, args.threads) for m in _models(models_dir)]
    idle = idle_rss()
    if args.json:
        print(json.dumps({"models": results, "idle_rss_bytes": idle}, indent=2))
        return 0
    print(f"runtime overhead: {args.runs} runs per side, {args.threads} intra-op thread(s)")
    print(
        f"{'model':<20} {'provider':<22} {'raw p50':>9} {'agent p50':>10} {'overhead':>9} "
        f"{'%':>6} {'raw p99':>9} {'agent p99':>10} {'load ms':>8} {'RSS MiB':>8}"
    )
    for r in results:
        print(
            f"{r['model']:<20} {r['provider']:<22} "
            f"{r['raw_p50_ms']:>9.4f} {r['agent_p50_ms']:>10.4f} "
            f"{r['overhead_ms']:>9.4f} {r['overhead_pct']:>5.1f}% {r['raw_p99_ms']:>9.3f} "
            f"{r['agent_p99_ms']:>10.3f} {r['load_ms']:>8.1f} {r['rss_mib']:>8.1f}"
        )
    for label, value in idle.items():
        print(f"idle agent RSS, {label:<30} {value / 2**20:6.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
