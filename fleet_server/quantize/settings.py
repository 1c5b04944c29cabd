"""The knobs of one quantization run, validated."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class QuantizeSettings(BaseModel):
    """How to quantize, and how close to fp32 the int8 model must stay to be written.

    Defaults follow onnxruntime's advice for CPUs: static quantization in the QDQ
    format with int8 activations and int8 weights (S8S8), the first choice on x86-64
    and ARM64; ``activation_type="uint8"`` (U8S8) is the fallback when accuracy drops a
    lot, and ``reduce_range`` (7-bit weights) avoids the saturation of the U8S8 path on
    x86-64 CPUs without VNNI.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_channel: bool = True
    activation_type: Literal["int8", "uint8"] = "int8"
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    reduce_range: bool = False
    #: Largest accuracy loss allowed, as a fraction (0.01 = one percentage point):
    #: against the labels when the data is labelled, else ``1 - top-1 agreement``.
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0)
    #: Largest absolute difference allowed on any output value (None: not checked).
    max_abs_error: float | None = Field(None, ge=0.0)
    #: Smallest cosine similarity allowed between the fp32 and int8 outputs of any one
    #: held-out sample, on every output (None: not checked).
    min_cosine: float | None = Field(None, ge=-1.0, le=1.0)
    #: Share of the calibration data held out for evaluation when no held-out set is given.
    held_out_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    #: Seed of the calibration / held-out split.
    seed: int = 0
    latency_runs: int = Field(50, ge=1, le=100_000)
    #: Intra-op CPU threads for the latency and evaluation runs.
    threads: int = Field(1, ge=1, le=256)
    #: Replace an existing file at the output path (only ever once the gate passed).
    overwrite: bool = False
