"""The rollout progress view the CLI prints (``rollout show``, ``--watch``): a header, the
gates' verdicts, and one line per wave with its devices by state and a progress bar.

Pure functions of the API's JSON (``GET /api/v1/rollouts/{id}``), so they are tested
without a server::

    rollout 7  face 1.3.0  running  wave 2 of 3, started 3m ago (dwell 30m)
    target   site=berlin
    waves    1,50%,100% -> 1, 2, 2 devices; probation 20m; auto-rollback off
    gate     failure ok: rollout: 1 of 1 decided devices failed (judged from 3)

    WAVE  SIZE  PENDING  ASSIGNED  UPDATING  PROBATION  COMMITTED  FAILED  OTHER  PROGRESS
    1     1     0        0         0         0          1          0       0      [####] 100%
    2*    2     0        1         1         0          0          0       0      [....]   0%
    3     2     2        0         0         0          0          0       0      [....]   0%
    all   5     2        1         1         0          1          0       0      [#...]  20%

(bars are 20 cells wide: ``#`` committed, ``x`` failed, ``-`` otherwise done, ``.`` open)
"""

from __future__ import annotations

from typing import Any

from fleet_server.cli_output import age

BAR = 20
#: Table columns: header -> the device states counted in it.
COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("pending", ("pending",)),
    ("assigned", ("assigned",)),
    ("updating", ("updating",)),
    ("probation", ("probation",)),
    ("committed", ("committed",)),
    ("failed", ("failed", "stalled")),
    ("other", ("superseded", "pinned", "reverted", "cancelled")),
]
_OTHER = ("superseded", "pinned", "reverted", "cancelled", "skipped")


def duration(seconds: int) -> str:
    """``90`` -> ``1m30s``; ``3600`` -> ``1h``."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def bar(counts: dict[str, int], size: int) -> str:
    """``[###xx--....]  60%``: committed ``#``, failed ``x``, otherwise done ``-``, not done
    yet ``.``; the percentage is of devices with an answer."""
    if size <= 0:
        return "[" + " " * BAR + "]    -"
    committed = counts.get("committed", 0)
    failed = counts.get("failed", 0) + counts.get("stalled", 0)
    other = sum(counts.get(s, 0) for s in _OTHER)
    open_ = max(size - committed - failed - other, 0)
    cells = [round(BAR * n / size) for n in (committed, failed, other)]
    while sum(cells) > BAR:  # rounding up thrice can overflow by one or two
        cells[cells.index(max(cells))] -= 1
    text = "#" * cells[0] + "x" * cells[1] + "-" * cells[2]
    done = (size - open_) / size
    return f"[{text:.<{BAR}}] {done:4.0%}"


def _target(target: dict[str, Any]) -> str:
    if target.get("all_devices"):
        return "every device"
    parts = [f"{k}={v}" for k, v in target.get("tags", {}).items()]
    if target.get("profile"):
        parts.append(f"profile {target['profile']}")
    devices = target.get("devices") or []
    if devices:
        shown = ", ".join(devices[:5]) + (f" (+{len(devices) - 5})" if len(devices) > 5 else "")
        parts.append(f"devices {shown}")
    return "; ".join(parts)


def header(r: dict[str, Any]) -> list[str]:
    """The lines above the wave table."""
    n = len(r["wave_sizes"])
    where = f"wave {r['current_wave'] + 1} of {n}" if r["current_wave"] >= 0 else "not started"
    if r["state"] == "running" and r["current_wave"] >= 0:
        where += f", started {age(r['wave_started_at'])} (dwell {duration(r['dwell_s'])})"
    lines = [f"rollout {r['id']}  {r['model']} {r['version']}  {r['state']}  {where}"]
    lines.append(f"target   {_target(r['target'])}")
    sizes = ", ".join(str(s) for s in r["wave_sizes"])
    rollback = "on" if r["auto_rollback"] else "off"
    lines.append(
        f"waves    {','.join(r['waves'])} -> {sizes} devices; "
        f"probation {duration(r['probation_s'])}; auto-rollback {rollback}"
    )
    if r.get("reason"):
        lines.append(f"reason   {r['reason']['code']}: {r['reason']['message']}")
    for v in r.get("health", []):
        status = "BREACHED" if v["breached"] else "ok"
        lines.append(f"gate     {v['gate']} {status}: {v['message']}")
    return lines


def wave_rows(r: dict[str, Any]) -> list[list[str]]:
    """One row per wave, then a total."""
    rows: list[list[str]] = []
    total: dict[str, int] = {}
    for w in r["waves_progress"]:
        counts = w["counts"]
        for state, n in counts.items():
            total[state] = total.get(state, 0) + n
        mark = str(w["wave"]) + ("*" if w["wave"] == r["current_wave"] + 1 else "")
        cells = [str(sum(counts.get(s, 0) for s in states)) for _, states in COLUMNS]
        rows.append([mark, str(w["size"]), *cells, bar(counts, w["size"])])
    planned = sum(w["size"] for w in r["waves_progress"])
    cells = [str(sum(total.get(s, 0) for s in states)) for _, states in COLUMNS]
    rows.append(["all", str(planned), *cells, bar(total, planned)])
    return rows


def render(r: dict[str, Any]) -> str:
    """The whole view as text."""
    headers = ["wave", "size", *(name for name, _ in COLUMNS), "progress"]
    rows = wave_rows(r)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    out = [*header(r), ""]
    out.append("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    skipped = r["totals"].get("skipped", 0)
    if skipped:
        out.append(
            f"skipped: {skipped} devices no variant fits (rollout devices {r['id']} --wave 0)"
        )
    return "\n".join(out)
