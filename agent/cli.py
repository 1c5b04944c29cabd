"""``edge-agent``: the device daemon and its local commands.

    edge-agent infer MODEL INPUT [--profile P] [--json]   run one inference locally
    edge-agent bench MODEL [-n N] [--shape ...]           latency, throughput, load time, RSS
    edge-agent doctor [--profile P] [--json]              hardware, providers, probe per link
    edge-agent run [--config FILE]                        the daemon (see agent.daemon)
    edge-agent enroll --server URL --token T              join a fleet (see agent.enroll)

Every failure prints ``error: <code>: <sentence>`` and exits non-zero; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import agent
from agent.errors import EdgeError

EXIT_ERROR = 2


def _state_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    return Path(tempfile.gettempdir()) / "edge-agent-cli"


def _options(profile_name: str | None, fmt: str, state_dir: Path) -> tuple[Any, str]:
    from agent.profiles import detect_profile, load_profile, runtime_options

    profile = load_profile(profile_name) if profile_name else detect_profile().profile
    return runtime_options(profile, fmt, state_dir / "cache"), profile.name


def _load(args: argparse.Namespace) -> tuple[Any, str]:
    from agent.bundle import open_bundle
    from agent.loader import load_model

    state = _state_dir(args.state_dir)
    work = state / "bundles"
    fmt = open_bundle(Path(args.model), work).format
    options, profile = _options(args.profile, fmt, state)
    loaded = load_model(Path(args.model), work_dir=work, options=options, profile=profile)
    return loaded, profile


def cmd_infer(args: argparse.Namespace) -> int:
    from agent.infer_files import read_request
    from agent.serve_request import serve_request

    loaded, profile = _load(args)
    model = loaded.model
    request = read_request(Path(args.input))
    reply = serve_request(model, request, queue_ms=0.0)
    if args.json:
        print(json.dumps(reply.to_dict(full=True), indent=2))
        return 0
    print(f"model     {model.name} {model.version} ({model.format}, profile {profile})")
    print(f"provider  {model.provider}")
    t = reply.timing
    print(f"timing    inference {t.inference_ms:.3f} ms, total {t.total_ms:.3f} ms")
    if reply.result is not None:
        print("result    " + json.dumps(reply.result, indent=2).replace("\n", "\n          "))
    for name, value in reply.outputs or []:
        flat = value.ravel()
        head = ", ".join(f"{v:.6g}" for v in flat[:8].tolist())
        more = ", ..." if flat.size > 8 else ""
        print(f"output    {name} {list(value.shape)} {value.dtype}: [{head}{more}]")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.bench import bench_model, format_bench

    loaded, profile = _load(args)
    shapes = _parse_shapes(args.shape)
    tensors = None
    if args.input:
        from agent.infer_files import read_request

        tensors = [(t.name, t.array) for t in read_request(Path(args.input)).tensors]
    report = bench_model(
        loaded.model, runs=args.runs, seconds=args.seconds, shapes=shapes, tensors=tensors
    )
    report["profile"] = profile
    print(json.dumps(report, indent=2) if args.json else format_bench(report))
    return 0


def _parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, _, dims = item.rpartition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise EdgeError(
                f"--shape {item!r}: expected NAME=D1,D2,...", code="bad_arguments"
            ) from None
    return shapes


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent.doctor import format_report, run_doctor

    report = run_doctor(args.profile, Path(args.root))
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return report.exit_code


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import run_daemon

    return run_daemon(Path(args.config), profile=args.profile)


def cmd_enroll(args: argparse.Namespace) -> int:
    from agent.enroll import enroll

    token = args.token or os.environ.get("EDGE_AGENT_ENROLL_TOKEN")
    if not token:
        raise EdgeError("--token (or $EDGE_AGENT_ENROLL_TOKEN) is required", code="bad_arguments")
    try:
        result = enroll(
            args.server,
            token,
            config_path=Path(args.config),
            device_id=args.device_id,
            state_dir=Path(args.state_dir) if args.state_dir else None,
            profile=args.profile,
            server_ca=Path(args.server_ca) if args.server_ca else None,
        )
    except OSError as exc:
        raise EdgeError(
            f"the server enrolled this device but writing failed: {exc}; fix it and enrol "
            "again with a new token (revoke this device first)",
            code="write_failed",
        ) from None
    print(f"enrolled {result.device_id} (certificate serial {result.serial})")
    print(f"identity  {result.files['cert'].parent}")
    print(f"config    {result.config_path}")
    print(f"broker    {result.broker_url or '-'}")
    print(f"server    {result.server_url}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="The edge-fleet device agent.")
    p.add_argument("--version", action="version", version=f"edge-agent {agent.__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    def model_cmd(name: str, helptext: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("model", help="a bundle (folder, .tar, .tgz) or a bare .onnx/.tflite file")
        sp.add_argument("--profile", help="device profile name (default: detected)")
        sp.add_argument(
            "--state-dir", help="where extracted bundles and caches go (default: a temp dir)"
        )
        sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    sp = model_cmd("infer", "run one inference on a model, locally")
    sp.add_argument("input", help="an image (.jpg/.png), a .npy array, or a JSON/ETNS request file")
    sp.set_defaults(func=cmd_infer)

    sp = model_cmd("bench", "measure a model: latency percentiles, throughput, load time, RSS")
    sp.add_argument("-n", "--runs", type=int, default=200, help="timed runs (default 200)")
    sp.add_argument("--seconds", type=float, default=10.0, help="stop after this long (default 10)")
    sp.add_argument("--shape", action="append", metavar="NAME=D1,D2", help="shape for dynamic dims")
    sp.add_argument("--input", help="use this .npy/.npz/JSON input instead of random values")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser(
        "doctor", help="detect the hardware and check every provider of its profile"
    )
    sp.add_argument("--profile", help="check this profile instead of the detected one")
    sp.add_argument("--root", default="/", help=argparse.SUPPRESS)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_doctor)

    sp = sub.add_parser(
        "enroll", help="join a fleet: make this device's key, get its certificate and config"
    )
    sp.add_argument("--server", required=True, help="the fleet server, e.g. https://fleet:8080")
    sp.add_argument("--token", help="the single-use enrolment token (or $EDGE_AGENT_ENROLL_TOKEN)")
    sp.add_argument("--device-id", help="default: the config's, else the host name")
    sp.add_argument("--config", default="/etc/edge-agent/agent.yaml", help="agent config to update")
    sp.add_argument("--state-dir", help="default: the config's, else /var/lib/edge-agent")
    sp.add_argument("--profile", help="device profile to report (default: detected)")
    sp.add_argument("--server-ca", help="CA file for an https server the system does not trust")
    sp.set_defaults(func=cmd_enroll)

    sp = sub.add_parser("run", help="run the agent daemon (what systemd starts)")
    sp.add_argument("--config", default="/etc/edge-agent/agent.yaml", help="agent config file")
    sp.add_argument("--profile", help="device profile (overrides the config and detection)")
    sp.set_defaults(func=cmd_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edge-agent``; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EdgeError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
