"""The InfluxDB store: every write fault over both write APIs, and what ``check-config``
says of it.

Faults come from the fault-injection server (``influx_fault_server``), which speaks the v2
API (driven through the real ``influxdb-client``) and the v1 ``/write`` as InfluxDB 1.x
answers it. The fault tests run once per API. Shipping through these faults (the
forwarder) is tested in ``test_forwarder``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from _exporter_process import run_cli
from conftest import BASE_MS
from influx_fault_server import InfluxFaultServer, Reply, threaded_fault_server
from store_helpers import (
    ADDR_A,
    ADDR_B,
    GOLDEN,
    fault_server,
    influx_env,
    influx_store,
    point_key,
)

from exporter import Settings
from exporter.errors import (
    ConfigError,
    StoreAuthError,
    StoreClientError,
    StoreRetryAfterError,
    StoreServerError,
    StoreTimeoutError,
)
from exporter.records import PaymentRecord, StoreRecord
from exporter.store import open_store, redact_url
from exporter.store.influx.store import InfluxApi, InfluxStore

# --------------------------------------------------------------------------- helpers


def _payments(count: int, prefix: str = "p", ms: int = BASE_MS) -> list[StoreRecord]:
    return [
        PaymentRecord(
            f"payment:received:{prefix}{i}",
            ms + i,
            "eip155:8453",
            "received",
            f"{prefix}{i}",
            ADDR_A,
            ADDR_B,
            1_000_000 + i,
        )
        for i in range(count)
    ]


@pytest.fixture
async def influx() -> AsyncIterator[InfluxFaultServer]:
    """A fault server on a free loopback port, accepting everything until told otherwise."""
    async with fault_server() as server:
        yield server


@pytest.fixture(params=["v2", "v1"])
def api(request: pytest.FixtureRequest) -> InfluxApi:
    """The write API under test: every fault test runs once per API."""
    value: InfluxApi = request.param
    return value


@pytest.fixture
async def store(influx: InfluxFaultServer, api: InfluxApi) -> AsyncIterator[InfluxStore]:
    """The store pointed at the fault server, with a timeout a loaded machine never hits."""
    async with influx_store(influx, timeout_seconds=10.0, api=api) as opened:
        yield opened


@pytest.fixture
async def quick_store(influx: InfluxFaultServer, api: InfluxApi) -> AsyncIterator[InfluxStore]:
    """The store pointed at the fault server with a 0.5 s timeout, for timeout tests."""
    async with influx_store(influx, timeout_seconds=0.5, api=api) as opened:
        yield opened


def _where(store: InfluxStore) -> str:
    """How the store's errors name where they write."""
    if store.api == "v1":
        return f"database {store.bucket!r}"
    return f"bucket {store.bucket!r} org {store.org!r}"


# --------------------------------------------------------------------------- store faults


async def test_write_sends_gzip_batches_of_at_most_5000_lines(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """12,000 records go as 5,000 + 5,000 + 2,000 lines, gzip'd, with org/bucket/ns."""
    records = _payments(12_000)
    assert await store.write(records) == []
    log = influx.request_log()
    assert [len(r.lines) for r in log] == [5_000, 5_000, 2_000]
    names = {"org": "test-org", "bucket": "payments"} if store.api == "v2" else {"db": "payments"}
    for request in log:
        assert request.content_encoding == "gzip"
        assert request.query == {**names, "precision": "ns"}
        assert request.authorization == "Token test-token"
        assert request.status == 204
    assert influx.point_keys() == {point_key(r) for r in records}


async def test_golden_points_arrive_byte_for_byte(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """Through gzip and the real client, InfluxDB receives exactly the golden lines."""
    assert await store.write([record for record, _ in GOLDEN]) == []
    assert sorted(influx.written_lines()) == sorted(line for _, line in GOLDEN)


async def test_server_error_raises_a_retryable_store_error(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """500: nothing is refused for good; the write raises and is retried later."""
    influx.push(Reply(500, "unexpected error writing points to database: timeout"))
    with pytest.raises(StoreServerError, match="500"):
        await store.write(_payments(3))
    assert influx.point_keys() == set()
    assert await store.write(_payments(3)) == []
    assert len(influx.point_keys()) == 3


@pytest.mark.parametrize(("status", "header", "seconds"), [(429, "7", 7.0), (503, "0.5", 0.5)])
async def test_throttling_raises_retry_after_with_the_servers_delay(
    influx: InfluxFaultServer, store: InfluxStore, status: int, header: str, seconds: float
) -> None:
    """429/503 carry the Retry-After the server named."""
    influx.push(Reply(status, "slow down", retry_after=header))
    with pytest.raises(StoreRetryAfterError) as caught:
        await store.write(_payments(2))
    assert caught.value.retry_after == seconds


async def test_413_splits_the_batch_until_it_fits(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """Above the server's limit, halves are written on their own; everything arrives."""
    influx.max_lines = 700
    records = _payments(2_000)
    assert await store.write(records) == []
    accepted = [r for r in influx.request_log() if r.status == 204]
    assert all(len(r.lines) <= 700 for r in accepted)
    assert sum(len(r.lines) for r in accepted) == 2_000
    assert influx.point_keys() == {point_key(r) for r in records}


async def test_bad_lines_are_isolated_by_bisection_and_the_rest_is_written(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """400 naming a bad line: the poison records come back with InfluxDB's message."""
    records = _payments(1_000)
    poison = {records[17].key, records[640].key}
    influx.bad_markers = ('payment_id="p17"', 'payment_id="p640"')
    refused = await store.write(records)
    assert {r.record.key for r in refused} == poison
    said = "unable to parse" if store.api == "v2" else "partial write: unable to parse"
    for rejection in refused:
        assert rejection.reason.startswith(f"influxdb 400: {said} 'payment,")
        assert rejection.record.key.rsplit(":", 1)[1] in rejection.reason
    good = {point_key(r) for r in records if r.key not in poison}
    assert influx.point_keys() == good
    # Bisection, not a line-by-line search: about two requests per halving per poison.
    assert store.requests <= 2 * 2 * math.ceil(math.log2(1_000)) + 1


async def test_partial_writes_are_bisected_and_the_conflicting_line_dead_lettered(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """Partial write (type conflict; 422 on v2, 400 on v1): the other lines land, the
    conflicting one is refused."""
    records = _payments(50)
    influx.conflict_markers = ('payment_id="p9"',)
    refused = await store.write(records)
    assert [r.record.key for r in refused] == [records[9].key]
    assert "partial write: field type conflict" in refused[0].reason
    assert refused[0].reason.startswith("influxdb 422" if store.api == "v2" else "influxdb 400")
    assert influx.point_keys() == {point_key(r) for r in records if r is not records[9]}


async def test_a_type_conflict_refusing_the_whole_v1_batch_dead_letters_only_its_line(
    influx: InfluxFaultServer,
) -> None:
    """InfluxDB 1.6 may answer a field type conflict with 400 for the whole batch, writing
    nothing: bisection still isolates the one line, and everything else is written."""
    influx.conflict_markers = ('payment_id="p613"',)
    influx.v1_conflict_drops_batch = True
    records = _payments(2_000)
    async with influx_store(influx, timeout_seconds=10.0, api="v1") as store:
        refused = await store.write(records)
        assert [r.record.key for r in refused] == [records[613].key]
        assert "field type conflict" in refused[0].reason
        assert store.requests <= 2 * math.ceil(math.log2(2_000)) + 1
    assert influx.point_keys() == {point_key(r) for r in records if r is not records[613]}


@pytest.mark.parametrize(
    "message", ["database is required", "unexpected EOF", "gzip: invalid header"]
)
async def test_a_v1_400_that_names_no_line_is_retried_not_dead_lettered(
    influx: InfluxFaultServer, message: str
) -> None:
    """1.x answers request-level trouble with 400 too: only answers naming lines bisect."""
    influx.push(Reply(400, message))
    async with influx_store(influx, timeout_seconds=10.0, api="v1") as store:
        with pytest.raises(StoreClientError, match=message):
            await store.write(_payments(10))
        assert store.requests == 1


async def test_v1_basic_auth_carries_the_user_and_never_the_url(
    influx: InfluxFaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    """v1 with a user name: HTTP Basic (not u/p query parameters, which would put the
    password in every URL); a wrong password is a StoreAuthError that never prints it."""
    influx.username, influx.password = "writer", "s3cret-pw"
    with caplog.at_level(logging.DEBUG):
        async with influx_store(influx, timeout_seconds=10.0, api="v1") as store:
            assert await store.write(_payments(3)) == []
        (request,) = influx.request_log()
        assert request.authorization == "Basic d3JpdGVyOnMzY3JldC1wdw=="
        assert set(request.query) == {"db", "precision"}
        wrong = InfluxStore(
            influx.url, None, None, influx.bucket, api="v1", username="writer",
            password="nope", retention_policy="autogen",
        )
        try:
            with pytest.raises(StoreAuthError) as caught:
                await wrong.write(_payments(1))
        finally:
            await wrong.close()
    assert "EXPORTER_INFLUX_USERNAME and EXPORTER_INFLUX_PASSWORD" in str(caught.value)
    assert "retention policy 'autogen'" in str(caught.value)
    assert influx.request_log()[-1].query["rp"] == "autogen"
    for text in (str(caught.value), *(r.getMessage() for r in caplog.records)):
        assert "s3cret-pw" not in text and "nope" not in text


async def test_a_request_level_400_is_retried_not_dead_lettered(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """A 400 about the request (body unreadable) must not turn good records into dead letters."""
    influx.push(Reply(400, "unable to read data: gzip: invalid header"))
    with pytest.raises(StoreClientError, match="unable to read data"):
        await store.write(_payments(10))
    assert store.requests == 1


@pytest.mark.parametrize(
    ("status", "message"),
    [(401, "unauthorized access"), (403, "insufficient permissions for write")],
)
async def test_refused_credentials_raise_store_auth_error(
    influx: InfluxFaultServer, store: InfluxStore, status: int, message: str
) -> None:
    """401/403 become StoreAuthError, which the forwarder treats as 'not ready'."""
    influx.push(Reply(status, message))
    with pytest.raises(StoreAuthError, match=message):
        await store.write(_payments(1))


async def test_unknown_bucket_is_a_configuration_error(
    influx: InfluxFaultServer, api: InfluxApi
) -> None:
    """404 (bucket, org or database not found) names the settings to check."""
    org = influx.org if api == "v2" else None
    wrong = InfluxStore(influx.url, influx.token, org, "nope", timeout_seconds=1, api=api)
    try:
        with pytest.raises(StoreAuthError, match="EXPORTER_INFLUX_BUCKET"):
            await wrong.write(_payments(1))
    finally:
        await wrong.close()


async def test_slow_answers_time_out(influx: InfluxFaultServer, quick_store: InfluxStore) -> None:
    """No answer within the timeout raises StoreTimeoutError (retried by the forwarder),
    naming the URL and the setting that sets the timeout."""
    influx.push(Reply(204, delay=5.0))
    started = time.monotonic()
    with pytest.raises(StoreTimeoutError) as caught:
        await quick_store.write(_payments(1))
    assert time.monotonic() - started < 3.0
    assert str(caught.value) == (
        f"InfluxDB at {influx.url} did not answer within 0.5s: check that it is up, or "
        "raise EXPORTER_INFLUX_TIMEOUT_SECONDS if it is only slow"
    )


async def test_connection_refused_then_recovery(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """An outage raises StoreServerError; once InfluxDB is back the same store writes again."""
    await influx.outage()
    with pytest.raises(StoreServerError, match="unreachable"):
        await store.write(_payments(2))
    await influx.resume()
    assert await store.write(_payments(2)) == []
    assert len(influx.point_keys()) == 2


@pytest.mark.parametrize(
    ("reply", "error", "way_out"),
    [
        (Reply(500, "engine broke"), StoreServerError, "InfluxDB's own log says why"),
        (Reply(418, "teapot"), StoreClientError, "check that EXPORTER_INFLUX_URL names"),
        (Reply(401, "unauthorized"), StoreAuthError, "EXPORTER_INFLUX_TOKEN"),
        (Reply(404, "bucket not found"), StoreAuthError, "EXPORTER_INFLUX_BUCKET"),
        (Reply(429, "slow", retry_after="2"), StoreRetryAfterError, "retry after 2s"),
    ],
    ids=["500", "418", "401", "404", "429"],
)
async def test_every_write_error_names_the_address_and_the_way_out(
    influx: InfluxFaultServer,
    store: InfluxStore,
    reply: Reply,
    error: type[Exception],
    way_out: str,
) -> None:
    """One line that says which InfluxDB (and bucket) failed and what to do about it."""
    influx.push(reply)
    with pytest.raises(error) as caught:
        await store.write(_payments(1))
    message = str(caught.value)
    assert influx.url in message and way_out in message
    assert f"{_where(store)} answered {reply.status}: {reply.message}; " in message
    assert "\n" not in message


async def test_an_unreachable_influxdb_names_its_url_and_what_to_check(
    influx: InfluxFaultServer, store: InfluxStore
) -> None:
    """Connection refused: the URL, the cause, and where to look."""
    await influx.outage()
    with pytest.raises(StoreServerError) as caught:
        await store.write(_payments(1))
    message = str(caught.value)
    assert message.startswith(f"InfluxDB at {influx.url} unreachable (")
    assert message.endswith("check that InfluxDB runs there and that EXPORTER_INFLUX_URL names it")


def test_a_url_with_user_info_is_refused_without_printing_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """User info cannot ride beside the token (every request would fail); it is refused
    at open with the URL redacted, and no log line carries the password."""
    settings = Settings(
        store="influxdb",
        influx_url="http://writer:s3cret@127.0.0.1:8086/",
        influx_token="t0ken",
        influx_org="o",
    )
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError) as caught:
        open_store(settings)
    message = str(caught.value)
    assert "EXPORTER_INFLUX_URL http://***@127.0.0.1:8086 carries user info" in message
    assert "remove the 'user:password@' part" in message
    assert "s3cret" not in message and "writer" not in message
    assert not any("s3cret" in record.getMessage() for record in caplog.records)


def test_redacted_urls_keep_everything_but_the_user_info() -> None:
    """What stores print of a URL: host, port and path; never the user or password."""
    assert (
        redact_url("https://u:p@influx.example:8086/base") == "https://***@influx.example:8086/base"
    )
    assert redact_url("http://u@h") == "http://***@h"
    assert redact_url("http://[::1]:8086") == "http://[::1]:8086"


async def test_check_reports_reachability_and_credentials(
    influx: InfluxFaultServer, api: InfluxApi
) -> None:
    """check(): version from /ping, credentials by an empty write that stores nothing."""
    org = influx.org if api == "v2" else None
    good = InfluxStore(influx.url, influx.token, org, influx.bucket, timeout_seconds=1, api=api)
    bad = InfluxStore(influx.url, "wrong", org, influx.bucket, timeout_seconds=1, api=api)
    try:
        ok = await good.check()
        assert (ok.reachable, ok.version, ok.credentials) == (True, "v2.7.11", "accepted")
        refused = await bad.check()
        assert (refused.reachable, refused.credentials) == (True, "refused")
        await influx.outage()
        down = await good.check()
        assert (down.reachable, down.credentials) == (False, "unknown")
    finally:
        await good.close()
        await bad.close()
    assert influx.point_keys() == set()


# --------------------------------------------------------------------------- configuration


def test_influxdb_without_url_token_or_org_is_a_config_error() -> None:
    """Selecting InfluxDB without its settings names every missing variable (exit 2)."""
    result = run_cli("check-config", EXPORTER_STORE="influxdb")
    assert result.returncode == 2
    for variable in ("EXPORTER_INFLUX_URL", "EXPORTER_INFLUX_TOKEN", "EXPORTER_INFLUX_ORG"):
        assert variable in result.stderr
    auto = run_cli("check-config", EXPORTER_INFLUX_URL="http://127.0.0.1:8086")
    assert auto.returncode == 2
    assert "EXPORTER_INFLUX_TOKEN" in auto.stderr and "EXPORTER_INFLUX_URL" not in auto.stderr


@pytest.fixture
def threaded_influx() -> Iterator[tuple[InfluxFaultServer, Callable[..., Any]]]:
    """A fault server on its own thread, for subprocess tests."""
    with threaded_fault_server() as (server, call):
        yield server, call


@pytest.mark.slow
def test_check_config_reports_and_pings_influxdb(
    threaded_influx: tuple[InfluxFaultServer, Callable[..., Any]],
) -> None:
    """check-config says InfluxDB will be used; --ping reaches it and tests the token."""
    server, call = threaded_influx
    env = {k: v for k, v in influx_env(server).items() if k.startswith("EXPORTER_")}
    plain = run_cli("check-config", **env)
    assert plain.returncode == 0, plain.stderr
    assert '"resolved_store": "influxdb"' in plain.stdout
    assert server.token not in plain.stdout
    pinged = run_cli("check-config", "--ping", **env)
    assert pinged.returncode == 0, pinged.stderr
    assert "reachable (InfluxDB v2.7.11); token accepted" in pinged.stdout
    refused = run_cli("check-config", "--ping", **{**env, "EXPORTER_INFLUX_TOKEN": "wrong"})
    assert refused.returncode == 1
    assert "credentials refused" in refused.stdout
    call(server.outage())
    down = run_cli("check-config", "--ping", **env)
    assert down.returncode == 1
    assert "unreachable" in down.stdout
    assert server.point_keys() == set()


@pytest.mark.slow
def test_check_config_pings_influxdb_over_the_v1_api(
    threaded_influx: tuple[InfluxFaultServer, Callable[..., Any]],
) -> None:
    """check-config with EXPORTER_INFLUX_API=v1: no org needed, the user name and password
    tested by an empty write to the database, the password never printed."""
    server, _ = threaded_influx
    server.username, server.password = "writer", "s3cret-pw"
    env = {
        "EXPORTER_INFLUX_URL": server.url,
        "EXPORTER_INFLUX_API": "v1",
        "EXPORTER_INFLUX_USERNAME": "writer",
        "EXPORTER_INFLUX_PASSWORD": "s3cret-pw",
    }
    pinged = run_cli("check-config", "--ping", **env)
    assert pinged.returncode == 0, pinged.stderr
    assert "(v1 API, database payments)" in pinged.stdout
    assert "credentials accepted for v1 API, database payments" in pinged.stdout
    refused = run_cli("check-config", "--ping", **{**env, "EXPORTER_INFLUX_PASSWORD": "nope"})
    assert refused.returncode == 1
    assert "credentials refused" in refused.stdout
    for output in (pinged.stdout, pinged.stderr, refused.stdout, refused.stderr):
        assert "s3cret-pw" not in output and "nope" not in output
    assert server.point_keys() == set()
