"""``check-config``: show the resolved settings (secrets hidden) and optionally reach
the configured InfluxDB."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from ..addresses import redact_url
from ..config import InfluxApi, Settings, StoreKind
from .common import settings_from_args

if TYPE_CHECKING:
    from ..store.influx.store import InfluxCheck
    from .common import Commands


URL_SETTINGS = ("influx_url", "upstream_facilitator")
"""Settings holding a URL, which may carry ``user:password@``."""


def _influx_names(settings: Settings) -> str:
    """Where the InfluxDB store writes: ``(org O, bucket B)`` or ``(v1 API, database D)``."""
    if settings.influx_api is InfluxApi.V2:
        return f"(org {settings.influx_org}, bucket {settings.influx_bucket})"
    policy = settings.influx_retention_policy
    return f"(v1 API, database {settings.influx_bucket}" + (
        f", retention policy {policy})" if policy else ")"
    )


def _describe_settings(settings: Settings) -> dict[str, Any]:
    described = settings.model_dump(mode="json")
    for name, value in settings:  # every secret, so that a new one cannot be printed
        if isinstance(value, SecretStr):
            described[name] = "(set)"
    for name in URL_SETTINGS:  # credentials written into a URL are never shown
        if described.get(name):
            described[name] = redact_url(described[name])
    described["ingest_signing"] = "on" if settings.ingest_signing_secret is not None else "off"
    described["resolved_store"] = settings.resolved_store.value
    described["resolved_stores"] = list(settings.sink_names)
    described["resolved_analytics_source"] = settings.resolved_analytics_source.value
    described["ledger_path"] = str(settings.ledger_path)
    if StoreKind.DUCKDB in settings.resolved_stores:
        described["duckdb_path"] = str(settings.duckdb_path)
    if StoreKind.INFLUXDB in settings.resolved_stores:
        described["store_target"] = (
            f"influxdb at {redact_url(settings.influx_url or '')} " + _influx_names(settings)
        )
    return described


def _check_config(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    sys.stdout.write(json.dumps(_describe_settings(settings), indent=2) + "\n")
    sys.stdout.write("configuration is valid\n")
    if not getattr(args, "ping", False):
        return 0
    if StoreKind.DUCKDB in settings.resolved_stores:
        sys.stdout.write(f"store duckdb: nothing to ping (embedded file {settings.duckdb_path})\n")
    if StoreKind.INFLUXDB not in settings.resolved_stores:
        return 0
    check = asyncio.run(_ping_influx(settings))
    where = f"influxdb {redact_url(settings.influx_url or '')}"
    if not check.reachable:
        sys.stdout.write(f"{where}: unreachable ({check.detail})\n")
        return 1
    sys.stdout.write(f"{where}: reachable (InfluxDB {check.version}); ")
    if check.credentials == "accepted":
        accepted = "token" if settings.influx_api is InfluxApi.V2 else "credentials"
        sys.stdout.write(f"{accepted} accepted for {_influx_names(settings).strip('()')}\n")
        return 0
    sys.stdout.write(f"credentials {check.credentials}: {check.detail}\n")
    return 1


async def _ping_influx(settings: Settings) -> InfluxCheck:
    from ..store import open_store
    from ..store.influx.store import InfluxStore

    store = open_store(settings, StoreKind.INFLUXDB)
    assert isinstance(store, InfluxStore)
    try:
        return await store.check()
    finally:
        await store.close()


def add_parser(commands: Commands) -> None:
    """Add ``check-config`` to the command line."""
    check = commands.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--listen", help="host:port to check instead of EXPORTER_LISTEN")
    check.add_argument("--data-dir", help="data directory to check instead of EXPORTER_DATA_DIR")
    check.add_argument(
        "--ping",
        action="store_true",
        help="also reach the configured InfluxDB and test its token, org and bucket "
        "(exit 1 when it cannot be reached or refuses them)",
    )
    check.set_defaults(run=_check_config)
