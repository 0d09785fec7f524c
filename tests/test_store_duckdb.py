"""Behaviour of the embedded DuckDB store: exact round trips, idempotence, atomicity, locks."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator

import duckdb
import pytest

from exporter.errors import ExporterError, StoreCorruptError, StoreError
from exporter.records import (
    BatchRecord,
    PaymentRecord,
    RevenueRecord,
    StoreRecord,
    WebsocketRecord,
)
from exporter.store.duckdb import DuckDBStore

_REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def db_path(tmp_path: pathlib.Path) -> pathlib.Path:
    """A store path in a directory that does not exist yet (open must create it)."""
    return tmp_path / "data" / "store.duckdb"


@pytest.fixture
async def store(db_path: pathlib.Path) -> AsyncIterator[DuckDBStore]:
    """An open store, closed after the test."""
    opened = DuckDBStore.open(db_path)
    yield opened
    await opened.close()


def _sample() -> list[StoreRecord]:
    """One record of every kind, with every optional field set or deliberately absent."""
    payer, payee = "0x" + "ab" * 20, "0x" + "cd" * 20
    return [
        PaymentRecord(
            "payment:received:p1",
            1_700_000_000_000,
            "eip155:8453",
            "received",
            "p1",
            payer,
            payee,
            1_500_000,
        ),
        PaymentRecord(
            "payment:verified:p1",
            1_700_000_000_100,
            "eip155:8453",
            "verified",
            "p1",
            payer,
            payee,
            1_500_000,
            verification_ms=12.25,
        ),
        PaymentRecord(
            "payment:settled:p1",
            1_700_000_000_200,
            "eip155:8453",
            "settled",
            "p1",
            payer,
            payee,
            1_500_000,
            1_000,
            1234.5,
            tx="0x" + "ef" * 32,
        ),
        PaymentRecord(
            "evt-9",
            1_700_000_000_300,
            "unknown",
            "failed",
            "unknown",
            error='insufficient funds: ünïcødé "quoted" \\ back',
        ),
        BatchRecord(
            "batch:created:b1", 1_700_000_001_000, "eip155:10", "created", "b1", 3, 9_000_000
        ),
        BatchRecord(
            "batch:settled:b1",
            1_700_000_002_000,
            "eip155:10",
            "settled",
            "b1",
            3,
            9_000_000,
            3_000,
            2**100 + 7,
            "0xtx",
        ),
        RevenueRecord(
            "revenue:1",
            1_700_000_003_000,
            "eip155:137",
            "gas_sponsorship",
            9_223_372_036_854_775_807,
            "p1",
        ),
        RevenueRecord("revenue:2", 1_700_000_003_001, "eip155:137", "premium", -5),
        WebsocketRecord("websocket:1", 1_700_000_004_000, 42),
    ]


def _rows(store: DuckDBStore, table: str) -> list[tuple[object, ...]]:
    return store.query(f'SELECT * FROM "{table}" ORDER BY key')


async def test_open_creates_directory_and_empty_tables(
    store: DuckDBStore, db_path: pathlib.Path
) -> None:
    assert await asyncio.to_thread(db_path.is_file)
    assert store.name == "duckdb"
    assert store.counts() == {
        "payment": 0,
        "batch": 0,
        "revenue": 0,
        "websocket": 0,
        "analytics": 0,
    }


async def test_every_record_type_round_trips_exactly(
    store: DuckDBStore, db_path: pathlib.Path
) -> None:
    await store.write(_sample())
    await store.close()
    reopened = DuckDBStore.open(db_path)  # the rows are in the file, not only in memory
    try:
        payer, payee = "0x" + "ab" * 20, "0x" + "cd" * 20
        assert _rows(reopened, "payment") == [
            (
                "evt-9",
                1_700_000_000_300,
                "unknown",
                "failed",
                "unknown",
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                'insufficient funds: ünïcødé "quoted" \\ back',
            ),
            (
                "payment:received:p1",
                1_700_000_000_000,
                "eip155:8453",
                "received",
                "p1",
                payer,
                payee,
                1_500_000,
                None,
                None,
                None,
                None,
                None,
            ),
            (
                "payment:settled:p1",
                1_700_000_000_200,
                "eip155:8453",
                "settled",
                "p1",
                payer,
                payee,
                1_500_000,
                1_000,
                1234.5,
                None,
                "0x" + "ef" * 32,
                None,
            ),
            (
                "payment:verified:p1",
                1_700_000_000_100,
                "eip155:8453",
                "verified",
                "p1",
                payer,
                payee,
                1_500_000,
                None,
                None,
                12.25,
                None,
                None,
            ),
        ]
        assert _rows(reopened, "batch") == [
            (
                "batch:created:b1",
                1_700_000_001_000,
                "eip155:10",
                "created",
                "b1",
                3,
                9_000_000,
                None,
                None,
                None,
            ),
            (
                "batch:settled:b1",
                1_700_000_002_000,
                "eip155:10",
                "settled",
                "b1",
                3,
                9_000_000,
                3_000,
                2**100 + 7,
                "0xtx",
            ),
        ]
        assert _rows(reopened, "revenue") == [
            (
                "revenue:1",
                1_700_000_003_000,
                "eip155:137",
                "gas_sponsorship",
                9_223_372_036_854_775_807,
                "p1",
            ),
            ("revenue:2", 1_700_000_003_001, "eip155:137", "premium", -5, None),
        ]
        assert _rows(reopened, "websocket") == [("websocket:1", 1_700_000_004_000, 42)]
    finally:
        await reopened.close()


async def test_columns_are_typed(store: DuckDBStore) -> None:
    types = dict(
        (f"{table}.{column}", kind)
        for table, column, kind in store.query(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
        )
    )
    assert types["payment.key"] == "VARCHAR"
    assert types["payment.time_ms"] == "BIGINT"
    assert types["payment.amount_micro"] == "BIGINT"
    assert types["payment.settlement_ms"] == "DOUBLE"
    assert types["batch.gas_used"] == "HUGEINT"
    assert types["revenue.amount_micro"] == "BIGINT"
    assert types["websocket.count"] == "BIGINT"
    assert types["analytics.value"] == "DOUBLE"


async def test_writing_the_same_batch_twice_keeps_one_row_per_key(store: DuckDBStore) -> None:
    records = _sample()
    await store.write(records)
    before = {table: _rows(store, table) for table in ("payment", "batch", "revenue")}
    await store.write(records)
    # A replay that overlaps the stored rows and adds new ones keeps the old, adds the new.
    extra = WebsocketRecord("websocket:2", 1_700_000_005_000, 7)
    await store.write([*records[:3], extra, *records[3:]])
    assert store.counts() == {
        "payment": 4,
        "batch": 2,
        "revenue": 2,
        "websocket": 2,
        "analytics": 0,
    }
    assert {table: _rows(store, table) for table in ("payment", "batch", "revenue")} == before


async def test_a_stored_key_behind_new_rows_of_another_table_keeps_each_row_once(
    store: DuckDBStore,
) -> None:
    # New payments are appended first; the batch record found stored afterwards undoes
    # them with the rest, and the batch is written again skipping only the stored key.
    batch = BatchRecord("batch:created:b1", 1_700_000_000_000, "eip155:8453", "created", "b1", 2, 9)
    await store.write([batch])
    fresh = [_received(i, 1_700_000_000_000 + i) for i in range(3)]
    later = WebsocketRecord("websocket:9", 1_700_000_000_500, 4)
    await store.write([*fresh, batch, later])
    assert store.counts() == {
        "payment": 3,
        "batch": 1,
        "revenue": 0,
        "websocket": 1,
        "analytics": 0,
    }
    stored_batch = ("batch:created:b1", 1_700_000_000_000, "eip155:8453", "created", "b1", 2, 9)
    assert _rows(store, "batch") == [(*stored_batch, None, None, None)]
    assert [row[0] for row in _rows(store, "payment")] == sorted(r.key for r in fresh)


async def test_a_key_repeated_within_one_batch_is_stored_once(store: DuckDBStore) -> None:
    first = WebsocketRecord("websocket:1", 1_700_000_000_000, 1)
    await store.write([first, WebsocketRecord("websocket:1", 1_700_000_000_000, 1)])
    assert _rows(store, "websocket") == [("websocket:1", 1_700_000_000_000, 1)]


async def test_a_batch_larger_than_one_statement_fits_a_small_pool(db_path: pathlib.Path) -> None:
    # One document of 40,000 records is a single 32 MiB allocation: more than the pool.
    payer, payee = "0x" + "ab" * 20, "0x" + "cd" * 20
    records: list[StoreRecord] = [
        PaymentRecord(
            f"payment:settled:p{i}",
            1_700_000_000_000 + i,
            "eip155:8453",
            "settled",
            f"p{i}",
            payer,
            payee,
            i,
            1,
            1_000.0,
        )
        for i in range(40_000)
    ]
    store = DuckDBStore.open(db_path, memory_limit="24MB")
    try:
        await store.write(records)
        assert store.query("SELECT count(*), sum(amount_micro) FROM payment") == [
            (40_000, sum(range(40_000)))
        ]
    finally:
        await store.close()


async def test_a_failing_record_leaves_nothing_of_its_batch(store: DuckDBStore) -> None:
    good = _sample()
    too_big = RevenueRecord("revenue:huge", 1_700_000_000_000, "eip155:8453", "premium", 2**70)
    with pytest.raises(duckdb.Error):
        await store.write([*good, too_big])
    assert store.counts() == {
        "payment": 0,
        "batch": 0,
        "revenue": 0,
        "websocket": 0,
        "analytics": 0,
    }
    # The same failure on a replay path (some keys already stored) is atomic too.
    await store.write(good[:2])
    with pytest.raises(duckdb.Error):
        await store.write([*good, too_big])
    assert store.counts()["payment"] == 2
    assert sum(store.counts().values()) == 2
    # The store stays usable after a failed batch.
    await store.write(good)
    assert sum(store.counts().values()) == len(good)


async def test_write_analytics_replaces_on_conflict(store: DuckDBStore) -> None:
    await store.write_analytics(
        [
            ("revenue_projection", "24h", 1_700_000_000_000, "monthly_micro", 1.5),
            ("revenue_projection", "24h", 1_700_000_000_000, "growth", 10.0),
            ("revenue_projection", "7d", 1_700_000_000_000, "growth", 3.0),
        ]
    )
    await store.write_analytics(
        [
            ("revenue_projection", "24h", 1_700_000_000_000, "growth", -2.5),
            ("revenue_projection", "24h", 1_700_003_600_000, "growth", 4.0),
            ("revenue_projection", "24h", 1_700_003_600_000, "growth", 5.0),  # last one wins
        ]
    )
    rows = store.query('SELECT * FROM analytics ORDER BY "window", time_ms, field')
    assert rows == [
        ("revenue_projection", "24h", 1_700_000_000_000, "growth", -2.5),
        ("revenue_projection", "24h", 1_700_000_000_000, "monthly_micro", 1.5),
        ("revenue_projection", "24h", 1_700_003_600_000, "growth", 5.0),
        ("revenue_projection", "7d", 1_700_000_000_000, "growth", 3.0),
    ]


async def test_query_and_aquery_take_parameters(store: DuckDBStore) -> None:
    await store.write(_sample())
    sql = "SELECT count(*), sum(amount_micro) FROM payment WHERE time_ms > ? AND status = ?"
    params: list[object] = [1_700_000_000_000, "settled"]
    assert store.query(sql, params) == [(1, 1_500_000)]
    assert await store.aquery(sql, params) == [(1, 1_500_000)]


async def test_concurrent_writes_and_queries_do_not_interfere(store: DuckDBStore) -> None:
    batches: list[list[StoreRecord]] = [
        [WebsocketRecord(f"websocket:{b}:{i}", 1_700_000_000_000 + i, i) for i in range(500)]
        for b in range(8)
    ]
    sql = "SELECT count(*) FROM websocket"
    writes = [asyncio.ensure_future(store.write(batch)) for batch in batches]
    counts = await asyncio.gather(*(store.aquery(sql) for _ in range(8)))
    await asyncio.gather(*writes)
    for counted in counts:
        assert counted[0][0] in range(0, 4001, 500)
    assert store.counts()["websocket"] == 4000


async def test_writes_after_close_fail_loudly(db_path: pathlib.Path) -> None:
    opened = DuckDBStore.open(db_path)
    await opened.close()
    await opened.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await opened.write(_sample())


def _open_in_subprocess(path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """Try ``DuckDBStore.open`` in a separate process; exit 3 and the message if locked."""
    code = textwrap.dedent(
        """
        import asyncio, pathlib, sys
        from exporter.store.duckdb import DuckDBStore, StoreLockedError
        try:
            store = DuckDBStore.open(pathlib.Path(sys.argv[1]))
        except StoreLockedError as error:
            sys.stderr.write(str(error))
            sys.exit(3)
        asyncio.run(store.close())
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH", "")])),
    }
    return subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


async def test_a_second_process_gets_the_locked_error(
    store: DuckDBStore, db_path: pathlib.Path
) -> None:
    result = await asyncio.to_thread(_open_in_subprocess, db_path)
    assert result.returncode == 3, result.stderr
    assert str(db_path) in result.stderr
    assert "another exporter process holds it" in result.stderr


async def test_close_releases_the_file_for_another_process(db_path: pathlib.Path) -> None:
    opened = DuckDBStore.open(db_path)
    await opened.write(_sample())
    await opened.close()
    result = await asyncio.to_thread(_open_in_subprocess, db_path)
    assert result.returncode == 0, result.stderr


def test_a_data_dir_that_cannot_be_made_is_a_store_error_naming_it(
    tmp_path: pathlib.Path,
) -> None:
    """A file where the store's directory should be: one line naming it, not a traceback."""
    blocker = tmp_path / "data"
    blocker.write_text("not a directory")
    path = blocker / "store.duckdb"
    with pytest.raises(StoreError) as caught:
        DuckDBStore.open(path)
    message = str(caught.value)
    assert f"DuckDB store {path} cannot be opened" in message
    assert f"check that {blocker} is a directory this user may write" in message
    assert "\n" not in message and isinstance(caught.value, ExporterError)


def test_a_directory_in_place_of_the_store_file_is_a_store_error(db_path: pathlib.Path) -> None:
    """The store path names a directory: the error says which and what to check."""
    db_path.mkdir(parents=True)
    with pytest.raises(StoreError, match="is a directory this user may write") as caught:
        DuckDBStore.open(db_path)
    assert str(db_path) in str(caught.value)
    assert db_path.is_dir()  # left as it was


def test_a_setting_duckdb_refuses_is_named(db_path: pathlib.Path) -> None:
    """DuckDB refusing its configuration names the exporter settings that set it."""
    with pytest.raises(StoreError) as caught:
        DuckDBStore.open(db_path, memory_limit="lots")
    message = str(caught.value)
    assert str(db_path) in message and "DuckDB said:" in message
    assert "EXPORTER_DUCKDB_MEMORY_LIMIT" in message


@pytest.mark.parametrize(
    "content",
    [b"this is not a database\n" * 500, b"", b"DUCK" * 10],
    ids=["garbage", "empty", "short"],
)
def test_an_invalid_file_is_reported_corrupt_and_left_alone(
    db_path: pathlib.Path, content: bytes
) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(content)
    with pytest.raises(StoreCorruptError) as caught:
        DuckDBStore.open(db_path)
    assert str(db_path) in str(caught.value)
    assert "move it aside" in str(caught.value)
    assert db_path.read_bytes() == content  # never recreated


async def test_a_truncated_store_is_reported_corrupt(db_path: pathlib.Path) -> None:
    opened = DuckDBStore.open(db_path)
    await opened.write(_sample())
    await opened.close()
    truncated = await asyncio.to_thread(_truncate, db_path, 6000)
    with pytest.raises(StoreCorruptError, match="move it aside") as caught:
        DuckDBStore.open(db_path)
    assert str(db_path) in str(caught.value)
    assert await asyncio.to_thread(db_path.read_bytes) == truncated


def _truncate(path: pathlib.Path, size: int) -> bytes:
    """Cut ``path`` to its first ``size`` bytes and return them."""
    head = path.read_bytes()[:size]
    path.write_bytes(head)
    return head


def _received(i: int, time_ms: int) -> PaymentRecord:
    return PaymentRecord(
        f"payment:received:{i:x}-{i * 2654435761 % 2**32:08x}",
        time_ms,
        "eip155:8453",
        "received",
        f"p{i}",
        "0x" + "a" * 40,
        "0x" + "b" * 40,
        1_000_000 + i,
    )


async def test_many_random_keys_fit_a_small_buffer_pool(db_path: pathlib.Path) -> None:
    # A primary key index over random keys is held wholly in memory: past the buffer
    # pool, DuckDB's checkpoint fails and the database is invalidated for good.
    store = DuckDBStore.open(db_path, memory_limit="16MB", threads=1)
    try:
        for start in range(0, 300_000, 10_000):
            batch: list[StoreRecord] = [
                _received(i, 1_700_000_000_000 + i) for i in range(start, start + 10_000)
            ]
            await store.write(batch)
        store.query("CHECKPOINT")
        assert store.counts()["payment"] == 300_000
    finally:
        await store.close()


async def test_a_replay_holding_a_late_record_stays_idempotent(store: DuckDBStore) -> None:
    now = 1_700_000_000_000
    recent = [_received(i, now + i) for i in range(100)]
    late = _received(1_000, now - 7_200_000)  # released two hours after its event
    await store.write([*recent, late])
    await store.write([late, *recent[::-1]])
    assert store.counts()["payment"] == 101


async def test_a_store_made_with_key_indexes_is_rebuilt_without_them(
    db_path: pathlib.Path,
) -> None:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = duckdb.connect(str(db_path))
    conn.execute(
        'CREATE TABLE websocket ("key" VARCHAR NOT NULL, "time_ms" BIGINT NOT NULL, '
        '"count" BIGINT NOT NULL, PRIMARY KEY ("key"))'
    )
    conn.execute("INSERT INTO websocket VALUES ('websocket:1', 1700000000000, 3)")
    conn.close()
    store = DuckDBStore.open(db_path)
    try:
        keys = store.query(
            "SELECT count(*) FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY' "
            "AND table_name <> 'analytics'"
        )
        assert keys == [(0,)]
        await store.write([WebsocketRecord("websocket:1", 1_700_000_000_000, 3)])
        assert _rows(store, "websocket") == [("websocket:1", 1_700_000_000_000, 3)]
    finally:
        await store.close()


async def test_checkpoints_keep_the_row_groups_they_wrote(store: DuckDBStore) -> None:
    # Vacuuming would merge them again at each checkpoint, at a cost growing with the table.
    for start in range(0, 3_000, 1_000):
        ids = range(start, start + 1_000)
        batch: list[StoreRecord] = [_received(i, 1_700_000_000_000 + i) for i in ids]
        await store.write(batch)
        store.query("CHECKPOINT")
    [(row_groups, rows)] = store.query(
        "SELECT count(DISTINCT row_group_id), max(count) FROM pragma_storage_info('payment')"
    )
    assert (row_groups, rows) == (3, 1_000)
    assert store.counts()["payment"] == 3_000
