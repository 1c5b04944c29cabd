"""The devices table: the store's device filters, plus an id search and a sort order,
paginated by keyset in both directions (never by offset, never the whole fleet).

The filter conditions and the row loading are the inventory's own
(:mod:`fleet_server.store.devices`), so the table always agrees with
``GET /api/v1/devices``. The keyset is ``(sort value, id)``: a page is an indexed range
read however deep it is.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, literal, select, tuple_
from sqlalchemy.orm import Session

from fleet_server.domain import Device, as_utc, utcnow
from fleet_server.errors import ValidationError
from fleet_server.store.cursor import decode, encode
from fleet_server.store.devices import (
    DEVICE_COLUMNS,
    DeviceFilter,
    devices_from_rows,
    filter_conditions,
)
from fleet_server.store.models import DeviceModelRow, DeviceRow

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SortKey(enum.StrEnum):
    """Columns the table sorts by."""

    ID = "id"
    LAST_SEEN = "last_seen"
    PROFILE = "profile"
    AGENT = "agent_version"


def _sort_expr(key: SortKey) -> ColumnElement[Any]:
    """The sort column, NULLs folded to the smallest value so the keyset is total."""
    if key is SortKey.ID:
        return DeviceRow.id.expression
    if key is SortKey.LAST_SEEN:
        return func.coalesce(DeviceRow.last_seen, literal(_EPOCH, DeviceRow.last_seen.type))
    column = DeviceRow.profile if key is SortKey.PROFILE else DeviceRow.agent_version
    return func.coalesce(column, "")


@dataclass(frozen=True)
class TableQuery:
    """One request of the table."""

    flt: DeviceFilter
    search: str | None = None
    sort: SortKey = SortKey.ID
    descending: bool = False
    limit: int = 50
    after: str | None = None
    before: str | None = None


@dataclass(frozen=True)
class TablePage:
    """One page: its devices, how many match in all, and the cursors around it."""

    items: list[Device]
    total: int
    next_cursor: str | None
    prev_cursor: str | None


def _key_of(sort: SortKey, row: Any) -> str:
    value = row.sort_value
    if sort is SortKey.LAST_SEEN:
        value = as_utc(value).isoformat() if isinstance(value, datetime) else str(value)
    return encode(json.dumps([value, row.id]))


def _parse_key(sort: SortKey, cursor: str) -> tuple[Any, str]:
    try:
        value, device_id = json.loads(decode(cursor))
        if not isinstance(value, str) or not isinstance(device_id, str):
            raise TypeError
        if sort is SortKey.LAST_SEEN:
            return as_utc(datetime.fromisoformat(value)), device_id
    except (ValueError, TypeError):
        raise ValidationError("cursor: not a valid page cursor", code="bad_cursor") from None
    return value, device_id


def _search(text: str) -> ColumnElement[bool]:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return DeviceRow.id.ilike(f"%{escaped}%", escape="\\")


def list_page(
    session: Session,
    query: TableQuery,
    *,
    stale_after: timedelta,
    now: datetime | None = None,
) -> TablePage:
    """A page of the table.

    Raises:
        ValidationError: a cursor is malformed (``bad_cursor``).
    """
    now = as_utc(now or utcnow())
    conds = filter_conditions(query.flt, now - stale_after)
    if query.search:
        conds.append(_search(query.search))
    total = int(session.scalar(select(func.count()).select_from(DeviceRow).where(*conds)) or 0)
    expr = _sort_expr(query.sort)
    keyset = tuple_(expr, DeviceRow.id)
    backwards = query.before is not None
    # walking backwards reads the reversed order, then flips the page
    reverse = query.descending != backwards
    stmt = select(*DEVICE_COLUMNS, expr.label("sort_value")).where(*conds)
    cursor = query.before if backwards else query.after
    if cursor is not None:
        value, device_id = _parse_key(query.sort, cursor)
        column = DeviceRow.last_seen.type if query.sort is SortKey.LAST_SEEN else None
        bound = tuple_(literal(value, column), literal(device_id))
        stmt = stmt.where(keyset < bound if reverse else keyset > bound)
    order = (expr.desc(), DeviceRow.id.desc()) if reverse else (expr.asc(), DeviceRow.id.asc())
    rows = list(session.execute(stmt.order_by(*order).limit(query.limit + 1)))
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    if backwards:
        rows.reverse()
    items = devices_from_rows(session, rows, now, stale_after)
    first = _key_of(query.sort, rows[0]) if rows else None
    last = _key_of(query.sort, rows[-1]) if rows else None
    if backwards:
        return TablePage(items, total, last, first if more else None)
    return TablePage(items, total, last if more else None, first if query.after else None)


def profiles(session: Session) -> list[str]:
    """The profiles devices reported (for the filter's choices)."""
    stmt = select(DeviceRow.profile).where(DeviceRow.profile.is_not(None)).distinct()
    return sorted(p for p in session.scalars(stmt) if p)


def model_versions(session: Session) -> list[tuple[str, str]]:
    """The (model, version) pairs devices run (for the filter's choices)."""
    m = DeviceModelRow
    stmt = select(m.model, m.version).distinct().order_by(m.model, m.version)
    return [(str(a), str(b)) for a, b in session.execute(stmt)]
