"""``edge-fleet`` commands that call the API: device ... and model ...

The server URL comes from ``EDGE_FLEET_URL`` (or ``--url``, or ``cli.yaml``), the token
from ``EDGE_FLEET_TOKEN`` (or ``~/.config/edge-fleet/cli.yaml``: ``url:`` and ``token:``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fleet_server.cli_client import ApiClient, file_size
from fleet_server.cli_output import Progress, age, block, dump_json, table
from fleet_server.config import load_client_settings
from fleet_server.domain import DeviceState, parse_tag
from fleet_server.errors import ValidationError


def client(args: argparse.Namespace) -> ApiClient:
    """An API client from the environment / cli.yaml, with ``--url`` applied. Raises
    ConfigError for a bad cli.yaml."""
    settings = load_client_settings()
    if args.url:
        settings = settings.model_copy(update={"url": args.url})
    return ApiClient(settings)


def tags_of(values: list[str]) -> dict[str, str]:
    """``k=v`` items (each may hold several, comma-separated) as a dict.

    Raises:
        ValidationError: an item is not ``key=value`` (``bad_tag``).
    """
    out: dict[str, str] = {}
    for value in values:
        for item in filter(None, (v.strip() for v in value.split(","))):
            try:
                key, val = parse_tag(item)
            except ValueError as exc:
                raise ValidationError(str(exc), code="bad_tag") from None
            out[key] = val
    return out


def _models(device: dict[str, Any]) -> str:
    return ",".join(f"{m['name']}@{m['version']}" for m in device["models"]) or "-"


def cmd_device_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": min(args.limit, 1000)}
    if args.tag:
        params["tag"] = [f"{k}={v}" for k, v in tags_of(args.tag).items()]
    for key in ("profile", "model", "model_version", "state"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    api = client(args)
    items = api.get_all("/api/v1/devices", params, limit=None if args.all else args.limit)
    if args.json:
        dump_json(items)
        return 0
    table(
        ["id", "state", "profile", "agent", "models", "tags", "last seen"],
        [
            [
                d["id"],
                d["state"],
                d["profile"],
                d["agent_version"],
                _models(d),
                d["tags"],
                age(d["last_seen"]),
            ]
            for d in items
        ],
    )
    return 0


def cmd_device_show(args: argparse.Namespace) -> int:
    d = client(args).get(f"/api/v1/devices/{args.id}")
    if args.json:
        dump_json(d)
        return 0
    block(
        [
            ("id", d["id"]),
            ("state", f"{d['state']} (reported {d['reported_state']})"),
            ("profile", d["profile"]),
            ("agent", d["agent_version"]),
            ("last seen", age(d["last_seen"])),
            ("tags", d["tags"]),
            ("enrolled", d["enrolled_at"]),
            ("revoked", d["revoked_at"]),
            ("certificate", d["cert_serial"]),
            ("facts", d["facts"]),
        ]
    )
    if d["models"]:
        print()
        table(
            ["model", "version", "state", "format", "provider"],
            [
                [m["name"], m["version"], m["state"], m["format"], m["provider"]]
                for m in d["models"]
            ],
        )
    if d["desired"]:
        print()
        table(
            ["desired model", "version", "variant", "revision"],
            [[m["name"], m["version"], m["variant"], m["revision"]] for m in d["desired"]],
        )
    return 0


def cmd_device_tag(args: argparse.Namespace) -> int:
    body = {"set": tags_of(args.tags), "remove": args.remove or []}
    d = client(args).patch(f"/api/v1/devices/{args.id}/tags", body)
    print(f"{d['id']}: {','.join(f'{k}={v}' for k, v in d['tags'].items()) or 'no tags'}")
    return 0


def cmd_device_token(args: argparse.Namespace) -> int:
    body = {"tags": tags_of(args.tags or []), "expires_in_s": int(args.expires.total_seconds())}
    t = client(args).post("/api/v1/enrolment-tokens", body)
    if args.json:
        dump_json(t)
        return 0
    print(t["token"])
    print(
        f"single-use enrolment token, expires {age(t['expires_at'])}; "
        f"tags: {','.join(f'{k}={v}' for k, v in t['tags'].items()) or 'none'}",
        file=sys.stderr,
    )
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    d = client(args).post(f"/api/v1/devices/{args.id}/revoke")
    print(f"{d['id']}: revoked at {d['revoked_at']}")
    if d["cert_serial"]:
        print(
            f"certificate {d['cert_serial']} is in the CRL: reload the broker to refuse it "
            "(systemctl reload mosquitto)",
            file=sys.stderr,
        )
    return 0


def _release_rows(releases: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["name"],
            r["version"],
            v["variant"],
            v["kind"],
            v["format"],
            v["size"],
            v["sha256"][:12],
            age(v["created_at"]),
        ]
        for r in releases
        for v in r["variants"]
    ]


_RELEASE_HEADERS = ["name", "version", "variant", "kind", "format", "bytes", "sha256", "created"]


def cmd_model_push(args: argparse.Namespace) -> int:
    path: Path = args.bundle
    fields = {"variant": args.variant}
    if args.version:
        fields["version"] = args.version
    if args.name:
        fields["name"] = args.name
    progress = Progress(file_size(path), f"uploading {path.name}")
    r = client(args).upload("/api/v1/models", path, fields, progress=progress.advance)
    progress.finish()
    if args.json:
        dump_json(r)
        return 0
    v = next(v for v in r["variants"] if v["variant"] == args.variant)
    print(f"published {r['name']} {r['version']} ({v['variant']}, {v['format']} {v['kind']})")
    print(f"sha256 {v['sha256']}  {v['size']} bytes")
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": 1000}
    if args.name:
        params["name"] = args.name
    items = client(args).get_all("/api/v1/models", params)
    if args.json:
        dump_json(items)
        return 0
    table(_RELEASE_HEADERS, _release_rows(items))
    return 0


def cmd_model_show(args: argparse.Namespace) -> int:
    api = client(args)
    if args.version:
        r = api.get(f"/api/v1/models/{args.name}/{args.version}")
        if args.json:
            dump_json(r)
            return 0
        block(
            [
                ("name", r["name"]),
                ("version", r["version"]),
                ("created", r["created_at"]),
                ("by", r["created_by"]),
            ]
        )
        print()
        table(_RELEASE_HEADERS, _release_rows([r]))
        return 0
    items = api.get_all("/api/v1/models", {"name": args.name, "limit": 1000})
    if args.json:
        dump_json(items)
        return 0
    if not items:
        print(f"no releases of {args.name}", file=sys.stderr)
        return 1
    table(_RELEASE_HEADERS, _release_rows(items))
    return 0


def quantize(argv: list[str]) -> int:
    """``edge-fleet model quantize ...``: hand every argument to the quantizer's CLI."""
    try:
        from fleet_server.quantize.cli import main as quantize_main
    except ImportError:
        print("error: unavailable: model quantize is not installed here", file=sys.stderr)
        return 1
    return quantize_main(argv)


def cmd_model_quantize(args: argparse.Namespace) -> int:
    return quantize(list(args.rest))


def register(sub: Any, common: argparse.ArgumentParser, duration: Any) -> None:
    """Add ``device`` and ``model`` to the CLI; ``common`` holds --json and --url,
    ``duration`` parses ``--expires``."""
    dev = sub.add_parser("device", help="the device inventory").add_subparsers(
        dest="device_cmd", required=True
    )
    p = dev.add_parser("list", parents=[common], help="list devices")
    p.add_argument("--tag", action="append", help="key=value filter (repeat for AND)")
    p.add_argument("--profile")
    p.add_argument("--model", help="runs this model")
    p.add_argument("--model-version", help="runs this model version")
    p.add_argument("--state", choices=[s.value for s in DeviceState])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--all", action="store_true", help="every page, not just --limit devices")
    p.set_defaults(func=cmd_device_list)
    p = dev.add_parser("show", parents=[common], help="show one device")
    p.add_argument("id")
    p.set_defaults(func=cmd_device_show)
    p = dev.add_parser("tag", parents=[common], help="set (key=value) or --remove tags")
    p.add_argument("id")
    p.add_argument("tags", nargs="*", help="key=value ...")
    p.add_argument("--remove", action="append", metavar="KEY")
    p.set_defaults(func=cmd_device_tag)
    p = dev.add_parser("token", parents=[common], help="create a single-use enrolment token")
    p.add_argument("--tags", "--tag", dest="tags", action="append", help="k=v[,k=v]")
    p.add_argument("--expires", type=duration, default=duration("1h"), help="lifetime (default 1h)")
    p.set_defaults(func=cmd_device_token)
    p = dev.add_parser("revoke", parents=[common], help="revoke a device")
    p.add_argument("id")
    p.set_defaults(func=cmd_device_revoke)

    mod = sub.add_parser("model", help="model releases").add_subparsers(
        dest="model_cmd", required=True
    )
    p = mod.add_parser("push", parents=[common], help="upload a bundle or model file as a release")
    p.add_argument("bundle", type=Path)
    p.add_argument("--version", help="semantic version (required for a bare model file)")
    p.add_argument("--variant", default="default")
    p.add_argument("--name", help="model name (default: the manifest's)")
    p.set_defaults(func=cmd_model_push)
    p = mod.add_parser("list", parents=[common], help="list releases")
    p.add_argument("--name")
    p.set_defaults(func=cmd_model_list)
    p = mod.add_parser("show", parents=[common], help="show a model's releases, or one release")
    p.add_argument("name")
    p.add_argument("version", nargs="?")
    p.set_defaults(func=cmd_model_show)
    p = mod.add_parser("quantize", help="quantize a model to int8 (see --help)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_model_quantize)
