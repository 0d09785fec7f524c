"""Signed deliveries: the ``X-Exporter-Signature`` header of ``POST /v1/events``.

A sender that holds the shared secret signs each request, in the style of webhook
signatures::

    X-Exporter-Signature: t=<unix seconds>,v2=<hex HMAC-SHA256 of
        "<t>.<content type>.<content encoding>.<body>">

The content type is the media type sent, lower case, without parameters
(``application/json``); the content encoding is the ``Content-Encoding`` sent, lower
case, or ``identity`` without one. They are signed because they decide how the body is
read: a body signed as JSON and replayed as NDJSON, or as gzip, must not be read another
way. The body signed is the request body exactly as sent on the wire, before any gzip
decoding, so that a receiver checks it before spending work on it (a gzip body is never
decoded for an unauthenticated sender). The key is the secret's UTF-8 bytes.

The older ``v1=`` signs ``"<t>.<body>"`` only. It is still accepted, so that existing
senders keep working, but its headers are not authenticated: the receiver answers and
counts a v1 request's refusals without keeping its bytes (a replay with other headers then
leaves nothing). When a header carries any ``v2=``, one of them must match; ``v1=``
entries beside them are not consulted. A header may carry several entries of a scheme (a
sender signing with an old and a new secret during a rotation): any one matching passes.
Elements with other keys (``v0=``, a future ``v3=``) are ignored, so that new schemes can
be added without breaking older receivers.
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
    """The ``v1`` digests (body only)."""
    signatures_v2: tuple[bytes, ...] = ()
    """The ``v2`` digests (content type, content encoding and body)."""


def signed_content_type(value: str | None) -> str:
    """The content type as ``v2`` signs it: the media type, lower case, no parameters."""
    media_type = (value or "").split(";", 1)[0].strip().lower()
    return media_type or "application/octet-stream"


def signed_content_encoding(value: str | None) -> str:
    """The content encoding as ``v2`` signs it: lower case, ``identity`` when none."""
    return (value or "").strip().lower() or "identity"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The hex ``v1`` signature of ``body`` sent at ``timestamp`` (unix seconds)."""
    return _digest(secret.encode(), timestamp, body).hex()


def sign_v2(
    secret: str, timestamp: int, body: bytes, content_type: str, content_encoding: str | None
) -> str:
    """The hex ``v2`` signature of ``body`` sent at ``timestamp`` with these headers."""
    return _digest_v2(
        secret.encode(),
        timestamp,
        _signed_headers(content_type, content_encoding),
        body,
    ).hex()


def signature_header(
    secret: str,
    body: bytes,
    timestamp: int | None = None,
    *,
    content_type: str,
    content_encoding: str | None = None,
) -> str:
    """The ``X-Exporter-Signature`` value for ``body`` sent with these headers, signed now
    unless ``timestamp`` is given. The content type has no default: it is signed, so a
    sender must name the one it really sends."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v2={sign_v2(secret, t, body, content_type, content_encoding)}"


def parse_signature_header(value: str) -> SignatureHeader:
    """Parse a header value, raising :class:`SignatureError` naming the part that is wrong."""
    timestamp: int | None = None
    signatures: list[bytes] = []
    signatures_v2: list[bytes] = []
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
        elif key in ("v1", "v2"):
            try:
                digest = bytes.fromhex(item)
            except ValueError:
                digest = b""
            if len(item) != _HEX_DIGITS or len(digest) * 2 != _HEX_DIGITS:
                raise SignatureError(
                    f"malformed {SIGNATURE_HEADER} header: {key}= must be {_HEX_DIGITS} hex "
                    f"digits (an HMAC-SHA256), got {_shown(item)}"
                )
            (signatures if key == "v1" else signatures_v2).append(digest)
    if timestamp is None:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: no t= timestamp")
    if not signatures and not signatures_v2:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: no v2= (or v1=) signature")
    return SignatureHeader(timestamp, tuple(signatures), tuple(signatures_v2))


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
                "(t=<unix seconds>,v2=<hex HMAC-SHA256 of "
                '"<t>.<content type>.<content encoding>.<body>">)'
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

    def verify(
        self,
        header: SignatureHeader,
        body: bytes,
        content_type: str | None = None,
        content_encoding: str | None = None,
    ) -> bool:
        """Raise :class:`SignatureError` unless an entry is the request's signature; True
        when it covers the headers (``v2``), False for a body-only ``v1`` signature.

        ``content_type`` and ``content_encoding`` are the header values as received.
        """
        if header.signatures_v2:
            signed = _signed_headers(content_type, content_encoding)
            for key in self._keys:
                expected = _digest_v2(key, header.timestamp, signed, body)
                if any(hmac.compare_digest(expected, given) for given in header.signatures_v2):
                    return True
            raise self._mismatch(
                "v2",
                len(header.signatures_v2),
                f'"<t>.{signed.decode(errors="replace")}.<body>" (the headers as sent)',
            )
        for key in self._keys:
            expected = _digest(key, header.timestamp, body)
            if any(hmac.compare_digest(expected, given) for given in header.signatures):
                return False
        raise self._mismatch("v1", len(header.signatures), '"<t>.<body>"')

    def _mismatch(self, scheme: str, entries: int, message: str) -> SignatureError:
        return SignatureError(
            f"no signature matches: {entries} {scheme}= "
            f"{'entry' if entries == 1 else 'entries'} checked against {len(self._keys)} "
            f"{'secret' if len(self._keys) == 1 else 'secrets'}; sign "
            f"{message} with the exporter's secret, the body exactly as sent"
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


def _signed_headers(content_type: str | None, content_encoding: str | None) -> bytes:
    # No media type or encoding the receiver accepts holds a dot, so a signed pair it
    # accepts reads back only one way.
    return (
        f"{signed_content_type(content_type)}.{signed_content_encoding(content_encoding)}"
    ).encode(errors="replace")


def _digest_v2(key: bytes, timestamp: int, signed_headers: bytes, body: bytes) -> bytes:
    mac = hmac.new(key, b"%d.%s." % (timestamp, signed_headers), hashlib.sha256)
    mac.update(body)
    return mac.digest()


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")
