"""Sticky sessions: a cookie that names the backend a client keeps (pure).

A route with ``sticky`` answers a client that brings no valid cookie with
``Set-Cookie: flynnp2p-sticky=<job id>.<signature>`` naming the job that served
it; the next request goes to that job while it takes traffic and is not skipped
for failing (else to another, which then gets a new cookie). The signature is an
HMAC-SHA256 (`cryptography`) over the route id and job id, with a key every
router derives alike from the cluster's secret (HKDF), so a cookie from one node
is good on every node, cannot be forged, and cannot name a job of another route.
A cookie that fails any check is ignored, never an error.
"""

from __future__ import annotations

import base64
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

COOKIE = b"flynnp2p-sticky"
_SIG_BYTES = 16
_MAX_JOB_ID = 128


def derive_key(secret: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"flynnp2p sticky v1").derive(secret)


def _signature(key: bytes, route_id: str, job_id: str) -> bytes:
    mac = HMAC(key, hashes.SHA256())
    mac.update(route_id.encode() + b"\x00" + job_id.encode())
    return base64.urlsafe_b64encode(mac.finalize()[:_SIG_BYTES]).rstrip(b"=")


def set_cookie(key: bytes, route_id: str, job_id: str, secure: bool) -> bytes:
    """The ``Set-Cookie`` header line naming `job_id` for `route_id`."""
    value = job_id.encode() + b"." + _signature(key, route_id, job_id)
    attrs = b"; Path=/; HttpOnly; SameSite=Lax" + (b"; Secure" if secure else b"")
    return b"Set-Cookie: " + COOKIE + b"=" + value + attrs + b"\r\n"


def job_of(lines: list[bytes], key: bytes, route_id: str) -> str | None:
    """The job a request's cookie names for `route_id`, if the signature holds."""
    for line in lines:
        name, _, value = line.partition(b":")
        if name.strip().lower() != b"cookie":
            continue
        for pair in value.split(b";"):
            k, eq, v = pair.strip().partition(b"=")
            if not eq or k != COOKIE:
                continue
            job, dot, sig = v.strip().rpartition(b".")
            if not dot or not job or len(job) > _MAX_JOB_ID or not job.isascii():
                continue
            job_id = job.decode("ascii")
            if hmac.compare_digest(sig, _signature(key, route_id, job_id)):
                return job_id
    return None
