"""Answers as text: aligned tables (numbers right-aligned), CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from typing import Any

_NUMERIC = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value % 1 else f"{value:.0f}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return printable(str(value))


def printable(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1) shown as ``\\xNN``: values from
    the network (a payee, a refused body) must not move a terminal's cursor or ring it."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def _csv_cell(value: object) -> str:
    """A CSV cell a spreadsheet will not run: text starting like a formula gets a ``'``
    prefix (numbers, negative ones included, are left alone)."""
    text = _cell(value)
    if text.startswith(_FORMULA_START) and not _NUMERIC.fullmatch(text):
        return "'" + text
    return text


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) or (
        isinstance(value, str) and _NUMERIC.fullmatch(value) is not None
    )


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned text table; numeric columns (money, counts, durations) right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    right = [
        bool(rows) and all(_is_number(row[i]) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        out = [v.rjust(widths[i]) if right[i] else v.ljust(widths[i]) for i, v in enumerate(values)]
        return "  ".join(out).rstrip()

    lines = [line(headers), line(["-" * w for w in widths])]
    lines += [line(row) for row in cells]
    return "\n".join(lines) + "\n"


def _table_of_dicts(items: list[dict[str, Any]]) -> str:
    if not items:
        return "(none)\n"
    headers = list(items[0])
    return render_table(headers, [[item.get(h) for h in headers] for item in items])


def _key_value_table(obj: dict[str, Any]) -> str:
    """Scalars as a two-column table, then each nested mapping or list as its own table."""
    scalars = [(k, v) for k, v in obj.items() if not isinstance(v, dict | list)]
    out = render_table(["field", "value"], scalars) if scalars else ""
    for key, value in obj.items():
        if isinstance(value, dict):
            out += f"\n{key}:\n" + render_table(["key", "value"], list(value.items()))
        elif isinstance(value, list):
            out += f"\n{key}:\n" + _table_of_dicts(value)
    return out


def render_data(data: object, fmt: str) -> str:
    """An analytics answer (JSON-ready data) as ``table``, ``json`` or ``csv`` text."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "csv":
        return _csv(data)
    if isinstance(data, list):
        return _table_of_dicts(data)
    if isinstance(data, dict):
        return _key_value_table(data)
    return _cell(data) + "\n"


def _flatten(prefix: str, value: object, out: list[tuple[str, object]]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _flatten(f"{prefix}.{index}", item, out)
    else:
        out.append((prefix, value))


def _csv(data: object) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if isinstance(data, dict) and isinstance(data.get("points"), list):
        data = data["points"]  # a time series: its points are the table
    if isinstance(data, list):
        if data and isinstance(data[0], dict):
            headers = list(data[0])
            writer.writerow(headers)
            for item in data:
                writer.writerow([_csv_cell(item.get(h)) for h in headers])
        else:
            writer.writerow(["value"])
            for item in data:
                writer.writerow([_csv_cell(item)])
        return buffer.getvalue()
    pairs: list[tuple[str, object]] = []
    _flatten("", data, pairs)
    writer.writerow(["field", "value"])
    for key, value in pairs:
        writer.writerow([key, _csv_cell(value)])
    return buffer.getvalue()



def render_flux(tables: list[tuple[list[str], list[list[object]]]], fmt: str) -> str:
    """Flux result tables as aligned tables (one per result table), JSON or CSV."""
    if fmt == "json":
        data = [[dict(zip(cols, row, strict=True)) for row in rows] for cols, rows in tables]
        return json.dumps(data, indent=2, default=str) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for index, (cols, rows) in enumerate(tables):
            writer.writerow(["table", *cols])
            writer.writerows([[index, *[_csv_cell(v) for v in row]] for row in rows])
        return buffer.getvalue()
    if not tables:
        return "(no tables)\n"
    parts = [
        f"table {index}:\n" + render_table(cols, rows) for index, (cols, rows) in enumerate(tables)
    ]
    return "\n".join(parts)



def clip(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with ``...`` (0: whole)."""
    text = " ".join(printable(text).split())
    return text if width <= 0 or len(text) <= width else text[: max(1, width - 3)] + "..."
