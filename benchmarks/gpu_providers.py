#!/usr/bin/env python3
"""Latency per execution provider (CPU, CUDA, TensorRT fp16) of PP-OCR's models, raw vs agent.

For each model and provider, the model is loaded through the agent's own loader
(``agent.loader.load_model``, one-link chain, a fresh ``cache_dir``) and the SAME session is
timed two ways, interleaved in small blocks so that drift and noise hit both alike (as in
``runtime_overhead.py``):

- raw:   ``session.run(names, feeds)`` on prepared feeds;
- agent: ``ServedModel.infer(...)``: input checks, conversions, the run, the NaN/Inf check.

Also the load-to-ready time, cold (a TensorRT engine is built) and, for TensorRT, again with
the engine cache of the first load. A provider this onnxruntime cannot use is printed as
``n/a`` with the reason: on a machine without ``onnxruntime-gpu`` only the CPU rows have
figures. See docs/gpu.md for the GPU setup.

    .venv/bin/python benchmarks/gpu_providers.py [--runs 1000] [--seconds 10] [--json]
    .venv/bin/python benchmarks/gpu_providers.py --models ppocr_cls --providers cpu,tensorrt

Record the figures in benchmarks/RESULTS.md with the date, the GPU and the driver/CUDA/TensorRT
versions (the script prints onnxruntime's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.errors import EdgeError  # noqa: E402
from agent.loader import LoadedModel, load_model  # noqa: E402
from agent.runtimes import ProviderSpec, RuntimeOptions  # noqa: E402
from agent.runtimes.onnx import OnnxRuntime  # noqa: E402

#: Provider label -> the one link of its chain (TensorRT with fp16, as the GPU profiles).
PROVIDERS: dict[str, ProviderSpec] = {
    "cpu": ProviderSpec("cpu"),
    "cuda": ProviderSpec("cuda"),
    "tensorrt": ProviderSpec("tensorrt", {"fp16": True}),
}
#: Model -> its input shape (PP-OCR's usual: a 48-px text line; a 640x640 page for det).
SHAPES: dict[str, tuple[int, ...]] = {
    "ppocr_cls": (1, 3, 48, 192),
    "ppocr_rec": (1, 3, 48, 320),
    "ppocr_det": (1, 3, 640, 640),
}
BLOCK = 10


def _load(path: Path, link: ProviderSpec, cache: Path, work: Path) -> tuple[LoadedModel, float]:
    options = RuntimeOptions(providers=(link,), cache_dir=cache)
    t0 = time.perf_counter()
    loaded = load_model(path, work_dir=work, options=options)
    return loaded, (time.perf_counter() - t0) * 1000


def _time(loaded: LoadedModel, x: Any, runs: int, seconds: float) -> dict[str, float]:
    model = loaded.model
    tensors = [(None, x)]
    feeds = model.prepare(tensors)
    runtime = model.runtime
    assert isinstance(runtime, OnnxRuntime), "an ONNX model"
    session = runtime._session
    names = [o.name for o in model.outputs]

    def raw() -> Any:
        return session.run(names, feeds)

    def agent() -> Any:
        return model.infer(tensors)

    for _ in range(20):
        raw()
        agent()
    t0 = time.perf_counter()
    agent()
    one = time.perf_counter() - t0
    runs = max(2 * BLOCK, min(runs, int(seconds / max(one, 1e-6))))
    samples: dict[str, list[float]] = {"raw": [], "agent": []}
    pc = time.perf_counter
    for i in range(runs // BLOCK):
        order = ("raw", "agent") if i % 2 == 0 else ("agent", "raw")
        for side in order:
            call = raw if side == "raw" else agent
            for _ in range(BLOCK):
                t = pc()
                call()
                samples[side].append(pc() - t)
    raw_ms, agent_ms = (np.asarray(samples[k]) * 1000 for k in ("raw", "agent"))
    return {
        "runs": float(len(raw_ms)),
        "raw_p50_ms": float(np.median(raw_ms)),
        "agent_p50_ms": float(np.median(agent_ms)),
        "raw_p99_ms": float(np.percentile(raw_ms, 99)),
        "agent_p99_ms": float(np.percentile(agent_ms, 99)),
    }


def bench(path: Path, label: str, runs: int, seconds: float) -> dict[str, Any]:
    """One model on one provider; ``{"error": reason}`` where the provider cannot serve it."""
    link = PROVIDERS[label]
    x = np.random.default_rng(0).uniform(-1, 1, SHAPES[path.stem]).astype(np.float32)
    row: dict[str, Any] = {"model": path.stem, "provider": label}
    with tempfile.TemporaryDirectory() as tmp:
        cache, work = Path(tmp) / "cache", Path(tmp) / "work"
        try:
            loaded, row["load_ms"] = _load(path, link, cache, work / "1")
        except EdgeError as exc:
            row["error"] = exc.message
            return row
        row["served_by"] = loaded.model.provider
        try:
            row.update(_time(loaded, x, runs, seconds))
        finally:
            loaded.model.close()
        if label == "tensorrt":
            again, row["cached_load_ms"] = _load(path, link, cache, work / "2")
            again.model.close()
    return row


def _print(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'model':<10} {'provider':<9} {'served by':<26} {'raw p50':>8} {'agent p50':>9} "
        f"{'overhead':>8} {'raw p99':>8} {'agent p99':>9} {'load ms':>9} {'cached':>8}"
    )
    for r in rows:
        head = f"{r['model']:<10} {r['provider']:<9}"
        if "error" in r:
            print(f"{head} n/a: {r['error']}")
            continue
        cached = f"{r['cached_load_ms']:8.0f}" if "cached_load_ms" in r else f"{'-':>8}"
        print(
            f"{head} {r['served_by']:<26} {r['raw_p50_ms']:8.3f} {r['agent_p50_ms']:9.3f} "
            f"{r['agent_p50_ms'] - r['raw_p50_ms']:8.3f} {r['raw_p99_ms']:8.3f} "
            f"{r['agent_p99_ms']:9.3f} {r['load_ms']:9.0f} {cached}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="at most, per side")
    parser.add_argument("--seconds", type=float, default=10.0, help="about, per side")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "scripts"))
    import onnxruntime as ort
    from fetch_models import cache_root, fetch  # type: ignore[import-not-found]

    models_dir = Path(fetch(cache_root() / "models"))
    rows = [
        bench(models_dir / f"{model}.onnx", label, args.runs, args.seconds)
        for model in args.models.split(",")
        for label in args.providers.split(",")
    ]
    if args.json:
        print(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=2))
        return 0
    print(
        f"onnxruntime {ort.__version__}, providers {', '.join(ort.get_available_providers())}; "
        f"up to {args.runs} runs or ~{args.seconds:.0f} s per side; times in ms"
    )
    _print(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
