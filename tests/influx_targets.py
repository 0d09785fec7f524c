"""The InfluxDB generations the real-engine suite runs against, behind one interface.

- :class:`V1Target`: Debian's ``influxd`` 1.6 (:mod:`influxdb_engine`), written over the v1
  API (``/write``), read back with InfluxQL. It can be killed and restarted.
- :class:`V2Target`: the InfluxDB 2.x of ``EXPORTER_TEST_INFLUX_URL`` (+ ``_TOKEN``,
  ``_ORG``, ``_BUCKET``; the compose ``test`` profile starts one), written over the v2 API
  (``/api/v2/write``), read back with Flux. It runs elsewhere, so it is never killed. Each
  database is a bucket of its own, deleted when the target closes.

Both answer the same questions (counts and integer sums per series, hourly counts, field
types, the points a filter matches), so every case asserts the same figures on both.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from typing import Any, Protocol

from influx_helpers import InfluxTarget, untyped
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_engine import InfluxEngine

from exporter.store.influx.store import InfluxStore

HOUR_MS = 3_600_000

Series = tuple[str, str]
"""(network, the other tag's value): '' where the measurement has no such tag."""

_FLUX_TYPES = {int: "integer", float: "float", str: "string", bool: "boolean"}


class EngineTarget(Protocol):
    """An InfluxDB the suite writes to through the exporter and reads back from."""

    name: str
    killable: bool
    """Whether :meth:`kill` and :meth:`start` may stop and restart the engine."""

    def fresh_database(self, name: str) -> str:
        """An empty database (1.x) or bucket (2.x) for ``name``; what stores write to."""
        ...

    def store(self, db: str) -> InfluxStore:
        """The exporter's store writing to ``db`` over this generation's write API."""
        ...

    def exporter_env(self, db: str) -> dict[str, str]:
        """The ``EXPORTER_INFLUX_*`` settings of an exporter process writing to ``db``."""
        ...

    def write(self, db: str, lines: bytes) -> int:
        """POST line protocol straight to the engine; the HTTP status."""
        ...

    def counts_and_sums(
        self, db: str, measurement: str, tag: str | None, counted: str, sums: tuple[str, ...]
    ) -> dict[Series, tuple[int, ...]]:
        """Per network and ``tag``: count of ``counted``, then the sum of each of ``sums``."""
        ...

    def hourly_counts(
        self, db: str, measurement: str, counted: str, start_ms: int, stop_ms: int
    ) -> Counter[int]:
        """Points of ``measurement`` (having ``counted``) per UTC hour number of event time."""
        ...

    def field_types(self, db: str) -> dict[str, dict[str, str]]:
        """Field name -> ``integer``/``float``/``string``/``boolean``, per measurement."""
        ...

    def count(self, db: str, measurement: str, field: str, status: str | None = None) -> int:
        """Points of ``measurement`` having ``field`` (of one ``status`` when given)."""
        ...

    def kill(self) -> None:
        """SIGKILL the engine (only where :attr:`killable`)."""
        ...

    def start(self) -> None:
        """Start the engine again on the same directories (only where :attr:`killable`)."""
        ...


class V1Target:
    """Debian's ``influxd`` 1.6 over the v1 API, read back with InfluxQL."""

    name = "influxd-1.6-v1"
    killable = True

    def __init__(self, engine: InfluxEngine) -> None:
        """Use ``engine``, started by the caller."""
        self.engine = engine

    def fresh_database(self, name: str) -> str:
        """An empty database called ``name``."""
        self.engine.query(f'DROP DATABASE "{name}"')
        self.engine.query(f'CREATE DATABASE "{name}"')
        return name

    def store(self, db: str) -> InfluxStore:
        """An unauthenticated v1 store (the engine runs without auth)."""
        return InfluxStore(self.engine.url, None, None, db, timeout_seconds=10, api="v1")

    def exporter_env(self, db: str) -> dict[str, str]:
        """The v1 settings: URL, API and database."""
        return {
            "EXPORTER_INFLUX_URL": self.engine.url,
            "EXPORTER_INFLUX_API": "v1",
            "EXPORTER_INFLUX_BUCKET": db,
        }

    def write(self, db: str, lines: bytes) -> int:
        """POST to ``/write``."""
        return self.engine.write(db, lines)

    def counts_and_sums(
        self, db: str, measurement: str, tag: str | None, counted: str, sums: tuple[str, ...]
    ) -> dict[Series, tuple[int, ...]]:
        """InfluxQL ``count`` and ``sum`` grouped by the tags."""
        columns = ", ".join([f'count("{counted}")', *(f'sum("{s}")' for s in sums)])
        group = ' GROUP BY "network", "' + tag + '"' if tag else ""
        (series,) = self.engine.query(f'SELECT {columns} FROM "{measurement}"{group}', db)
        found: dict[Series, tuple[int, ...]] = {}
        for one in series:
            tags = one.get("tags", {})
            (values,) = one["values"]
            key = (tags.get("network", ""), tags.get(tag, "") if tag else "")
            found[key] = tuple(int(v or 0) for v in values[1:])
        return found

    def hourly_counts(
        self, db: str, measurement: str, counted: str, start_ms: int, stop_ms: int
    ) -> Counter[int]:
        """InfluxQL ``GROUP BY time(1h)``."""
        hourly: Counter[int] = Counter()
        (series,) = self.engine.query(
            f'SELECT count("{counted}") FROM "{measurement}" WHERE time >= {start_ms}ms '
            f"AND time < {stop_ms}ms GROUP BY time(1h) fill(none)",
            db,
        )
        for one in series:
            for ts, count in one["values"]:
                hourly[ts // 1_000_000 // HOUR_MS] += int(count)
        return hourly

    def field_types(self, db: str) -> dict[str, dict[str, str]]:
        """``SHOW FIELD KEYS``."""
        (series,) = self.engine.query("SHOW FIELD KEYS", db)
        return {one["name"]: dict(one["values"]) for one in series}

    def count(self, db: str, measurement: str, field: str, status: str | None = None) -> int:
        """InfluxQL ``count``."""
        where = f"status = '{status}'" if status is not None else ""
        return self.engine.count(db, measurement, field, where)

    def kill(self) -> None:
        """SIGKILL ``influxd``."""
        self.engine.kill()

    def start(self) -> None:
        """Start ``influxd`` on the same directories."""
        self.engine.start()


def _lit(value: str) -> str:
    """A Flux string literal (JSON escaping is a subset of Flux's)."""
    return json.dumps(value)


def flux_counts_and_sums(
    bucket: str, measurement: str, tag: str | None, field: str, function: str
) -> str:
    """Flux: ``function`` (``count`` or ``sum``) of one field per network and ``tag``."""
    columns = ", ".join(_lit(c) for c in ("network", tag) if c) if tag else ""
    return f"""
from(bucket: {_lit(bucket)})
  |> range(start: 1970-01-01T00:00:00Z)
  |> filter(fn: (r) => r._measurement == {_lit(measurement)} and r._field == {_lit(field)})
  |> group(columns: [{columns}])
  |> {function}()
"""


def flux_hourly(bucket: str, measurement: str, field: str, start_ms: int, stop_ms: int) -> str:
    """Flux: points of one field per UTC hour, each row at its hour's start."""
    return f"""
from(bucket: {_lit(bucket)})
  |> range(start: time(v: {start_ms * 1_000_000}), stop: time(v: {stop_ms * 1_000_000}))
  |> filter(fn: (r) => r._measurement == {_lit(measurement)} and r._field == {_lit(field)})
  |> group()
  |> aggregateWindow(every: 1h, fn: count, createEmpty: false, timeSrc: "_start")
"""


def flux_first_values(bucket: str) -> str:
    """Flux: the first value of every series and field, typed as stored."""
    return f"""
from(bucket: {_lit(bucket)})
  |> range(start: 1970-01-01T00:00:00Z)
  |> first()
"""


def flux_count(bucket: str, measurement: str, field: str, status: str | None) -> str:
    """Flux: points of one field, of one ``status`` when given."""
    extra = f" and r.status == {_lit(status)}" if status is not None else ""
    return f"""
from(bucket: {_lit(bucket)})
  |> range(start: 1970-01-01T00:00:00Z)
  |> filter(fn: (r) => r._measurement == {_lit(measurement)} and r._field == {_lit(field)}{extra})
  |> group()
  |> count()
"""


class V2Target:
    """An InfluxDB 2.x over the v2 API, read back with Flux; a bucket per database."""

    name = "influxdb-2.x-v2"
    killable = False

    def __init__(self, target: InfluxTarget) -> None:
        """Connect to ``target`` (its bucket is left alone: the suite makes its own)."""
        self.target = target
        self.client = InfluxDBClient(
            url=target.url, token=target.token, org=target.org, timeout=120_000
        )
        self.run = uuid.uuid4().hex[:8]
        self._buckets: dict[str, Any] = {}

    def close(self) -> None:
        """Delete the buckets this target made and close the client."""
        api = untyped(self.client.buckets_api)()
        try:
            for bucket in self._buckets.values():
                api.delete_bucket(bucket)
        finally:
            untyped(self.client.close)()

    def fresh_database(self, name: str) -> str:
        """A new bucket with infinite retention, named after ``name`` and this run."""
        api = untyped(self.client.buckets_api)()
        full = f"exporter-engine-{name}-{self.run}"
        if full in self._buckets:
            api.delete_bucket(self._buckets.pop(full))
        self._buckets[full] = api.create_bucket(bucket_name=full, org=self.target.org)
        return full

    def store(self, db: str) -> InfluxStore:
        """A v2 store with the target's token and org."""
        return InfluxStore(
            self.target.url, self.target.token, self.target.org, db, timeout_seconds=30
        )

    def exporter_env(self, db: str) -> dict[str, str]:
        """The v2 settings: URL, API, token, org and bucket."""
        return {
            "EXPORTER_INFLUX_URL": self.target.url,
            "EXPORTER_INFLUX_API": "v2",
            "EXPORTER_INFLUX_TOKEN": self.target.token,
            "EXPORTER_INFLUX_ORG": self.target.org,
            "EXPORTER_INFLUX_BUCKET": db,
        }

    def write(self, db: str, lines: bytes) -> int:
        """POST to ``/api/v2/write``."""
        query = urllib.parse.urlencode({"org": self.target.org, "bucket": db, "precision": "ns"})
        request = urllib.request.Request(
            f"{self.target.url.rstrip('/')}/api/v2/write?{query}",
            data=lines,
            method="POST",
            headers={"Authorization": f"Token {self.target.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def _rows(self, flux: str) -> list[dict[str, Any]]:
        tables = untyped(self.client.query_api)().query(flux)
        return [dict(record.values) for table in tables for record in table.records]

    def counts_and_sums(
        self, db: str, measurement: str, tag: str | None, counted: str, sums: tuple[str, ...]
    ) -> dict[Series, tuple[int, ...]]:
        """Flux ``count`` of ``counted`` and ``sum`` of each of ``sums`` per series."""
        columns: list[dict[Series, int]] = []
        for field, function in [(counted, "count"), *((s, "sum") for s in sums)]:
            found: dict[Series, int] = {}
            for row in self._rows(flux_counts_and_sums(db, measurement, tag, field, function)):
                key = (str(row.get("network") or ""), str(row.get(tag) or "") if tag else "")
                found[key] = int(row["_value"] or 0)
            columns.append(found)
        return {key: tuple(column.get(key, 0) for column in columns) for key in columns[0]}

    def hourly_counts(
        self, db: str, measurement: str, counted: str, start_ms: int, stop_ms: int
    ) -> Counter[int]:
        """Flux ``aggregateWindow(every: 1h, fn: count)``."""
        hourly: Counter[int] = Counter()
        for row in self._rows(flux_hourly(db, measurement, counted, start_ms, stop_ms)):
            hourly[int(row["_time"].timestamp() * 1000) // HOUR_MS] += int(row["_value"])
        return hourly

    def field_types(self, db: str) -> dict[str, dict[str, str]]:
        """The Python type influxdb-client gives each field's values (from the CSV
        annotations: long, double, string, boolean)."""
        types: dict[str, dict[str, str]] = {}
        for row in self._rows(flux_first_values(db)):
            fields = types.setdefault(str(row["_measurement"]), {})
            fields[str(row["_field"])] = _FLUX_TYPES[type(row["_value"])]
        return types

    def count(self, db: str, measurement: str, field: str, status: str | None = None) -> int:
        """Flux ``count``."""
        rows = self._rows(flux_count(db, measurement, field, status))
        return int(rows[0]["_value"]) if rows else 0

    def kill(self) -> None:
        """Not possible: the server is not this process's child."""
        raise RuntimeError("an InfluxDB 2.x target cannot be killed by the tests")

    def start(self) -> None:
        """Not possible: the server is not this process's child."""
        raise RuntimeError("an InfluxDB 2.x target cannot be started by the tests")
