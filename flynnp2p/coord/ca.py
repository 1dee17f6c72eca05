"""The cluster CA: one certificate authority per cluster, made from its token.

Theory of operation
-------------------
Every node must trust the same CA, and a node joining (or a whole cluster
rebooting) must not depend on any other node being up to get its certificate.
So the CA's private key is *derived* from the cluster token's admin secret
(HKDF-SHA256 → a P-256 scalar), and the CA certificate is built from fixed
fields (subject, serial, validity), on each node alike.  Two nodes' copies of
the CA certificate differ only in their (randomised ECDSA) signature bytes;
chain verification only uses the CA's name and public key, so any copy
verifies any node's leaf.  Whoever holds the token can mint certificates; the
token is the cluster's root secret already (it carries the gossip key and the
API key).

Leaf certificates (etcd peers today, the router's default certificate next)
get a fresh key each, kept in the node's data dir.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The secp256r1 group order: a derived scalar is reduced into [1, n-1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_CA_NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
_CA_NOT_AFTER = dt.datetime(2120, 1, 1, tzinfo=dt.UTC)
LEAF_DAYS = 825


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _ca_key(secret: bytes) -> ec.EllipticCurvePrivateKey:
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=None, info=b"flynnp2p cluster CA v1").derive(
        secret
    )
    scalar = int.from_bytes(okm, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _ca_name(cluster_id: bytes) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flynnp2p"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"flynnp2p cluster CA {cluster_id.hex()[:16]}"),
        ]
    )


class ClusterCA:
    """The CA of the cluster whose token holds ``secret`` and ``cluster_id``."""

    def __init__(self, cluster_id: bytes, secret: bytes) -> None:
        self.key = _ca_key(secret)
        self.name = _ca_name(cluster_id)
        serial = int.from_bytes(hashlib.sha256(b"ca" + cluster_id).digest()[:16], "big") >> 1
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(_CA_NOT_BEFORE)
            .not_valid_after(_CA_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA's public key (the same on every node, unlike the cert bytes)."""
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "sha256:" + hashlib.sha256(der).hexdigest()

    def issue(
        self,
        common_name: str,
        *,
        ips: tuple[str, ...] = (),
        dns: tuple[str, ...] = (),
        now: dt.datetime,
        key_pem: bytes | None = None,
    ) -> Pem:
        """A leaf certificate for servers and clients (etcd peers are both)."""
        if key_pem is not None:
            loaded = serialization.load_pem_private_key(key_pem, password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError("the leaf key must be an EC key")
            key = loaded
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        names += [x509.DNSName(d) for d in dns]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Pem(
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
