"""Signed deliveries: X-Exporter-Signature on POST /v1/events, its settings, the simulator."""

from __future__ import annotations

import gzip
import json
import logging
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from _exporter_process import clean_env, labels, run_cli, running_exporter
from conftest import AppClient, received, require_tool, settled, wait_until
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from exporter import Settings, create_app
from exporter.app import COMMITTER
from exporter.cli.simulate_live import run_simulation
from exporter.ingest.signing import (
    SIGNATURE_HEADER,
    SignatureError,
    SignatureVerifier,
    parse_signature_header,
    sign,
    signature_header,
)

SECRET = "whsec_current-7f3a9c1e5b"
PREVIOUS = "whsec_previous-2d8e4b6a0c"
JSON = {"Content-Type": "application/json"}
ClientFactory = Callable[..., Awaitable[AppClient]]


def body_of(*events: dict[str, object]) -> bytes:
    """Events as a JSON array."""
    return json.dumps(list(events)).encode()


def signed(
    body: bytes, secret: str = SECRET, t: int | None = None, encoding: str | None = None
) -> dict[str, str]:
    """JSON request headers (with ``encoding``) carrying the signature of ``body``."""
    signature = signature_header(
        secret, body, t, content_type="application/json", content_encoding=encoding
    )
    headers = {**JSON, SIGNATURE_HEADER: signature}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    return headers


def bad_signatures(registry: CollectorRegistry) -> float:
    """exporter_events_rejected_total{reason="bad_signature"}."""
    value = registry.get_sample_value("exporter_events_rejected_total", {"reason": "bad_signature"})
    assert value is not None
    return value


def stored(client: AppClient) -> tuple[int, int]:
    """(events, dead letters) in the app's ledger."""
    ledger = client.app[COMMITTER].ledger
    return ledger.stats().events, len(ledger.dead_letters(None))


@pytest.fixture
def signing(data_dir: Path) -> Settings:
    """Settings requiring signed deliveries."""
    return Settings(data_dir=data_dir, listen="127.0.0.1:0", ingest_signing_secret=SECRET)


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, signing: Settings, registry: CollectorRegistry
) -> AppClient:
    """The app with signing on."""
    return await aiohttp_client(create_app(signing, registry))


# ------------------------------------------------------------------------- the header


def test_openssl_one_liner_computes_the_same_signature() -> None:
    """The v1 shell recipe (openssl over "<t>.<body>", for senders not yet on v2) agrees."""
    openssl = require_tool("openssl")
    body = body_of(received("p1"))
    script = (
        f'printf \'%s.%s\' "$T" "$BODY" | {openssl} dgst -sha256 -hmac "$SECRET" -r '
        "| cut -d' ' -f1"
    )
    result = subprocess.run(
        ["sh", "-c", script],
        env={"T": "1767225600", "BODY": body.decode(), "SECRET": SECRET},
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    assert result.stdout.strip() == sign(SECRET, 1767225600, body)
    assert re.fullmatch(r"[0-9a-f]{64}", result.stdout.strip())


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("", "element '' is not key=value"),
        ("v1=" + "a" * 64, "no t= timestamp"),
        ("t=1767225600", "no v2= (or v1=) signature"),
        ("t=1767225600,v0=abc", "no v2= (or v1=) signature"),
        ("t=soon,v1=" + "a" * 64, "t= must be unix time in whole seconds, got 'soon'"),
        ("t=-5,v1=" + "a" * 64, "t= must be unix time in whole seconds, got '-5'"),
        ("t=1,t=2,v1=" + "a" * 64, "more than one t="),
        ("t=1767225600,v1=abc", "v1= must be 64 hex digits (an HMAC-SHA256), got 'abc'"),
        ("t=1767225600,v1=" + "g" * 64, "v1= must be 64 hex digits"),
        ("t=1767225600,v1", "element 'v1' is not key=value"),
    ],
)
def test_malformed_headers_name_the_part(header: str, message: str) -> None:
    with pytest.raises(SignatureError) as caught:
        parse_signature_header(header)
    assert str(caught.value).startswith(f"malformed {SIGNATURE_HEADER} header: ")
    assert message in str(caught.value)


def test_header_parsing_tolerates_spaces_case_and_unknown_schemes() -> None:
    digest = sign(SECRET, 1767225600, b"{}")
    header = parse_signature_header(f" t=1767225600 , v0=legacy, v1={digest.upper()} ")
    assert header.timestamp == 1767225600
    assert header.signatures == (bytes.fromhex(digest),)


def test_verifier_tolerance_applies_both_ways() -> None:
    """Exactly at the tolerance passes; one second beyond, past or future, is refused."""
    now = 1_767_225_600
    verifier = SignatureVerifier([SECRET], 300, clock=lambda: now + 0.9)
    for t in (now - 300, now + 300):
        header = verifier.check_header(
            signature_header(SECRET, b"x", t, content_type="application/json")
        )
        assert verifier.verify(header, b"x", "application/json") is True
    with pytest.raises(SignatureError, match=r"is 301 s in the past, outside the tolerance of 300"):
        verifier.check_header(
            signature_header(SECRET, b"x", now - 301, content_type="application/json")
        )
    with pytest.raises(SignatureError, match=r"is 301 s in the future, outside the tolerance"):
        verifier.check_header(
            signature_header(SECRET, b"x", now + 301, content_type="application/json")
        )


# ------------------------------------------------------------------------- the endpoint


async def test_signed_plain_and_gzip_bodies_are_accepted(
    client: AppClient, registry: CollectorRegistry
) -> None:
    plain = body_of(received("p1"))
    response = await client.post("/v1/events", data=plain, headers=signed(plain))
    assert response.status == 202
    assert await response.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
    # A gzip body is signed as sent: the compressed bytes.
    compressed = gzip.compress(body_of(received("p2"), settled("p2")))
    response = await client.post(
        "/v1/events", data=compressed, headers=signed(compressed, encoding="gzip")
    )
    assert response.status == 202
    assert (await response.json())["accepted"] == 2
    assert stored(client) == (3, 0)
    assert bad_signatures(registry) == 0


async def test_gzip_body_signed_after_decoding_is_refused(client: AppClient) -> None:
    """The signature covers the wire bytes, so signing the decoded JSON does not pass."""
    decoded = body_of(received("p1"))
    response = await client.post(
        "/v1/events",
        data=gzip.compress(decoded),
        headers=signed(decoded, encoding="gzip"),
    )
    assert response.status == 401
    assert (await response.json())["error"].startswith("no signature matches")


async def test_missing_header_is_401_counted_and_not_stored(
    client: AppClient, registry: CollectorRegistry
) -> None:
    response = await client.post("/v1/events", json=received("p1"))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith(SIGNATURE_HEADER)
    answer = await response.json()
    assert answer["accepted"] == 0 and answer["duplicates"] == 0 and answer["rejected"] == []
    assert answer["error"].startswith(f"missing {SIGNATURE_HEADER} header")
    assert bad_signatures(registry) == 1
    assert stored(client) == (0, 0)


async def test_malformed_header_names_the_part(client: AppClient) -> None:
    body = body_of(received("p1"))
    response = await client.post(
        "/v1/events", data=body, headers={**JSON, SIGNATURE_HEADER: f"t={int(time.time())}"}
    )
    assert response.status == 401
    assert (await response.json())["error"] == (
        f"malformed {SIGNATURE_HEADER} header: no v2= (or v1=) signature"
    )


async def test_wrong_secret_or_changed_body_is_refused(
    client: AppClient, registry: CollectorRegistry
) -> None:
    body = body_of(received("p1"))
    wrong = await client.post("/v1/events", data=body, headers=signed(body, "whsec_other"))
    changed = await client.post("/v1/events", data=body_of(received("p2")), headers=signed(body))
    for response in (wrong, changed):
        assert response.status == 401
        assert (await response.json())["error"].startswith(
            "no signature matches: 1 v2= entry checked against 1 secret"
        )
    assert bad_signatures(registry) == 2
    assert stored(client) == (0, 0)


async def test_timestamps_outside_the_tolerance_are_refused(client: AppClient) -> None:
    body = body_of(received("p1"))
    now = int(time.time())
    old = await client.post("/v1/events", data=body, headers=signed(body, t=now - 400))
    future = await client.post("/v1/events", data=body, headers=signed(body, t=now + 400))
    inside = await client.post("/v1/events", data=body, headers=signed(body, t=now - 200))
    assert (old.status, future.status, inside.status) == (401, 401, 202)
    # The distance is measured on the server a moment later: 400 or 401 seconds.
    assert re.fullmatch(
        rf"{SIGNATURE_HEADER} timestamp t={now - 400} is 40[01] s in the past, outside the "
        r"tolerance of 300 s \(a replay, or the sender's clock is off\)",
        (await old.json())["error"],
    )
    assert re.search(r"is (399|400) s in the future", (await future.json())["error"])


async def test_tolerance_is_configurable(aiohttp_client: ClientFactory, data_dir: Path) -> None:
    settings = Settings(
        data_dir=data_dir, ingest_signing_secret=SECRET, ingest_signing_tolerance_seconds=30
    )
    client = await aiohttp_client(create_app(settings, CollectorRegistry()))
    body = body_of(received("p1"))
    response = await client.post(
        "/v1/events", data=body, headers=signed(body, t=int(time.time()) - 60)
    )
    assert response.status == 401
    assert "outside the tolerance of 30 s" in (await response.json())["error"]


async def test_rotation_accepts_the_previous_secret_and_several_entries(
    aiohttp_client: ClientFactory, data_dir: Path
) -> None:
    settings = Settings(
        data_dir=data_dir, ingest_signing_secret=SECRET, ingest_signing_secret_previous=PREVIOUS
    )
    client = await aiohttp_client(create_app(settings, CollectorRegistry()))
    first, second, third, fourth = (body_of(received(f"p{n}")) for n in range(4))
    t = int(time.time())
    both = f"t={t},v1={sign('whsec_unknown', t, third)},v1={sign(PREVIOUS, t, third)}"
    answers = [
        await client.post("/v1/events", data=first, headers=signed(first, SECRET)),
        await client.post("/v1/events", data=second, headers=signed(second, PREVIOUS)),
        await client.post("/v1/events", data=third, headers={**JSON, SIGNATURE_HEADER: both}),
        await client.post("/v1/events", data=fourth, headers=signed(fourth, "whsec_unknown")),
    ]
    assert [answer.status for answer in answers] == [202, 202, 202, 401]
    assert (await answers[3].json())["error"].startswith(
        "no signature matches: 1 v2= entry checked against 2 secrets"
    )
    assert stored(client) == (3, 0)


async def test_bearer_token_and_signature_both_apply(
    aiohttp_client: ClientFactory, data_dir: Path
) -> None:
    settings = Settings(
        data_dir=data_dir, ingest_token="s3cret-token", ingest_signing_secret=SECRET
    )
    client = await aiohttp_client(create_app(settings, CollectorRegistry()))
    body = body_of(received("p1"))
    bearer = {"Authorization": "Bearer s3cret-token"}
    signature_only = await client.post("/v1/events", data=body, headers=signed(body))
    token_only = await client.post("/v1/events", data=body, headers={**JSON, **bearer})
    both = await client.post("/v1/events", data=body, headers={**signed(body), **bearer})
    assert (signature_only.status, token_only.status, both.status) == (401, 401, 202)
    assert (await signature_only.json())["error"] == "missing or wrong bearer token"
    assert (await token_only.json())["error"].startswith(f"missing {SIGNATURE_HEADER} header")


async def test_only_verified_bodies_become_dead_letters(
    client: AppClient, registry: CollectorRegistry
) -> None:
    """A refusal before the signature is verified is counted but not kept; after, it is."""
    junk = b"not json at all"
    forged = f"t={int(time.time())},v1={'0' * 64}"  # well formed and fresh, but not signed
    unsupported = await client.post(
        "/v1/events", data=junk, headers={"Content-Type": "text/plain", SIGNATURE_HEADER: forged}
    )
    assert unsupported.status == 415
    assert (
        registry.get_sample_value(
            "exporter_events_rejected_total", {"reason": "unsupported_media_type"}
        )
        == 1
    )
    assert stored(client) == (0, 0)
    malformed = await client.post("/v1/events", data=junk, headers=signed(junk))
    assert malformed.status == 400
    letters = client.app[COMMITTER].ledger.dead_letters(None)
    assert [(d.reason, d.raw) for d in letters] == [("malformed", junk)]


async def test_secret_never_reaches_logs_readyz_or_metrics(
    client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body = body_of(received("p1"))
    await client.post("/v1/events", data=body, headers=signed(body))
    await client.post("/v1/events", data=body, headers=signed(body, "whsec_wrong"))
    await client.post("/v1/events", data=body, headers=JSON)
    assert any("signature" in record.getMessage() for record in caplog.records)
    logged = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    readyz = await client.get("/readyz")
    metrics = await client.get("/metrics")
    for text in (logged, await readyz.text(), await metrics.text()):
        assert SECRET not in text


# ------------------------------------------------------------------------- the settings


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"ingest_signing_secret": ""}, "ingest_signing_secret", "must not be empty"),
        ({"ingest_signing_secret": "  "}, "ingest_signing_secret", "must not be empty"),
        (
            {"ingest_signing_secret": SECRET + "\n"},
            "ingest_signing_secret",
            "must not start or end with whitespace",
        ),
        (
            {"ingest_signing_secret": SECRET, "ingest_signing_secret_previous": ""},
            "ingest_signing_secret_previous",
            "must not be empty",
        ),
        (
            {"ingest_signing_secret": SECRET, "ingest_signing_tolerance_seconds": 0},
            "ingest_signing_tolerance_seconds",
            "greater than 0",
        ),
    ],
)
def test_bad_signing_settings_name_the_field(
    values: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)  # type: ignore[arg-type]
    [error] = caught.value.errors()
    assert error["loc"] == (field,)
    assert message in error["msg"]
    assert SECRET not in str(caught.value)


def test_previous_secret_needs_a_current_one() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(ingest_signing_secret_previous=PREVIOUS)
    assert "EXPORTER_INGEST_SIGNING_SECRET_PREVIOUS is set without" in str(caught.value)
    assert PREVIOUS not in str(caught.value)


def test_signing_secret_does_not_open_non_loopback_listen() -> None:
    """The token also guards the analytics API, which signatures do not cover."""
    with pytest.raises(ValidationError) as caught:
        Settings(listen="0.0.0.0:9402", ingest_signing_secret=SECRET)
    assert "without EXPORTER_INGEST_TOKEN" in str(caught.value)
    assert "a signing secret authenticates ingest only" in str(caught.value)
    assert Settings(listen="0.0.0.0:9402", ingest_token="t" * 16, ingest_signing_secret=SECRET)


def test_check_config_reports_signing_without_the_secret() -> None:
    off = run_cli("check-config")
    on = run_cli(
        "check-config",
        EXPORTER_INGEST_SIGNING_SECRET=SECRET,
        EXPORTER_INGEST_SIGNING_SECRET_PREVIOUS=PREVIOUS,
    )
    assert (off.returncode, on.returncode) == (0, 0), off.stderr + on.stderr
    described_off = json.loads(off.stdout.rpartition("configuration is valid")[0])
    described_on = json.loads(on.stdout.rpartition("configuration is valid")[0])
    assert described_off["ingest_signing"] == "off"
    assert described_off["ingest_signing_secret"] is None
    assert described_on["ingest_signing"] == "on"
    assert described_on["ingest_signing_secret"] == "(set)"
    assert described_on["ingest_signing_secret_previous"] == "(set)"
    assert described_on["ingest_signing_tolerance_seconds"] == 300
    assert SECRET not in on.stdout + on.stderr and PREVIOUS not in on.stdout + on.stderr


def test_check_config_names_an_empty_secret() -> None:
    result = run_cli("check-config", EXPORTER_INGEST_SIGNING_SECRET="")
    assert result.returncode == 2
    assert "EXPORTER_INGEST_SIGNING_SECRET: must not be empty" in result.stderr


# ------------------------------------------------------------------------- the simulator


async def test_simulated_signed_traffic_is_accepted_end_to_end(
    client: AppClient, registry: CollectorRegistry
) -> None:
    url = str(client.make_url("")).rstrip("/")
    summary = await run_simulation(
        url, rate=40, duration=1.0, signing_secret=SECRET, batch_size=5, concurrency=2
    )
    assert summary.errors == 0 and summary.unacknowledged == 0, summary.last_error
    # Every event is acknowledged: accepted, or a duplicate of the simulator's re-deliveries.
    assert summary.accepted > 0 and summary.accepted + summary.duplicates == summary.events
    assert summary.status_counts == {202: summary.requests}
    assert stored(client)[0] == summary.accepted
    assert bad_signatures(registry) == 0


async def test_unsigned_simulation_is_refused(client: AppClient) -> None:
    url = str(client.make_url("")).rstrip("/")
    summary = await run_simulation(url, rate=20, duration=0.3, max_retries=0)
    assert summary.events > 0
    assert summary.accepted == 0 and summary.unacknowledged == summary.events
    assert summary.last_error is not None
    assert summary.last_error.startswith(f"HTTP 401: missing {SIGNATURE_HEADER} header")


def test_simulate_refuses_an_empty_signing_secret() -> None:
    flag = run_cli("simulate", "--duration", "0.1", "--signing-secret", "")
    env = run_cli("simulate", "--duration", "0.1", EXPORTER_INGEST_SIGNING_SECRET=" ")
    assert flag.returncode == 2 and "--signing-secret must not be empty" in flag.stderr
    assert env.returncode == 2 and "EXPORTER_INGEST_SIGNING_SECRET must not be empty" in env.stderr
    help_text = run_cli("simulate", "--help").stdout
    assert "--signing-secret" in help_text


@pytest.mark.slow
def test_cli_simulate_and_demo_sign_with_the_configured_secret(tmp_path: Path) -> None:
    """``simulate`` signs with the variable, ``serve --demo`` with the exporter's own secret."""
    env = {"EXPORTER_INGEST_SIGNING_SECRET": SECRET}
    with running_exporter(
        tmp_path / "data", tmp_path / "exporter.log", ["--demo"], env=clean_env(**env)
    ) as exporter:

        def demo_counted() -> bool:
            received_total = exporter.metric("exporter_events_received_total")
            return sum(received_total.values()) > 0

        wait_until(demo_counted, 10.0, 0.1, "demo traffic to be committed")
        result = run_cli(
            "simulate", "--url", exporter.url, "--rate", "20", "--duration", "1", **env
        )
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads(result.stdout)
        assert summary["errors"] == 0 and summary["rejected"] == 0
        assert summary["accepted"] > 0
        assert summary["accepted"] + summary["duplicates"] == summary["events"]
        rejected = exporter.metric("exporter_events_rejected_total")
        assert rejected[labels(reason="bad_signature")] == 0
        assert SECRET not in exporter.log()
        assert exporter.terminate() == 0, exporter.log()
