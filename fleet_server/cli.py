"""``edge-fleet``: run the fleet server and manage devices, tokens and model releases.

    edge-fleet serve [--data-dir D] [--database-url U] [--host H] [--port P] [--mqtt-url M]
    edge-fleet db upgrade|current
    edge-fleet token create --role admin --name ops | list | revoke ID     (local database)
    edge-fleet keys init --offline-dir D | rotate ROLE --offline-dir D | status   (files)
    edge-fleet ca init | crl | broker-cert --host H | client-cert NAME             (files)
    edge-fleet device list|show|tag|token|revoke ...                      (API)
    edge-fleet model push BUNDLE --version 1.3.0 [--variant x] | list | show | quantize
    edge-fleet rollout create --model face@1.3.0 --target site=berlin ... | list | show ID
        [--watch] | devices ID | pause|resume|abort|rollback ID                (API)
    edge-fleet device pin DEVICE face@1.2.0 | unpin DEVICE face | pins DEVICE  (API)

API commands read the server URL from ``EDGE_FLEET_URL`` (default http://127.0.0.1:8080)
and the token from ``EDGE_FLEET_TOKEN`` or ``~/.config/edge-fleet/cli.yaml``. Every error
prints ``error: code: sentence`` and exits 1 (2 for a usage error); never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from fleet_server import __version__, cli_keys, cli_local, cli_remote, cli_rollout
from fleet_server.cli_output import parse_duration
from fleet_server.errors import FleetError

EXIT_ERROR = 1


def duration(text: str) -> timedelta:
    """argparse type for ``--expires 1h``."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = argparse.ArgumentParser(
        prog="edge-fleet", description="Run the edge-fleet server and manage the fleet."
    )
    parser.add_argument("--version", action="version", version=f"edge-fleet {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--url", help="server URL (default: $EDGE_FLEET_URL)")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_local.register(sub, common, duration)
    cli_keys.register(sub, common)
    cli_remote.register(sub, common, duration)
    cli_rollout.register(sub, common, duration)  # after cli_remote: adds device pin
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["model", "quantize"]:  # its own parser takes every argument after it
        return cli_remote.quantize(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except FleetError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
