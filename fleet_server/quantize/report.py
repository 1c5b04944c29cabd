"""The outcome of one quantization run: what was done, what was measured, the verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleet_server.quantize.evaluate import Evaluation, Latency
from fleet_server.quantize.settings import QuantizeSettings


@dataclass(frozen=True)
class QuantizeReport:
    """Sizes, latencies and accuracy of fp32 vs int8, and whether the model was written."""

    model_in: Path
    model_out: Path
    settings: QuantizeSettings
    calibration_samples: int
    evaluation: Evaluation
    size_fp32: int
    size_int8: int
    #: What the tool had to do to the model first (opset upgrade, shape-inference fallback).
    notes: tuple[str, ...]
    #: Every bound the int8 model broke; empty when it passed.
    violations: tuple[str, ...]
    written: bool

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the whole report."""
        ev = self.evaluation
        return {
            "model_in": str(self.model_in),
            "model_out": str(self.model_out),
            "written": self.written,
            "passed": self.passed,
            "violations": list(self.violations),
            "notes": list(self.notes),
            "settings": self.settings.model_dump(),
            "calibration_samples": self.calibration_samples,
            "held_out_samples": ev.samples,
            "size_bytes": {"fp32": self.size_fp32, "int8": self.size_int8},
            "latency_ms": {"fp32": asdict(ev.latency_fp32), "int8": asdict(ev.latency_int8)},
            "accuracy": {"fp32": ev.accuracy_fp32, "int8": ev.accuracy_int8},
            "accuracy_drop": ev.accuracy_drop,
            "outputs": [asdict(o) for o in ev.outputs],
        }

    def to_text(self) -> str:
        """A short, human-readable report (one fact per line)."""
        s, ev = self.settings, self.evaluation
        weights = "per-channel" if s.per_channel else "per-tensor"
        labelled = ", labelled" if ev.accuracy_fp32 is not None else ""
        lines = [
            f"quantize {self.model_in.name} -> {self.model_out.name}",
            f"  method     static QDQ, int8 {weights} weights"
            f"{' (reduced range)' if s.reduce_range else ''}, {s.activation_type} activations, "
            f"{s.calibration_method} calibration",
            f"  data       {self.calibration_samples} calibration samples, "
            f"{ev.samples} held out{labelled}",
        ]
        lines += [f"  note       {n}" for n in self.notes]
        ratio = self.size_int8 / self.size_fp32 if self.size_fp32 else 0.0
        lines.append(
            f"  size       {_kib(self.size_fp32)} -> {_kib(self.size_int8)} ({ratio:.2f}x)"
        )
        lines.append(f"  latency    {_latency(ev.latency_fp32, ev.latency_int8)}")
        if ev.accuracy_fp32 is not None and ev.accuracy_int8 is not None:
            drop = ev.accuracy_fp32 - ev.accuracy_int8
            lines.append(
                f"  accuracy   fp32 {ev.accuracy_fp32:.1%}, int8 {ev.accuracy_int8:.1%} "
                f"(drop {drop:.1%}, bound {s.max_accuracy_drop:.1%})"
            )
        for out in ev.outputs:
            agree = "" if out.top1_agreement is None else f", top-1 agree {out.top1_agreement:.1%}"
            lines.append(
                f"  output     {out.name}: max|d| {out.max_abs_error:.4g}, "
                f"mean|d| {out.mean_abs_error:.4g}, cosine min {out.cosine_min:.4f} "
                f"mean {out.cosine_mean:.4f}{agree}"
            )
        if self.violations:
            lines += [f"  violation  {v}" for v in self.violations]
            lines.append(f"  result     REFUSED: nothing written to {self.model_out}")
        elif self.written:
            lines.append(f"  result     OK: wrote {self.model_out}")
        else:
            lines.append("  result     OK (not written)")
        return "\n".join(lines)


def _kib(size: int) -> str:
    return f"{size / 1024:.1f} KiB"


def _latency(fp32: Latency, int8: Latency) -> str:
    speedup = fp32.p50_ms / int8.p50_ms if int8.p50_ms > 0 else 0.0
    threads = "thread" if fp32.threads == 1 else "threads"
    return (
        f"p50 {fp32.p50_ms:.2f} -> {int8.p50_ms:.2f} ms, p95 {fp32.p95_ms:.2f} -> "
        f"{int8.p95_ms:.2f} ms ({speedup:.2f}x; onnxruntime CPU, {fp32.threads} {threads}, "
        f"{fp32.runs} runs)"
    )
