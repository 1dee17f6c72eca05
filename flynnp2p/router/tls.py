"""HTTPS for the router: certificates chosen by SNI, and TLS over the router's sockets.

Theory of operation
-------------------
`CertStore` holds one `ssl.SSLContext` per certificate: the default one, for
``*.<cluster domain>`` and ``<cluster domain>``, issued by the cluster CA
(`flynnp2p.coord.ca`, the same CA on every node, so a client that pins it trusts
every node's router), and one per `Certificate` record that routes bring. The
TLS handshake's server name picks one (`context_for`): a certificate naming the
exact domain, else one whose ``*.`` wildcard covers it, else the default. The
store is rebuilt from the state's certificate records when they change
(`update`); contexts of certificates that did not change are kept. Only ALPN
``http/1.1`` is offered. A record whose PEM no longer loads (it was checked when
its route was added, `flynnp2p.tls`) is left out and reported in `errors`,
never taking the listener down.

`TlsSock` gives the proxy the same interface as `flynnp2p.router.sock.Sock`
(recv, sendall, send_nowait, shutdown_write, close), over an
`ssl.SSLObject` with memory BIOs on a plain `Sock`: TLS records are read and
written with the router's own non-blocking I/O, and the proxy does not know it
is speaking TLS. One task may receive while another sends (a tunnel does):
ciphertext leaves through one lock, so records are never interleaved.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import ssl
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import trio

from flynnp2p.coord.ca import ClusterCA, Pem
from flynnp2p.router.sock import RECV_SIZE, Sock
from flynnp2p.tls import names_domain

HANDSHAKE_TIMEOUT_S = 10.0


def _context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context for one certificate (the ssl module loads chains from files
    only: they are written 0600 to a private directory and removed at once)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_COMPRESSION
    with tempfile.TemporaryDirectory(prefix="flynnp2p-tls-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


@dataclass(frozen=True)
class StoredCert:
    """What the store needs of a `Certificate` record."""

    id: str
    domains: tuple[str, ...]
    cert_pem: str
    key_pem: str


@dataclass
class CertStore:
    ca: ClusterCA
    domain: str
    now: dt.datetime | None = None  # when the default certificate is issued (None: now)
    ips: tuple[str, ...] = ()  # this node's addresses, named by its default certificate too
    default: ssl.SSLContext = field(init=False)
    default_pem: Pem = field(init=False)  # what router workers are handed (`router.handover`)
    by_id: dict[str, tuple[StoredCert, ssl.SSLContext]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._issue_default()

    def _issue_default(self) -> None:
        now = self.now or dt.datetime.now(dt.UTC)
        pem = self.ca.issue(
            f"*.{self.domain}", dns=(f"*.{self.domain}", self.domain), ips=self.ips, now=now
        )
        self.default, self.default_pem = _context(pem.cert, pem.key), pem
        self.default.sni_callback = self._pick

    def update(self, certs: Iterable[StoredCert], domain: str | None = None) -> None:
        """The certificates of the state now; unchanged ones keep their context.
        A new cluster `domain` gets a new default certificate."""
        if domain is not None and domain != self.domain:
            self.domain, self.now = domain, None
            self._issue_default()
        wanted = {c.id: c for c in certs}
        for cid in list(self.by_id):
            if cid not in wanted or self.by_id[cid][0] != wanted[cid]:
                del self.by_id[cid]
        self.errors = {k: v for k, v in self.errors.items() if k in wanted}
        for cid, cert in wanted.items():
            if cid in self.by_id or self.errors.get(cid):
                continue
            try:
                self.by_id[cid] = (cert, _context(cert.cert_pem.encode(), cert.key_pem.encode()))
            except (ssl.SSLError, ValueError, OSError) as exc:
                self.errors[cid] = f"cannot load certificate {cid}: {exc.__class__.__name__}"

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        wildcard = None
        for cert, ctx in self.by_id.values():
            if name in cert.domains:
                return ctx
            if wildcard is None and any(names_domain(d, name) for d in cert.domains):
                wildcard = ctx
        return wildcard or self.default

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        chosen = self.context_for(server_name)
        if chosen is not self.default:
            sslobj.context = chosen

    def status(self) -> Mapping[str, object]:
        return {
            "default": [f"*.{self.domain}", self.domain],
            "certificates": {cid: list(c.domains) for cid, (c, _) in sorted(self.by_id.items())},
            "errors": dict(sorted(self.errors.items())),
        }


class TlsSock:
    """TLS over a `Sock`, with the `Sock` interface (see the module docstring)."""

    __slots__ = ("_in", "_out", "_send_lock", "closed", "raw", "tls")

    def __init__(self, raw: Sock, ctx: ssl.SSLContext) -> None:
        self.raw = raw
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._send_lock = trio.StrictFIFOLock()
        self.closed = False

    async def _flush(self) -> None:
        if self._out.pending:
            async with self._send_lock:
                data = self._out.read()
                if data:
                    await self.raw.sendall(data)

    async def _fill(self) -> bool:
        """More ciphertext from the peer; False at its end of stream."""
        data = await self.raw.recv()
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        """Raises `ssl.SSLError` or OSError on a failed handshake, or trio.TooSlowError."""
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._flush()
                    if not await self._fill():
                        raise ConnectionResetError("the client closed during the TLS handshake") from None
            await self._flush()

    async def recv(self, size: int = RECV_SIZE) -> bytes:
        while True:
            try:
                data = self.tls.read(size)
            except ssl.SSLWantReadError:
                await self._flush()  # post-handshake messages (session tickets)
                if not await self._fill():
                    return b""  # the peer ended without close_notify: the end all the same
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as exc:
                raise ConnectionResetError(f"TLS: {exc.reason or exc}") from None
            await self._flush()
            return data

    async def sendall(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.tls.write(data)
        except ssl.SSLError as exc:
            raise ConnectionResetError(f"TLS: {exc.reason or exc}") from None
        await self._flush()

    def send_nowait(self, data: bytes) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            self.tls.write(data)
            self.raw.send_nowait(self._out.read())

    def shutdown_write(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            with contextlib.suppress(ssl.SSLWantReadError):
                self.tls.unwrap()
            self.raw.send_nowait(self._out.read())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.raw.close()
