"""Signed deliveries: the ``X-Exporter-Signature`` header of ``POST /v1/events``.

A sender that holds the shared secret signs each request, in the style of webhook
signatures::

    X-Exporter-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">

The body signed is the request body exactly as sent on the wire, before any gzip
decoding, so that a receiver checks it before spending work on it (a gzip body is never
decoded for an unauthenticated sender). The key is the secret's UTF-8 bytes. A header may
carry several ``v1=`` entries (a sender signing with an old and a new secret during a
rotation): any one matching passes. Elements with other keys (``v0=``, a future ``v2=``)
are ignored, so that new schemes can be added without breaking older receivers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import DEFAULT_TOLERANCE_SECONDS, Settings, check_secret

SIGNATURE_HEADER = "X-Exporter-Signature"
"""The request header carrying the timestamp and signatures."""

_HEX_DIGITS = 2 * hashlib.sha256().digest_size
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SHOWN = 40  # longest piece of a bad header echoed back in an error


class SignatureError(Exception):
    """A delivery's signature is missing, malformed, stale or wrong; the message says which."""


@dataclass(frozen=True, slots=True)
class SignatureHeader:
    """A parsed ``X-Exporter-Signature``: the signed timestamp and the ``v1`` digests."""

    timestamp: int
    signatures: tuple[bytes, ...]


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The hex ``v1`` signature of ``body`` sent at ``timestamp`` (unix seconds)."""
    return _digest(secret.encode(), timestamp, body).hex()


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Exporter-Signature`` value for ``body``, signed now unless ``timestamp`` is given."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={sign(secret, t, body)}"


def parse_signature_header(value: str) -> SignatureHeader:
    """Parse a header value, raising :class:`SignatureError` naming the part that is wrong."""
    timestamp: int | None = None
    signatures: list[bytes] = []
    for element in value.split(","):
        key, sep, item = element.strip().partition("=")
        if not sep or not key:
            raise SignatureError(
                f"malformed {SIGNATURE_HEADER} header: element {_shown(element)} is not key=value"
            )
        if key == "t":
            if timestamp is not None:
                raise SignatureError(f"malformed {SIGNATURE_HEADER} header: more than one t=")
            if not _TIMESTAMP.fullmatch(item):
                raise SignatureError(
                    f"malformed {SIGNATURE_HEADER} header: t= must be unix time in whole "
                    f"seconds, got {_shown(item)}"
                )
            timestamp = int(item)
        elif key == "v1":
            try:
                digest = bytes.fromhex(item)
            except ValueError:
                digest = b""
            if len(item) != _HEX_DIGITS or len(digest) * 2 != _HEX_DIGITS:
                raise SignatureError(
                    f"malformed {SIGNATURE_HEADER} header: v1= must be {_HEX_DIGITS} hex digits "
                    f"(an HMAC-SHA256), got {_shown(item)}"
                )
            signatures.append(digest)
    if timestamp is None:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: no t= timestamp")
    if not signatures:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: no v1= signature")
    return SignatureHeader(timestamp, tuple(signatures))


class SignatureVerifier:
    """Checks ``X-Exporter-Signature`` against one or more secrets, within a time tolerance.

    Checking is split in two so that a request whose header is missing, malformed or
    stale is refused before its body is read: :meth:`check_header`, then :meth:`verify`
    on the raw body.
    """

    def __init__(
        self,
        secrets: Sequence[str],
        tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise ValueError("a signature verifier needs at least one secret")
        self._keys = tuple(check_secret(secret).encode() for secret in secrets)
        self.tolerance_seconds = tolerance_seconds
        self._clock = clock

    def check_header(self, value: str | None) -> SignatureHeader:
        """The parsed header when present, well formed and within the tolerance."""
        if value is None:
            raise SignatureError(
                f"missing {SIGNATURE_HEADER} header: this exporter requires signed deliveries "
                '(t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">)'
            )
        header = parse_signature_header(value)
        skew = int(self._clock()) - header.timestamp
        if abs(skew) > self.tolerance_seconds:
            when = f"{skew} s in the past" if skew > 0 else f"{-skew} s in the future"
            raise SignatureError(
                f"{SIGNATURE_HEADER} timestamp t={header.timestamp} is {when}, outside the "
                f"tolerance of {self.tolerance_seconds} s (a replay, or the sender's clock is off)"
            )
        return header

    def verify(self, header: SignatureHeader, body: bytes) -> None:
        """Raise :class:`SignatureError` unless a ``v1`` entry is the body's signature."""
        for key in self._keys:
            expected = _digest(key, header.timestamp, body)
            if any(hmac.compare_digest(expected, given) for given in header.signatures):
                return
        entries = len(header.signatures)
        raise SignatureError(
            f"no signature matches: {entries} v1= "
            f"{'entry' if entries == 1 else 'entries'} checked against {len(self._keys)} "
            f"{'secret' if len(self._keys) == 1 else 'secrets'}; sign "
            '"<t>.<body>" with the exporter\'s secret, the body exactly as sent'
        )


def verifier_from_settings(settings: Settings) -> SignatureVerifier | None:
    """The verifier the settings ask for, or None when signing is off."""
    secrets = [
        secret.get_secret_value()
        for secret in (
            settings.ingest_signing_secret,
            settings.ingest_signing_secret_previous,
        )
        if secret is not None
    ]
    if not secrets:
        return None
    return SignatureVerifier(secrets, settings.ingest_signing_tolerance_seconds)


def _digest(key: bytes, timestamp: int, body: bytes) -> bytes:
    mac = hmac.new(key, b"%d." % timestamp, hashlib.sha256)
    mac.update(body)
    return mac.digest()


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")
