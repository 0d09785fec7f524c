"""The Flux analytics source: queries type-checked, bounds, parameters and result mapping offline,
and the same answers as DuckDB against a real InfluxDB 2.x when one is configured.

Without a server: every shipped ``exporter/analytics/queries/*.flux`` passes the official Flux
type-checker (``fluxcheck``, which fails under CI when Node is missing) and broken copies fail it;
the window bounds are checked as arithmetic; the parameters the real ``influxdb-client`` sends are
captured by a local HTTP server, re-parsed by the official Flux parser and used as the type-
checker's preamble; hand-written annotated CSV goes through influxdb-client's own parser into the
protocol's dataclasses. With ``EXPORTER_TEST_INFLUX_URL`` (+ ``_TOKEN``, ``_ORG``, ``_BUCKET``): a
scenario written with :class:`InfluxStore` into a bucket of its own gives, for every analytic and
window, the answers DuckDB gives for the same records.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import BASE_MS
from fluxcheck import FLUX_DIR as CHECKER_DIR
from fluxcheck import assert_flux_valid, check_flux, collect_flux
from hypothesis import given
from hypothesis import strategies as st
from influx_helpers import influxdb_source
from influxdb_client.client.flux_csv_parser import FluxCsvParser, FluxSerializationMode
from influxdb_client.client.flux_table import FluxTable
from influxdb_client.rest import ApiException

from exporter.analytics.compute import Analytics
from exporter.analytics.duckdb import DuckDBAnalyticsSource
from exporter.analytics.flux import (
    DEFAULT_STATE_LOOKBACK_MS,
    NO_RANK,
    NS_PER_MS,
    QUERY_NAMES,
    FluxAnalyticsSource,
    FluxTime,
    Params,
    buckets_from_tables,
    flux_query,
    point_in_time_from_tables,
    rank_values_from_tables,
    rescaled_rank,
    top_lists_from_tables,
    window_range,
    window_totals_from_tables,
)
from exporter.analytics.models import (
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    AnalyticsResult,
    BucketTotals,
    NetworkTotals,
    PayeeTotals,
    PayerTotals,
    PointInTime,
    RankRequest,
    RankValues,
    RouteTotals,
    TopLists,
    Window,
    WindowTotals,
    result_data,
)
from exporter.errors import StoreClientError
from exporter.records import (
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    WebsocketRecord,
    unique_time_ns,
)
from exporter.store.duckdb import DuckDBStore

ROOT = Path(__file__).resolve().parent.parent
FLUX_QUERIES = ROOT / "exporter" / "analytics" / "queries"

PREAMBLE = """\
params = {
    bucket: "payments",
    start: 2026-04-10T13:00:01.235Z,
    stop: 2026-04-11T13:00:01.235Z,
    half_start: 2026-04-11T01:00:01.235Z,
    every: 1h,
    limit: 1000,
    settled: 100,
    timed: 100,
    amount_ranks: [50, 51],
    settlement_ranks: [95, 99],
}"""
"""The ``params`` record of every shipped query, with the types the exporter passes: strings,
times, a duration, an int and arrays of ints (see ``FluxAnalyticsSource``)."""

AT = BASE_MS + 100 * DAY_MS + 13 * HOUR_MS + 1_234
"""An instant off every hour and day boundary (2026-04-11T13:00:01.234Z)."""

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


# ------------------------------------------------------------------ the type-checker


def test_every_shipped_query_type_checks() -> None:
    """Each protocol method has its Flux file, and every file passes the official checker."""
    queries = collect_flux(FLUX_QUERIES)
    assert sorted(queries) == sorted(f"{name}.flux" for name in QUERY_NAMES)
    assert_flux_valid(queries, PREAMBLE)


BROKEN: dict[str, tuple[str, str, str, str]] = {
    # case: (file, text replaced, replacement, substring of the expected error)
    "wrong function": ("top_lists.flux", "|> pivot(", "|> pivots(", "undefined identifier pivots"),
    "wrong parameter": (
        "settled_buckets.flux",
        "window(every: params.every)",
        "window(each: params.every)",
        "found unexpected argument each",
    ),
    "misspelt required parameter": (
        "top_lists.flux",
        "rowKey:",
        "rowKeys:",
        "missing required argument rowKey",
    ),
    "wrong type for a parameter": (
        "top_lists.flux",
        "limit(n: params.limit)",
        "limit(n: params.bucket)",
        "expected int but found string (argument n)",
    ),
    "time where a duration goes": (
        "settled_buckets.flux",
        "window(every: params.every)",
        "window(every: params.start)",
        "expected duration but found time (argument every)",
    ),
    "string where a time goes": (
        "window_totals.flux",
        "range(start: params.half_start",
        "range(start: params.bucket",
        "string is not Timeable (argument start of range)",
    ),
    "undeclared params field": (
        "point_in_time.flux",
        "stop: params.stop)",
        "stop: params.end)",
        "missing label end",
    ),
    "int mixed with float": (
        "top_lists.flux",
        "payers: accumulator.payers + 1,",
        "payers: accumulator.payers + 1.0,",
        "expected float but found int",
    ),
    "string where an array goes": (
        "settled_order_values.flux",
        "ranks: params.amount_ranks",
        "ranks: params.bucket",
        "(array) but found string (argument ranks)",
    ),
}


def test_broken_copies_of_shipped_queries_fail() -> None:
    """A wrong function, parameter or type in a copy of a shipped query is reported, and the
    untouched queries checked in the same run stay valid."""
    shipped = collect_flux(FLUX_QUERIES)
    broken: dict[str, str] = {}
    for case, (name, old, new, _) in BROKEN.items():
        code = "\n".join(line.split("//")[0] for line in shipped[name].splitlines())
        assert old in code, f"{case}: {old!r} is not in the code of {name}"
        broken[case] = shipped[name].replace(old, new, 1)
    errors = check_flux({**shipped, **broken}, PREAMBLE)
    for name in shipped:
        assert errors[name] == [], name
    for case, (_, _, _, expected) in BROKEN.items():
        assert any(expected in e for e in errors[case]), (case, errors[case])


def test_queries_ship_as_package_data() -> None:
    """The source reads each query from the installed package, byte for byte the shipped file."""
    for name in QUERY_NAMES:
        assert flux_query(name) == (FLUX_QUERIES / f"{name}.flux").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="unknown Flux query 'nope'"):
        flux_query("nope")


# ------------------------------------------------------------------ window bounds


def _inside(ns: int, bounds: tuple[FluxTime, FluxTime]) -> bool:
    """Whether a point at ``ns`` is in Flux's half-open ``range(start, stop)``."""
    start, stop = bounds
    return start.ns <= ns < stop.ns


def test_window_range_excludes_the_start_and_includes_the_end() -> None:
    """(at - span, at] in event ms, whatever the point's sub-millisecond part."""
    span = HOUR_MS
    bounds = window_range(AT, span)
    assert bounds == (FluxTime((AT - span + 1) * NS_PER_MS), FluxTime((AT + 1) * NS_PER_MS))
    last_ns = NS_PER_MS - 1
    assert not _inside((AT - span) * NS_PER_MS, bounds)
    assert not _inside((AT - span) * NS_PER_MS + last_ns, bounds)
    assert _inside((AT - span + 1) * NS_PER_MS, bounds)
    assert _inside(AT * NS_PER_MS, bounds)
    assert _inside(AT * NS_PER_MS + last_ns, bounds)
    assert not _inside((AT + 1) * NS_PER_MS, bounds)
    # real keys: the ns offset comes from the event's dedup key
    for key in ("payment:settled:a", "payment:settled:b", "batch:settled:x"):
        assert _inside(unique_time_ns(AT, key), bounds)
        assert not _inside(unique_time_ns(AT - span, key), bounds)
        assert not _inside(unique_time_ns(AT + 1, key), bounds)
    with pytest.raises(ValueError, match="positive"):
        window_range(AT, 0)


@given(
    at=st.integers(min_value=946_684_800_000, max_value=4_102_444_800_000),
    span=st.integers(min_value=1, max_value=90 * DAY_MS),
    offset=st.integers(min_value=-3, max_value=3),
    at_edge=st.booleans(),
    sub_ms=st.integers(min_value=0, max_value=NS_PER_MS - 1),
)
def test_window_range_holds_exactly_the_window(
    at: int, span: int, offset: int, at_edge: bool, sub_ms: int
) -> None:
    """A point of event ms ``t`` is in the range iff ``at - span < t <= at`` (near both edges)."""
    t = (at if at_edge else at - span) + offset
    assert _inside(t * NS_PER_MS + sub_ms, window_range(at, span)) == (at - span < t <= at)


def _range_starts(query: str) -> list[str]:
    """The start argument of every ``range()`` of ``query``."""
    return re.findall(r"range\(start: ([^,)]+)", query)


def test_no_shipped_query_reads_from_before_its_window() -> None:
    """Every range starts at a window bound the exporter computes (never a fixed instant, an
    epoch or all history), so each query's cost is that of its window, not of the bucket."""
    for name in QUERY_NAMES:
        starts = _range_starts(flux_query(name))
        assert starts and set(starts) <= {"params.start", "params.half_start"}, (name, starts)
    assert DEFAULT_STATE_LOOKBACK_MS <= 7 * DAY_MS
    with pytest.raises(ValueError, match="positive"):
        FluxAnalyticsSource(cast(Any, None), "payments", state_lookback_ms=0)


def _pipelines(query: str) -> list[str]:
    """The top-level statements of ``query`` (blank-line separated), comments removed."""
    code = "\n".join(line.split("//")[0] for line in query.splitlines())
    return [block for block in re.split(r"\n\s*\n", code) if block.strip()]


def test_no_shipped_query_sums_money_in_int64() -> None:
    """Flux adds int64 values and wraps silently past 2^63 (9.2 trillion token units; one
    amount may have 12 integer digits). Money is summed in two parts, split at 10^9."""
    money = re.compile(r'_field == "\w+_micro"|r\.\w+_micro\b')
    summed = 0
    for name in QUERY_NAMES:
        for block in _pipelines(flux_query(name)):
            if not money.search(block):
                continue
            assert "sum()" not in block and "sum(column" not in block, f"{name}:\n{block}"
            for term in re.findall(r"accumulator\.\w+ \+ ([^,\n}]+)", block):
                if "_micro" in term or "_value" in term:
                    summed += 1
                    assert re.search(r"[/%] 1000000000$", term.strip()), f"{name}: {term}"
    assert summed >= 4, "the split sums were not found"


def test_the_cost_table_covers_every_shipped_query() -> None:
    """Flux cost is written down: one row per shipped query in docs/flux-cost.md."""
    doc = (ROOT / "docs" / "flux-cost.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \|", doc, re.M)
    assert sorted(rows) == sorted(QUERY_NAMES)
    assert "1,000,000 payments over 30 days" in doc


def test_ranks_are_computed_from_the_count_the_query_reads() -> None:
    """No rank comes from a count taken by another query: each row knows the number of values
    its own read returned (ascending and descending running counts), and the wanted positions
    are derived from it with the exporter's formula."""
    query = flux_query("settled_order_values")
    assert 'cumulativeSum(columns: ["rank"])' in query
    assert 'cumulativeSum(columns: ["from_top"])' in query
    assert "n: r.rank + r.from_top - 1" in query
    assert "((2 * x - 1) * n + 2 * n0 - 1) / (2 * n0)" in query
    assert "n0: params.settled" in query and "n0: params.timed" in query
    assert re.search(r"positions\(ranks: ranks, n0: n0, n: r\.n\)", query)


async def test_point_in_time_reads_only_its_look_back(aiohttp_server: ServerFactory) -> None:
    """Pending payments and WebSocket clients come from (at - look-back, at], not from 1970."""
    fake = _FakeInflux()
    url = await _start_fake(aiohttp_server, fake)
    source = FluxAnalyticsSource.connect(
        url, "test-token", "test-org", "payments", state_lookback_ms=HOUR_MS
    )
    try:
        await source.point_in_time(AT)
    finally:
        await source.close()
    assert fake.params("point_in_time") == [
        {
            "bucket": '"payments"',
            "start": FluxTime((AT - HOUR_MS + 1) * NS_PER_MS).rfc3339(),
            "stop": FluxTime((AT + 1) * NS_PER_MS).rfc3339(),
        }
    ]


def test_flux_time_literals_are_exact_to_the_nanosecond() -> None:
    """Times are written with nine fraction digits (datetime would drop nanoseconds)."""
    assert FluxTime(0).rfc3339() == "1970-01-01T00:00:00.000000000Z"
    assert FluxTime((AT + 1) * NS_PER_MS).rfc3339() == "2026-04-11T13:00:01.235000000Z"
    assert FluxTime(1_767_225_600_123_456_789).rfc3339() == "2026-01-01T00:00:00.123456789Z"
    assert FluxTime(-1).rfc3339() == "1969-12-31T23:59:59.999999999Z"


# ------------------------------------------------------------------ a fake InfluxDB


@dataclass
class _FakeInflux:
    """Answers /api/v2/query like InfluxDB, with canned annotated CSV per query file."""

    answers: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """(query name, the request's JSON body) in arrival order."""

    def name_of(self, query: str) -> str:
        """Which shipped file a request's query text is."""
        return next(n for n in QUERY_NAMES if flux_query(n) == query)

    def params(self, name: str) -> list[dict[str, str]]:
        """The ``params`` record of every request for ``name``, rendered as Flux literals."""
        out = []
        for request_name, body in self.requests:
            if request_name == name:
                [statement] = body["extern"]["body"]
                out.append(
                    {
                        p["key"]["name"]: _render(p["value"])
                        for p in statement["assignment"]["init"]["properties"]
                    }
                )
        return out


async def _start_fake(aiohttp_server: ServerFactory, fake: _FakeInflux) -> str:
    async def query(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Token test-token"
        assert request.query["org"] == "test-org"
        body = await request.json()
        name = fake.name_of(body["query"])
        fake.requests.append((name, body))
        return web.Response(text=fake.answers.get(name, ""), content_type="text/csv")

    app = web.Application()
    app.router.add_post("/api/v2/query", query)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def fake_influx(
    aiohttp_server: ServerFactory,
) -> AsyncIterator[tuple[_FakeInflux, FluxAnalyticsSource]]:
    """A fake InfluxDB and a source talking to it through the real influxdb-client."""
    fake = _FakeInflux(answers={"settled_order_values": RANKS_CSV})
    url = await _start_fake(aiohttp_server, fake)
    source = FluxAnalyticsSource.connect(url, "test-token", "test-org", "payments")
    yield fake, source
    await source.close()


def _render(node: Mapping[str, Any]) -> str:
    """Flux source text of one literal of the request's ``extern`` AST (JSON)."""
    kind = node["type"]
    if kind == "StringLiteral":
        return json.dumps(node["value"])
    if kind in ("IntegerLiteral", "DateTimeLiteral"):
        return str(node["value"])
    if kind == "DurationLiteral":
        return "".join(f"{d['magnitude']}{d['unit']}" for d in node["values"])
    if kind == "ArrayExpression":
        return "[" + ", ".join(_render(e) for e in node["elements"]) + "]"
    if kind == "UnaryExpression":
        return str(node["operator"]) + _render(node["argument"])
    raise AssertionError(f"unexpected literal {node!r}")


def _extern_text(body: Mapping[str, Any]) -> str:
    """The request's ``extern`` as Flux source: ``option params = {...}``."""
    [statement] = body["extern"]["body"]
    assert statement["type"] == "OptionStatement"
    assignment = statement["assignment"]
    record = ", ".join(
        f"{p['key']['name']}: {_render(p['value'])}" for p in assignment["init"]["properties"]
    )
    return f"option {assignment['id']['name']} = {{{record}}}"


# ------------------------------------------------------------------ what the client sends


async def test_each_method_sends_its_query_with_exact_params_per_span(
    fake_influx: tuple[_FakeInflux, FluxAnalyticsSource],
) -> None:
    """One request per distinct span, the shipped text, every value in the params record."""
    fake, source = fake_influx
    await source.window_totals(AT, [HOUR_MS, DAY_MS, HOUR_MS, 1])
    await source.settled_buckets(AT, [DAY_MS], DAY_MS)
    await source.top_lists(AT, [HOUR_MS], 25)
    await source.settled_order_values(
        AT,
        {
            HOUR_MS: RankRequest(settled=100, amount=(2, 3), settlement=()),
            DAY_MS: RankRequest(settled=0),  # nothing wanted: no query
        },
    )
    await source.point_in_time(AT)
    assert sorted(fake.params("window_totals"), key=lambda p: p["start"]) == [
        {
            "bucket": '"payments"',
            "start": "2026-04-10T13:00:01.235000000Z",
            "stop": "2026-04-11T13:00:01.235000000Z",
            "half_start": "2026-04-11T01:00:01.235000000Z",
        },
        {
            "bucket": '"payments"',
            "start": "2026-04-11T12:00:01.235000000Z",
            "stop": "2026-04-11T13:00:01.235000000Z",
            "half_start": "2026-04-11T12:30:01.235000000Z",
        },
        {  # 1 ms: the window is the single millisecond at; its second half is empty
            "bucket": '"payments"',
            "start": "2026-04-11T13:00:01.234000000Z",
            "stop": "2026-04-11T13:00:01.235000000Z",
            "half_start": "2026-04-11T13:00:01.234000000Z",
        },
    ]
    assert fake.params("settled_buckets") == [
        {
            "bucket": '"payments"',
            "start": "2026-04-10T13:00:01.235000000Z",
            "stop": "2026-04-11T13:00:01.235000000Z",
            "every": "86400000000000ns",
        }
    ]
    assert fake.params("top_lists")[0]["limit"] == "25"
    assert fake.params("settled_order_values") == [
        {
            "bucket": '"payments"',
            "start": "2026-04-11T12:00:01.235000000Z",
            "stop": "2026-04-11T13:00:01.235000000Z",
            "settled": "100",
            "timed": "100",
            "amount_ranks": "[2, 3]",
            "settlement_ranks": f"[{NO_RANK}]",
        }
    ]
    assert fake.params("point_in_time") == [
        {  # the default look-back: one day
            "bucket": '"payments"',
            "start": "2026-04-10T13:00:01.235000000Z",
            "stop": "2026-04-11T13:00:01.235000000Z",
        }
    ]
    for name, body in fake.requests:
        assert body["query"] == flux_query(name)  # values only ever travel in the extern


def _flux_parse_body(text: str) -> list[Any]:
    """The statements of ``text`` as the official Flux parser's JSON AST (under Node)."""
    script = (
        'import * as m from "node:module";'
        'import { readFileSync } from "node:fs";'
        'm.register("./wasm-loader.mjs", "file://" + process.cwd() + "/");'
        'const { parse } = await import("@influxdata/flux-lsp-browser/flux-lsp-browser_bg.js");'
        'process.stdout.write(JSON.stringify(parse(readFileSync(0, "utf8")).body));'
    )
    node = shutil.which("node")
    assert node is not None  # check_flux ran first: it skips, or fails in CI, without Node
    proc = subprocess.run(
        [node, "--input-type=module", "-e", script],
        input=text,
        capture_output=True,
        text=True,
        cwd=CHECKER_DIR,
        timeout=60,
        check=True,
    )
    return cast(list[Any], json.loads(proc.stdout))


_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(?:Z|\+00:00)")


def _normal(node: Any) -> Any:
    """An AST without positions, identifier type tags and time-literal spelling differences."""
    if isinstance(node, list):
        return [_normal(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _normal(v)
        for k, v in node.items()
        if k not in ("location", "base") and not (k == "type" and v == "Identifier")
    }
    if out.get("type") == "DateTimeLiteral":
        match = _RFC3339.fullmatch(out["value"])
        assert match, out
        out["value"] = f"{match[1]}.{(match[2] or '').ljust(9, '0')}Z"
    return out


async def test_sent_params_are_what_flux_parses_and_type_check_every_query(
    fake_influx: tuple[_FakeInflux, FluxAnalyticsSource],
) -> None:
    """The extern influxdb-client sends is, node for node, the official parser's AST of
    ``option params = {...}``; with that very text as preamble every query type-checks."""
    fake, source = fake_influx
    analytics = Analytics(source)
    await analytics.compute_all(AT)
    await source.settled_order_values(
        AT, {DAY_MS: RankRequest(settled=100, amount=(2,), settlement=(100, 100))}
    )
    by_name = {name: body for name, body in fake.requests}
    assert sorted(by_name) == sorted(QUERY_NAMES)
    externs = {name: _extern_text(body) for name, body in by_name.items()}
    assert check_flux({name: flux_query(name) for name in QUERY_NAMES}, PREAMBLE) == {
        name: [] for name in QUERY_NAMES
    }  # skips without Node (fails in CI), before Node is needed below
    for name, text in externs.items():
        assert check_flux({name: flux_query(name)}, preamble=text) == {name: []}, text
        assert _normal(_flux_parse_body(text)) == _normal(by_name[name]["extern"]["body"]), name


async def test_an_empty_influxdb_answers_as_an_empty_duckdb(
    fake_influx: tuple[_FakeInflux, FluxAnalyticsSource], tmp_path: Path
) -> None:
    """No rows from any query: every analytic of every window is DuckDB's empty answer."""
    fake, source = fake_influx
    got = await Analytics(source).compute_all(AT)
    store = DuckDBStore.open(tmp_path / "store.duckdb")
    try:
        expected = await Analytics(DuckDBAnalyticsSource(store)).compute_all(AT)
    finally:
        await store.close()
    assert _data(got) == _data(expected)
    # all windows and the realtime minute at once, one request per span and method
    assert len(fake.requests) == 7 + 3 + 6 + 6 + 1


async def test_query_errors_surface(aiohttp_server: ServerFactory) -> None:
    """A refused query is raised, never read as an empty window."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response(
            {"code": "invalid", "message": "compilation failed: undefined identifier"},
            status=400,
        )

    app = web.Application()
    app.router.add_post("/api/v2/query", refuse)
    server = await aiohttp_server(app)
    source = FluxAnalyticsSource.connect(str(server.make_url("")), "t", "o", "payments")
    try:
        with pytest.raises(StoreClientError) as raised:
            await source.point_in_time(AT)
    finally:
        await source.close()
    assert "answered a query 400: compilation failed: undefined identifier" in str(raised.value)
    assert isinstance(raised.value.__cause__, ApiException)


@dataclass
class _GatedQuerier:
    """A querier whose answers wait for the test; counts queries in flight."""

    limit: int
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    most: int = 0
    calls: int = 0

    async def query(self, flux: str, params: Params) -> list[Any]:
        self.calls += 1
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        if self.in_flight == self.limit:
            self.full.set()
        await self.gate.wait()
        self.in_flight -= 1
        return []

    async def close(self) -> None:
        pass


async def test_spans_run_concurrently_within_the_limit() -> None:
    """Per-span queries overlap, never more than ``max_concurrent_queries`` at once."""
    querier = _GatedQuerier(limit=2)
    source = FluxAnalyticsSource(querier, "payments", max_concurrent_queries=2)
    task = asyncio.ensure_future(source.top_lists(AT, [HOUR_MS * k for k in range(1, 7)], 10))
    await querier.full.wait()
    assert (querier.in_flight, querier.calls) == (2, 2)
    querier.gate.set()
    lists = await task
    assert querier.most == 2 and querier.calls == 6
    assert lists == {HOUR_MS * k: TopLists([], [], []) for k in range(1, 7)}


async def test_bad_arguments_are_refused() -> None:
    """Non-positive spans, bucket widths and limits never reach InfluxDB."""
    querier = _GatedQuerier(limit=1)
    querier.gate.set()
    source = FluxAnalyticsSource(querier, "payments")
    with pytest.raises(ValueError, match="spans must be positive"):
        await source.window_totals(AT, [HOUR_MS, 0])
    with pytest.raises(ValueError, match="bucket_ms"):
        await source.settled_buckets(AT, [HOUR_MS], 0)
    with pytest.raises(ValueError, match="limit"):
        await source.top_lists(AT, [HOUR_MS], 0)
    with pytest.raises(ValueError):
        FluxAnalyticsSource(querier, "payments", max_concurrent_queries=0)
    assert querier.calls == 0


# ------------------------------------------------------------------ annotated CSV -> dataclasses


def _tables(csv: str) -> list[FluxTable]:
    """Annotated CSV (as InfluxDB 2 answers /api/v2/query) parsed by influxdb-client."""
    parser = cast(Callable[..., Any], FluxCsvParser)(
        response=io.BytesIO(csv.replace("\n", "\r\n").encode()),
        serialization_mode=FluxSerializationMode.tables,
    )
    for _ in parser.generator():
        pass
    return list(parser.table_list())


WINDOW_TOTALS_CSV = """\
#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,long,string,string,string,string
#group,false,false,true,true,false,true,true,true,true
#default,records,,,,,,,,
,result,table,_start,_stop,_value,_field,_measurement,network,status
,,0,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,5,payment_id,payment,eip155:8453,received
,,1,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,4,payment_id,payment,eip155:8453,settled
,,2,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,1,payment_id,payment,eip155:8453,failed
,,3,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,3,payment_id,payment,eip155:8453,verified
,,4,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,2,payment_id,payment,eip155:10,received
,,5,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,2,payment_id,payment,unknown,failed

#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,string,string,string,string,long,long
#group,false,false,true,true,true,true,true,true,false,false
#default,settled,,,,,,,,,
,result,table,_start,_stop,_field,_measurement,network,status,hi,lo
,,0,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,amount_micro,payment,eip155:8453,settled,20000000000,1254740993
,,1,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,fee_micro,payment,eip155:8453,settled,0,40001

#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,double,string,string,string,string
#group,false,false,true,true,false,true,true,true,true
#default,settlement,,,,,,,,
,result,table,_start,_stop,_value,_field,_measurement,network,status
,,2,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,6000.5,settlement_ms,payment,eip155:8453,settled

#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,long,string,string,string,string
#group,false,false,true,true,false,true,true,true,true
#default,settlement_count,,,,,,,,
,result,table,_start,_stop,_value,_field,_measurement,network,status
,,3,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,3,settlement_ms,payment,eip155:8453,settled

#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,string,string,string,string,long,long
#group,false,false,true,true,true,true,true,true,false,false
#default,second_half,,,,,,,,,
,result,table,_start,_stop,_field,_measurement,network,status,hi,lo
,,0,2026-04-11T01:00:01.235Z,2026-04-11T13:00:01.235Z,fee_micro,payment,eip155:8453,settled,0,30001

#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,long,string,string,string,string
#group,false,false,true,true,false,true,true,true,true
#default,batches,,,,,,,,
,result,table,_start,_stop,_value,_field,_measurement,network,status
,,0,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,2,batch_id,batch,eip155:8453,settled
,,1,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,1,batch_id,batch,eip155:137,settled

#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,long,string,string,string,string
#group,false,false,true,true,false,true,true,true,true
#default,gas,,,,,,,,
,result,table,_start,_stop,_value,_field,_measurement,network,status
,,0,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,9223372036854775807,gas_used,batch,eip155:8453,settled
,,1,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,7,payment_count,batch,eip155:8453,settled
,,2,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,84000,gas_used,batch,eip155:137,settled
,,3,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,3,payment_count,batch,eip155:137,settled

#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,string,string,string,string,long,long
#group,false,false,true,true,true,true,true,true,false,false
#default,revenue,,,,,,,,,
,result,table,_start,_stop,_field,_measurement,kind,network,hi,lo
,,0,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,amount_micro,revenue,premium,eip155:8453,0,250000
,,1,2026-04-10T13:00:01.235Z,2026-04-11T13:00:01.235Z,amount_micro,revenue,premium,eip155:10,0,750000
"""
"""Money sums come as two parts, ``hi`` and ``lo`` (value = hi * 10^9 + lo): the volume here,
20000000001254740993, is beyond int64, where a Flux ``sum()`` would have wrapped."""


def test_window_totals_add_series_up_exactly() -> None:
    """Counts per status, integer sums beyond 2**63 kept exact (two parts, no wrap), batches
    on networks without payments, revenue by kind."""
    totals = window_totals_from_tables(_tables(WINDOW_TOTALS_CSV))
    assert totals == WindowTotals(
        networks=[
            NetworkTotals("eip155:10", 2, 2, 0, 0, 0, 0, 0.0, 0, 0, 0),
            NetworkTotals("eip155:137", 0, 0, 0, 0, 0, 0, 0.0, 84_000, 3, 0),
            NetworkTotals(
                "eip155:8453", 13, 5, 4, 1, 20_000_000_001_254_740_993, 40_001, 6000.5,
                9_223_372_036_854_775_807, 7, 3,  # one settled record has no settlement time
            ),
            NetworkTotals("unknown", 2, 0, 0, 2, 0, 0, 0.0, 0, 0, 0),
        ],
        fees_second_half_micro=30_001,
        revenue_by_kind={"premium": 1_000_000},
    )
    [base] = [n for n in totals.networks if n.network == "eip155:8453"]
    assert isinstance(base.volume_micro, int) and isinstance(base.gas_used, int)
    assert base.volume_micro != int(float(base.volume_micro))  # a float would have lost it
    assert base.volume_micro > 2**63  # an int64 sum would have wrapped


def test_money_never_comes_from_a_float_column() -> None:
    """A ``double`` where an integer sum belongs is refused, not rounded."""
    types = "#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,string,string,string,string"
    csv = WINDOW_TOTALS_CSV.replace(
        f"{types},long,long\n#group,false,false,true,true,true,true,true,true,false,false\n"
        "#default,second_half",
        f"{types},double,double\n#group,false,false,true,true,true,true,true,true,false,false\n"
        "#default,second_half",
    )
    assert csv != WINDOW_TOTALS_CSV
    with pytest.raises(TypeError, match="expected an integer"):
        window_totals_from_tables(_tables(csv))


def test_an_unknown_result_is_an_error() -> None:
    """A yield the mapping does not know means the query and the code disagree."""
    csv = WINDOW_TOTALS_CSV.replace("#default,batches", "#default,bathces")
    with pytest.raises(RuntimeError, match="unexpected result 'bathces'"):
        window_totals_from_tables(_tables(csv))


BUCKETS_CSV = """\
#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,long,string,string,string,string
#group,false,false,true,true,false,true,true,true,true
#default,records,,,,,,,,
,result,table,_start,_stop,_value,_field,_measurement,network,status
,,0,2026-04-11T12:00:01.235Z,2026-04-11T13:00:00Z,2,payment_id,payment,eip155:8453,settled
,,1,2026-04-11T13:00:00Z,2026-04-11T13:00:01.235Z,1,payment_id,payment,eip155:8453,settled
,,2,2026-04-11T13:00:00Z,2026-04-11T13:00:01.235Z,3,payment_id,payment,eip155:10,settled

#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,string,string,string,string,long,long
#group,false,false,true,true,true,true,true,true,false,false
#default,sums,,,,,,,,,
,result,table,_start,_stop,_field,_measurement,network,status,hi,lo
,,0,2026-04-11T12:00:01.235Z,2026-04-11T13:00:00Z,amount_micro,payment,eip155:8453,settled,0,3000000
,,1,2026-04-11T12:00:01.235Z,2026-04-11T13:00:00Z,fee_micro,payment,eip155:8453,settled,0,20000
,,2,2026-04-11T13:00:00Z,2026-04-11T13:00:01.235Z,amount_micro,payment,eip155:8453,settled,0,1
,,3,2026-04-11T13:00:00Z,2026-04-11T13:00:01.235Z,fee_micro,payment,eip155:8453,settled,0,0
,,4,2026-04-11T13:00:00Z,2026-04-11T13:00:01.235Z,amount_micro,payment,eip155:10,settled,3999,1000000000
,,5,2026-04-11T13:00:00Z,2026-04-11T13:00:01.235Z,fee_micro,payment,eip155:10,settled,0,30000

#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,string,long
#group,false,false,true,true,true,false
#default,parties,,,,,
,result,table,_start,_stop,_field,_value
,,0,2026-04-11T12:00:01.235Z,2026-04-11T13:00:00Z,payee,1
,,1,2026-04-11T12:00:01.235Z,2026-04-11T13:00:00Z,payer,2
,,2,2026-04-11T13:00:00Z,2026-04-11T13:00:01.235Z,payee,2
,,3,2026-04-11T13:00:00Z,2026-04-11T13:00:01.235Z,payer,3
"""


def test_buckets_floor_a_clipped_start_and_add_networks_up() -> None:
    """The first bucket's ``_start`` is the range start: it is floored to its UTC hour; counts
    and sums add up over networks, distinct parties come already across networks."""
    buckets = buckets_from_tables(_tables(BUCKETS_CSV), HOUR_MS)
    noon = BASE_MS + 100 * DAY_MS + 12 * HOUR_MS
    assert buckets == [
        BucketTotals(noon, 2, 3_000_000, 20_000, 2, 1),
        BucketTotals(noon + HOUR_MS, 4, 4_000_000_000_001, 30_000, 3, 2),
    ]
    days = buckets_from_tables(_tables(BUCKETS_CSV), DAY_MS)
    assert [b.start_ms for b in days] == [BASE_MS + 100 * DAY_MS]


RANKS_CSV = """\
#datatype,string,long,long,long,long
#group,false,false,false,false,false
#default,amount,,,,
,result,table,_value,rank,n
,,0,1500000,2,100
,,0,2500000,3,100

#datatype,string,long,double,long,long
#group,false,false,false,false,false
#default,settlement,,,,
,result,table,_value,rank,n
,,0,59999.75,95,100
,,0,61000,100,100
"""
"""Each kept row: its value, its position among the values the query read, and their count."""


def test_rank_values_are_keyed_by_rank() -> None:
    """Amounts stay integers, times floats; a rank answered twice (p95 = p99) is one key."""
    request = RankRequest(settled=100, amount=(2, 3), settlement=(95, 100))
    assert rank_values_from_tables(_tables(RANKS_CSV), request) == RankValues(
        amount={2: 1_500_000, 3: 2_500_000}, settlement={95: 59_999.75, 100: 61_000.0}
    )
    same = RankRequest(settled=100, amount=(3,), settlement=(100, 100))
    assert rank_values_from_tables(_tables(RANKS_CSV), same) == RankValues(
        amount={3: 2_500_000}, settlement={100: 61_000.0}
    )


def test_ranks_follow_the_count_the_query_itself_read() -> None:
    """Records written since the window was counted (8 values read, 4 counted): rank k of 4
    is the value at the same fraction of the 8 the query sorted, as DuckDB rescales, never a
    rank shifted by the newcomers."""
    assert [rescaled_rank(k, 4, 4) for k in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert [rescaled_rank(k, 4, 8) for k in (1, 2, 3, 4)] == [1, 3, 5, 7]
    assert [rescaled_rank(k, 4, 2) for k in (1, 2, 3, 4)] == [1, 1, 2, 2]
    csv = """\
#datatype,string,long,long,long,long
#group,false,false,false,false,false
#default,amount,,,,
,result,table,_value,rank,n
,,0,30,3,8
,,0,50,5,8
"""
    request = RankRequest(settled=4, amount=(2, 3))
    assert rank_values_from_tables(_tables(csv), request) == RankValues(amount={2: 30, 3: 50})


def test_a_missing_rank_is_an_error_never_a_made_up_median() -> None:
    request = RankRequest(settled=101, amount=(51,), settlement=(96, 101))
    with pytest.raises(RuntimeError, match=r"amount ranks \[51\] of 101 .*read saw 100"):
        rank_values_from_tables(_tables(RANKS_CSV), request)
    with pytest.raises(RuntimeError, match=r"settlement ranks \[95\] of 100 .*read saw 0"):
        rank_values_from_tables([], RankRequest(settled=100, settlement=(95,)))


TOP_CSV = """\
#datatype,string,long,string,string,long,long,long,long,long
#group,false,false,false,false,false,false,false,false,false
#default,routes,,,,,,,,
,result,table,payer,payee,hi,lo,payments,last_ms,order_hi
,,0,0xbb,0x02,0,500,2,1775912400000,-500
,,0,0xaa,0x02,0,500,1,1775912401000,-500
,,0,0xaa,0x01,0,500,3,1775912402000,-500
,,0,0xcc,0x01,0,100,1,1775912403000,-100

#datatype,string,long,string,long,long,long,long,long
#group,false,false,false,false,false,false,false,false
#default,payers,,,,,,,
,result,table,payer,hi,lo,payments,last_ms,order_hi
,,0,0xaa,0,1000,4,1775912402000,-1000
,,0,0xbb,0,500,2,1775912400000,-500

#datatype,string,long,string,long,long,long,long,long
#group,false,false,false,false,false,false,false,false
#default,payers,,,,,,,
,result,table,payer,hi,lo,payments,last_ms,order_hi
,,1,0xab,0,1000,1,1775912404000,-1000

#datatype,string,long,string,long,long,long,long,long
#group,false,false,false,false,false,false,false,false
#default,payees,,,,,,,
,result,table,payee,hi,lo,payments,payers,order_hi
,,0,0x02,0,1000,3,2,-1000
,,0,0x01,0,600,4,2,-600
"""


def test_top_lists_keep_the_contract_order_and_limit() -> None:
    """Amount descending, ties by address (routes: payer, then payee), cut at the limit,
    whatever tables the rows came in."""
    lists = top_lists_from_tables(_tables(TOP_CSV), 3)
    assert lists.routes == [
        RouteTotals("0xaa", "0x01", 500, 3),
        RouteTotals("0xaa", "0x02", 500, 1),
        RouteTotals("0xbb", "0x02", 500, 2),
    ]
    assert lists.payers == [
        PayerTotals("0xaa", 1000, 4, 1_775_912_402_000),
        PayerTotals("0xab", 1000, 1, 1_775_912_404_000),
        PayerTotals("0xbb", 500, 2, 1_775_912_400_000),
    ]
    assert lists.payees == [PayeeTotals("0x02", 1000, 3, 2), PayeeTotals("0x01", 600, 4, 2)]
    assert top_lists_from_tables(_tables(TOP_CSV), 1).payers == [
        PayerTotals("0xaa", 1000, 4, 1_775_912_402_000)
    ]


POINT_IN_TIME_CSV = """\
#datatype,string,long,long
#group,false,false,false
#default,ids,,
,result,table,_value
,,0,7

#datatype,string,long,long
#group,false,false,false
#default,terminal_ids,,
,result,table,_value
,,0,4

#datatype,string,long,long,long
#group,false,false,false,false
#default,websocket,,,
,result,table,ms,_value
,,0,1775912401001,12
"""


def test_point_in_time_subtracts_terminal_ids() -> None:
    """Pending = distinct ids (received or terminal) - distinct terminal ids; clients as is."""
    assert point_in_time_from_tables(_tables(POINT_IN_TIME_CSV)) == PointInTime(3, 12)
    assert point_in_time_from_tables([]) == PointInTime(0, 0)


# ------------------------------------------------------------------ against a real InfluxDB


def _data(snapshot: Mapping[Any, AnalyticsResult]) -> dict[str, object]:
    return {
        f"{k.name}/{k.window.value if k.window else '-'}/{k.metric or '-'}": result_data(v)
        for k, v in snapshot.items()
    }


NETWORKS = ("eip155:8453", "eip155:10", "eip155:999999")


def _scenario(at: int, seed: int = 4) -> list[StoreRecord]:
    """Enriched records around ``at``: random traffic over 95 days (some after ``at``) and
    hand-picked edges: window boundaries, equal milliseconds, ties, unknown failures,
    pending payments, batches, revenue and WebSocket counts."""
    rng = random.Random(seed)
    payers = [f"0x{i:040x}" for i in range(1, 13)]
    payees = [f"0x{i:040x}" for i in range(100, 106)]
    records: list[StoreRecord] = []

    def payment(
        pid: str,
        t: int,
        status: str,
        network: str,
        payer: str,
        payee: str,
        amount: int,
        fee: int | None = None,
        settlement: float | None = None,
    ) -> None:
        records.append(
            PaymentRecord(
                f"payment:{status}:{pid}",
                t,
                network,
                status,
                pid,
                payer,
                payee,
                amount,
                fee_micro=fee,
                settlement_ms=settlement,
                tx="0x" + "c" * 64 if status == "settled" else None,
                error="insufficient_funds" if status == "failed" else None,
            )
        )

    for i in range(400):
        pid = f"p{i}"
        t = at - rng.randrange(95 * DAY_MS) if i % 20 else at + rng.randrange(1, HOUR_MS)
        network, payer, payee = rng.choice(NETWORKS), rng.choice(payers), rng.choice(payees)
        amount = rng.choice([1, 1_000_000, rng.randrange(1, 10**13)])
        payment(pid, t, "received", network, payer, payee, amount)
        if rng.random() < 0.3:
            payment(pid, t + rng.randrange(1, 500), "verified", network, payer, payee, amount)
        outcome = rng.random()
        done = t + rng.randrange(1, 3 * HOUR_MS)
        if outcome < 0.7:
            fee = rng.randrange(0, 50_000)
            payment(
                pid,
                done,
                "settled",
                network,
                payer,
                payee,
                amount,
                fee,
                rng.randrange(1, 120_000 * 4) / 4,
            )
        elif outcome < 0.85:
            payment(pid, done, "failed", network, payer, payee, amount)

    # window edges: exactly at - 1h (out of 1h), just inside, and exactly at
    for pid, t in (("edge-out", at - HOUR_MS), ("edge-in", at - HOUR_MS + 1), ("edge-at", at)):
        payment(pid, t - 5, "received", NETWORKS[0], payers[0], payees[0], 2_000_000)
        payment(pid, t, "settled", NETWORKS[0], payers[0], payees[0], 2_000_000, 10_000, 1500.0)
    # equal millisecond, equal tags: two points
    for pid in ("same-ms-1", "same-ms-2"):
        payment(pid, at - 10 * MINUTE_MS - 1, "received", NETWORKS[1], payers[1], payees[1], 5)
        payment(pid, at - 10 * MINUTE_MS, "settled", NETWORKS[1], payers[1], payees[1], 5, 1, 700.0)
    # a tie in the top lists: equal totals, the address decides
    for pid, payer in (("tie-a", payers[10]), ("tie-b", payers[11])):
        payment(pid, at - 2 * HOUR_MS, "settled", NETWORKS[2], payer, payees[5], 10**14, 7, 900.0)
    # failures that joined nothing
    for k in range(3):
        records.append(
            PaymentRecord(
                f"payment:failed:unknown:{k}",
                at - k * DAY_MS - 7,
                "unknown",
                "failed",
                "unknown",
                error="nonce",
            )
        )
    # pending as of at: settled only after at
    payment("late", at - 30 * MINUTE_MS, "received", NETWORKS[0], payers[2], payees[2], 3)
    payment("late", at + 1, "settled", NETWORKS[0], payers[2], payees[2], 3, 0, 10.0)
    for k, (t, network, gas) in enumerate(
        [
            (at - 3 * HOUR_MS, NETWORKS[0], 84_000),
            (at - 8 * DAY_MS, NETWORKS[1], 120_000),
            (at - 40 * MINUTE_MS, "eip155:137", 21_000),
            (at - HOUR_MS, NETWORKS[0], 50_000),
        ]
    ):
        bid = f"b{k}"
        records.append(
            BatchRecord(
                f"batch:created:{bid}", t - 100, network, "created", bid, 2 + k, 10**7, None, None
            )
        )
        records.append(
            BatchRecord(
                f"batch:settled:{bid}",
                t,
                network,
                "settled",
                bid,
                2 + k,
                10**7,
                20_000,
                gas,
                "0x" + "d" * 64,
            )
        )
    for k, (t, kind) in enumerate(
        [(at - 5 * HOUR_MS, "premium"), (at - 2 * DAY_MS, "gas_sponsorship"), (at, "premium")]
    ):
        records.append(RevenueRecord(f"revenue:{k}", t, NETWORKS[k % 2], kind, 250_000 * (k + 1)))
    for k, (t, count) in enumerate(
        [(at - DAY_MS, 3), (at - 5, 9), (at - 5, 11), (at - 5, 10), (at + 1, 99)]
    ):
        records.append(WebsocketRecord(f"websocket:{k}", t, count))
    return records


SCENARIO_ATS = (AT, AT - 1, AT - HOUR_MS, AT + 1, AT - DAY_MS + 7 * MINUTE_MS)


@pytest.mark.needs_influxdb
async def test_influxdb_answers_as_duckdb_for_every_analytic(tmp_path: Path) -> None:
    """The same records in InfluxDB (through InfluxStore) and DuckDB: equal answers for every
    analytic and window, as of instants on and beside the window edges."""
    records = _scenario(AT)
    duck = DuckDBStore.open(tmp_path / "store.duckdb")
    try:
        assert await duck.write(records) == []
        async with influxdb_source(tmp_path, records) as flux:
            for at in SCENARIO_ATS:
                expected = _data(await Analytics(DuckDBAnalyticsSource(duck)).compute_all(at))
                got = _data(await Analytics(flux).compute_all(at))
                assert sorted(got) == sorted(expected)
                for key, value in expected.items():
                    assert got[key] == value, f"{key} as of {at}"
            # the scenario is not trivially empty where it matters
            day = await Analytics(flux).payments(Window.H24, AT)
            assert day.successfulPayments > 3 and day.failedPayments > 0
    finally:
        await duck.close()


def test_the_scenario_covers_its_edges() -> None:
    """The integration scenario holds what it claims (checked without a server)."""
    records = _scenario(AT)
    keys = [r.key for r in records]
    assert len(keys) == len(set(keys))
    settled_at = {
        r.time_ms for r in records if isinstance(r, PaymentRecord) and r.status == "settled"
    }
    assert {AT - HOUR_MS, AT - HOUR_MS + 1, AT} <= settled_at
    assert any(r.time_ms > AT for r in records)
    assert sum(1 for r in records if isinstance(r, WebsocketRecord) and r.time_ms == AT - 5) == 3
