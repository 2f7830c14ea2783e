"""The table and the JSON document."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.common import Row


def _number(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "rps" or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def _target(row: Row) -> str:
    if row.target is None:
        return ""
    if row.floor is not None:
        return f"<= {row.target:g} x"
    return f"<= {row.target:g} {'B' if row.unit == 'bytes' else row.unit}"


def _status(row: Row) -> str:
    met = row.met
    return "" if met is None else ("met" if met else "NOT MET")


def _notes(row: Row) -> str:
    extra = row.extra
    parts = []
    if "p50_us" in extra:
        parts.append(f"p50 {_number(extra['p50_us'])} us, p99 {_number(extra['p99_us'])} us")
    if "wall_us" in extra:
        parts.append(f"wall {_number(extra['wall_us'])} us/req")
    if "cpu_us" in extra:
        parts.append(f"CPU {_number(extra['cpu_us'])} us")
    if "rss_bytes_per_entry" in extra and extra["rss_bytes_per_entry"] is not None:
        parts.append(f"RSS {extra['rss_bytes_per_entry']:.0f} B/entry")
    if "entries" in extra:
        parts.append(f"{extra['entries']:,} entries")
    if "note" in extra:
        parts.append(str(extra["note"]))
    return "; ".join(parts)


def table(rows: Sequence[Row], errors: Mapping[str, str]) -> str:
    header = ("row", "median", "best", "unit", "ratio", "to floor", "target", "status", "notes")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        ratio = row.ratio
        lines.append((
            row.name,
            _number(row.value, row.unit),
            _number(row.best, row.unit),
            row.unit if row.unit != "us" else "us",
            "" if ratio is None else f"{ratio:.3f}",
            row.floor or "",
            _target(row),
            _status(row),
            _notes(row),
        ))  # fmt: skip
    for name, message in errors.items():
        lines.append((name, "-", "-", "", "", "", "", "ERROR", message.splitlines()[0][:100]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    right = {1, 2, 4}
    out = []
    for index, line in enumerate(lines):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(line[:-1])
        ]
        out.append("  ".join([*cells, line[-1]]).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in widths) + "  -----")
    return "\n".join(out)


def markdown(rows: Sequence[Row]) -> str:
    """The same table as Markdown (for the README)."""
    out = [
        "| row | median | best | unit | ratio | floor | target | status | notes |",
        "|---|---:|---:|---|---:|---|---|---|---|",
    ]
    for row in rows:
        ratio = row.ratio
        cells = [
            f"`{row.name}`",
            _number(row.value, row.unit),
            _number(row.best, row.unit),
            row.unit,
            "" if ratio is None else f"{ratio:.3f}",
            row.floor or "",
            _target(row).replace("<=", "≤"),
            _status(row),
            _notes(row),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def document(
    rows: Sequence[Row], errors: Mapping[str, str], meta: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``--json`` document: ``meta``, ``rows`` (keyed by row name), ``targets``, ``errors``."""
    return {
        "meta": dict(meta),
        "rows": {row.name: row.as_json() for row in rows},
        "targets": {
            row.name: {
                "ratio": None if row.ratio is None else round(row.ratio, 4),
                "value": round(row.value, 3),
                "target": row.target,
                "met": row.met,
            }
            for row in rows
            if row.target is not None
        },
        "errors": dict(errors),
    }
