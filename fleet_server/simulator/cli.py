"""``scripts/simulate-fleet``: run a simulated fleet against a fleet server and its broker.

    simulate-fleet --server http://127.0.0.1:8080 --mqtt mqtt://127.0.0.1:1883 \\
        --devices 1000 --interval 10 --failure-rate 0.02 [--duration 10m] ...

Settings come from flags, or from a YAML file (``--config sim.yaml``) whose keys are the
fields of :class:`~fleet_server.simulator.settings.SimulatorSettings`; flags override it.
It runs until Ctrl-C (or ``--duration``), printing one summary line every
``--summary-interval`` seconds; then every device publishes its offline status and
disconnects. Errors print ``error: code: sentence`` and exit 1 (2 for a usage error).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError as PydanticValidationError

from fleet_server.cli_output import parse_duration
from fleet_server.errors import ConfigError, FleetError
from fleet_server.simulator.fleet import Fleet
from fleet_server.simulator.settings import ModelSpec, SimulatorSettings

EXIT_ERROR = 1
#: File descriptors beyond one per device connection: HTTP, the loop, logs.
_SPARE_FDS = 256


def seconds(text: str) -> float:
    """argparse type: ``90``, ``0.5``, ``30s``, ``10m``, ``1h`` -> seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        for item in value.split(","):
            key, sep, val = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"{what}: expected KEY=VALUE, got {item!r}")
            out[key] = val
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simulate-fleet",
        description="Simulated edge devices that speak the device protocol to a fleet server.",
    )
    a = p.add_argument
    a("--config", type=Path, help="settings (YAML; keys of SimulatorSettings)")
    a("--server", dest="server_url", help="fleet server URL (default http://127.0.0.1:8080)")
    a("--mqtt", dest="mqtt_url", help="broker URL (default mqtt://127.0.0.1:1883)")
    a("--topic-prefix")
    a("--ca-file", type=Path, help="CA for mqtts:// and https://")
    a("--devices", type=int, help="how many devices (default 100)")
    a("--id-prefix", help="device ids are PREFIX-00000... (default sim)")
    a("--first-index", type=int, help="number of the first device (default 0)")
    a("--profile", action="append", metavar="NAME=WEIGHT", help="profile mix (repeat)")
    a("--model", action="append", metavar="NAME@VERSION[:FORMAT]", help="models run at start")
    a("--connection", choices=["device", "shared"], help="one connection per device (default)")
    a("--connections", type=int, help="shared connections (default 4)")
    a("--register", dest="registration", choices=["auto", "enrol"], help="how devices join (auto)")
    a("--api-token", help="operator token for --register enrol (default $EDGE_FLEET_TOKEN)")
    a("--tag", action="append", metavar="K=V", help="tags of enrolled devices (repeat)")
    a("--mqtt-username", help="shared connections: broker user")
    a("--mqtt-password", help="shared connections ($EDGE_FLEET_SIM_MQTT_PASSWORD)")
    a("--mqtt-cert", dest="mqtt_cert_file", type=Path, help="shared connections: client cert")
    a("--mqtt-key", dest="mqtt_key_file", type=Path, help="shared connections: client key")
    a("--keepalive", dest="keepalive_s", type=int)
    a("--connect-rate", type=float, help="new connections per second (default 500)")
    a("--interval", dest="interval_s", type=seconds, help="telemetry interval (default 10s)")
    a("--request-rate", type=float, help="pretend requests/s per model (default 2)")
    a("--error-rate", type=float, help="share of pretend requests that fail (default 0.002)")
    a("--failure-rate", type=float, help="share of updates that fail (default 0)")
    a("--step-time", dest="step_s", type=seconds, help="mean update step (default 0.5s)")
    a("--probation", dest="probation_s", type=seconds, help="device probation (default 10s)")
    a("--latency-regression", type=float, help="new versions run slower by this (0.3 = 30%%)")
    a("--poll-interval", dest="poll_interval_s", type=seconds, help="0: hints only (300s)")
    a("--no-initial-check", dest="initial_check", action="store_const", const=False)
    a("--min-check-interval", dest="min_check_interval_s", type=seconds)
    a("--http-concurrency", type=int, help="checks and downloads in flight (default 8)")
    a("--state-dir", type=Path, help="TUF metadata and identities (default: temporary)")
    a("--offline-rate", type=float, help="share of the fleet offline at a time (default 0)")
    a("--offline-time", dest="offline_s", type=seconds, help="mean outage (default 60s)")
    a("--duration", dest="duration_s", type=seconds, help="stop after (default: Ctrl-C)")
    a("--summary-interval", dest="summary_interval_s", type=seconds, help="(default 5s)")
    a("--stats-file", type=Path, help="write the counters here as JSON at every summary")
    a("--seed", type=int)
    a("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def settings_from(args: argparse.Namespace, env: dict[str, str]) -> SimulatorSettings:
    """The settings from the flags, over the ``--config`` file.

    Raises:
        ConfigError: the file cannot be read, or a value is invalid (the key is named).
    """
    data: dict[str, Any] = {}
    if args.config is not None:
        try:
            loaded = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{args.config}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: expected a mapping at the top level")
        data.update(loaded)
    skip = {"config", "profile", "model", "tag", "log_level"}
    data.update({k: v for k, v in vars(args).items() if k not in skip and v is not None})
    if args.profile:
        data["profiles"] = {k: float(v) for k, v in _pairs(args.profile, "--profile").items()}
    if args.tag:
        data["tags"] = _pairs(args.tag, "--tag")
    if "api_token" not in data and env.get("EDGE_FLEET_TOKEN"):
        data["api_token"] = env["EDGE_FLEET_TOKEN"]
    if "mqtt_password" not in data and env.get("EDGE_FLEET_SIM_MQTT_PASSWORD"):
        data["mqtt_password"] = env["EDGE_FLEET_SIM_MQTT_PASSWORD"]
    try:
        if args.model:
            data["models"] = [ModelSpec.parse(m) for m in args.model]
        return SimulatorSettings.model_validate(data)
    except (PydanticValidationError, ValueError) as exc:
        if isinstance(exc, PydanticValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "settings"
            raise ConfigError(f"{where}: {first['msg']}") from None
        raise ConfigError(str(exc)) from None


def raise_open_files(settings: SimulatorSettings) -> None:
    """Raise the soft limit of open files to what the fleet needs (up to the hard limit).

    Raises:
        ConfigError: the hard limit is too low (raise it: ``ulimit -Hn``, systemd
            ``LimitNOFILE``).
    """
    conns = settings.devices if settings.connection == "device" else settings.connections
    need = conns + settings.http_concurrency + _SPARE_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need or soft == resource.RLIM_INFINITY:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(
            f"{conns} connections need {need} open files; the hard limit is {hard} "
            "(raise it, or use --connection shared)"
        )
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else hard, hard)
    )


async def _run(fleet: Fleet) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, fleet.stop)
    await fleet.run()


def main(argv: list[str] | None = None) -> int:
    """Run the simulator; returns the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # enrolment: a line per request
    try:
        settings = settings_from(args, dict(os.environ))
        raise_open_files(settings)
        fleet = Fleet(settings)
        how = "own connection each" if settings.connection == "device" else "shared (load only)"
        print(
            f"simulating {settings.devices} devices ({how}, {settings.registration} registration) "
            f"against {settings.server_url} and {settings.mqtt_url}; Ctrl-C stops",
            flush=True,
        )
        asyncio.run(_run(fleet))
    except FleetError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # the state folder, the stats file
        print(f"error: io_error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
