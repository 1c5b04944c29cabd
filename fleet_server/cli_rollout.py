"""``edge-fleet rollout ...`` and ``edge-fleet device pin|unpin|pins``: staged rollouts
through the API.

    edge-fleet rollout create --model face@1.3.0 --target site=berlin \\
        --waves 1,10%,50%,100% --max-failure 5% --min-devices 3 --probation 10m [--auto-rollback]
    edge-fleet rollout list [--state S] [--model M]
    edge-fleet rollout show ID [--watch] | devices ID [--wave N] [--state S]
    edge-fleet rollout pause|abort|rollback ID | resume ID [--force]
    edge-fleet device pin DEVICE face@1.2.0 [--variant V] | unpin DEVICE face | pins DEVICE
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from fleet_server.cli_output import age, dump_json, table
from fleet_server.cli_remote import client, tags_of
from fleet_server.cli_rollout_view import render
from fleet_server.errors import ValidationError
from fleet_server.rollouts.domain import DeviceState, RolloutState

ENDED = {RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.ROLLED_BACK}


def model_at(text: str) -> tuple[str, str]:
    """``face@1.3.0`` -> ``("face", "1.3.0")``.

    Raises:
        ValidationError: no ``@`` or an empty part (``bad_model``).
    """
    name, sep, version = text.partition("@")
    if not sep or not name or not version:
        raise ValidationError(
            f"{text!r}: expected MODEL@VERSION, e.g. face@1.3.0", code="bad_model"
        )
    return name, version


def ratio(text: str) -> float:
    """argparse type: ``5%`` or ``0.05`` -> 0.05."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a ratio like 5% or 0.05") from None
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return value


def variants_of(values: list[str]) -> dict[str, str]:
    """``--variant int8`` (every profile) or ``--variant rpi5=int8`` (one profile)."""
    out: dict[str, str] = {}
    for value in values:
        profile, sep, variant = value.rpartition("=")
        out[profile if sep else "*"] = variant
    return out


def spec_of(args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /api/v1/rollouts`` body from ``rollout create``'s flags.

    Raises:
        ValidationError: a malformed --model, --target or --variant.
    """
    name, version = model_at(args.model)
    target: dict[str, Any] = {"tags": tags_of(args.target or [])}
    if args.profile:
        target["profile"] = args.profile
    if args.device:
        target["devices"] = [d for v in args.device for d in v.split(",") if d]
    if args.all_devices:
        target = {"all_devices": True}
    gates: dict[str, Any] = {"failure": None, "latency": None}
    if not args.no_failure_gate:
        gates["failure"] = {"max_ratio": args.max_failure, "min_devices": args.min_devices}
    if args.max_latency_regression is not None:
        gates["latency"] = {
            "max_regression": args.max_latency_regression,
            "min_devices": args.min_devices,
            "window_s": int(args.latency_window.total_seconds()),
        }
    return {
        "model": name,
        "version": version,
        "variants": variants_of(args.variant or []),
        "target": target,
        "waves": args.waves,
        "dwell_s": int(args.dwell.total_seconds()),
        "probation_s": int(args.probation.total_seconds()),
        "gates": gates,
        "auto_rollback": args.auto_rollback,
    }


def cmd_create(args: argparse.Namespace) -> int:
    r = client(args).post("/api/v1/rollouts", spec_of(args))
    if args.json:
        dump_json(r)
        return 0
    sizes = ", ".join(str(s) for s in r["wave_sizes"])
    print(f"rollout {r['id']}: {r['model']} {r['version']} to {r['devices']} devices")
    print(f"waves: {sizes}; watch it with: edge-fleet rollout show {r['id']} --watch")
    skipped = r["totals"].get("skipped", 0)
    if skipped:
        print(f"{skipped} devices skipped (no variant fits): rollout devices {r['id']} --wave 0")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": 1000}
    for key in ("state", "model"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    items = client(args).get_all("/api/v1/rollouts", params, limit=None if args.all else 100)
    if args.json:
        dump_json(items)
        return 0
    rows = []
    for r in items:
        t = r["totals"]
        failed = t.get("failed", 0) + t.get("stalled", 0)
        wave = f"{r['current_wave'] + 1}/{len(r['wave_sizes'])}"
        done = f"{t.get('committed', 0)}/{r['devices']}"
        rows.append(
            [
                r["id"],
                r["model"],
                r["version"],
                r["state"],
                wave,
                done,
                failed,
                age(r["created_at"]),
            ]
        )
    table(["id", "model", "version", "state", "wave", "committed", "failed", "created"], rows)
    return 0


def cmd_show(args: argparse.Namespace, sleep: Callable[[float], None] = time.sleep) -> int:
    api = client(args)
    path = f"/api/v1/rollouts/{args.id}"
    while True:
        r = api.get(path)
        if args.json:
            dump_json(r)
            return 0
        if args.watch and sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place
        print(render(r), flush=True)
        if not args.watch or RolloutState(r["state"]) in ENDED:
            return 0
        print()
        sleep(args.interval)


def cmd_devices(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": 1000}
    if args.wave is not None:
        params["wave"] = args.wave
    if args.state:
        params["state"] = args.state
    items = client(args).get_all(f"/api/v1/rollouts/{args.id}/devices", params)
    if args.json:
        dump_json(items)
        return 0
    table(
        ["device", "wave", "state", "last event", "variant", "previous", "reason"],
        [
            [
                d["device_id"],
                d["wave"] or "-",
                d["state"] + (" (waived)" if d["waived"] else ""),
                f"{d['last_event']} {age(d['last_event_ts'])}" if d["last_event"] else "-",
                d["variant"],
                d["prev_version"],
                (d["reason"] or {}).get("message"),
            ]
            for d in items
        ],
    )
    return 0


def _verb(verb: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        body = {"force": True} if getattr(args, "force", False) else None
        r = client(args).post(f"/api/v1/rollouts/{args.id}/{verb}", body)
        if args.json:
            dump_json(r)
            return 0
        reason = f" ({r['reason']['message']})" if r.get("reason") else ""
        print(f"rollout {r['id']}: {r['state']}{reason}")
        return 0

    return run


def cmd_pin(args: argparse.Namespace) -> int:
    name, version = model_at(args.model)
    body: dict[str, Any] = {"version": version}
    if args.variant:
        body["variant"] = args.variant
    p = client(args).request("PUT", f"/api/v1/devices/{args.device}/pins/{name}", json=body)
    if args.json:
        dump_json(p)
        return 0
    print(f"{p['device_id']}: pinned to {p['model']} {p['version']} ({p['variant']})")
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    p = client(args).request("DELETE", f"/api/v1/devices/{args.device}/pins/{args.model}")
    print(f"{p['device_id']}: {p['model']} unpinned (it keeps {p['version']} until a rollout)")
    return 0


def cmd_pins(args: argparse.Namespace) -> int:
    items = client(args).get(f"/api/v1/devices/{args.device}/pins")
    if args.json:
        dump_json(items)
        return 0
    table(
        ["model", "version", "variant", "by", "since"],
        [
            [p["model"], p["version"], p["variant"], p["created_by"], age(p["created_at"])]
            for p in items
        ],
    )
    return 0


def _subcommands(parser: argparse.ArgumentParser) -> Any:
    """The sub-command action of ``parser`` (to add commands to ``device``)."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def register(sub: Any, common: argparse.ArgumentParser, duration: Any) -> None:
    """Add ``rollout`` and ``device pin|unpin|pins`` (after ``device`` was registered)."""
    ro = sub.add_parser("rollout", help="staged model rollouts").add_subparsers(
        dest="rollout_cmd", required=True
    )
    p = ro.add_parser("create", parents=[common], help="roll a release out in waves")
    p.add_argument("--model", required=True, help="MODEL@VERSION, e.g. face@1.3.0")
    p.add_argument("--target", action="append", metavar="K=V", help="tag filter (repeat: AND)")
    p.add_argument("--profile", help="only devices of this profile")
    p.add_argument("--device", action="append", help="only these devices (repeat or a,b)")
    p.add_argument("--all-devices", action="store_true", help="the whole fleet")
    p.add_argument("--variant", action="append", metavar="[PROFILE=]VARIANT")
    p.add_argument("--waves", default="1,10%,50%,100%", help="cumulative (default %(default)s)")
    p.add_argument(
        "--dwell",
        type=duration,
        default=duration("30m"),
        help="a wave moves on after this long even if devices are silent (30m)",
    )
    p.add_argument(
        "--probation",
        type=duration,
        default=duration("20m"),
        help="wait this long for a device on probation to commit (20m)",
    )
    p.add_argument("--max-failure", type=ratio, default=0.05, help="failure gate (5%%)")
    p.add_argument("--min-devices", type=int, default=3, help="gates judge from (3)")
    p.add_argument("--no-failure-gate", action="store_true")
    p.add_argument("--max-latency-regression", type=ratio, help="latency gate, e.g. 20%%")
    p.add_argument("--latency-window", type=duration, default=duration("10m"))
    p.add_argument(
        "--auto-rollback",
        action="store_true",
        help="on a gate breach, move the wave's devices back",
    )
    p.set_defaults(func=cmd_create)
    p = ro.add_parser("list", parents=[common], help="list rollouts")
    p.add_argument("--state", choices=[s.value for s in RolloutState])
    p.add_argument("--model")
    p.add_argument("--all", action="store_true", help="every page, not just 100")
    p.set_defaults(func=cmd_list)
    p = ro.add_parser("show", parents=[common], help="a rollout's progress")
    p.add_argument("id", type=int)
    p.add_argument("--watch", action="store_true", help="redraw until the rollout ends")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between redraws")
    p.set_defaults(func=cmd_show)
    p = ro.add_parser("devices", parents=[common], help="a rollout's devices")
    p.add_argument("id", type=int)
    p.add_argument("--wave", type=int, help="1-based; 0 for devices no variant fits")
    p.add_argument("--state", choices=[s.value for s in DeviceState])
    p.set_defaults(func=cmd_devices)
    for verb, text in [
        ("pause", "stop assigning new devices"),
        ("resume", "continue a paused rollout"),
        ("abort", "stop; assigned devices keep the new version"),
        ("rollback", "move every assigned device back"),
    ]:
        p = ro.add_parser(verb, parents=[common], help=text)
        p.add_argument("id", type=int)
        if verb == "resume":
            p.add_argument("--force", action="store_true", help="waive the failures so far")
        p.set_defaults(func=_verb(verb))

    dev = _subcommands(sub.choices["device"])
    p = dev.add_parser("pin", parents=[common], help="pin a device to MODEL@VERSION")
    p.add_argument("device")
    p.add_argument("model", metavar="MODEL@VERSION")
    p.add_argument("--variant")
    p.set_defaults(func=cmd_pin)
    p = dev.add_parser("unpin", parents=[common], help="remove a device's pin of MODEL")
    p.add_argument("device")
    p.add_argument("model")
    p.set_defaults(func=cmd_unpin)
    p = dev.add_parser("pins", parents=[common], help="a device's pins")
    p.add_argument("device")
    p.set_defaults(func=cmd_pins)
