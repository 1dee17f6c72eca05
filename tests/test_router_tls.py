"""TLS over the router's sockets: SNI picks the certificate, bytes pass both ways."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

import httpx
import trio
import trio.lowlevel

from flynnp2p.coord.ca import ClusterCA
from flynnp2p.router.sock import Sock
from flynnp2p.router.tls import CertStore, StoredCert, TlsSock
from flynnp2p.token import ClusterToken
from tests.certs import make_cert

TOKEN = ClusterToken.generate()
CA = ClusterCA(TOKEN.cluster_id, TOKEN.admin_secret)
NOW = dt.datetime.now(dt.UTC)


def store() -> CertStore:
    cert, key = make_cert("shop.example.org", days=(-1, 30), at=NOW)
    wild, wkey = make_cert("*.example.net", days=(-1, 30), at=NOW)
    s = CertStore(CA, "flynnp2p.localhost", NOW)
    s.update([StoredCert("c1", ("shop.example.org",), cert, key), StoredCert("c2", ("*.example.net",), wild, wkey)])
    return s


async def serve_once(listener: socket.socket, certs: CertStore, got: list[bytes]) -> None:
    await trio.lowlevel.wait_readable(listener)
    conn, _ = listener.accept()
    tls = TlsSock(Sock(conn), certs.default)
    try:
        await tls.handshake()
        data = await tls.recv()
        got.append(data)
        await tls.sendall(b"echo:" + data)
        tls.shutdown_write()
        got.append(await tls.recv())  # the client's end
    finally:
        tls.close()


async def client(port: int, server_name: str, verify: ssl.SSLContext) -> tuple[bytes, dict[str, object]]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, verify, server_hostname=server_name)
    await tls.do_handshake()
    peer = tls.getpeercert()
    assert tls.selected_alpn_protocol() == "http/1.1"
    await tls.send_all(b"hello")
    answer = b""
    while len(answer) < len(b"echo:hello"):
        answer += await tls.receive_some(100)
    await tls.aclose()
    return answer, peer


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(5)
    s.setblocking(False)
    return s


def trusting(pem: bytes | str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pem.decode() if isinstance(pem, bytes) else pem)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def test_the_default_certificate_is_the_cluster_cas_for_the_cluster_domain() -> None:
    certs = store()
    with listener() as lst:
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_once, lst, certs, got)
            answer, peer = await client(lst.getsockname()[1], "hello.flynnp2p.localhost", trusting(CA.cert_pem))
        assert answer == b"echo:hello" and got == [b"hello", b""]
        assert ("DNS", "*.flynnp2p.localhost") in peer["subjectAltName"]  # type: ignore[operator]


async def test_sni_picks_a_routes_certificate_exact_or_wildcard() -> None:
    certs = store()
    for name, cid in (("shop.example.org", "c1"), ("a.example.net", "c2")):
        pem = certs.by_id[cid][0].cert_pem
        with listener() as lst:
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_once, lst, certs, got)
                answer, _ = await client(lst.getsockname()[1], name, trusting(pem))
            assert answer == b"echo:hello"


async def test_a_failed_handshake_is_an_error_not_a_hang() -> None:
    certs = store()
    with listener() as lst:
        async def plain_client() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", lst.getsockname()[1])
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(plain_client)
            await trio.lowlevel.wait_readable(lst)
            conn, _ = lst.accept()
            tls = TlsSock(Sock(conn), certs.default)
            try:
                with trio.fail_after(5):
                    try:
                        await tls.handshake()
                    except (ssl.SSLError, OSError) as exc:
                        assert exc
                    else:
                        raise AssertionError("plain HTTP passed a TLS handshake")
            finally:
                tls.close()


def test_a_certificate_that_no_longer_loads_is_reported_not_fatal() -> None:
    certs = store()
    certs.update([StoredCert("bad", ("x.example",), "-----BEGIN CERTIFICATE-----\nnope\n", "x")])
    assert "bad" in certs.errors and "bad" not in certs.by_id
    assert certs.context_for("x.example") is certs.default
    assert set(certs.status()["certificates"]) == set()  # type: ignore[arg-type]


async def test_https_through_the_router_by_sni_with_keep_alive_and_https_only() -> None:
    from flynnp2p.router.service import Router
    from flynnp2p.watch import Watched
    from tests.test_router_helpers import LOCAL, HttpBackend, route, table_of

    certs = store()
    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        address = await backend.start(nursery)
        table = table_of(
            [route("r1", "hello.flynnp2p.localhost"), route("r2", "shop.example.org", https_only=True)],
            {("app1", "web"): [address]},
        )
        router = Router(Watched(table), address=LOCAL, http_port=0, https_port=0, certs=certs, seed=1)
        http_port = await nursery.start(router.run)
        https_port = router.bound_https_port
        assert https_port
        ca = trusting(CA.cert_pem)
        async with httpx.AsyncClient(verify=ca) as client:
            # The server name comes from the sni_hostname extension; the address is loopback.
            for name in ("hello.flynnp2p.localhost", "hello.flynnp2p.localhost"):  # one connection, twice
                r = await client.get(
                    f"https://{LOCAL}:{https_port}/headers", headers={"Host": name},
                    extensions={"sni_hostname": name},
                )
                assert r.status_code == 200
                h = {n.lower(): v for n, v in r.json()["headers"]}
                assert h["x-forwarded-proto"] == "https" and h["x-forwarded-port"] == str(https_port)
            r = await client.get(
                f"http://{LOCAL}:{http_port}/a?b=1", headers={"Host": "shop.example.org:8080"}
            )
            assert r.status_code == 308
            assert r.headers["location"] == f"https://shop.example.org:{https_port}/a?b=1"
        shop_ca = trusting(certs.by_id["c1"][0].cert_pem)
        async with httpx.AsyncClient(verify=shop_ca) as client:
            r = await client.get(
                f"https://{LOCAL}:{https_port}/", headers={"Host": "shop.example.org"},
                extensions={"sni_hostname": "shop.example.org"},
            )
            assert r.status_code == 200
        # Plain HTTP on the HTTPS port is a failed handshake, counted; the listener lives on.
        await trio.lowlevel.checkpoint()
        stream = await trio.open_tcp_stream(LOCAL, https_port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            while await stream.receive_some(100):
                pass
        await stream.aclose()
        assert router.status()["tls"]["handshake_failures"] == 1  # type: ignore[index]
        nursery.cancel_scope.cancel()


async def openssl_get(port: int, name: str, ca_file: str) -> str:
    """`openssl s_client -servername NAME`, verifying against `ca_file`, one GET."""
    request = f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
    with trio.fail_after(20):
        done = await trio.run_process(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name,
             "-CAfile", ca_file, "-verify_return_error", "-ign_eof", "-alpn", "http/1.1"],
            stdin=request, capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


async def test_two_certificates_on_one_port_by_sni_with_openssl_s_client_through_workers(
    tmp_path: Path,
) -> None:
    """Router workers are handed the certificates (PEM, the default one included) and
    serve each by SNI; a certificate added later reaches them too."""
    from flynnp2p.router.workers import RouterWorkers
    from flynnp2p.watch import Watched
    from tests.test_router_helpers import LOCAL, HttpBackend, route, table_of

    shop, shop_key = make_cert("shop.example.org", days=(-1, 30), at=NOW)
    blog, blog_key = make_cert("blog.example.com", days=(-1, 30), at=NOW)
    later, later_key = make_cert("later.example.com", days=(-1, 30), at=NOW)
    for name, pem in (("shop", shop), ("blog", blog), ("later", later), ("ca", CA.cert_pem)):
        (tmp_path / f"{name}.pem").write_text(pem if isinstance(pem, str) else pem.decode())
    certs = CertStore(CA, "flynnp2p.localhost", NOW)
    certs.update([StoredCert("c1", ("shop.example.org",), shop, shop_key),
                  StoredCert("c2", ("blog.example.com",), blog, blog_key)])  # fmt: skip

    class NoLines:
        async def write(self, app: str, job_id: str, lines: object) -> None:
            pass

    async with trio.open_nursery() as nursery:
        backend = HttpBackend("b")
        address = await backend.start(nursery)
        names = ("shop.example.org", "blog.example.com", "later.example.com", "hello.flynnp2p.localhost")
        table = Watched(table_of([route(f"r{i}", n) for i, n in enumerate(names)], {("app1", "web"): [address]}))
        workers = RouterWorkers(2, table, address=LOCAL, http_port=0, https_port=0, certs=certs,
                                log_writer=NoLines(), sticky_key=b"k" * 32)  # fmt: skip
        await nursery.start(workers.run)
        port = workers.bound_https_port
        assert port
        for name, ca in (("shop.example.org", "shop"), ("blog.example.com", "blog"),
                         ("hello.flynnp2p.localhost", "ca")):  # fmt: skip
            for _ in range(3):  # new connections: both workers answer
                out = await openssl_get(port, name, str(tmp_path / f"{ca}.pem"))
                assert "Verify return code: 0 (ok)" in out, out
                assert f"CN = {name}" in out or f"CN={name}" in out or ca == "ca", out
                assert "ALPN protocol: http/1.1" in out and "hello from b" in out, out
        # The wrong certificate for the name does not verify against another's.
        out = await openssl_get(port, "shop.example.org", str(tmp_path / "blog.pem"))
        assert "Verify return code: 0 (ok)" not in out
        # Until its certificate arrives, later.example.com gets the default one.
        out = await openssl_get(port, "later.example.com", str(tmp_path / "later.pem"))
        assert "Verify return code: 0 (ok)" not in out
        certs.update([*(c for c, _ in certs.by_id.values()),
                      StoredCert("c3", ("later.example.com",), later, later_key)])  # fmt: skip
        with trio.fail_after(10):
            while True:
                outs = [await openssl_get(port, "later.example.com", str(tmp_path / "later.pem")) for _ in range(4)]
                if all("Verify return code: 0 (ok)" in o for o in outs):
                    break
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
