"""The OpenAPI 3.1 description of the exporter's HTTP interface, served at ``/openapi.json``.

The document is built from the code it describes: event schemas come from the event
TypedDicts of :mod:`exporter.events` (with the string formats their validators enforce
written in as patterns) and analytics answers from the result models of
:mod:`exporter.analytics.models`, so a field added there appears here without a second list.
It describes one running instance: the bearer scheme is required only when a token is
configured, the signature header only when signed deliveries are, and the proxy routes
appear only in proxy mode. The proxy's pass-through of every other path cannot be a path
item (OpenAPI has no catch-all path); the top-level ``x-proxy-pass-through`` extension
names it instead.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Final, get_args, get_origin, get_type_hints

from pydantic import TypeAdapter

from .analytics.models import (
    ANALYTIC_NAMES,
    DEFAULT_LIMIT,
    MAX_LIMIT,
    TIME_SERIES_METRICS,
    HealthStatus,
    NetworkMetrics,
    PaymentMetrics,
    RealtimeStats,
    RevenueBreakdown,
    RevenueMetrics,
    TimeSeries,
    TopPayee,
    TopPayer,
    TopRoute,
    Window,
)
from .events import (
    MAX_FUTURE_SKEW_MS,
    MIN_TIMESTAMP_MS,
    Address,
    DecimalString,
    Event,
    Identifier,
    IntegerString,
    Network,
    Timestamp,
    Transaction,
)
from .ingest.signing import SIGNATURE_HEADER
from .networks import BUILTIN_TABLE, CAIP2

OPENAPI_PATH: Final = "/openapi.json"
"""Where the document is served."""

PROXY_PASS_THROUGH: Final = "x-proxy-pass-through"
"""Top-level extension present in proxy mode: every path not described is passed upstream."""

ANALYTICS_MODELS: Final[Mapping[str, Any]] = {
    "payments": PaymentMetrics,
    "networks": list[NetworkMetrics],
    "revenue": RevenueMetrics,
    "revenue/breakdown": RevenueBreakdown,
    "top/payers": list[TopPayer],
    "top/payees": list[TopPayee],
    "top/routes": list[TopRoute],
    "timeseries": TimeSeries,
    "realtime": RealtimeStats,
    "health": HealthStatus,
}
"""The answer model of each analytic under ``/v1/analytics/``."""

_REF = "#/components/schemas/{model}"
_NOT_CONTROL = "[^\\u0000-\\u001f\\u007f]"
# JSON Schema patterns are searched, not matched: each one is anchored.
_STRING_FORMATS: Final[list[tuple[object, dict[str, object]]]] = [
    (
        DecimalString,
        {
            "pattern": "^[0-9]{1,12}(\\.[0-9]{1,18})?$",
            "description": 'Plain non-negative decimal string in token units (USD), e.g. "1.50".',
        },
    ),
    (
        IntegerString,
        {"pattern": "^[0-9]{1,30}$", "description": 'Non-negative integer string, e.g. "21000".'},
    ),
    (
        Network,
        {
            "anyOf": [
                {"pattern": f"^{CAIP2.pattern}$"},
                {"enum": sorted(BUILTIN_TABLE.v1_names)},
            ],
            "description": 'CAIP-2 chain id, e.g. "eip155:8453", or an x402 v1 network name '
            '(e.g. "base"), which the exporter stores as its CAIP-2 id.',
        },
    ),
    (
        Address,
        {
            "pattern": f"^(?!\\s){_NOT_CONTROL}+(?<!\\s)$",
            "description": "Address: EVM 0x + 40 hex (stored lower case) or another chain's "
            "address, without surrounding spaces or control characters.",
        },
    ),
    (
        Transaction,
        {
            "pattern": f"^{_NOT_CONTROL}+$",
            "description": "Transaction id without control characters.",
        },
    ),
    (
        Identifier,
        {"pattern": f"^{_NOT_CONTROL}+$", "description": "Id without control characters."},
    ),
    (
        Timestamp,
        {
            "minimum": MIN_TIMESTAMP_MS,
            "description": "Unix epoch milliseconds, from 2000-01-01 to at most "
            f"{MAX_FUTURE_SKEW_MS // 3_600_000} h ahead of the exporter's clock.",
        },
    ),
]


def _unwrap(hint: object) -> object:
    """The annotated type of a field, without NotRequired and ``| None``."""
    while get_origin(hint) is not None and get_origin(hint) is not Annotated:
        members = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(members) != 1:
            return hint
        hint = members[0]
    return hint


def _formats(hint: object) -> dict[str, object] | None:
    for alias, keywords in _STRING_FORMATS:
        if hint == alias:
            return keywords
    return None


def _refine(schema: dict[str, Any], keywords: Mapping[str, object]) -> None:
    """Add ``keywords`` to a property schema, or to its non-null ``anyOf`` branch."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") != "null":
            branch.update({k: v for k, v in keywords.items() if k != "description"})
    schema["description"] = keywords["description"]


def _event_classes() -> Iterator[type]:
    """The envelope TypedDicts of the event union, then their ``data`` TypedDicts."""
    envelopes: tuple[type, ...] = get_args(get_args(Event)[0])
    yield from envelopes
    for envelope in envelopes:
        yield get_type_hints(envelope)["data"]


def _event_schemas() -> dict[str, Any]:
    adapter: TypeAdapter[Any] = TypeAdapter(Event)
    schema = adapter.json_schema(ref_template=_REF)
    defs: dict[str, Any] = schema.pop("$defs")
    for cls in _event_classes():
        properties = defs[cls.__name__]["properties"]
        for name, hint in get_type_hints(cls, include_extras=True).items():
            properties[name].pop("title", None)
            keywords = _formats(_unwrap(hint))
            if keywords is not None:
                _refine(properties[name], keywords)
        defs[cls.__name__].pop("title", None)
    schema["description"] = (
        "One event: {type, data, id?}, discriminated on type. Unknown extra fields are "
        "accepted and dropped."
    )
    defs["Event"] = schema
    return defs


def _model_schema(model: Any, defs: dict[str, Any]) -> dict[str, Any]:
    adapter: TypeAdapter[Any] = TypeAdapter(model)
    schema = adapter.json_schema(mode="serialization", ref_template=_REF)
    defs.update(schema.pop("$defs", {}))
    return schema


def _json(schema: Mapping[str, object], description: str) -> dict[str, object]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "What was wrong and why."}},
}

_INGEST_ANSWERS: Final[Mapping[str, str]] = {
    "202": "At least one event was committed to the ledger, or all were duplicates; "
    "rejected items are listed by index.",
    "400": "Malformed JSON, NDJSON line or gzip stream (with the parser's message).",
    "401": "Missing or wrong bearer token, or a required delivery signature is missing or invalid.",
    "408": "The body did not arrive within the body read timeout; the connection is closed.",
    "409": "Every event in the body conflicts with a stored one: the same key (a lifecycle "
    "event's type and paymentId or batchId, else its id) with a different body, or a "
    "second settled or failed event for a payment that already ended.",
    "413": "Body (as sent or decoded) or batch over its limit.",
    "415": "Content-Type or Content-Encoding not supported.",
    "422": "No event in the body is valid; every error names its field.",
    "503": "The ledger cannot commit or the store backlog is over its limit; see Retry-After.",
}


_ENCODING_PATTERN: Final = (
    "^[ \\t]*(([xX]-)?[gG][zZ][iI][pP]|[iI][dD][eE][nN][tT][iI][tT][yY])?[ \\t]*$"
)


def _ingest_operation(auth: bool, signed: bool) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for status, description in _INGEST_ANSWERS.items():
        answer = _json(_ref("IngestAnswer"), description)
        if status == "503":
            answer["headers"] = {
                "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}
            }
        answers[status] = answer
    events = {"type": "array", "items": _ref("Event")}
    operation: dict[str, Any] = {
        "operationId": "ingestEvents",
        "summary": "Ingest facilitator events",
        "description": "Body: one event object or a JSON array of events (application/json), "
        "or NDJSON (one event per line), optionally gzip-encoded. 202 means committed to "
        "the ledger. Every refused body or event is kept as a dead letter.",
        "parameters": [
            {
                "name": "Content-Encoding",
                "in": "header",
                "required": False,
                "description": "gzip (or x-gzip; several members are decoded in turn) or "
                "identity, in any case; empty means identity. The decoded body has the same "
                "size limit as a plain one.",
                "schema": {"type": "string", "pattern": _ENCODING_PATTERN},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"oneOf": [_ref("Event"), events]}},
                "application/x-ndjson": {
                    "schema": events
                    | {
                        "description": "One event object per line (also accepted as "
                        "application/ndjson and application/jsonl)."
                    },
                },
            },
        },
        "responses": answers,
    }
    if signed:
        operation["parameters"].append(
            {
                "name": SIGNATURE_HEADER,
                "in": "header",
                "required": True,
                "description": "Signed delivery: t=<unix seconds>,v2=<64 hex digits: "
                "HMAC-SHA256 of <t>.<content type>.<content encoding>.<body as sent>> (v2= "
                "may repeat during a key rotation; the older v1= signs <t>.<body> only and "
                "is still accepted); missing, malformed, stale or wrong is answered 401.",
                "schema": {
                    "type": "string",
                    "pattern": "^t=[0-9]{1,12}(,v[12]=[0-9a-fA-F]{64})+$",
                },
            }
        )
    if auth:
        operation["security"] = [{"bearerAuth": []}]
    return operation


_AT_PATTERN: Final = (
    "^(-?[0-9]+|[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\\.[0-9]+)?)?"
    "([Zz]|[+-][0-9]{2}:[0-9]{2}))$"
)

_ANALYTICS_ANSWERS: Final[Mapping[str, str]] = {
    "400": "Unknown window, metric, limit or at.",
    "401": "Missing or wrong bearer token.",
    "503": "Analytics are not computed for the configured store.",
}


def _analytics_operation(name: str, schema: dict[str, Any], auth: bool) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    if name != "realtime":
        parameters.append(
            {
                "name": "window",
                "in": "query",
                "description": "The window (at - window, at].",
                "schema": {"type": "string", "enum": [w.value for w in Window], "default": "24h"},
            }
        )
    parameters.append(
        {
            "name": "at",
            "in": "query",
            "description": "Evaluate as of this instant (epoch milliseconds or RFC 3339 with "
            "offset) instead of the cached result; default now.",
            "schema": {"type": "string", "pattern": _AT_PATTERN},
        }
    )
    if name.startswith("top/"):
        parameters.append(
            {
                "name": "limit",
                "in": "query",
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_LIMIT,
                    "default": DEFAULT_LIMIT,
                },
            }
        )
    if name == "timeseries":
        parameters.append(
            {
                "name": "metric",
                "in": "query",
                "schema": {
                    "type": "string",
                    "enum": list(TIME_SERIES_METRICS),
                    "default": "volume",
                },
            }
        )
    headers = {
        "X-Analytics-At": {
            "description": "The instant (epoch ms) the result is as of.",
            "schema": {"type": "string"},
        },
        "X-Analytics-Stale": {
            "description": "Present for cached results: whether the last refresh failed.",
            "schema": {"type": "string", "enum": ["true", "false"]},
        },
    }
    ok = _json(schema, "The analytic, as of X-Analytics-At.")
    ok["headers"] = headers
    operation: dict[str, Any] = {
        "operationId": "analytics_" + name.replace("/", "_"),
        "summary": f"Analytics: {name}",
        "parameters": parameters,
        "responses": {"200": ok}
        | {status: _json(_ERROR, text) for status, text in _ANALYTICS_ANSWERS.items()},
    }
    if auth:
        operation["security"] = [{"bearerAuth": []}]
    return operation


def _readiness_schema() -> dict[str, Any]:
    nullable_string = {"type": ["string", "null"]}
    store: dict[str, Any] = {
        "name": {"type": "string"},
        "reachable": {
            "type": ["boolean", "null"],
            "description": "Whether the last write got an answer; null before the first.",
        },
        "authFailed": {"type": "boolean"},
        "backlog": {"type": "integer"},
        "lagSeconds": {"type": "number"},
        "lastSuccessfulWrite": {
            "type": ["number", "null"],
            "description": "Unix time in seconds.",
        },
        "lastError": nullable_string,
        "errorClass": nullable_string,
        "consecutiveFailures": {"type": "integer"},
    }
    return {
        "type": "object",
        "required": ["status", "ledger"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "not ready"]},
            "reason": {"type": "string"},
            "ledger": {
                "type": "object",
                "description": "Ledger counts, or the error that makes the ledger unwritable.",
                "properties": {
                    "events": {"type": "integer"},
                    "backlog": {"type": "integer"},
                    "waitingForJoin": {"type": "integer"},
                    "deadLetters": {"type": "integer"},
                    "error": {"type": "string"},
                    "lastCommit": {
                        "type": "object",
                        "description": "How the last ledger commit ended (Unix time in "
                        "seconds); one older than 10 s is confirmed by a small write.",
                        "properties": {
                            "at": {"type": "number"},
                            "ok": {"type": "boolean"},
                            "error": nullable_string,
                        },
                    },
                },
            },
            "store": {
                "type": "object",
                "description": "The first store of EXPORTER_STORES (the only one by default).",
                "required": list(store),
                "properties": store,
            },
            "stores": {
                "type": "array",
                "description": "Every store the ledger feeds, each at its own pace.",
                "items": {"type": "object", "required": list(store), "properties": store},
            },
        },
    }


def _proxy_paths() -> dict[str, Any]:
    gateway = {
        "type": "object",
        "required": ["error", "upstream", "endpoint"],
        "properties": {
            "error": {"type": "string"},
            "upstream": {"type": "string"},
            "endpoint": {"type": "string"},
        },
    }
    answers = {
        "default": {"description": "The upstream facilitator's answer, passed through unchanged."},
        "408": _json(
            gateway,
            "The request body did not arrive within the body read timeout; nothing was "
            "forwarded and the connection is closed.",
        ),
        "502": _json(gateway, "The upstream facilitator is unreachable."),
        "504": _json(gateway, "The upstream facilitator did not answer in time."),
    }
    body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "x402 request (paymentPayload, paymentRequirements), "
                    "forwarded unchanged.",
                }
            }
        },
    }
    paths: dict[str, Any] = {}
    for name in ("verify", "settle"):
        paths[f"/{name}"] = {
            "post": {
                "operationId": f"proxy_{name}",
                "summary": f"x402 {name}, forwarded upstream and recorded as payment events",
                "requestBody": body,
                "responses": answers,
            }
        }
    paths["/supported"] = {
        "get": {
            "operationId": "proxy_supported",
            "summary": "x402 supported kinds, forwarded upstream",
            "responses": answers,
        }
    }
    return paths


def build_openapi(*, auth: bool, proxy: bool, signed: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of an exporter with or without a token, signed deliveries
    and proxy mode."""
    schemas = _event_schemas()
    schemas["IngestAnswer"] = {
        "type": "object",
        "required": ["accepted", "duplicates", "rejected"],
        "properties": {
            "accepted": {"type": "integer", "minimum": 0},
            "duplicates": {"type": "integer", "minimum": 0},
            "rejected": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "error"],
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        "error": {"type": "string"},
                    },
                },
            },
            "error": {"type": "string", "description": "Why the request as a whole was refused."},
        },
    }
    paths: dict[str, Any] = {"/v1/events": {"post": _ingest_operation(auth, signed)}}
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus exposition (OpenMetrics when asked for by Accept)",
            "responses": {
                "200": {
                    "description": "The metrics.",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                }
            },
        }
    }
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness: 200 while the process serves",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["status"],
                        "properties": {"status": {"const": "ok"}},
                    },
                    "Serving.",
                )
            },
        }
    }
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: the ledger is writable and every store accepts the credentials",
            "responses": {
                "200": _json(_ref("Readiness"), "Ready."),
                "503": _json(_ref("Readiness"), "Not ready: the ledger or the store's reason."),
            },
        }
    }
    schemas["Readiness"] = _readiness_schema()
    for name in ANALYTIC_NAMES:
        schema = _model_schema(ANALYTICS_MODELS[name], schemas)
        paths[f"/v1/analytics/{name}"] = {"get": _analytics_operation(name, schema, auth)}
    paths[OPENAPI_PATH] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")},
        }
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "facilitator-exporter",
            "version": importlib.metadata.version("facilitator-exporter"),
            "description": "Durable ingest of x402 payment-facilitator events, Prometheus "
            "metrics and analytics.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth:
        document["components"]["securitySchemes"] = {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "EXPORTER_INGEST_TOKEN, on ingest and analytics.",
            }
        }
    if proxy:
        paths.update(_proxy_paths())
        document[PROXY_PASS_THROUGH] = {
            "description": "Proxy mode: a request to any path and method not described here "
            "is forwarded to the upstream facilitator and its answer returned unchanged "
            "(502 or 504 with a JSON error when the upstream fails).",
            "responses": copy.deepcopy(paths["/supported"]["get"]["responses"]),
        }
    return document


def openapi_json(*, auth: bool, proxy: bool, signed: bool = False) -> bytes:
    """:func:`build_openapi` encoded once, as served."""
    document = build_openapi(auth=auth, proxy=proxy, signed=signed)
    return json.dumps(document, separators=(",", ":")).encode()
