"""``edge-agent bench``: latency percentiles, throughput, load time and RSS of a model.

Inputs are random values of each input's dtype and shape (dynamic dims are 1 unless
given). Timed runs go through the agent's own run path (input checks, conversions,
the runtime, output checks), i.e. what a request costs the agent minus the transport.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from agent.errors import EdgeError
from agent.model import ServedModel
from agent.runtimes.base import Array, TensorSpec


def random_input(spec: TensorSpec, shape: tuple[int, ...] | None = None, seed: int = 0) -> Array:
    """A random array for ``spec`` (``shape`` fills its dynamic dims; default 1)."""
    rng = np.random.default_rng(seed)
    dims = shape or tuple(1 if d is None else d for d in spec.shape)
    dtype = spec.np_dtype
    if dtype.kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, dims).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -128), min(info.max, 127), dims, endpoint=True).astype(dtype)


def _rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a dependency of the agent extra
        return 0


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(samples_ms)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(arr.mean())}


def bench_model(
    model: ServedModel,
    *,
    runs: int = 200,
    seconds: float = 10.0,
    shapes: dict[str, tuple[int, ...]] | None = None,
    warmup: int = 5,
    tensors: list[tuple[str | None, Array]] | None = None,
) -> dict[str, Any]:
    """Run ``model`` up to ``runs`` times (or ``seconds``) and report the figures.

    Raises:
        EdgeError: a ``--shape`` names no input, or the model fails on the inputs.
    """
    shapes = shapes or {}
    unknown = set(shapes) - {s.name for s in model.inputs}
    if unknown:
        raise EdgeError(
            f"--shape names no input of the model: {', '.join(sorted(unknown))}",
            code="bad_arguments",
        )
    if tensors is None:
        tensors = [
            (s.name, random_input(s, shapes.get(s.name), seed=i))
            for i, s in enumerate(model.inputs)
        ]
    for _ in range(warmup):
        model.infer(tensors)
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    t_start = time.perf_counter()
    while len(samples) < runs and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        model.infer(tensors)
        samples.append((time.perf_counter() - t0) * 1000.0)
    elapsed = time.perf_counter() - t_start
    return {
        "model": model.name,
        "version": model.version,
        "format": model.format,
        "provider": model.provider,
        "inputs": {str(name): list(a.shape) for name, a in tensors},
        "runs": len(samples),
        "latency_ms": percentiles(samples),
        "throughput_per_s": len(samples) / elapsed if elapsed > 0 else 0.0,
        "load_ms": model.load_ms,
        "rss_bytes": _rss_bytes(),
    }


def format_bench(r: dict[str, Any]) -> str:
    """A readable text report of :func:`bench_model`'s result."""
    lat = r["latency_ms"]
    lines = [
        f"model       {r['model']} {r['version']} ({r['format']}, profile {r.get('profile', '?')})",
        f"provider    {r['provider']}",
        f"inputs      {', '.join(f'{k} {v}' for k, v in r['inputs'].items())}",
        f"runs        {r['runs']}",
        f"latency     p50 {lat['p50']:.3f} ms   p95 {lat['p95']:.3f} ms   p99 {lat['p99']:.3f} ms",
        f"throughput  {r['throughput_per_s']:.1f} inferences/s (one stream)",
        f"load        {r['load_ms']:.1f} ms to ready (open, load, check, warm up)",
        f"rss         {r['rss_bytes'] / 2**20:.1f} MiB",
    ]
    return "\n".join(lines)
