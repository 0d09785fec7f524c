"""Exporter settings: every ``EXPORTER_*`` environment variable, validated up front."""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from .addresses import base_url, is_loopback_host, split_host_port
from .errors import ConfigError
from .networks import CAIP2, NetworkTable

ENV_PREFIX = "EXPORTER_"
"""Every setting is the environment variable of this prefix and the field name, upper case."""

RESERVED_PREFIX = "EXPORTER_TEST_"
"""Variables of this prefix belong to the test suite (e.g. ``EXPORTER_TEST_INFLUX_URL``); the
exporter ignores them instead of refusing them as misspelt settings."""

DUCKDB_MEMORY_LIMIT = "48MB"
"""The embedded store's default buffer pool (``EXPORTER_DUCKDB_MEMORY_LIMIT``)."""
DUCKDB_THREADS = 2
"""The embedded store's default worker threads (``EXPORTER_DUCKDB_THREADS``)."""


DEFAULT_TOLERANCE_SECONDS = 300
"""How far the signed timestamp may be from the receiver's clock, either way."""


def check_secret(value: str) -> str:
    """``value`` as a signing secret, or ValueError saying why it cannot be one.

    An empty secret would make every signature forgeable, and whitespace around a secret
    is almost always a stray newline from a file, which the sender would not sign with.
    """
    if not value.strip():
        raise ValueError("must not be empty: unset it to turn signing off")
    if value != value.strip():
        raise ValueError("must not start or end with whitespace (a stray newline?)")
    return value


class Durability(StrEnum):
    """How hard a ledger commit is pushed to disk before a 202 is sent."""

    PROCESS = "process"
    """Survives a crash of the exporter (SQLite ``synchronous=NORMAL`` in WAL mode)."""
    POWER = "power"
    """Survives power loss too (``synchronous=FULL``): one fsync per group commit."""


class StoreKind(StrEnum):
    """Which time-series store the ledger's outbox feeds."""

    AUTO = "auto"
    """InfluxDB when ``EXPORTER_INFLUX_URL`` is set, else DuckDB."""
    DUCKDB = "duckdb"
    INFLUXDB = "influxdb"


class InfluxApi(StrEnum):
    """Which InfluxDB write API the store speaks."""

    V2 = "v2"
    """``/api/v2/write``: InfluxDB 2.x (org, bucket, token)."""
    V1 = "v1"
    """``/write``: InfluxDB 1.x, and the v1 compatibility API of 1.8+, 2.x and 3."""


SINKS = (StoreKind.DUCKDB, StoreKind.INFLUXDB)
"""The stores ``EXPORTER_STORES`` may list."""


class AnalyticsSourceKind(StrEnum):
    """Where the analytics queries run: SQL on the DuckDB sink or Flux on the InfluxDB one."""

    DUCKDB = "duckdb"
    FLUX = "flux"


def parse_stores(value: str) -> tuple[StoreKind, ...]:
    """The sinks of an ``EXPORTER_STORES`` value (``duckdb,influxdb``), or ValueError why not."""
    names = [name.strip().lower() for name in value.split(",")]
    known = ", ".join(kind.value for kind in SINKS)
    stores: list[StoreKind] = []
    for name in names:
        if name not in {kind.value for kind in SINKS}:
            shown = f"unknown store {name!r}" if name else "an empty name"
            raise ValueError(f"{shown}: list one or more of {known}, e.g. duckdb,influxdb")
        if StoreKind(name) in stores:
            raise ValueError(f"{name} is listed twice: list each store once")
        stores.append(StoreKind(name))
    return tuple(stores)


def default_analytics_source(settings: Settings) -> AnalyticsSourceKind:
    """The analytics source when ``EXPORTER_ANALYTICS_SOURCE`` is unset.

    DuckDB whenever it is a sink: it answers from this machine, also while InfluxDB is
    down, and Flux does not run on every InfluxDB that takes writes. Flux on an InfluxDB
    sink alone.
    """
    if StoreKind.DUCKDB in settings.resolved_stores:
        return AnalyticsSourceKind.DUCKDB
    return AnalyticsSourceKind.FLUX


class LogFormat(StrEnum):
    """Log line rendering."""

    LOGFMT = "logfmt"
    JSON = "json"


MIN_NETWORK_TOKEN_LENGTH = 16
"""Shortest ingest token accepted on a listener that other machines can reach."""

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    """Exporter configuration, read from ``EXPORTER_*`` environment variables.

    Unknown fields are refused so that a misspelt setting is an error, not a silent default.
    """

    # hide_input_in_errors: a refused value may be a secret, and so may the other inputs
    # that a model-level error would otherwise print.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, hide_input_in_errors=True
    )

    listen: str = Field(
        "127.0.0.1:9402",
        description="host:port the HTTP server binds; non-loopback requires an ingest token",
    )
    data_dir: Path = Field(Path("data"), description="directory for the ledger and DuckDB store")
    ingest_token: SecretStr | None = Field(
        None,
        description="bearer token required on ingest and the analytics API (at least 16 "
        "characters when listening beyond loopback)",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="JSON list of extra Host header names a loopback listener answers to; "
        "by default it answers only to localhost and loopback addresses (DNS rebinding)",
    )
    ingest_signing_secret: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 key of signed deliveries: when set, ingest also requires a "
        "valid X-Exporter-Signature header",
    )
    ingest_signing_secret_previous: SecretStr | None = Field(
        None,
        description="during a key rotation, the secret being retired: signatures made with it "
        "are still accepted",
    )
    ingest_signing_tolerance_seconds: PositiveInt = Field(
        DEFAULT_TOLERANCE_SECONDS,
        description="how far a signature's timestamp may be from the exporter's clock, "
        "in the past or the future",
    )
    durability: Durability = Field(Durability.PROCESS, description="process or power")
    ledger_commit_on_loop: bool = Field(
        True,
        description="commit small ingest requests on the event loop, the fastest on a fast "
        "disk; false moves every commit to the ledger's writer thread, so that a slow disk "
        "never holds up the HTTP server (each request then pays a thread hand-off)",
    )
    max_body_bytes: PositiveInt = Field(
        8 * 1024 * 1024, description="largest accepted request body, after gzip decoding"
    )
    max_inflight_body_bytes: PositiveInt = Field(
        64 * 1024 * 1024,
        description="bytes of ingest bodies read or processed at once, across connections (a "
        "body counts as its Content-Length, a chunked one as EXPORTER_MAX_BODY_BYTES, twice "
        "when gzipped); past it a request is answered 503 with Retry-After before its body is "
        "read",
    )
    max_batch_events: PositiveInt = Field(10_000, description="most events in one request")
    max_backlog_events: PositiveInt = Field(
        2_000_000, description="undelivered events at which ingest answers 503"
    )
    retention_days: Annotated[int, Field(ge=0)] = Field(
        35, description="days delivered events stay in the ledger; 0 keeps them forever"
    )
    dead_letter_max_bytes: Annotated[int, Field(ge=1024)] = Field(
        64 * 1024,
        description="bytes of a refused body kept in its dead letter (its head); the rest is "
        "counted in exporter_dead_letter_truncated_bytes_total and its size recorded",
    )
    dead_letter_max_bytes_per_minute: Annotated[int, Field(ge=1024)] = Field(
        1024 * 1024,
        description="most bytes refusals may add to the ledger per minute; past it a refusal "
        "is still answered and counted, but not stored (exporter_dead_letters_unstored_total)",
    )
    dead_letter_retention_days: Annotated[int, Field(ge=0)] = Field(
        14, description="days dead letters stay in the ledger; 0 keeps them forever"
    )
    join_timeout_seconds: Annotated[int, Field(ge=0)] = Field(
        3600,
        description="after this, an event still waiting for its join partner (a payment's "
        "settled, verified or failed event without its payment:received, a batch:settled "
        "without its batch:created) is counted with what it carries, on its own network "
        "or unknown",
    )
    settlement_timeout_seconds: PositiveInt = Field(
        900,
        description="in proxy mode, a payment whose settle was answered settlement_pending "
        "and that no later answer ended within this ends as failed (settlement_timeout); "
        "the SDKs wait about a minute for a receipt and retry within the authorization's "
        "validity, so 15 minutes leaves room for a congested chain and several retries",
    )
    body_read_timeout_seconds: PositiveFloat = Field(
        30.0,
        description="a request body (ingest, or proxy mode) not fully received this long "
        "after its headers is answered 408 and the connection closed",
    )
    idle_timeout_seconds: PositiveFloat = Field(
        75.0,
        description="a connection that has not sent a complete request head this long "
        "after connecting or after its last answer is closed",
    )
    store: StoreKind = Field(StoreKind.AUTO, description="auto, duckdb or influxdb")
    stores: str | None = Field(
        None,
        description="comma-separated stores the ledger feeds, each at its own pace, e.g. "
        "duckdb,influxdb; unset: the one store of EXPORTER_STORE",
    )
    analytics_source: AnalyticsSourceKind | None = Field(
        None,
        description="duckdb or flux: the sink the analytics queries run on; unset: duckdb "
        "when it is a sink, else flux",
    )
    store_batch_size: PositiveInt = Field(5_000, description="events per store write")
    store_flush_interval_seconds: Annotated[float, Field(ge=0)] = Field(
        1.0,
        description="after a write that was not full, wait up to this long for more records "
        "before the next one, so that a trickle of events is written in batches",
    )
    analytics_refresh_seconds: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="refresh cadence per window, JSON, e.g. {\"1h\": 30, \"90d\": 900}; "
        "unset windows keep their defaults",
    )
    analytics_timeout_seconds: PositiveFloat = Field(
        30.0, description="a refresh running longer is abandoned; the last result stays"
    )
    influx_url: str | None = Field(
        None, description="InfluxDB 2.x base URL, e.g. http://influxdb:8086"
    )
    influx_token: SecretStr | None = Field(None, description="InfluxDB API token")
    influx_org: str | None = Field(None, description="InfluxDB organization (name or id)")
    influx_bucket: str = Field("payments", description="InfluxDB bucket the points go to")
    influx_timeout_seconds: PositiveFloat = Field(
        10.0, description="InfluxDB request timeout (a write not answered by then is retried)"
    )
    influx_api: InfluxApi = Field(
        InfluxApi.V2,
        description="InfluxDB write API: v2 (/api/v2/write: org, bucket, token) or v1 "
        "(/write: database = EXPORTER_INFLUX_BUCKET; InfluxDB 1.x, or the v1 API of 2.x and 3)",
    )
    influx_username: str | None = Field(
        None, description="v1 API: user name, sent with the password as HTTP Basic auth"
    )
    influx_password: SecretStr | None = Field(
        None, description="v1 API: password of EXPORTER_INFLUX_USERNAME"
    )
    influx_retention_policy: str | None = Field(
        None, description="v1 API: retention policy to write to (default: the database's)"
    )
    duckdb_memory_limit: str = Field(
        DUCKDB_MEMORY_LIMIT,
        description="DuckDB buffer pool limit (DuckDB size syntax, e.g. 512MB, 2GB)",
    )
    duckdb_threads: PositiveInt = Field(DUCKDB_THREADS, description="DuckDB worker threads")
    log_level: str = Field("info", description="debug, info, warning or error")
    log_format: LogFormat = Field(LogFormat.LOGFMT, description="logfmt or json")
    upstream_facilitator: str | None = Field(
        None,
        description="proxy mode: base URL of the x402 facilitator to put the exporter in "
        "front of; /verify, /settle, /supported and other paths are forwarded to it",
    )
    upstream_timeout_seconds: PositiveFloat = Field(
        30.0, description="proxy mode: a facilitator request not answered by then gets a 504"
    )
    proxy_max_request_bytes: PositiveInt = Field(
        1024 * 1024,
        description="proxy mode: largest request body forwarded; a larger one gets a 413 "
        "before it is read",
    )
    proxy_max_response_bytes: PositiveInt = Field(
        4 * 1024 * 1024,
        description="proxy mode: largest upstream answer relayed; a larger one is cut off "
        "and answered with a 502",
    )
    proxy_max_concurrent_requests: PositiveInt = Field(
        64,
        description="proxy mode: upstream requests in flight at once; beyond it a request "
        "gets a 503 with Retry-After before its body is read",
    )
    proxy_fee_bps: Annotated[int, Field(ge=0, le=10_000)] = Field(
        0, description="proxy mode: the facilitator's fee on settled payments, in basis points"
    )
    max_network_labels: Annotated[int, Field(ge=1, le=10_000)] = Field(
        64,
        description="most distinct network label values in metrics; beyond it the label is "
        "other (exporter_network_labels_overflow_total); the store keeps the true network",
    )
    network_aliases: dict[str, str] = Field(
        default_factory=dict,
        description="JSON object of extra network names and the CAIP-2 ids they stand for, "
        'e.g. {"my-l2": "eip155:424242"}, for ingested events and proxy mode alike; every '
        "x402 v1 name is built in",
    )
    proxy_asset_decimals: dict[str, Annotated[int, Field(ge=0, le=36)]] = Field(
        default_factory=dict,
        description="proxy mode: decimals per asset, JSON, keyed by asset address or "
        '"network/asset", e.g. {"eip155:56/0x55d3...7955": 18}; known USDC deployments are 6',
    )

    @field_validator("listen")
    @classmethod
    def _listen_is_host_port(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("duckdb_memory_limit")
    @classmethod
    def _size(cls, value: str) -> str:
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", value, re.I):
            raise ValueError("must be a size such as 128MB or 2GB")
        return value.strip()

    @field_validator("analytics_refresh_seconds")
    @classmethod
    def _known_cadences(cls, value: dict[str, float]) -> dict[str, float]:
        known = ("realtime", "1h", "6h", "24h", "7d", "30d", "90d")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown windows {unknown}; known: {', '.join(known)}")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return value.lower()

    @field_validator("ingest_token", "influx_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("ingest_signing_secret", "ingest_signing_secret_previous")
    @classmethod
    def _signing_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_secret(value.get_secret_value())
        return value

    @field_validator("influx_url", "influx_org", "influx_username", "influx_retention_policy")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value.strip() if value is not None else None

    @field_validator("influx_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else base_url(value)

    @field_validator("upstream_facilitator")
    @classmethod
    def _upstream_url(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else base_url(value.strip())

    @field_validator("network_aliases")
    @classmethod
    def _aliases_name_caip2(cls, value: dict[str, str]) -> dict[str, str]:
        for name, caip2 in value.items():
            if not CAIP2.fullmatch(caip2):
                raise ValueError(f"{name!r} must map to a CAIP-2 chain id such as eip155:8453")
        return value

    @property
    def networks(self) -> NetworkTable:
        """The network table: built-in names, ``network_aliases`` and asset decimals."""
        return NetworkTable(self.network_aliases, self.proxy_asset_decimals)

    @field_validator("proxy_asset_decimals")
    @classmethod
    def _asset_keys(cls, value: dict[str, int]) -> dict[str, int]:
        normalised: dict[str, int] = {}
        for key, decimals in value.items():
            network, sep, asset = key.strip().rpartition("/")
            caip2 = re.fullmatch(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}", network)
            if not asset or (sep and not caip2):
                raise ValueError(
                    f'key {key!r} must be an asset address or "network/asset" with a CAIP-2 '
                    'network, e.g. "eip155:8453/0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"'
                )
            if asset.startswith("0x"):
                asset = asset.lower()
            normalised[f"{network}/{asset}" if sep else asset] = decimals
        return normalised

    @field_validator("stores")
    @classmethod
    def _known_stores(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return ",".join(kind.value for kind in parse_stores(value))

    @field_validator("analytics_source", mode="before")
    @classmethod
    def _blank_source_is_unset(cls, value: object) -> object:
        # Compose passes an unset variable through as an empty one.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("influx_bucket")
    @classmethod
    def _bucket_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _loopback_without_token(self) -> Settings:
        host, _ = split_host_port(self.listen)
        token = self.ingest_token.get_secret_value() if self.ingest_token else None
        if token is not None and len(token) < MIN_NETWORK_TOKEN_LENGTH and not is_loopback_host(
            host
        ):
            raise ValueError(
                f"EXPORTER_INGEST_TOKEN is {len(token)} characters; on a non-loopback address "
                f"({self.listen}) it must have at least {MIN_NETWORK_TOKEN_LENGTH}: generate one "
                "with `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        if self.ingest_token is None and not is_loopback_host(host):
            raise ValueError(
                f"refusing to listen on {self.listen} without EXPORTER_INGEST_TOKEN: "
                "set a token or listen on a loopback address such as 127.0.0.1"
                + (
                    " (a signing secret authenticates ingest only; the token also guards "
                    "the analytics API)"
                    if self.ingest_signing_secret is not None
                    else ""
                )
            )
        return self

    @model_validator(mode="after")
    def _inflight_budget_holds_one(self) -> Settings:
        if self.max_inflight_body_bytes < 2 * self.max_body_bytes:
            raise ValueError(
                f"EXPORTER_MAX_INFLIGHT_BODY_BYTES ({self.max_inflight_body_bytes}) is below "
                f"twice EXPORTER_MAX_BODY_BYTES ({self.max_body_bytes}): a gzipped body of the "
                "largest size could never be read; raise the budget or lower the body limit"
            )
        return self

    @model_validator(mode="after")
    def _dead_letter_budget_holds_one(self) -> Settings:
        if self.dead_letter_max_bytes_per_minute < self.dead_letter_max_bytes:
            raise ValueError(
                "EXPORTER_DEAD_LETTER_MAX_BYTES_PER_MINUTE "
                f"({self.dead_letter_max_bytes_per_minute}) is below "
                f"EXPORTER_DEAD_LETTER_MAX_BYTES ({self.dead_letter_max_bytes}): "
                "a full dead letter could never be stored; raise the budget or lower the cap"
            )
        return self

    @model_validator(mode="after")
    def _previous_secret_with_current(self) -> Settings:
        if self.ingest_signing_secret_previous is not None and self.ingest_signing_secret is None:
            raise ValueError(
                "EXPORTER_INGEST_SIGNING_SECRET_PREVIOUS is set without "
                "EXPORTER_INGEST_SIGNING_SECRET: the previous secret is only accepted next to "
                "a current one"
            )
        return self

    @field_validator("influx_username")
    @classmethod
    def _basic_auth_user(cls, value: str | None) -> str | None:
        if value is not None and ":" in value:
            raise ValueError("must not contain ':' (HTTP Basic auth cannot carry it)")
        return value

    @model_validator(mode="after")
    def _influx_v1_settings(self) -> Settings:
        if self.influx_password is not None and self.influx_username is None:
            raise ValueError(
                "EXPORTER_INFLUX_PASSWORD is set without EXPORTER_INFLUX_USERNAME: set the "
                "user name too, or unset the password"
            )
        if self.influx_api is InfluxApi.V1:
            return self
        v1_only = [
            setting_variable(name)
            for name in ("influx_username", "influx_password", "influx_retention_policy")
            if getattr(self, name) is not None
        ]
        if v1_only:
            raise ValueError(
                f"{', '.join(v1_only)} only apply to the v1 write API: set "
                "EXPORTER_INFLUX_API=v1, or unset them (InfluxDB 2.x authenticates with "
                "EXPORTER_INFLUX_TOKEN)"
            )
        return self

    @model_validator(mode="after")
    def _one_way_to_name_stores(self) -> Settings:
        if self.stores is not None and self.store is not StoreKind.AUTO:
            raise ValueError(
                f"EXPORTER_STORE={self.store.value} and EXPORTER_STORES={self.stores} are both "
                "set: keep EXPORTER_STORES (it lists every store) and unset EXPORTER_STORE"
            )
        return self

    @model_validator(mode="after")
    def _analytics_source_is_a_sink(self) -> Settings:
        source = self.analytics_source
        if source is None:
            return self
        needed = StoreKind.INFLUXDB if source is AnalyticsSourceKind.FLUX else StoreKind.DUCKDB
        if needed not in self.resolved_stores:
            raise ValueError(
                f"EXPORTER_ANALYTICS_SOURCE={source.value} needs the {needed.value} store, "
                f"and the stores are {','.join(k.value for k in self.resolved_stores)}: add it "
                "to EXPORTER_STORES or unset EXPORTER_ANALYTICS_SOURCE"
            )
        if source is AnalyticsSourceKind.FLUX and self.influx_api is InfluxApi.V1:
            raise ValueError(
                "EXPORTER_ANALYTICS_SOURCE=flux needs the InfluxDB v2 API, and "
                "EXPORTER_INFLUX_API is v1: set EXPORTER_INFLUX_API=v2 (InfluxDB 2.x), or add "
                "duckdb to EXPORTER_STORES and set EXPORTER_ANALYTICS_SOURCE=duckdb"
            )
        return self

    @model_validator(mode="after")
    def _influx_complete(self) -> Settings:
        if StoreKind.INFLUXDB not in self.resolved_stores:
            return self
        if self.influx_api is InfluxApi.V1:
            if self.influx_url is None:
                raise ValueError(
                    f"the InfluxDB store needs EXPORTER_INFLUX_URL (store is "
                    f"{self.store.value}; set EXPORTER_STORE=duckdb for the embedded store)"
                )
            if self.influx_username is not None and self.influx_token is not None:
                raise ValueError(
                    "EXPORTER_INFLUX_USERNAME and EXPORTER_INFLUX_TOKEN are both set: the v1 "
                    "API takes one of them (user name and password, or a token); unset one"
                )
            return self
        missing = [
            f"EXPORTER_INFLUX_{name.upper()}"
            for name, value in (
                ("url", self.influx_url),
                ("token", self.influx_token),
                ("org", self.influx_org),
            )
            if value is None
        ]
        if missing:
            chosen = (
                "EXPORTER_STORES lists influxdb; list duckdb alone for the embedded store"
                if self.stores is not None
                else f"store is {self.store.value}; set EXPORTER_STORE=duckdb for the "
                "embedded store"
            )
            raise ValueError(f"the InfluxDB store needs {', '.join(missing)} ({chosen})")
        return self

    @property
    def host(self) -> str:
        """The bind host of ``listen``."""
        return split_host_port(self.listen)[0]

    @property
    def listens_on_loopback(self) -> bool:
        """Whether only this machine can reach the listener."""
        return is_loopback_host(self.host)

    @property
    def port(self) -> int:
        """The bind port of ``listen``."""
        return split_host_port(self.listen)[1]

    @property
    def ledger_path(self) -> Path:
        """The SQLite ledger file."""
        return self.data_dir / "ledger.sqlite3"

    @property
    def duckdb_path(self) -> Path:
        """The embedded DuckDB store file."""
        return self.data_dir / "store.duckdb"

    @property
    def resolved_store(self) -> StoreKind:
        """The first store the ledger feeds (the only one unless ``EXPORTER_STORES`` lists
        more); ``auto`` is InfluxDB when ``EXPORTER_INFLUX_URL`` is set, else DuckDB."""
        return self.resolved_stores[0]

    @property
    def resolved_stores(self) -> tuple[StoreKind, ...]:
        """Every store the ledger feeds, in the order ``EXPORTER_STORES`` lists them."""
        if self.stores is not None:
            return parse_stores(self.stores)
        if self.store is not StoreKind.AUTO:
            return (self.store,)
        return (StoreKind.INFLUXDB if self.influx_url is not None else StoreKind.DUCKDB,)

    @property
    def sink_names(self) -> tuple[str, ...]:
        """The stores' names, as the ledger's cursors and the ``store`` labels know them."""
        return tuple(kind.value for kind in self.resolved_stores)

    @property
    def resolved_analytics_source(self) -> AnalyticsSourceKind:
        """``EXPORTER_ANALYTICS_SOURCE``, or its default for these stores."""
        if self.analytics_source is not None:
            return self.analytics_source
        return default_analytics_source(self)


def setting_variable(field: str) -> str:
    """The environment variable of the setting ``field`` (``influx_url`` -> EXPORTER_INFLUX_URL)."""
    return ENV_PREFIX + field.upper()


SETTING_VARIABLES: tuple[str, ...] = tuple(setting_variable(name) for name in Settings.model_fields)
"""Every ``EXPORTER_*`` variable that is a setting."""
_SETTING_NAMES = tuple(name.upper() for name in Settings.model_fields)


def _is_json_valued(annotation: Any) -> bool:
    """True when pydantic-settings reads a field of this type as JSON (a container or model)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_is_json_valued(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) is Annotated:
        return _is_json_valued(typing.get_args(annotation)[0])
    origin = typing.get_origin(annotation) or annotation
    if isinstance(origin, type) and issubclass(origin, BaseModel):
        return True
    return origin in (dict, list, set, frozenset, tuple)


JSON_SETTINGS: tuple[str, ...] = tuple(
    name for name, field in Settings.model_fields.items() if _is_json_valued(field.annotation)
)
"""The settings whose variable holds JSON (e.g. ``EXPORTER_ANALYTICS_REFRESH_SECONDS``)."""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One problem line per ``EXPORTER_*`` variable in ``environ`` that is not a setting,
    naming the closest setting: a misspelt variable would otherwise be silently ignored.
    ``EXPORTER_TEST_*`` variables are reserved for the test suite and never refused."""
    problems = []
    for name in sorted(environ):
        variable = name.upper()
        if not variable.startswith(ENV_PREFIX) or variable.startswith(RESERVED_PREFIX):
            continue
        if variable in SETTING_VARIABLES:
            continue
        # Compared without the shared prefix, which would make every name look close.
        close = difflib.get_close_matches(
            variable.removeprefix(ENV_PREFIX), _SETTING_NAMES, n=1, cutoff=0.6
        )
        hint = (
            f"did you mean {ENV_PREFIX}{close[0]}?"
            if close
            else "unset it (the settings are listed under Configuration in README.md)"
        )
        problems.append(f"{name} is not a setting: {hint}")
    return problems


_JSON_EXAMPLES = {
    "analytics_refresh_seconds": '{"1h": 30, "90d": 900}',
    "proxy_asset_decimals": '{"eip155:56/0x55d398326f99059fF775485246999027B3197955": 18}',
}
"""A valid value of each JSON-valued setting, shown when one is malformed."""


def _malformed_json(environ: Mapping[str, str]) -> list[str]:
    """One problem line per JSON-valued setting in ``environ`` that is not JSON at all."""
    by_variable = {name.upper(): value for name, value in environ.items()}
    problems = []
    for field in JSON_SETTINGS:
        variable = setting_variable(field)
        value = by_variable.get(variable)
        if value is None:
            continue
        try:
            json.loads(value)
        except ValueError as error:
            reason = getattr(error, "msg", str(error))
            where = (
                f" at line {error.lineno} column {error.colno}"
                if isinstance(error, json.JSONDecodeError)
                else ""
            )
            problems.append(
                f"{variable} is not valid JSON ({reason}{where}): "
                f"expected JSON such as {_JSON_EXAMPLES.get(field, 'null')}"
            )
    return problems


def _validation_problems(error: ValidationError) -> list[str]:
    """One line per problem of ``error``, naming the variable (and key) at fault."""
    problems = []
    for detail in error.errors(include_url=False):
        message = str(detail["msg"]).removeprefix("Value error, ")
        location = [str(part) for part in detail["loc"]]
        if not location:
            problems.append(message)
            continue
        field, *inside = location
        variable = setting_variable(field) if field in Settings.model_fields else field
        if field not in Settings.model_fields:
            message = "not a setting"
        key = f" (key {'.'.join(inside)})" if inside else ""
        problems.append(f"{variable}{key}: {message}")
    return problems


def _settings_error_problem(error: SettingsError) -> str:
    """The one line for a value pydantic-settings could not even decode."""
    match = re.search(r'field "(\w+)"', str(error))
    variable = setting_variable(match.group(1)) if match else "an EXPORTER_* variable"
    cause = error.__cause__
    return f"{variable} cannot be read: {cause if cause is not None else error}"


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment and ``overrides`` (command-line values), or
    ConfigError with one line per problem naming its ``EXPORTER_*`` variable.

    Unlike ``Settings()`` it also refuses ``EXPORTER_*`` variables that are not settings
    and reports malformed JSON values as such, so no mistake ends in a pydantic traceback.
    """
    checked = dict(os.environ)
    problems = unknown_variables(checked) + _malformed_json(checked)
    if not problems:
        try:
            return Settings(**overrides)
        except ValidationError as error:
            problems = _validation_problems(error)
        except SettingsError as error:
            problems = [_settings_error_problem(error)]
    raise ConfigError("\n".join(f"invalid configuration: {problem}" for problem in problems))
