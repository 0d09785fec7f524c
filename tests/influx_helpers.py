"""Helpers for tests against a real InfluxDB 2.x: the configured target, Flux for reading
points back, and a fresh bucket with a Flux analytics source over it.

The target is read from ``EXPORTER_TEST_INFLUX_URL``, ``_TOKEN``, ``_ORG`` and ``_BUCKET`` at
import: the autouse ``env_clean`` fixture removes ``EXPORTER_*`` variables before each test.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.domain.bucket_retention_rules import BucketRetentionRules
from influxdb_client.domain.post_bucket_request import PostBucketRequest
from influxdb_client.rest import ApiException
from influxdb_client.service.buckets_service import BucketsService
from influxdb_client.service.organizations_service import OrganizationsService

from exporter.analytics.flux import FluxAnalyticsSource
from exporter.analytics.models import DAY_MS
from exporter.records import StoreRecord
from exporter.store.influx.store import InfluxStore


@dataclass(frozen=True)
class InfluxTarget:
    """Where the InfluxDB under test is, and the credentials and bucket to use."""

    url: str
    token: str
    org: str
    bucket: str


def _target_from_environment() -> InfluxTarget | None:
    names = ("URL", "TOKEN", "ORG", "BUCKET")
    values = [os.environ.get(f"EXPORTER_TEST_INFLUX_{name}", "").strip() for name in names]
    return InfluxTarget(*values) if all(values) else None


TARGET = _target_from_environment()
"""The configured InfluxDB, or None when the variables are not all set."""

SKIP_REASON = (
    "EXPORTER_TEST_INFLUX_URL, _TOKEN, _ORG and _BUCKET are not all set: no InfluxDB 2.x "
    "to test against (docker compose --profile test run --rm tests provides one)"
)


def _lit(value: str) -> str:
    """A Flux string literal (JSON escaping is a subset of Flux's)."""
    return json.dumps(value)


def rows_query(bucket: str, measurement: str, network: str, start_ms: int, stop_ms: int) -> str:
    """Flux for one measurement's points of one network, fields pivoted into columns."""
    return f"""
from(bucket: {_lit(bucket)})
  |> range(start: time(v: {start_ms * 1_000_000}), stop: time(v: {stop_ms * 1_000_000}))
  |> filter(fn: (r) => r._measurement == {_lit(measurement)} and r.network == {_lit(network)})
  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
  |> group()
  |> sort(columns: ["_time"])
"""


def untyped(thing: object) -> Callable[..., Any]:
    """influxdb-client's generated classes and methods, which carry no annotations."""
    return cast(Callable[..., Any], thing)


@asynccontextmanager
async def fresh_bucket() -> AsyncIterator[InfluxTarget]:
    """A new bucket (infinite retention) in the configured InfluxDB, deleted afterwards: the
    analytics read whole buckets, so nothing else may be in it. Skips without a server or
    when the token may not create buckets."""
    if TARGET is None:
        pytest.skip(SKIP_REASON)
    client = InfluxDBClientAsync(url=TARGET.url, token=TARGET.token, org=TARGET.org)
    try:
        api = client.api_client
        orgs = await untyped(OrganizationsService)(api).get_orgs_async(org=TARGET.org)
        buckets = untyped(BucketsService)(api)
        name = f"exporter-analytics-{uuid.uuid4().hex[:12]}"
        request = untyped(PostBucketRequest)(
            org_id=orgs.orgs[0].id,
            name=name,
            retention_rules=[untyped(BucketRetentionRules)(type="expire", every_seconds=0)],
        )
        try:
            bucket = await buckets.post_buckets_async(request)
        except ApiException as error:
            if error.status in (401, 403):
                pytest.skip(f"the test token cannot create a bucket ({error.status})")
            raise
        try:
            yield InfluxTarget(TARGET.url, TARGET.token, TARGET.org, name)
        finally:
            await buckets.delete_buckets_id_async(bucket.id)
    finally:
        await untyped(client.close)()


@asynccontextmanager
async def influxdb_source(
    directory: Path, records: list[StoreRecord]
) -> AsyncIterator[FluxAnalyticsSource]:
    """``records`` written with :class:`InfluxStore` into a fresh bucket, and the Flux source
    over it (the contract suite's store-factory signature; ``directory`` is unused)."""
    async with fresh_bucket() as bucket:
        store = InfluxStore(bucket.url, bucket.token, bucket.org, bucket.bucket)
        try:
            assert await store.write(records) == []
        finally:
            await store.close()
        # The scenarios (and the DuckDB source) count payments pending since any time; the
        # look-back covers their 95 days so both stores answer the same.
        source = FluxAnalyticsSource.connect(
            bucket.url, bucket.token, bucket.org, bucket.bucket, state_lookback_ms=100 * DAY_MS
        )
        try:
            yield source
        finally:
            await source.close()
