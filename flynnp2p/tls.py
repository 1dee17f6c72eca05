"""A route's certificate, checked before it is stored: it parses, matches its key,
is valid now, and names the route's domain.

`check_certificate` is what ``route add http DOMAIN --cert C --key K`` runs on the
leader before the `Certificate` record is written, so every router can load what
the state holds. Each refusal is a `UserError` that says which check failed. Key
material never reaches an error message or a log line.

Pure (``now`` is an argument); `cryptography` parses.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from flynnp2p.errors import UserError

_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)


@dataclass(frozen=True)
class CertInfo:
    domains: tuple[str, ...]  # the DNS names it is for (SANs, else the common name)
    not_after: dt.datetime
    chain: int  # certificates in the PEM (leaf first)


def names_domain(pattern: str, domain: str) -> bool:
    """Whether a certificate name covers `domain` (``*.a.b`` covers one label)."""
    pattern, domain = pattern.lower().rstrip("."), domain.lower().rstrip(".")
    if pattern == domain:
        return True
    if pattern.startswith("*."):
        head, _, rest = domain.partition(".")
        return bool(head) and head != "*" and rest == pattern[2:]
    return False


def check_certificate(cert_pem: str, key_pem: str, domain: str, now: dt.datetime) -> CertInfo:
    try:
        chain = x509.load_pem_x509_certificates(cert_pem.encode())
    except ValueError:
        raise UserError(
            "cert: not a PEM certificate (expected one or more '-----BEGIN CERTIFICATE-----' "
            "blocks, the server's first)"
        ) from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        raise UserError(
            "key: not an unencrypted PEM private key (expected '-----BEGIN PRIVATE KEY-----', "
            "'RSA PRIVATE KEY' or 'EC PRIVATE KEY'; decrypt it first)"
        ) from None
    if not isinstance(key, _KEY_TYPES):
        raise UserError("key: expected an RSA, EC or Ed25519 key")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != leaf.public_key().public_bytes(der, public):
        raise UserError("key: does not match the certificate (the certificate is for another key)")
    if leaf.not_valid_after_utc <= now:
        raise UserError(f"cert: expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_before_utc > now:
        raise UserError(f"cert: not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    names = _names(leaf)
    if not any(names_domain(n, domain) for n in names):
        raise UserError(f"cert: is for {', '.join(names) or 'no DNS name'}, not for {domain}")
    return CertInfo(tuple(names), leaf.not_valid_after_utc, len(chain))


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [
            str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
