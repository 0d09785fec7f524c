"""The analytics source protocol (the raw aggregates a store answers) and the choice of
the source that fits a store: SQL on DuckDB, Flux on InfluxDB."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from ..config import Settings
from ..records import Store
from .models import (
    BucketTotals,
    PointInTime,
    RankRequest,
    RankValues,
    TopLists,
    WindowTotals,
)


class AnalyticsSource(Protocol):
    """The raw aggregates a store answers; ``Analytics`` derives every result from them.

    Common rules for every method:

    * ``spans_ms`` are window lengths in ms; a span ``s`` selects the records with
      ``at_ms - s < time_ms <= at_ms`` (``time_ms`` is the event's own timestamp).
      Results are keyed by span. Spans are positive and may include any length
      (the realtime figures ask for 60,000); each is answered independently.
    * "settled records" are payment records with status ``settled``; they always carry
      payer, payee, ``amount_micro``, ``fee_micro`` and ``settlement_ms``.
    * Money and gas are exact Python ``int`` (convert DuckDB HUGEINT / Flux int64 sums);
      ``settlement_ms`` values and sums are ``float``.
    * Every method is one query (or one statement) where the store allows it.
    * A store that cannot answer (unreachable, timed out, refusing the credentials,
      failing on its side) raises a :class:`exporter.errors.StoreError` naming the cause;
      the API answers it with 503.
    """

    async def window_totals(self, at_ms: int, spans_ms: Sequence[int]) -> dict[int, WindowTotals]:
        """Per span: per-network counters and sums, the second-half fees, revenue by kind.

        Networks come from the ``payment`` records (``network`` column) and from the
        ``batch`` records with status ``settled`` (their ``batch:created`` network);
        revenue from the ``revenue`` records. Any order.
        """
        ...

    async def settled_buckets(
        self, at_ms: int, spans_ms: Sequence[int], bucket_ms: int
    ) -> dict[int, list[BucketTotals]]:
        """Per span: settled records grouped by ``time_ms - time_ms % bucket_ms``.

        Only buckets holding at least one settled record of the window; distinct payers
        and payees count among that bucket's settled records in the window. Any order.
        ``bucket_ms`` is ``HOUR_MS`` or ``DAY_MS`` (UTC: epoch ms has no leap seconds).
        """
        ...

    async def settled_order_values(
        self, at_ms: int, ranks: Mapping[int, RankRequest]
    ) -> dict[int, RankValues]:
        """Per span: the values at 1-based ranks of the ascending settled amounts/times.

        Rank ``k`` of ``n`` settled records is ``sorted(values)[k - 1]``; callers ask only
        for ``1 <= k <= n``, with ``n`` the ``settled`` count of :meth:`window_totals`.
        """
        ...

    async def top_lists(
        self, at_ms: int, spans_ms: Sequence[int], limit: int
    ) -> dict[int, TopLists]:
        """Per span: the first ``limit`` payers, payees and routes over settled records.

        Payers: by ``payer``, amount = sum of ``amount_micro``, count, latest ``time_ms``;
        ordered amount desc, then address asc. Payees: by ``payee``, amount, count, distinct
        payers; same order. Routes: by (payer, payee), amount, count; amount desc, then
        payer asc, payee asc. Strings compare by code point (byte order of UTF-8).
        """
        ...

    async def point_in_time(self, at_ms: int) -> PointInTime:
        """Pending payments and the WebSocket client count as of ``at_ms``.

        Pending: distinct ``payment_id`` of payment records with status ``received`` and
        ``time_ms <= at_ms`` having no record with ``time_ms <= at_ms`` and status
        ``settled``, or status ``failed`` with a ``payment_id`` other than ``"unknown"``
        (an unknown failure never joins a payment). WebSocket clients: ``count`` of the
        ``websocket`` record with the greatest ``time_ms <= at_ms`` (equal times: the
        greatest count); 0 when there is none.
        """
        ...

    async def close(self) -> None:
        """Release what the source holds (connections, queries in flight); idempotent.

        The store it reads stays open: its owner closes it. A query after ``close``
        raises :class:`exporter.errors.StoreError`.
        """
        ...


def analytics_source(store: Store, settings: Settings) -> AnalyticsSource | None:
    """The analytics queries for ``store``: SQL on DuckDB, Flux on InfluxDB."""
    from ..store.duckdb import DuckDBStore

    if isinstance(store, DuckDBStore):
        from .duckdb import DuckDBAnalyticsSource

        return DuckDBAnalyticsSource(store)
    # Imported only here: the InfluxDB client and its dependencies hold about 13 MiB
    # that an exporter on the embedded store never uses.
    from ..store.influx.store import InfluxStore

    if isinstance(store, InfluxStore) and store.api == "v2":  # Flux runs on 2.x only
        from .flux import FluxAnalyticsSource

        assert settings.influx_url and settings.influx_token and settings.influx_org
        return FluxAnalyticsSource.connect(
            settings.influx_url,
            settings.influx_token.get_secret_value(),
            settings.influx_org,
            settings.influx_bucket,
            timeout_seconds=settings.influx_timeout_seconds,
        )
    return None
