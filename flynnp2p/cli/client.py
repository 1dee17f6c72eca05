"""The CLI's side of the API: which cluster to talk to, and a small HTTP client.

Client config (``~/.config/flynnp2p/config.json``, 0600)::

    {"default": "NAME", "clusters": {"NAME": {"url": "...", "token": "...", "ca": "PEM"?}}}

An ``https://`` URL (a node's router, ``--https-port``) is verified against the
cluster CA pinned in ``ca``: derived from a full cluster token, or fetched once
and checked against a fingerprint (`pin_ca`); never the system's CAs.

``FLYNNP2P_URL`` and ``FLYNNP2P_TOKEN`` override the chosen cluster.

Retries
-------
A 503 means the cluster cannot do it *right now*: the leader is changing, quorum
is missing for a moment.  `ApiClient.request` tries again on a 503, after
`RETRY_DELAYS_S` (about 10 s in all), when the request is safe to repeat: GET,
HEAD, PUT and DELETE, and creates sent with `ApiClient.create`, which carry an
``Idempotency-Key`` (one uuid per create, the same on each of its retries) so the
server can answer a repeated create with what it made the first time.  Other
POSTs and PATCHes are sent again only on a 503 that says the cluster did nothing
(``Flynnp2p-Untouched``: no leader to take it, the leader unreachable); any
other 503 may come after the write was made.  On success nothing is printed; if
every try fails, the last answer is the error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from flynnp2p.config import client_config_path, client_env_override, write_secret
from flynnp2p.coord.ca import ClusterCA
from flynnp2p.errors import UNTOUCHED_HEADER, ClusterError, ConfigError, FlynnError, UserError
from flynnp2p.token import ClusterToken, api_key_from


@dataclass
class ClientConfig:
    default: str | None = None
    clusters: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls) -> ClientConfig:
        path = client_config_path()
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
            return cls(raw.get("default"), dict(raw.get("clusters", {})))
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None

    def save(self) -> None:
        path = client_config_path()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_secret(path, json.dumps({"default": self.default, "clusters": self.clusters}, indent=2))

    def ca_of(self, name: str | None = None) -> str | None:
        return self.clusters.get(name or self.default or "", {}).get("ca")

    def target(self, name: str | None = None) -> tuple[str, str]:
        env_url, env_token = client_env_override()
        chosen = name or self.default
        entry = self.clusters.get(chosen or "", {})
        if name and not entry:
            raise UserError(f"no cluster named {name!r} (see 'flynnp2p cluster list')")
        url = env_url or entry.get("url")
        token = env_token or entry.get("token")
        if not url or not token:
            raise UserError(
                "no cluster configured: run 'flynnp2p cluster add --url http://NODE:7100 "
                "--token TOKEN' or set FLYNNP2P_URL and FLYNNP2P_TOKEN"
            )
        return url, token


IDEMPOTENCY_KEY = "Idempotency-Key"
# The pauses before each retry of a 503: 9.75 s in all, which outlasts a leader
# change (a lease of a few seconds plus an election).
RETRY_DELAYS_S: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0)
RETRY_SAFE_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})


def pin_ca(url: str, token: str, fingerprint: str | None) -> str | None:
    """The CA an ``https://`` URL is verified against (None for http://): the cluster
    CA derived from a full token, else the one the node serves at /v1/cluster/ca,
    accepted only if its public key has `fingerprint` (``sha256:HEX``)."""
    if not url.startswith("https://"):
        return None
    if fingerprint is None:
        try:
            t = ClusterToken.parse(token)
        except (UserError, ValueError):
            raise UserError(
                "an https:// URL needs the full cluster token (to derive the cluster CA) or "
                "--ca-fingerprint sha256:HEX (see 'flynnp2p cluster status' on a node)"
            ) from None
        return ClusterCA(t.cluster_id, t.admin_secret).cert_pem.decode()
    try:
        resp = httpx.get(url.rstrip("/") + "/v1/cluster/ca", verify=False, timeout=10)  # checked below
        cert = x509.load_pem_x509_certificate(resp.content)
    except (httpx.HTTPError, ValueError) as exc:
        raise ClusterError(f"cannot fetch the cluster CA from {url}: {exc}") from None
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    seen = "sha256:" + hashlib.sha256(der).hexdigest()
    if not hmac.compare_digest(seen, fingerprint.lower()):
        raise UserError(f"{url} serves a CA with fingerprint {seen}, not {fingerprint}: not trusted")
    return cert.public_bytes(Encoding.PEM).decode()


class ApiClient:
    def __init__(
        self, url: str, token: str, timeout: float = 10.0, *,
        transport: httpx.BaseTransport | None = None, ca: str | None = None,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key_from(token)}"},
            timeout=timeout,
            transport=transport,
            verify=ssl.create_default_context(cadata=ca) if ca else True,
        )
        self.retry_delays_s = tuple(retry_delays_s)
        self.sleep = sleep

    def create(self, path: str, **kwargs: Any) -> Any:
        """POST a create with an idempotency key, so that it may be retried."""
        headers = {**kwargs.pop("headers", {}), IDEMPOTENCY_KEY: str(uuid.uuid4())}
        return self.request("POST", path, headers=headers, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = kwargs.get("headers") or {}
        retry = method.upper() in RETRY_SAFE_METHODS or IDEMPOTENCY_KEY in headers
        delays = iter(self.retry_delays_s)
        while True:
            resp = self._send(method, path, kwargs)
            if resp.status_code != 503:
                return self._answer(resp)
            if not (retry or resp.headers.get(UNTOUCHED_HEADER)):  # it may have been done
                return self._answer(resp)
            delay = next(delays, None)
            if delay is None:
                return self._answer(resp)
            self.sleep(delay)

    def _send(self, method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClusterError(f"cannot reach {self.url}: {str(exc) or type(exc).__name__}") from None

    def _answer(self, resp: httpx.Response) -> Any:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            message = err.get("message") or resp.text.strip() or resp.reason_phrase
            error = FlynnError(f"{self.url} answered {resp.status_code}: {message}")
            error.status = resp.status_code
            raise error
        return body

    def get(self, path: str) -> Any:
        return self.request("GET", path)
