"""The real InfluxDB engine the store suites run against: it starts, stores what it is sent
exactly, and enforces what a stand-in never did (field types, merges of equal points)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from influxdb_engine import SKIP_REASON, InfluxEngine, influxd_path


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[InfluxEngine]:
    """A started engine with an empty ``payments`` database."""
    if influxd_path() is None:
        pytest.skip(SKIP_REASON)
    started = InfluxEngine(tmp_path / "influxdb")
    started.start()
    started.query("CREATE DATABASE payments")
    yield started
    started.stop()


@pytest.mark.slow
def test_points_of_one_series_and_timestamp_merge_and_distinct_ones_survive(
    engine: InfluxEngine,
) -> None:
    same = b"payment,network=eip155:8453,status=received amount_micro=1i 1767225600000000000\n"
    other = b"payment,network=eip155:8453,status=received amount_micro=2i 1767225600000000001\n"
    assert engine.write("payments", same + same.replace(b"=1i", b"=3i") + other) == 204
    assert engine.count("payments", "payment", "amount_micro") == 2


@pytest.mark.slow
def test_a_field_written_as_another_type_is_refused_with_400(engine: InfluxEngine) -> None:
    assert engine.write("payments", b"payment,network=n amount_micro=1i 1\n") == 204
    assert engine.write("payments", b"payment,network=n amount_micro=1.5 2\n") == 400
    assert engine.count("payments", "payment", "amount_micro") == 1


@pytest.mark.slow
def test_points_survive_a_kill_and_restart_on_the_same_directories(
    engine: InfluxEngine,
) -> None:
    lines = b"".join(b"payment,network=n amount_micro=%di %d\n" % (i, i + 1) for i in range(1000))
    assert engine.write("payments", lines) == 204
    engine.kill()
    engine.start()
    assert engine.count("payments", "payment", "amount_micro") == 1000
