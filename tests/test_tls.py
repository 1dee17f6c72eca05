"""A route's certificate is refused, saying which check failed, before anything is stored."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from flynnp2p.errors import UserError
from flynnp2p.tls import check_certificate, names_domain
from tests.certs import NOW, key_pem, make_cert


def test_a_good_certificate_and_its_names() -> None:
    cert, key = make_cert("example.com", "www.example.com")
    info = check_certificate(cert, key, "www.example.com", NOW)
    assert info.domains == ("example.com", "www.example.com") and info.chain == 1
    assert info.not_after == NOW + dt.timedelta(days=90)
    cert, key = make_cert("legacy.example", san=False)  # the common name, when there are no SANs
    assert check_certificate(cert, key, "legacy.example", NOW).domains == ("legacy.example",)


@pytest.mark.parametrize(
    ("pattern", "domain", "covered"),
    [("*.example.com", "a.example.com", True), ("*.example.com", "example.com", False),
     ("*.example.com", "a.b.example.com", False), ("Example.com", "example.com", True),
     ("example.com", "example.org", False)],
)  # fmt: skip
def test_wildcards_cover_one_label(pattern: str, domain: str, covered: bool) -> None:
    assert names_domain(pattern, domain) is covered


def test_each_refusal_says_which_check_failed() -> None:
    cert, key = make_cert("example.com")
    other = key_pem(ec.generate_private_key(ec.SECP256R1()))
    cases = [
        ("not a cert", key, "example.com", NOW, "cert: not a PEM certificate"),
        (cert, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "example.com", NOW,
         "key: not an unencrypted PEM private key"),
        (cert, other, "example.com", NOW, "key: does not match the certificate"),
        (cert, key, "example.com", NOW + dt.timedelta(days=91), "cert: expired on 2026-08-30"),
        (cert, key, "example.com", NOW - dt.timedelta(days=2), "cert: not valid before"),
        (cert, key, "example.org", NOW, "cert: is for example.com, not for example.org"),
    ]  # fmt: skip
    for cert_pem, key_text, domain, now, message in cases:
        assert len(key_text.splitlines()) > 1
        with pytest.raises(UserError, match=message) as caught:
            check_certificate(cert_pem, key_text, domain, now)
        assert key_text.splitlines()[1] not in str(caught.value)  # key material is never echoed
