"""The words of a signature refusal: a sender fixing its signing reads them, so each names
what was expected and what was wrong (the header, the clock, the scheme)."""

from __future__ import annotations

import pytest

from exporter.ingest.signing import (
    SIGNATURE_HEADER,
    SignatureError,
    SignatureVerifier,
    parse_signature_header,
    sign,
)

SECRET = "whsec_rules-of-the-signature-9c4e"
NOW = 1_767_225_600


def test_a_missing_header_names_the_recipe() -> None:
    verifier = SignatureVerifier([SECRET], clock=lambda: NOW)
    with pytest.raises(SignatureError) as caught:
        verifier.check_header(None)
    assert str(caught.value) == (
        f"missing {SIGNATURE_HEADER} header: this exporter requires signed deliveries "
        '(t=<unix seconds>,v2=<hex HMAC-SHA256 of "<t>.<content type>.<content encoding>.'
        '<body>">)'
    )


def test_one_second_outside_a_zero_tolerance_is_in_the_past() -> None:
    verifier = SignatureVerifier([SECRET], 0, clock=lambda: NOW + 1)
    with pytest.raises(SignatureError) as caught:
        verifier.check_header(f"t={NOW},v1={sign(SECRET, NOW, b'{}')}")
    assert str(caught.value).startswith(
        f"{SIGNATURE_HEADER} timestamp t={NOW} is 1 s in the past, outside the tolerance of 0 s"
    )


def test_a_v1_mismatch_names_what_v1_signs() -> None:
    verifier = SignatureVerifier([SECRET], clock=lambda: NOW)
    header = verifier.check_header(f"t={NOW},v1={sign('whsec_another-secret-1', NOW, b'{}')}")
    with pytest.raises(SignatureError) as caught:
        verifier.verify(header, b"{}", "application/json")
    assert str(caught.value) == (
        "no signature matches: 1 v1= entry checked against 1 secret; sign "
        '"<t>.<body>" with the exporter\'s secret, the body exactly as sent'
    )


def test_an_element_splits_at_its_first_equals_sign() -> None:
    with pytest.raises(SignatureError) as caught:
        parse_signature_header(f"t={NOW}=5,v1={sign(SECRET, NOW, b'{}')}")
    assert str(caught.value) == (
        f"malformed {SIGNATURE_HEADER} header: t= must be unix time in whole seconds, got '{NOW}=5'"
    )
