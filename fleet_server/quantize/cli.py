"""``edge-fleet model quantize``: int8-quantize an ONNX model, refusing it if it strays.

Exit status: 0 the int8 model was written; 3 it was refused by an accuracy bound
(nothing written; the report says why); 1 any other error; 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError as PydanticValidationError

from agent.processing.config import ImagePreprocessing
from fleet_server.quantize.errors import AccuracyBoundExceeded, QuantizeError
from fleet_server.quantize.pipeline import quantize_onnx
from fleet_server.quantize.settings import QuantizeSettings

EXIT_OK, EXIT_ERROR, EXIT_REFUSED = 0, 1, 3


def build_parser(prog: str = "edge-fleet model quantize") -> argparse.ArgumentParser:
    """The argument parser (also used by ``edge-fleet`` to nest it as a sub-command)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Static int8 (QDQ) quantization of an ONNX model with onnxruntime, "
        "evaluated against the fp32 model on held-out data and refused when it loses "
        "more accuracy than allowed.",
    )
    p.add_argument("model", type=Path, help="the fp32 .onnx model")
    p.add_argument(
        "calibration", type=Path, help="folder of images, .npy or .npz files (optional labels.json)"
    )
    p.add_argument(
        "-o", "--output", type=Path, help="where to write the int8 model (default: MODEL.int8.onnx)"
    )
    p.add_argument(
        "--held-out",
        type=Path,
        help="a separate evaluation folder (default: hold out part of CALIBRATION)",
    )
    p.add_argument(
        "--preprocess",
        type=Path,
        help="YAML/JSON image preprocessing spec, as a bundle manifest's "
        "'preprocessing' (kind: image); needed for image folders",
    )
    p.add_argument(
        "--per-tensor",
        action="store_true",
        help="one scale per weight tensor instead of per output channel",
    )
    p.add_argument(
        "--activations",
        choices=["int8", "uint8"],
        default="int8",
        help="activation type (default int8: S8S8, onnxruntime's first choice)",
    )
    p.add_argument(
        "--method",
        choices=["minmax", "entropy", "percentile"],
        default="minmax",
        help="calibration method (default minmax)",
    )
    p.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights (for x86-64 CPUs without VNNI with uint8 activations)",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.01,
        metavar="FRACTION",
        help="largest accuracy loss allowed, 0.01 = 1 point (default 0.01)",
    )
    p.add_argument(
        "--max-abs-error",
        type=float,
        metavar="X",
        help="largest absolute output difference allowed",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        metavar="X",
        help="smallest per-sample output cosine similarity allowed",
    )
    p.add_argument(
        "--held-out-fraction",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="share of CALIBRATION held out without --held-out (default 0.25)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--latency-runs", type=int, default=50, help="timed runs per model")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for timing (default 1)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    try:
        settings = QuantizeSettings(
            per_channel=not args.per_tensor,
            activation_type=args.activations,
            calibration_method=args.method,
            reduce_range=args.reduce_range,
            max_accuracy_drop=args.max_accuracy_drop,
            max_abs_error=args.max_abs_error,
            min_cosine=args.min_cosine,
            held_out_fraction=args.held_out_fraction,
            seed=args.seed,
            latency_runs=args.latency_runs,
            threads=args.threads,
            overwrite=args.force,
        )
    except PydanticValidationError as exc:
        raise QuantizeError(_pydantic_reason(exc), code="options_invalid") from None
    preprocess = _load_preprocess(args.preprocess) if args.preprocess else None
    output = args.output or args.model.with_suffix(".int8.onnx")
    try:
        report = quantize_onnx(
            args.model,
            output,
            args.calibration,
            settings,
            held_out=args.held_out,
            preprocess=preprocess,
        )
    except AccuracyBoundExceeded as exc:
        _show(exc.report.to_dict() if args.json else exc.report.to_text(), args.json)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    _show(report.to_dict() if args.json else report.to_text(), args.json)
    return EXIT_OK


def _show(what: object, as_json: bool) -> None:
    print(json.dumps(what, indent=2) if as_json else what)


def _load_preprocess(path: Path) -> ImagePreprocessing:
    """Read an image preprocessing spec from a YAML or JSON file.

    Raises:
        QuantizeError: ``options_invalid`` — unreadable file or an invalid spec.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise QuantizeError(
            f"{path}: cannot read the preprocessing spec: {exc}", code="options_invalid"
        ) from None
    try:
        return ImagePreprocessing.model_validate(data)
    except PydanticValidationError as exc:
        raise QuantizeError(f"{path}: {_pydantic_reason(exc)}", code="options_invalid") from None


def _pydantic_reason(exc: PydanticValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "value"
    return f"{where}: {err['msg']}"


if __name__ == "__main__":
    raise SystemExit(main())
