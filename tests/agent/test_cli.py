"""``edge-agent`` as a user runs it: a real subprocess, real models, readable errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests import modelgen


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_infer_npy_and_json_on_a_bare_model(tmp_path: Path) -> None:
    model = modelgen.make_onnx_affine(tmp_path / "affine.onnx")
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.save(tmp_path / "x.npy", x)
    w, b = modelgen.affine_weights(3, 2)
    proc = _cli("infer", str(model), str(tmp_path / "x.npy"), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["provider"] == "CPUExecutionProvider"
    assert out["outputs"][0]["data"] == (x @ w + b).ravel().tolist()
    req = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    (tmp_path / "req.json").write_text(json.dumps(req))
    proc = _cli("infer", str(model), str(tmp_path / "req.json"))
    assert proc.returncode == 0, proc.stderr
    assert "provider  CPUExecutionProvider" in proc.stdout
    assert "output    y [1, 2] float32" in proc.stdout


def test_errors_are_one_line_with_a_code(tmp_path: Path) -> None:
    model = modelgen.make_onnx_affine(tmp_path / "affine.onnx")
    np.save(tmp_path / "bad.npy", np.zeros((1, 5), np.float32))
    proc = _cli("infer", str(model), str(tmp_path / "bad.npy"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: bad_input: input 'x': expected shape [?,3], got [1, 5]"
    )
    assert "Traceback" not in proc.stderr
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    proc = _cli("infer", str(tmp_path / "broken.onnx"), str(tmp_path / "bad.npy"))
    assert proc.returncode == 2 and "error: model_load_failed:" in proc.stderr
    proc = _cli("infer", str(tmp_path / "missing.onnx"), str(tmp_path / "bad.npy"))
    assert proc.returncode == 2 and "error: bundle_not_found:" in proc.stderr


def test_bench_reports_figures(tmp_path: Path) -> None:
    model = modelgen.make_tflite_quantized_add(tmp_path / "q.tflite", "int8")
    proc = _cli("bench", str(model), "-n", "50", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["runs"] == 50
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert report["throughput_per_s"] > 0 and report["rss_bytes"] > 10 * 2**20


def test_doctor_exit_codes() -> None:
    assert _cli("doctor").returncode == 0
    proc = _cli("doctor", "--profile", "coral-usb")
    assert proc.returncode == 1
    assert "edgetpu" in proc.stdout
    proc = _cli("doctor", "--profile", "no-such-profile")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
