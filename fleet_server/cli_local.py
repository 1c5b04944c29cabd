"""``edge-fleet`` commands that work on the server's own database: serve, db, token.

``token create`` is how the first admin token is made: run it on the server host (it
talks to the database directly, no API token needed) and keep the printed secret.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fleet_server.auth import mint
from fleet_server.cli_output import block, dump_json, table
from fleet_server.config import ServerSettings, load_server_settings
from fleet_server.domain import Role, utcnow
from fleet_server.errors import ValidationError
from fleet_server.store import migrate, tokens
from fleet_server.store.engine import Database


def add_db_options(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--data-dir`` and ``--database-url`` (env: EDGE_FLEET_DATA_DIR,
    EDGE_FLEET_DATABASE_URL)."""
    p.add_argument("--config", type=Path, help="server settings (YAML)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("EDGE_FLEET_DATA_DIR"),
        help="where SQLite and artifacts live (default ./edge-fleet-data)",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("EDGE_FLEET_DATABASE_URL"),
        help="e.g. postgresql+psycopg://fleet@db/fleet (default: SQLite in --data-dir)",
    )


def settings_from(args: argparse.Namespace, **extra: Any) -> ServerSettings:
    """Server settings from ``--config`` plus the flags given. Raises ConfigError."""
    overrides: dict[str, Any] = {"data_dir": args.data_dir, "database_url": args.database_url}
    overrides.update(extra)
    return load_server_settings(args.config, overrides)


def _local_actor() -> str:
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):
        return "local:unknown"


def cmd_serve(args: argparse.Namespace) -> int:
    """Apply pending migrations and serve the API (and the ingest, with --mqtt-url)."""
    import uvicorn

    from fleet_server.server import build_app, build_services, prepare
    from fleet_server.workers import LOG_LEVEL_ENV, SETTINGS_ENV

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_from(
        args,
        host=args.host,
        port=args.port,
        mqtt={"url": args.mqtt_url} if args.mqtt_url else None,
    )
    level = args.log_level.lower()
    if args.workers <= 1:
        app = build_app(settings)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=level)
        return 0
    if args.workers > 64:
        raise ValidationError(f"--workers {args.workers}: at most 64")
    services = build_services(settings)
    try:
        prepare(services)  # once, before the workers start
    finally:
        services.releases.validator.close()
        services.db.dispose()
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    os.environ[LOG_LEVEL_ENV] = level
    uvicorn.run(
        "fleet_server.server:app_from_env",
        factory=True,
        workers=args.workers,
        host=settings.host,
        port=settings.port,
        log_level=level,
    )
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply pending migrations."""
    db = Database(settings_from(args).resolved_database_url())
    try:
        before, after = migrate.upgrade(db)
    finally:
        db.dispose()
    print(f"database at {after} (was {before or 'empty'})")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    """Print the schema revision."""
    db = Database(settings_from(args).resolved_database_url())
    try:
        rev = migrate.current(db)
    finally:
        db.dispose()
    print(f"{rev or 'empty'} (newest: {migrate.head()})")
    return 0


def _open_db(args: argparse.Namespace) -> Database:
    db = Database(settings_from(args).resolved_database_url())
    migrate.upgrade(db)
    return db


def cmd_token_create(args: argparse.Namespace) -> int:
    """Create an API token in the local database and print its secret once."""
    expires = utcnow() + args.expires if args.expires else None
    secret = mint()
    db = _open_db(args)
    try:
        with db.write() as session:
            record = tokens.create_api_token(
                session,
                name=args.name,
                role=Role(args.role),
                token_hash=secret.hash,
                prefix=secret.prefix,
                actor=_local_actor(),
                expires_at=expires,
            )
    finally:
        db.dispose()
    if args.json:
        dump_json(
            {"id": record.id, "name": record.name, "role": record.role, "token": secret.token}
        )
        return 0
    print(secret.token)
    print(
        f"created token #{record.id} {record.name!r} ({record.role.value}); "
        "the secret above is shown only once",
        file=sys.stderr,
    )
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    """List API tokens (never their secrets)."""
    db = _open_db(args)
    try:
        with db.read() as session:
            found = tokens.list_api_tokens(session, include_revoked=args.all)
    finally:
        db.dispose()
    if args.json:
        dump_json([t.__dict__ for t in found])
        return 0
    table(
        ["id", "name", "role", "prefix", "created", "expires", "revoked", "last used"],
        [
            [
                t.id,
                t.name,
                t.role.value,
                t.prefix + "...",
                t.created_at,
                t.expires_at,
                t.revoked_at,
                t.last_used_at,
            ]
            for t in found
        ],
    )
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Revoke an API token by id."""
    if not args.id.isdigit():
        raise ValidationError(f"token id {args.id!r} is not a number (see: edge-fleet token list)")
    db = _open_db(args)
    try:
        with db.write() as session:
            t = tokens.revoke_api_token(session, int(args.id), actor=_local_actor())
    finally:
        db.dispose()
    block([("revoked", f"#{t.id} {t.name}"), ("at", t.revoked_at)])
    return 0


def register(sub: Any, common: argparse.ArgumentParser, duration: Any) -> None:
    """Add ``serve``, ``db`` and ``token`` to the CLI; ``common`` holds --json and --url,
    ``duration`` parses ``--expires``."""
    p = sub.add_parser(
        "serve", parents=[common], help="run the API server (applies migrations first)"
    )
    add_db_options(p)
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8080)")
    p.add_argument("--mqtt-url", default=None, help="broker to ingest from (mqtt://host:1883)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes on this host (one runs the ingest and rollout engine)",
    )
    p.set_defaults(func=cmd_serve)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_cmd", required=True)
    p = db.add_parser("upgrade", parents=[common], help="apply pending migrations")
    add_db_options(p)
    p.set_defaults(func=cmd_db_upgrade)
    p = db.add_parser("current", parents=[common], help="show the schema revision")
    add_db_options(p)
    p.set_defaults(func=cmd_db_current)

    tok = sub.add_parser("token", help="operator API tokens (local database)")
    ts = tok.add_subparsers(dest="token_cmd", required=True)
    p = ts.add_parser("create", parents=[common], help="create a token and print it once")
    add_db_options(p)
    p.add_argument("--role", required=True, choices=[r.value for r in Role])
    p.add_argument("--name", required=True)
    p.add_argument("--expires", type=duration, help="lifetime, e.g. 90d (default: never)")
    p.set_defaults(func=cmd_token_create)
    p = ts.add_parser("list", parents=[common], help="list tokens")
    add_db_options(p)
    p.add_argument("--all", action="store_true", help="include revoked tokens")
    p.set_defaults(func=cmd_token_list)
    p = ts.add_parser("revoke", parents=[common], help="revoke a token")
    add_db_options(p)
    p.add_argument("id", help="token id (see token list)")
    p.set_defaults(func=cmd_token_revoke)
