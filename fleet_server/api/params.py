"""Query parameters shared by several routers: pages and time windows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Query

from fleet_server.domain import as_utc, utcnow
from fleet_server.errors import ValidationError

Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Cursor = Annotated[
    str | None, Query(max_length=200, description="next_cursor of the previous page")
]
Since = Annotated[datetime | None, Query(description="start (RFC 3339); default: until - 1h")]
Until = Annotated[datetime | None, Query(description="end (RFC 3339); default: now")]
Step = Annotated[
    int | None, Query(ge=1, le=86_400, description="seconds per point; default: ~200 points")
]

MAX_POINTS = 2000
_NICE_STEPS = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21_600, 43_200, 86_400)


@dataclass(frozen=True)
class Window:
    since: int
    until: int
    step: int

    def bounds(self) -> tuple[datetime, datetime]:
        return (
            datetime.fromtimestamp(self.since, UTC),
            datetime.fromtimestamp(self.until, UTC),
        )


def window(since: datetime | None, until: datetime | None, step: int | None) -> Window:
    """The time window of a series query, in epoch seconds.

    Raises:
        ValidationError: ``since`` is not before ``until``, or the step makes too many points.
    """
    end = as_utc(until) if until else utcnow()
    start = as_utc(since) if since else end - timedelta(hours=1)
    if start >= end:
        raise ValidationError("since: must be before until")
    span = int((end - start).total_seconds())
    if step is None:
        step = next((s for s in _NICE_STEPS if span / s <= 200), _NICE_STEPS[-1])
    if span / step > MAX_POINTS:
        raise ValidationError(
            f"step: {step}s gives more than {MAX_POINTS} points; use a larger step"
        )
    return Window(int(start.timestamp()), int(end.timestamp()), step)
