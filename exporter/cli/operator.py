"""Operator commands behind the command line: replay, export, dead-letters, query, flux,
backfill, recover.

Commands that open the ledger (replay, export, backfill) take the data directory's lock
first, so they refuse to run beside an exporter on the same data directory. Replay
commits through the same validation and ledger path as ``POST /v1/events`` and then runs
the exporter's own :class:`~exporter.store.forwarder.Forwarder` until the outbox is drained, so
the store holds the replayed events when the command returns. ``query`` asks a running
exporter over HTTP (``--url``) or, when no exporter holds the data directory, opens the
store itself; it says on stderr which one it did. ``dead-letters`` reads the ledger
through a read-only SQLite connection, which SQLite allows beside a running exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import functools
import gzip
import io
import itertools
import json
import logging
import os
import re
import sqlite3
import struct
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from prometheus_client import CollectorRegistry

from ..analytics.models import Analytics, AnalyticsRequestError, Window, WindowError, result_data
from ..analytics.source import analytics_source
from ..config import Settings, StoreKind
from ..errors import (
    DataDirLockedError,
    ExporterError,
    LedgerCorruptError,
    LedgerError,
    OperatorError,
)
from ..events import EventError, MalformedJSONError, canonical_json, dedup_key, parse_event_json
from ..ledger import (
    DataDirLock,
    DeadLetter,
    GroupCommitter,
    Ledger,
    Outcome,
    PreparedEvent,
    Submission,
    read_only_uri,
    recovery_marker,
)
from ..metrics import Metrics
from ..records import Store
from ..store import Forwarder, open_store

log = logging.getLogger(__name__)

REPLAY_BATCH_EVENTS = 5_000
"""Events committed to the ledger per transaction during replay and backfill."""

_GZIP_MAGIC = b"\x1f\x8b"
_NUMERIC = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


# --------------------------------------------------------------------------- shared helpers


def parse_instant(text: str, option: str) -> int:
    """Epoch milliseconds from ``text``: an integer (ms) or an RFC 3339 time with offset."""
    if re.fullmatch(r"-?[0-9]{1,19}", text):  # ASCII: isdigit() also admits "²"
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise OperatorError(
            f"{option}: expected epoch milliseconds or an RFC 3339 time, got {text!r}", 2
        ) from None
    if moment.tzinfo is None:
        raise OperatorError(f"{option}: {text!r} needs a UTC offset (e.g. Z)", 2)
    return int(moment.timestamp() * 1000)


def _iso(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@contextlib.contextmanager
def locked_data_dir(settings: Settings, command: str) -> Iterator[DataDirLock]:
    """Hold the data directory's lock, or refuse clearly when an exporter holds it."""
    try:
        lock = DataDirLock(settings.data_dir)
    except DataDirLockedError as error:
        raise OperatorError(
            f"{command}: {error}. {command} opens the ledger itself and cannot run beside "
            "an exporter on the same data directory"
        ) from None
    try:
        yield lock
    finally:
        lock.release()


def _existing_ledger(settings: Settings, command: str) -> None:
    if not settings.ledger_path.exists():
        raise OperatorError(f"{command}: no ledger at {settings.ledger_path}")


class Progress:
    """A progress line on a stream: done/total, rate per second and ETA.

    On a terminal the line redraws in place; elsewhere a line is written every few seconds.
    """

    def __init__(self, stream: IO[str], unit: str, total: float | None = None) -> None:
        """Report on ``stream``; ``total`` (same unit as ``advance``) gives the ETA."""
        self.stream = stream
        self.unit = unit
        self.total = total
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._last = 0.0
        self.items = 0
        self.done = 0.0
        self._drawn: tuple[int, float] | None = None

    def update(self, items: int, done: float | None = None, force: bool = False) -> None:
        """Record ``items`` processed (and ``done`` of the total so far); maybe redraw."""
        self.items = items
        if done is not None:
            self.done = done
        now = time.monotonic()
        if not force and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        self._drawn = (items, self.done)
        line = self.render(now)
        self.stream.write(("\r" + line + " " * 4) if self.tty else line + "\n")
        self.stream.flush()

    def render(self, now: float | None = None) -> str:
        """The progress line."""
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.items / elapsed
        parts = [f"{self.items} {self.unit}", f"{rate:,.0f} {self.unit}/s"]
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            width = 24
            filled = int(fraction * width)
            bar = "#" * filled + "-" * (width - filled)
            parts.insert(0, f"[{bar}] {fraction * 100:5.1f}%")
            if 0 < fraction < 1:
                eta = elapsed * (1 - fraction) / fraction
                parts.append(f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d}")
        return "  ".join(parts)

    def finish(self) -> None:
        """Draw the final state (unless already drawn) and end the line."""
        if self._drawn != (self.items, self.done):
            self.update(self.items, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@contextlib.asynccontextmanager
async def delivering(
    settings: Settings, committer: GroupCommitter, deliver: bool, drain_seconds: float
) -> AsyncIterator[Forwarder | None]:
    """Run the exporter's forwarder from ``committer``'s ledger to the configured store.

    On exit the forwarder drains the outbox for up to ``drain_seconds`` and the store is
    closed; what is not delivered stays in the ledger for the exporter's next start.
    """
    if not deliver:
        yield None
        return
    try:
        store = await asyncio.to_thread(open_store, settings)
    except ExporterError as error:
        raise OperatorError(f"cannot open the store: {error}") from None
    forwarder = Forwarder(committer, store, Metrics(CollectorRegistry()), settings.store_batch_size)
    committer.on_commit_hooks.append(forwarder.wake)
    forwarder.start()
    try:
        yield forwarder
    finally:
        await forwarder.stop(drain_seconds)
        await store.close()


# --------------------------------------------------------------------------- replay


@dataclass
class ReplaySummary:
    """What a replay did."""

    files: int = 0
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    delivered_to: str | None = None
    left_in_ledger: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "files": self.files,
            "lines": self.lines,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": dict(sorted(self.rejected.items())),
            "rejectedTotal": sum(self.rejected.values()),
            "store": self.delivered_to,
            "leftInLedger": self.left_in_ledger,
        }


def _open_input(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """(raw file, line reader): gzip is recognised by its magic bytes, not the name."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    head = raw.read(2)
    raw.seek(0)
    if head == _GZIP_MAGIC:
        return raw, cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    return raw, raw


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """(line number, line, bytes of the file consumed so far) for each non-blank line."""
    raw, reader = _open_input(path)
    with raw, reader:
        for number, line in enumerate(reader, start=1):
            if line.strip():
                yield number, line.rstrip(b"\r\n"), raw.tell()


async def replay(
    settings: Settings,
    paths: Sequence[Path],
    *,
    err: IO[str],
    deliver: bool = True,
    drain_seconds: float = 60.0,
    batch_events: int = REPLAY_BATCH_EVENTS,
    max_reported: int = 100,
) -> ReplaySummary:
    """Feed NDJSON files (plain or gzip) through validation and the ledger, then the store.

    Bad lines are reported on ``err`` as ``file:line: reason: message`` (the first
    ``max_reported``) and counted; they never stop the rest.
    """
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise OperatorError(f"replay: no such file: {', '.join(missing)}", 2)
    summary = ReplaySummary(files=len(paths))
    total_bytes = sum(p.stat().st_size for p in paths)
    progress = Progress(err, "events", total_bytes)
    reported = 0

    def report(where: str, reason: str, message: str) -> None:
        nonlocal reported
        summary.rejected[reason] += 1
        reported += 1
        if reported <= max_reported:
            err.write(f"{where}: {reason}: {message}\n")
        elif reported == max_reported + 1:
            err.write(f"(more rejected lines are counted but not listed after {max_reported})\n")

    with locked_data_dir(settings, "replay"):
        ledger = await asyncio.to_thread(Ledger, settings.ledger_path, settings.durability)
        committer = GroupCommitter(ledger)
        try:
            async with delivering(settings, committer, deliver, drain_seconds) as forwarder:
                summary.delivered_to = forwarder.store.name if forwarder else None
                pending: list[tuple[str, PreparedEvent]] = []

                async def commit() -> None:
                    if not pending:
                        return
                    result = await committer.submit(Submission([p for _, p in pending]))
                    for (where, _), outcome in zip(pending, result.outcomes, strict=True):
                        if outcome is Outcome.ACCEPTED:
                            summary.accepted += 1
                        elif outcome is Outcome.DUPLICATE:
                            summary.duplicates += 1
                        else:
                            report(
                                where,
                                "conflict",
                                "an event with the same id was already stored with a "
                                "different body (kept as a dead letter)",
                            )
                    pending.clear()

                done_before = 0
                for path in paths:
                    consumed = 0
                    for number, line, consumed in _iter_lines(path):
                        summary.lines += 1
                        where = f"{path}:{number}"
                        try:
                            event = parse_event_json(line)
                        except MalformedJSONError as error:
                            report(where, "malformed", f"not valid JSON: {error}")
                            continue
                        except EventError as error:
                            report(where, "invalid", str(error))
                            continue
                        body = canonical_json(event)
                        pending.append(
                            (where, PreparedEvent(event, dedup_key(event, body), body, line))
                        )
                        if len(pending) >= batch_events:
                            await commit()
                            progress.update(summary.lines, done_before + consumed)
                    done_before += path.stat().st_size
                await commit()
                progress.update(summary.lines, done_before)
        finally:
            progress.finish()
            summary.left_in_ledger = ledger.backlog
            await asyncio.to_thread(committer.close)
            await asyncio.to_thread(ledger.close)
    return summary


# --------------------------------------------------------------------------- export


def _open_output(output: Path | None, stdout: IO[bytes]) -> contextlib.AbstractContextManager[Any]:
    if output is None:
        return contextlib.nullcontext(stdout)
    if output.name.endswith(".gz"):
        return gzip.open(output, "wb")
    return open(output, "wb")


def export(
    settings: Settings,
    since_ms: int | None,
    until_ms: int | None,
    output: Path | None,
    stdout: IO[bytes],
) -> int:
    """Write the ledger's events in commit order as NDJSON; returns how many.

    ``since_ms`` (inclusive) and ``until_ms`` (exclusive) select by the event's own
    timestamp. Each line is the event's canonical JSON, which ``replay`` ingests with the
    same dedup key.
    """
    _existing_ledger(settings, "export")
    written = 0
    with locked_data_dir(settings, "export"):
        ledger = Ledger(settings.ledger_path, settings.durability)
        try:
            with _open_output(output, stdout) as sink:
                for _seq, _key, body in ledger.iter_events():
                    blob = bytes(body)
                    if since_ms is not None or until_ms is not None:
                        ts = int(json.loads(blob)["data"]["timestamp"])
                        if since_ms is not None and ts < since_ms:
                            continue
                        if until_ms is not None and ts >= until_ms:
                            continue
                    sink.write(blob + b"\n")
                    written += 1
                sink.flush()
        finally:
            ledger.close()
    return written


# --------------------------------------------------------------------------- dead letters


def dead_letters(settings: Settings, reason: str | None, limit: int) -> list[dict[str, Any]]:
    """Stored dead letters, newest first, read without disturbing a running exporter."""
    _existing_ledger(settings, "dead-letters")
    uri = read_only_uri(settings.ledger_path)
    sql = "SELECT id, received_at, reason, error, key, raw FROM dead_letters"
    params: list[object] = []
    if reason is not None:
        sql += " WHERE reason = ?"
        params.append(reason)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(limit)
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=30.0)
        try:
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as error:
        raise OperatorError(f"dead-letters: cannot read {settings.ledger_path}: {error}") from None
    return [
        {
            "id": row[0],
            "receivedAt": _iso(int(row[1])),
            "reason": row[2],
            "error": row[3],
            "key": row[4],
            "raw": bytes(row[5]).decode("utf-8", errors="replace"),
        }
        for row in rows
    ]


# --------------------------------------------------------------------------- rendering


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value % 1 else f"{value:.0f}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


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
                writer.writerow([_cell(item.get(h)) for h in headers])
        else:
            writer.writerow(["value"])
            for item in data:
                writer.writerow([_cell(item)])
        return buffer.getvalue()
    pairs: list[tuple[str, object]] = []
    _flatten("", data, pairs)
    writer.writerow(["field", "value"])
    for key, value in pairs:
        writer.writerow([key, _cell(value)])
    return buffer.getvalue()


# --------------------------------------------------------------------------- query


@dataclass(frozen=True, slots=True)
class QueryRequest:
    """One analytics question, as the HTTP API takes it."""

    name: str
    window: str
    at_ms: int | None
    limit: int
    metric: str


def query_exporter(url: str, token: str | None, request: QueryRequest, timeout: float) -> object:
    """Ask a running exporter's ``GET /v1/analytics/{name}``; its JSON answer."""
    params: dict[str, str] = {"window": request.window, "limit": str(request.limit)}
    if request.name == "timeseries":
        params["metric"] = request.metric
    if request.at_ms is not None:
        params["at"] = str(request.at_ms)
    target = f"{url.rstrip('/')}/v1/analytics/{request.name}?{urllib.parse.urlencode(params)}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(target, headers=headers), timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as error:
        with error:
            body = error.read().decode("utf-8", errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            body = str(json.loads(body)["error"])
        raise OperatorError(f"query: {url} answered {error.code}: {body}") from None
    except (urllib.error.URLError, OSError) as error:
        raise OperatorError(f"query: cannot reach an exporter at {url}: {error}") from None


async def query_store(settings: Settings, request: QueryRequest) -> object:
    """Compute one analytic by opening the configured store (no exporter may hold it)."""
    try:
        window = None if request.name == "realtime" else Window.parse(request.window)
    except WindowError as error:
        raise OperatorError(f"query: {error}", 2) from None
    at_ms = request.at_ms if request.at_ms is not None else int(time.time() * 1000)
    # The embedded store's file is the exporter's while it runs; InfluxDB is shared.
    embedded = settings.resolved_store is StoreKind.DUCKDB
    lock = locked_data_dir(settings, "query") if embedded else contextlib.nullcontext()
    with lock:
        try:
            store = await asyncio.to_thread(open_store, settings)
        except ExporterError as error:
            raise OperatorError(f"query: cannot open the store: {error}") from None
        try:
            source = analytics_source(store, settings)
            if source is None:
                raise OperatorError(f"query: no analytics for the {store.name} store")
            try:
                result = await Analytics(source).compute(
                    request.name, window, at_ms, limit=request.limit, metric=request.metric
                )
            except AnalyticsRequestError as error:
                raise OperatorError(f"query: {error}", 2) from None
            finally:
                close: Callable[[], Any] | None = getattr(source, "close", None)
                if close is not None:
                    await close()
        finally:
            await store.close()
    return result_data(result)


# --------------------------------------------------------------------------- flux


async def run_flux(settings: Settings, flux: str) -> list[tuple[list[str], list[list[object]]]]:
    """Run ad hoc Flux on the configured InfluxDB; each result table's columns and rows."""
    if settings.resolved_store is not StoreKind.INFLUXDB:
        raise OperatorError(
            f"flux: the configured store is {settings.resolved_store.value}, not InfluxDB; "
            "set EXPORTER_INFLUX_URL, EXPORTER_INFLUX_TOKEN and EXPORTER_INFLUX_ORG "
            "(or use `query` for the analytics of the embedded store)",
            2,
        )
    from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

    assert settings.influx_url and settings.influx_token and settings.influx_org
    client: Any = InfluxDBClientAsync(
        url=settings.influx_url,
        token=settings.influx_token.get_secret_value(),
        org=settings.influx_org,
        timeout=max(1, int(settings.influx_timeout_seconds * 1000)),
    )
    try:
        tables = await client.query_api().query(flux)
    except Exception as error:  # the client raises ApiException, aiohttp and OS errors
        status = getattr(error, "status", None)
        body = getattr(error, "body", None) or error
        detail = f"{status}: {body}" if status else f"{type(error).__name__}: {error}"
        raise OperatorError(f"flux: InfluxDB at {settings.influx_url} refused: {detail}") from None
    finally:
        await client.close()
    out: list[tuple[list[str], list[list[object]]]] = []
    for table in tables:
        columns = [c.label for c in table.columns if c.label not in ("result", "table")]
        rows = [[_flux_value(record.values.get(c)) for c in columns] for record in table.records]
        out.append((columns, rows))
    return out


def _flux_value(value: object) -> object:
    if isinstance(value, datetime.datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


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
            writer.writerows([[index, *[_cell(v) for v in row]] for row in rows])
        return buffer.getvalue()
    if not tables:
        return "(no tables)\n"
    parts = [
        f"table {index}:\n" + render_table(cols, rows) for index, (cols, rows) in enumerate(tables)
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- backfill


@dataclass
class BackfillSummary:
    """What a backfill did."""

    target: str
    events: int = 0
    resumed_from_seq: int = 0
    records_written: int = 0
    complete: bool = False
    left_in_scratch: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "target": self.target,
            "events": self.events,
            "resumedFromSeq": self.resumed_from_seq,
            "recordsWritten": self.records_written,
            "complete": self.complete,
        }


def _target_settings(settings: Settings, target: StoreKind) -> Settings:
    return settings.model_copy(update={"store": target})


class _CountingStore:
    """A store wrapper counting the records it was given."""

    def __init__(self, store: Store) -> None:
        self.inner = store
        self.name = store.name
        self.written = 0

    async def write(self, records: list[Any]) -> list[Any]:
        refused = await self.inner.write(records)
        self.written += len(records)
        return refused

    async def close(self) -> None:
        await self.inner.close()


def _progress_file(settings: Settings, target: StoreKind) -> Path:
    return settings.data_dir / f"backfill-{target.value}.json"


def _scratch_path(settings: Settings, target: StoreKind) -> Path:
    return settings.data_dir / f"backfill-{target.value}.sqlite3"


def _write_progress(path: Path, seq: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump({"lastSourceSeq": seq}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


async def backfill(
    settings: Settings,
    target: StoreKind,
    *,
    err: IO[str],
    restart: bool = False,
    drain_seconds: float = 60.0,
    batch_events: int = REPLAY_BATCH_EVENTS,
    store_factory: Callable[[Settings], Store] = open_store,
) -> BackfillSummary:
    """Re-deliver the ledger's whole history to ``target``, resumably.

    The ledger keeps events, not the store records it already delivered, so the records
    are derived again by committing the events in order to a scratch ledger in the data
    directory (``backfill-<target>.sqlite3``) whose outbox the exporter's forwarder
    drains into the target. ``backfill-<target>.json`` records the last source event
    committed; a rerun continues from there (store writes are idempotent per key, so
    anything written twice is held once). Both files are removed when the run completes.
    """
    _existing_ledger(settings, "backfill")
    if target is StoreKind.INFLUXDB and not (
        settings.influx_url and settings.influx_token and settings.influx_org
    ):
        raise OperatorError(
            "backfill: --to influxdb needs EXPORTER_INFLUX_URL, EXPORTER_INFLUX_TOKEN and "
            "EXPORTER_INFLUX_ORG",
            2,
        )
    with locked_data_dir(settings, "backfill"):
        return await _backfill_locked(
            settings, target, err, restart, drain_seconds, batch_events, store_factory
        )


async def _backfill_locked(
    settings: Settings,
    target: StoreKind,
    err: IO[str],
    restart: bool,
    drain_seconds: float,
    batch_events: int,
    store_factory: Callable[[Settings], Store],
) -> BackfillSummary:
    """:func:`backfill` once the caller holds the data directory's lock."""
    target_settings = _target_settings(settings, target)
    summary = BackfillSummary(target.value)
    progress_path = _progress_file(settings, target)
    scratch_path = _scratch_path(settings, target)
    if restart:
        for stale in (progress_path, *_sqlite_files(scratch_path)):
            stale.unlink(missing_ok=True)
    after = 0
    if progress_path.exists():
        after = int(json.loads(progress_path.read_text())["lastSourceSeq"])
        err.write(f"backfill: resuming after ledger event {after}\n")
    summary.resumed_from_seq = after
    try:
        store = _CountingStore(await asyncio.to_thread(store_factory, target_settings))
    except ExporterError as error:
        raise OperatorError(f"backfill: cannot open the {target.value} store: {error}") from None
    source = await asyncio.to_thread(Ledger, settings.ledger_path, settings.durability)
    scratch = await asyncio.to_thread(Ledger, scratch_path, settings.durability)
    committer = GroupCommitter(scratch)
    forwarder = Forwarder(committer, store, Metrics(CollectorRegistry()), settings.store_batch_size)
    committer.on_commit_hooks.append(forwarder.wake)
    total = source.stats().events
    progress = Progress(err, "events", total)
    forwarder.start()
    try:
        pending: list[PreparedEvent] = []
        last_seq = after

        async def commit() -> None:
            if pending:
                await committer.submit(Submission(list(pending)))
                pending.clear()
            await asyncio.to_thread(_write_progress, progress_path, last_seq)

        seen = 0
        for seq, key, body in source.iter_events():
            seen += 1
            if seq <= after:
                continue
            blob = bytes(body)
            event = parse_event_json(blob)
            pending.append(PreparedEvent(event, key, blob, blob))
            last_seq = seq
            summary.events += 1
            if len(pending) >= batch_events:
                await commit()
                progress.update(seen, seen)
        await commit()
        # Failures whose payment never arrived were released by the exporter after
        # its join timeout; the whole history is here, so release them now.
        await committer.call(
            functools.partial(scratch.release_unjoined_failures, int(time.time() * 1000) + 1)
        )
        progress.update(seen, seen)
    finally:
        await forwarder.stop(drain_seconds)
        progress.finish()
        summary.records_written = store.written
        summary.left_in_scratch = scratch.backlog
        await store.close()
        await asyncio.to_thread(committer.close)
        await asyncio.to_thread(scratch.close)
        await asyncio.to_thread(source.close)
    if summary.left_in_scratch == 0:
        summary.complete = True
        for done in (progress_path, *_sqlite_files(scratch_path)):
            done.unlink(missing_ok=True)
    return summary


def _sqlite_files(path: Path) -> tuple[Path, ...]:
    return (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))


# --------------------------------------------------------------------------- recover


@dataclass
class RecoverySummary:
    """What a recovery found and did."""

    ledger_problem: str | None = None
    store_problem: str | None = None
    moved_aside: list[str] = field(default_factory=list)
    resumed: bool = False
    """An interrupted earlier run was found and started over from its damaged file."""
    salvaged_events: int = 0
    unreadable_events: int = 0
    """Rows whose body could not be parsed as an event."""
    unreadable_ranges: list[tuple[int, int]] = field(default_factory=list)
    """Ledger sequence numbers (first, last) the damaged ledger's b-tree could not lead
    to; a last of 2**62 or more means "to the end"."""
    page_scan_events: int = 0
    """Events of the unreadable ranges found by reading the file page by page."""
    salvaged_dead_letters: int = 0
    unreadable_dead_letters: int = 0
    """Dead letter rows read whose columns are not what the ledger writes."""
    unreadable_dead_letter_ranges: list[tuple[int, int]] = field(default_factory=list)
    """Dead letter ids (first, last) the damaged ledger's b-tree could not lead to."""
    store_records_written: int = 0
    store_complete: bool = True
    retention_removed_before_seq: int | None = None
    """Events before this ledger sequence number were deleted by retention: their store
    records could not be rebuilt."""

    @property
    def lossless(self) -> bool:
        """Whether everything the damaged files held was salvaged or rebuilt."""
        return (
            not self.unreadable_events
            and not self.unreadable_ranges
            and not self.unreadable_dead_letters
            and not self.unreadable_dead_letter_ranges
            and self.store_complete
            and self.retention_removed_before_seq is None
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""

        def ranges(found: list[tuple[int, int]]) -> list[list[int | None]]:
            return [[first, last if last < 2**62 else None] for first, last in found]

        return {
            "ledgerProblem": self.ledger_problem,
            "storeProblem": self.store_problem,
            "movedAside": self.moved_aside,
            "resumed": self.resumed,
            "salvagedEvents": self.salvaged_events,
            "unreadableEvents": self.unreadable_events,
            "unreadableSeqRanges": ranges(self.unreadable_ranges),
            "pageScanEvents": self.page_scan_events,
            "salvagedDeadLetters": self.salvaged_dead_letters,
            "unreadableDeadLetters": self.unreadable_dead_letters,
            "unreadableDeadLetterIdRanges": ranges(self.unreadable_dead_letter_ranges),
            "storeRecordsWritten": self.store_records_written,
            "storeComplete": self.store_complete,
            "retentionRemovedBeforeSeq": self.retention_removed_before_seq,
            "lossless": self.lossless,
        }


_LEDGER_COMPANIONS = ("-wal", "-shm")
_STORE_COMPANIONS = (".wal",)


def _ledger_problem(settings: Settings) -> str | None:
    """Why the ledger is damaged, or None; other failures to open it stop the command.

    A ledger that cannot be opened for another reason (disk full, locked, permissions)
    is not damaged, and moving it aside would not help: it stays where it is.
    """
    if not settings.ledger_path.exists():
        return None
    try:
        Ledger(settings.ledger_path, settings.durability).close()
    except LedgerCorruptError as error:
        return str(error)
    except LedgerError as error:
        raise OperatorError(f"recover: {error}; the ledger is left in place") from None
    return None


async def _store_problem(settings: Settings) -> str | None:
    from ..errors import StoreCorruptError
    from ..store.duckdb import DuckDBStore

    if settings.resolved_store is not StoreKind.DUCKDB or not settings.duckdb_path.exists():
        return None
    try:
        store = await asyncio.to_thread(
            DuckDBStore.open,
            settings.duckdb_path,
            settings.duckdb_memory_limit,
            settings.duckdb_threads,
        )
    except StoreCorruptError as error:
        return str(error)
    except Exception as error:  # locked, permissions, I/O: not damage
        raise OperatorError(
            f"recover: cannot check the DuckDB store {settings.duckdb_path}: {error}; "
            "it is left in place"
        ) from None
    await store.close()
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_aside(path: Path, target: Path, companions: Sequence[str]) -> list[Path]:
    """Rename ``path`` and its companion files (``-wal``...) to ``target``.

    The companions keep their suffix after the new name, so SQLite and DuckDB still find
    a WAL beside the moved file when it is opened for salvage. They move first: once the
    main file is at ``target``, everything is (a rerun after a kill finishes the rest).
    """
    moved = []
    for suffix in (*companions, ""):
        source = path.with_name(path.name + suffix)
        if source.exists():
            destination = target.with_name(target.name + suffix)
            os.replace(source, destination)
            moved.append(destination)
    _fsync_dir(path.parent)
    return moved[-1:] + moved[:-1]


def _begin_recovery(
    path: Path, companions: Sequence[str], summary: RecoverySummary, err: IO[str]
) -> Path:
    """Mark ``path`` as being recovered and move it aside; returns the damaged file.

    The marker (:func:`~exporter.ledger.storage.recovery_marker`) is written before the rename
    and names the damaged file, so a run that stops anywhere after it leaves the
    exporter refusing to start and the next ``recover`` starting over from that file.
    """
    marker = recovery_marker(path)
    if marker.exists():
        target = path.with_name(json.loads(marker.read_text())["damaged"])
        summary.resumed = True
        err.write(f"recover: an earlier recovery of {path} was interrupted; starting it over\n")
    else:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = path.with_name(f"{path.name}.damaged-{stamp}")
        for n in itertools.count(2):
            if not target.exists():
                break
            target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        _write_progress_file(marker, {"damaged": target.name})
    if not target.exists():
        if not path.exists():
            raise OperatorError(f"recover: neither {path} nor {target} exists")
        moved = _move_aside(path, target, companions)
        err.write(f"recover: moved aside to {moved[0]}\n")
    summary.moved_aside += [
        str(p)
        for p in (target, *(target.with_name(target.name + s) for s in companions))
        if p.exists()
    ]
    return target


def _end_recovery(built: Path, path: Path, companions: Sequence[str]) -> None:
    """Put the complete rebuilt file ``built`` in place of ``path``; drop the marker."""
    for suffix in companions:
        left = built.with_name(built.name + suffix)
        if left.exists():
            if left.stat().st_size > 0 and suffix != "-shm":
                raise OperatorError(
                    f"recover: {left} still holds data after closing {built}; run recover again"
                )
            left.unlink()
    with open(built, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(built, path)
    _fsync_dir(path.parent)
    recovery_marker(path).unlink()
    _fsync_dir(path.parent)


def _write_progress_file(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as JSON to ``path`` atomically and durably."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(content, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove_sqlite_files(path: Path) -> None:
    for stale in _sqlite_files(path):
        stale.unlink(missing_ok=True)


def _probe(conn: sqlite3.Connection, table: str, key: str, at: int) -> int | None:
    """The first row id of ``table`` at or after ``at`` (None: there is none).

    Reads only the table's b-tree, not the rows' columns; raises where that is damaged.
    """
    row = conn.execute(
        f"SELECT {key} FROM {table} WHERE {key} >= ? ORDER BY {key} LIMIT 1", (at,)
    ).fetchone()
    return None if row is None else int(row[0])


def _past_damage(
    conn: sqlite3.Connection, table: str, key: str, after: int
) -> tuple[int | None, int]:
    """Where reading can resume after a damaged stretch that follows ``after``.

    Returns (the first row id that can be found past it, or None when nothing can; the
    last row id given up). Probes ``after`` + 1, 2, 4, ... and then bisects the last
    step, so a damaged stretch costs a few dozen queries.
    """
    failed, step = after + 1, 1
    while True:
        at = after + step
        try:
            found = _probe(conn, table, key, at)
            break
        except sqlite3.DatabaseError:
            failed = at
            if step >= 2**61:
                return None, 2**62
            step *= 2
    low, high = failed, at  # the probe fails at ``low`` and succeeds at ``high``
    while high - low > 1:
        middle = (low + high) // 2
        try:
            result = _probe(conn, table, key, middle)
        except sqlite3.DatabaseError:
            low = middle
            continue
        high, found = middle, result
    return found, low


def _read_rows(
    conn: sqlite3.Connection,
    table: str,
    key: str,
    columns: str,
    unreadable: list[tuple[int, int]],
) -> Iterator[tuple[Any, ...]]:
    """(row id, *columns) of every row of ``table`` of a damaged ledger that can be read.

    Rows come in row id order; where a page is damaged the ids on it are recorded in
    ``unreadable`` and reading resumes after them.
    """
    after = 0
    while True:
        try:
            rows = conn.execute(
                f"SELECT {key}, {columns} FROM {table} WHERE {key} > ? ORDER BY {key}", (after,)
            )
            for row in rows:
                after = max(after, int(row[0]))
                yield tuple(row)
            return
        except sqlite3.DatabaseError:
            pass
        # The row after ``after`` (or the page leading to it) cannot be read.
        try:
            first = _probe(conn, table, key, after + 1)
        except sqlite3.DatabaseError:
            found, given_up = _past_damage(conn, table, key, after)
            unreadable.append((after + 1, given_up))
            if found is None:
                return
            after = max(found - 1, given_up)
            continue
        if first is None:
            return
        unreadable.append((first, first))  # its columns are unreadable
        after = first


def _open_damaged(path: Path) -> sqlite3.Connection:
    """A read-only connection to the damaged ledger at ``path``.

    Read-only, SQLite still reads the WAL beside it but never checkpoints it into the
    file nor deletes it: the damaged file and its WAL stay as they were.
    """
    return sqlite3.connect(read_only_uri(path), uri=True, check_same_thread=False)


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    """An SQLite varint at ``at``: (value, offset after it)."""
    value = 0
    for k in range(8):
        byte = buf[at + k]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + k + 1
    return (value << 8) | buf[at + 8], at + 9


_EVENT_COLUMNS = 9  # seq, key, key_hash, type, ref, ts, received_at, body, state
_BODY_COLUMN = 7


def _event_body(payload: bytes) -> bytes | None:
    """The ``body`` of an ``events`` row in SQLite record format, or None if it is not one."""
    header_end, at = _varint(payload, 0)
    types: list[int] = []
    while at < header_end:
        serial, at = _varint(payload, at)
        types.append(serial)
    if len(types) != _EVENT_COLUMNS or types[_BODY_COLUMN] < 12 or types[_BODY_COLUMN] % 2:
        return None
    sizes = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8, 7: 8, 8: 0, 9: 0}
    offset = header_end
    for serial in types[:_BODY_COLUMN]:
        offset += sizes[serial] if serial < 12 else (serial - 12 - serial % 2) // 2
    length = (types[_BODY_COLUMN] - 12) // 2
    body = payload[offset : offset + length]
    return body if len(body) == length else None


def _leaf_rows(page: bytes, header_at: int) -> Iterator[tuple[int, bytes]]:
    """(rowid, body) of each ``events`` row on a table b-tree leaf page."""
    if page[header_at] != 0x0D:
        return
    cells = int.from_bytes(page[header_at + 3 : header_at + 5], "big")
    max_local = len(page) - 35  # larger payloads continue on overflow pages: skipped
    for cell in range(cells):
        at = header_at + 8 + 2 * cell
        try:
            pointer = int.from_bytes(page[at : at + 2], "big")
            size, at = _varint(page, pointer)
            rowid, at = _varint(page, at)
            if size > max_local or at + size > len(page):
                continue
            body = _event_body(page[at : at + size])
        except (IndexError, KeyError):
            continue
        if body is not None:
            yield rowid, body


_WAL_HEADER_BYTES = 32
_WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums little-endian, big-endian
_WAL_FRAME_HEADER = 24


def _wal_checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes) continuing from (s0, s1)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for k in range(0, len(words), 2):
        s0 = (s0 + words[k] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[k + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _committed_wal_pages(wal: Path, page_size: int) -> list[bytes]:
    """The pages of the WAL's committed transactions, in the order they were written.

    Only frames that a reader of the WAL would use count: those carrying the header's
    salts with a valid running checksum, up to the last commit frame. Frames of a
    transaction that never committed (its request was refused) and those of earlier
    WAL generations (a rewound WAL keeps their bytes past its new end) are left out.
    """
    with open(wal, "rb") as handle:
        data = handle.read()
    if len(data) < _WAL_HEADER_BYTES:
        return []
    magic, _, wal_page_size = struct.unpack(">III", data[:12])
    if magic not in _WAL_MAGIC or wal_page_size != page_size:
        return []
    big_endian = magic == _WAL_MAGIC[1]
    salts = data[16:24]
    sums = _wal_checksum(data[:24], big_endian, 0, 0)
    if sums != struct.unpack(">II", data[24:32]):
        return []
    pages: list[bytes] = []
    committed = 0
    at = _WAL_HEADER_BYTES
    stride = _WAL_FRAME_HEADER + page_size
    while at + stride <= len(data):
        header = data[at : at + _WAL_FRAME_HEADER]
        page = data[at + _WAL_FRAME_HEADER : at + stride]
        if header[8:16] != salts:
            break
        sums = _wal_checksum(header[:8] + page, big_endian, *sums)
        if sums != struct.unpack(">II", header[16:24]):
            break
        pages.append(page)
        if int.from_bytes(header[4:8], "big"):  # a commit frame: the database size
            committed = len(pages)
        at += stride
    return pages[:committed]


def _scan_pages(path: Path) -> Iterator[tuple[int, bytes]]:
    """(rowid, body) of ``events`` rows found by reading the file and its WAL page by page.

    SQLite reaches a row only through the b-tree pages above it; when those are lost (a
    truncated file loses the pages allocated last, often the upper levels) the leaves
    may still be there. Rows may repeat (older copies of a page): the new ledger
    deduplicates them by key. Of the WAL only committed transactions are read.
    """
    with open(path, "rb") as handle:
        header = handle.read(100)
    page_size = int.from_bytes(header[16:18], "big") if len(header) == 100 else 0
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        page_size = 4096  # the header is lost: SQLite's default
    with open(path, "rb") as handle:
        number = 0
        while len(page := handle.read(page_size)) == page_size:
            number += 1
            yield from _leaf_rows(page, 100 if number == 1 else 0)
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        for page in _committed_wal_pages(wal, page_size):
            yield from _leaf_rows(page, 0)


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter | None:
    """A dead letter from a (id, received_at, reason, error, key, raw) row, if sound."""
    _, received_at, reason, error, key, raw = row
    if not (
        isinstance(received_at, int)
        and isinstance(reason, str)
        and isinstance(error, str)
        and (key is None or isinstance(key, str))
        and isinstance(raw, bytes)
    ):
        return None
    return DeadLetter(reason, error, raw, key, received_at)


async def _salvage_ledger(
    damaged: Path, target: Path, settings: Settings, summary: RecoverySummary, err: IO[str]
) -> int | None:
    """Commit every readable event and dead letter of ``damaged`` to a new ledger at
    ``target``, in their old order; returns the first event sequence number read.

    Joins and store records are derived again as the events are committed; the new
    outbox reaches the store when the exporter next starts (the store skips records it
    already holds). Dead letters (refused input, the losing body of a conflict, store
    refusals) are copied with their original time.
    """
    conn = _open_damaged(damaged)
    ledger: Ledger | None = None
    try:
        ledger = await asyncio.to_thread(Ledger, target, settings.durability)
        committer = GroupCommitter(ledger)
        progress = Progress(err, "events")
        first_seq: int | None = None

        async def submit(bodies: list[bytes]) -> None:
            prepared = []
            for body in bodies:
                try:
                    event = parse_event_json(body)
                except (EventError, MalformedJSONError):
                    summary.unreadable_events += 1
                    continue
                canonical = canonical_json(event)
                prepared.append(PreparedEvent(event, dedup_key(event, canonical), canonical, body))
            result = await committer.submit(Submission(prepared))
            summary.salvaged_events += result.outcomes.count(Outcome.ACCEPTED)
            progress.update(summary.salvaged_events)

        seen: set[int] = set()
        rows = _read_rows(conn, "events", "seq", "body", summary.unreadable_ranges)
        try:
            while chunk := await asyncio.to_thread(
                lambda: list(itertools.islice(rows, REPLAY_BATCH_EVENTS))
            ):
                seen.update(int(seq) for seq, _ in chunk)
                await submit([bytes(body) for _, body in chunk])
            if summary.unreadable_ranges:
                # Pages the b-tree no longer leads to may still hold rows it did not
                # reach (a damaged page can also hold rowids that send the b-tree scan
                # past them).
                scanned = sorted(
                    (rowid, body)
                    for rowid, body in await asyncio.to_thread(lambda: list(_scan_pages(damaged)))
                    if rowid not in seen
                )
                before = summary.salvaged_events
                for start in range(0, len(scanned), REPLAY_BATCH_EVENTS):
                    chunk_rows = scanned[start : start + REPLAY_BATCH_EVENTS]
                    seen.update(rowid for rowid, _ in chunk_rows)
                    await submit([body for _, body in chunk_rows])
                summary.page_scan_events = summary.salvaged_events - before
            first_seq = min(seen, default=None)
            letters = _read_rows(
                conn,
                "dead_letters",
                "id",
                "received_at, reason, error, key, raw",
                summary.unreadable_dead_letter_ranges,
            )
            while chunk := await asyncio.to_thread(
                lambda: list(itertools.islice(letters, REPLAY_BATCH_EVENTS))
            ):
                sound = [letter for row in chunk if (letter := _dead_letter(row)) is not None]
                summary.unreadable_dead_letters += len(chunk) - len(sound)
                await committer.submit(Submission(dead_letters=sound))
                summary.salvaged_dead_letters += len(sound)
        finally:
            progress.finish()
            await asyncio.to_thread(committer.close)
    finally:
        if ledger is not None:
            await asyncio.to_thread(ledger.close)
        conn.close()
    return first_seq


def _first_seq(path: Path) -> int | None:
    """The ledger's first event sequence number (None: it holds no event)."""
    conn = sqlite3.connect(read_only_uri(path), uri=True)
    try:
        (first,) = conn.execute("SELECT min(seq) FROM events").fetchone()
    finally:
        conn.close()
    return None if first is None else int(first)


def _retention_gap(first_seq: int | None, unreadable: list[tuple[int, int]]) -> int | None:
    """The first event sequence number kept, when retention deleted those before it.

    ``first_seq`` is the first one the ledger held (the damaged ledger's, when it was
    salvaged: the new ledger numbers its events from 1 again). Sequence numbers lost to
    damage from the very first on are reported as unreadable, not as retention.
    """
    if first_seq is None or first_seq <= 1 or (unreadable and unreadable[0][0] == 1):
        return None
    return first_seq


async def _rebuild_store(
    settings: Settings, summary: RecoverySummary, err: IO[str], drain_seconds: float
) -> bool:
    """Rebuild the DuckDB store from the ledger into a file beside it; True when complete.

    The rebuilt file replaces the store only once every record is in it.
    """
    from ..store.duckdb import DuckDBStore

    building = settings.duckdb_path.with_name(settings.duckdb_path.name + ".recovering")
    for stale in (building, *(building.with_name(building.name + s) for s in _STORE_COMPANIONS)):
        stale.unlink(missing_ok=True)

    def open_building(target: Settings) -> Store:
        return DuckDBStore.open(building, target.duckdb_memory_limit, target.duckdb_threads)

    rebuilt = await _backfill_locked(
        settings, StoreKind.DUCKDB, err, True, drain_seconds, REPLAY_BATCH_EVENTS, open_building
    )
    summary.store_records_written = rebuilt.records_written
    if rebuilt.complete:
        _end_recovery(building, settings.duckdb_path, _STORE_COMPANIONS)
    return rebuilt.complete


async def recover(
    settings: Settings, *, err: IO[str], drain_seconds: float = 60.0
) -> RecoverySummary:
    """Check the ledger and the embedded store; move a damaged one aside and rebuild it.

    A damaged ledger is renamed ``ledger.sqlite3.damaged-<UTC time>`` and every event
    and dead letter that can still be read from it is committed to a new ledger. A
    damaged DuckDB store is renamed likewise and rebuilt from the ledger's events by
    :func:`backfill`. Each is rebuilt in a ``.recovering`` file that replaces the old
    name only when complete, and a marker beside it (written before the rename) keeps
    the exporter from starting until then: a run that stops midway is started over by
    the next one. Files that pass the checks are left alone, so running it twice is
    harmless.
    """
    summary = RecoverySummary()
    ledger, store = settings.ledger_path, settings.duckdb_path
    with locked_data_dir(settings, "recover"):
        if recovery_marker(ledger).exists():
            summary.ledger_problem = f"the recovery of {ledger} was interrupted"
        else:
            summary.ledger_problem = await asyncio.to_thread(_ledger_problem, settings)
        if recovery_marker(store).exists():
            summary.store_problem = f"the recovery of {store} was interrupted"
        else:
            summary.store_problem = await _store_problem(settings)
        first_seq: int | None = None
        if summary.ledger_problem is not None:
            err.write(f"recover: {summary.ledger_problem.split('. ', 1)[0]}\n")
            damaged = _begin_recovery(ledger, _LEDGER_COMPANIONS, summary, err)
            building = ledger.with_name(ledger.name + ".recovering")
            _remove_sqlite_files(building)
            err.write(f"recover: salvaging the events of {damaged}\n")
            first_seq = await _salvage_ledger(damaged, building, settings, summary, err)
            _end_recovery(building, ledger, _LEDGER_COMPANIONS)
        if summary.store_problem is not None:
            err.write(f"recover: {summary.store_problem.split('. ', 1)[0]}\n")
            _begin_recovery(store, _STORE_COMPANIONS, summary, err)
            if not ledger.exists():
                summary.store_complete = False  # nothing to rebuild it from
                recovery_marker(store).unlink()
            else:
                err.write("recover: rebuilding the store from the ledger\n")
                summary.store_complete = await _rebuild_store(settings, summary, err, drain_seconds)
                if summary.ledger_problem is None:
                    first_seq = await asyncio.to_thread(_first_seq, ledger)
                summary.retention_removed_before_seq = _retention_gap(
                    first_seq, summary.unreadable_ranges
                )
    return summary
