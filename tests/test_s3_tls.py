"""S3 over TLS: the lean PutObject path (``evalsyncd/storage/_s3put.py``) and the SDK beside
it, against SeaweedFS behind a TLS-terminating loopback proxy (``evalsyncd.testing.tls``)
whose certificate, for ``127.0.0.1``, a throwaway CA made at test time signed.

What a user meets: an ``https://`` endpoint with the CA trusted through ``AWS_CA_BUNDLE``
or ``REQUESTS_CA_BUNDLE`` (every request works, the small PUTs on the lean path), without
it (a clear transient error naming the URL, and a daemon that backs off and stays up), a
CA bundle that cannot be loaded (a permanent error naming the file), and the environment's
proxy settings.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yarl

from evalsyncd.errors import PermanentStorageError, TransientStorageError
from evalsyncd.storage import S3Storage
from evalsyncd.storage._s3put import LeanPut
from evalsyncd.testing.proxy import CountingProxy, LoopbackProxy
from evalsyncd.testing.servers import SeaweedS3Server
from evalsyncd.testing.tls import LoopbackCertificates, TlsProxy
from tests.conftest import S3_BUCKET
from tests.daemon import Daemon, wait_mirrored, write_config
from tests.helpers import lean_put_of, wait_for
from tests.opshelpers import evalsyncd as run_cli
from tests.reliability import events

_CA_VARIABLES = ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE")
_PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> LoopbackCertificates:
    """A throwaway CA and a certificate it signed for 127.0.0.1, ::1 and localhost."""
    pytest.importorskip("cryptography", reason="the test CA is made with `cryptography`")
    return LoopbackCertificates.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def untrusting(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CA bundle and no proxy from the developer's environment: botocore's default bundle."""
    for name in (*_CA_VARIABLES, *_PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tls_proxy(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str], certs: LoopbackCertificates
) -> Iterator[TlsProxy]:
    """``https://127.0.0.1:{port}`` in front of SeaweedFS, recording each request's head."""
    with TlsProxy("127.0.0.1", s3_server.port, certs, record_heads=True) as proxy:
        yield proxy


@pytest.mark.parametrize("variable", _CA_VARIABLES)
def test_lean_puts_and_the_sdks_requests_go_over_tls_with_the_ca_trusted(
    tls_proxy: TlsProxy,
    s3_server: SeaweedS3Server,
    certs: LoopbackCertificates,
    untrusting: None,
    monkeypatch: pytest.MonkeyPatch,
    unique_prefix: str,
    variable: str,
) -> None:
    """With the test CA in ``AWS_CA_BUNDLE`` (or ``REQUESTS_CA_BUNDLE``, which the SDK honours
    too) a write, an append at offset 0 and one after it go over TLS on the lean path (no
    request handed to the SDK, ``Host`` with the non-default port), and the SDK's own GETs,
    HEADs and LISTs work over TLS too; the bytes are on the server."""
    monkeypatch.setenv(variable, str(certs.ca_file))
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=tls_proxy.url) as storage:
        storage.write("runs/r/metadata.json", b'{"run_id": "r"}')
        storage.append("runs/r/t.jsonl", b'{"i": 0}\n', offset=0)
        storage.append("runs/r/t.jsonl", b'{"i": 1}\n', offset=9)
        assert storage.read("runs/r/t.jsonl") == b'{"i": 0}\n{"i": 1}\n'
        assert storage.stat("runs/r/metadata.json").size == 15
        assert storage.list_dir("runs/r") == ["metadata.json", "t.jsonl"]
        lean = lean_put_of(storage)
        assert lean is not None and lean.enabled
        assert lean.base_url == f"{tls_proxy.url}/{S3_BUCKET}/"
        assert lean.fallbacks == 0
    assert tls_proxy.heads is not None
    puts = [h for h in tls_proxy.heads if h.method == "PUT"]
    assert len(puts) == 3, tls_proxy.heads
    assert all("amz-sdk-invocation-id" not in h.headers for h in puts), "a PUT went via the SDK"
    assert {h.headers["host"] for h in tls_proxy.heads} == {f"127.0.0.1:{tls_proxy.port}"}
    assert {"GET", "HEAD"} <= {h.method for h in tls_proxy.heads if h not in puts}
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as plain:
        assert plain.read("runs/r/metadata.json") == b'{"run_id": "r"}'


@pytest.mark.parametrize("max_attempts", [1, 2])
def test_an_untrusted_certificate_is_a_transient_error_naming_the_url(
    tls_proxy: TlsProxy, untrusting: None, unique_prefix: str, max_attempts: int
) -> None:
    """Without the test CA (botocore's default bundle) a write fails with a
    TransientStorageError (not a raw ssl.SSLError) that names the object's URL and says the
    certificate was not verified, whether the lean path raises it (``max_attempts = 1``) or
    hands the request to the SDK, which fails the same way; nothing reached the server, and
    the lean path stays on (the SDK could not do better)."""
    with S3Storage(
        S3_BUCKET, unique_prefix, endpoint_url=tls_proxy.url, max_attempts=max_attempts
    ) as storage:
        with pytest.raises(TransientStorageError) as info:
            storage.write("a.json", b"{}")
        lean = lean_put_of(storage)
        assert lean is not None and lean.enabled
        assert lean.fallbacks == (max_attempts > 1)
    message = str(info.value)
    assert message.startswith(f"s3://{S3_BUCKET}/{unique_prefix}/a.json: "), message
    assert "CERTIFICATE_VERIFY_FAILED" in message, message
    assert not isinstance(info.value, ssl.SSLError) and info.value.__cause__ is not None
    assert tls_proxy.requests == 0


@pytest.mark.parametrize("content", [None, b"not a certificate\n"], ids=["missing", "garbage"])
def test_a_ca_bundle_that_cannot_be_loaded_is_a_permanent_error_naming_it(
    tmp_path: Path,
    untrusting: None,
    monkeypatch: pytest.MonkeyPatch,
    content: bytes | None,
) -> None:
    """``AWS_CA_BUNDLE`` naming a file that is missing or holds no certificate fails the
    first request over ``https://`` with a PermanentStorageError (retrying will not help)
    that names the file and the setting, before any connection is made."""
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_bytes(content)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testsecret")
    with (
        S3Storage(S3_BUCKET, "p", endpoint_url="https://127.0.0.1:9") as storage,
        pytest.raises(PermanentStorageError) as info,
    ):
        storage.write("a.json", b"{}")
    assert str(bundle) in str(info.value) and "AWS_CA_BUNDLE" in str(info.value)


class SilentListener(LoopbackProxy):
    """Accepts TCP connections and never says a word (a TLS handshake that never ends)."""

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read()  # until the client gives up


@pytest.mark.parametrize("lean_puts", [True, False], ids=["lean", "sdk"])
def test_a_tls_handshake_that_never_ends_costs_the_connect_timeout(
    untrusting: None, monkeypatch: pytest.MonkeyPatch, lean_puts: bool
) -> None:
    """A server that accepts the connection but never answers the TLS handshake fails a write
    after ``connect_timeout_s`` (the handshake is part of connecting), not ``read_timeout_s``,
    on the lean path as through the SDK: a TransientStorageError naming the object."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testsecret")
    with SilentListener("127.0.0.1", 9) as silent:
        endpoint = f"https://127.0.0.1:{silent.port}"
        storage = S3Storage(
            S3_BUCKET,
            "p",
            endpoint_url=endpoint,
            max_attempts=1,
            connect_timeout_s=0.3,
            read_timeout_s=30.0,
            lean_puts=lean_puts,
        )
        started = time.monotonic()
        with storage, pytest.raises(TransientStorageError) as info:
            storage.write("a.json", b"{}")
        assert time.monotonic() - started < 10.0  # read_timeout_s is 30 s
    assert str(info.value).startswith(f"s3://{S3_BUCKET}/p/a.json: "), str(info.value)


@pytest.mark.parametrize(
    ("base_url", "host"),
    [
        ("https://127.0.0.1:8443/b/", "127.0.0.1:8443"),
        ("https://s3.example.com:443/b/", "s3.example.com"),
        ("http://s3.example.com:80/b/", "s3.example.com"),
        ("http://s3.example.com:443/b/", "s3.example.com:443"),
        ("https://[::1]:9000/b/", "[::1]:9000"),
        ("https://B.S3.Example.com/", "b.s3.example.com"),
    ],
)
def test_the_lean_host_header_is_the_one_botocore_signs(base_url: str, host: str) -> None:
    """The ``Host`` the lean path signs and sends is the one botocore signs for that URL:
    the port only when it is not the scheme's default, the name in lower case."""
    from botocore.auth import _host_from_url

    lean = LeanPut(base_url, "us-east-1", None, None, "ua")  # type: ignore[arg-type]
    assert lean._signer.host == host == _host_from_url(base_url)


@pytest.mark.parametrize(
    ("bucket", "region", "base_url"),
    [
        ("bucket1", "eu-west-3", "https://bucket1.s3.eu-west-3.amazonaws.com/"),
        ("bucket1", "us-east-1", "https://bucket1.s3.amazonaws.com/"),
        ("my.bucket", "ap-east-1", "https://s3.ap-east-1.amazonaws.com/my.bucket/"),
    ],
)
def test_the_lean_url_on_aws_is_the_regional_one_the_sdk_sends_to(
    untrusting: None, monkeypatch: pytest.MonkeyPatch, bucket: str, region: str, base_url: str
) -> None:
    """On AWS (no ``endpoint_url``) the lean path sends to the host the SDK's own requests go
    to, the region's (a presigned URL has the global ``bucket.s3.amazonaws.com``), path-style
    for a bucket with dots (TLS wildcard certificates); taking it sends nothing (a proxy
    where nothing listens would fail any request)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testsecret")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # the test servers' (cloud_env)
        monkeypatch.delenv(name, raising=False)
    with S3Storage(bucket, "p", region=region) as storage:
        lean = lean_put_of(storage)
        assert lean is not None and lean.base_url == base_url and lean.region == region


def test_no_proxy_keeps_the_lean_path_direct_and_a_proxy_is_read_once(
    tls_proxy: TlsProxy,
    certs: LoopbackCertificates,
    untrusting: None,
    monkeypatch: pytest.MonkeyPatch,
    unique_prefix: str,
) -> None:
    """With ``HTTPS_PROXY`` at a port where nothing listens and ``NO_PROXY=127.0.0.1`` the lean
    path (and the SDK) go straight to the endpoint over TLS; without ``NO_PROXY`` the lean path
    resolves, when the client opens, the proxy and its credentials from the URL."""
    monkeypatch.setenv("AWS_CA_BUNDLE", str(certs.ca_file))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=tls_proxy.url) as storage:
        storage.write("a.json", b"{}")
        lean = lean_put_of(storage)
        assert lean is not None and lean._proxy is None and lean.fallbacks == 0
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", "http://user:secret@proxy.invalid:3128")
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=tls_proxy.url) as storage:
        lean = lean_put_of(storage)
        assert lean is not None
        assert lean._proxy == yarl.URL("http://proxy.invalid:3128")
        assert lean._connect_headers is not None and not lean._request_headers
        assert base64.b64decode(
            lean._connect_headers["Proxy-Authorization"].removeprefix("Basic ")
        ).startswith(b"user:")


class ConnectProxy(LoopbackProxy):
    """An HTTP proxy that only tunnels (``CONNECT``), always to ``target_host:target_port``;
    :attr:`tunnels` lists the ``host:port`` each ``CONNECT`` asked for. With
    :attr:`server_ssl` set it is an ``https://`` proxy (TLS to the proxy, TLS inside)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.tunnels: list[str] = []
        self.requests: list[str] = []
        """Every request line received (``CONNECT`` or not)."""

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        self.requests.append(head.split("\r\n", 1)[0])
        method, target, _version = head.split("\r\n", 1)[0].split(" ")
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        self.tunnels.append(target)
        upstream_r, upstream_w = await self.open_upstream()
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()
            with contextlib.suppress(OSError, RuntimeError):
                if dst.can_write_eof():
                    dst.write_eof()

        try:
            await asyncio.gather(pump(reader, upstream_w), pump(upstream_r, writer))
        finally:
            self.close_upstream(upstream_w)


@pytest.mark.parametrize("form", ["http://", "", "https://"], ids=["http", "no-scheme", "https"])
def test_the_lean_path_goes_through_the_sdks_https_proxy(
    tls_proxy: TlsProxy,
    certs: LoopbackCertificates,
    untrusting: None,
    monkeypatch: pytest.MonkeyPatch,
    unique_prefix: str,
    form: str,
) -> None:
    """``HTTPS_PROXY`` as ``http://host:port``, as ``host:port`` (botocore reads it as
    http://) or as ``https://host:port`` (TLS to the proxy): the lean path tunnels through
    the same proxy as the SDK, to the endpoint over TLS, with no request handed to the SDK."""
    connect = ConnectProxy("127.0.0.1", tls_proxy.port)
    if form == "https://":
        connect.server_ssl = certs.server_context()
    with connect:
        monkeypatch.setenv("AWS_CA_BUNDLE", str(certs.ca_file))
        monkeypatch.setenv("HTTPS_PROXY", f"{form}127.0.0.1:{connect.port}")
        with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=tls_proxy.url) as storage:
            storage.write("a.json", b"{}")
            storage.append("b.jsonl", b"1\n", offset=0)
            assert storage.read("b.jsonl") == b"1\n"
            lean = lean_put_of(storage)
            assert lean is not None and lean.fallbacks == 0
            assert str(lean._proxy) == f"{form or 'http://'}127.0.0.1:{connect.port}"
    assert connect.tunnels and set(connect.tunnels) == {f"127.0.0.1:{tls_proxy.port}"}
    assert tls_proxy.heads is not None
    puts = [h for h in tls_proxy.heads if h.method == "PUT"]
    assert len(puts) == 2 and all("amz-sdk-invocation-id" not in h.headers for h in puts)


def test_an_https_proxy_in_front_of_an_http_endpoint_is_verified_on_every_path(
    s3_server: SeaweedS3Server,
    cloud_env: dict[str, str],
    certs: LoopbackCertificates,
    untrusting: None,
    monkeypatch: pytest.MonkeyPatch,
    unique_prefix: str,
) -> None:
    """``HTTP_PROXY=https://user:secret@...`` for a plain-HTTP endpoint, the proxy's
    certificate not trusted: the TLS hop to the proxy is verified on the lean path as in
    the SDK, so the write fails with a clear error and the proxy never receives a
    request (nor the credentials in its URL)."""
    proxy = ConnectProxy("127.0.0.1", s3_server.port)
    proxy.server_ssl = certs.server_context()
    with proxy:
        monkeypatch.setenv("HTTP_PROXY", f"https://user:secret@127.0.0.1:{proxy.port}")
        with (
            S3Storage(
                S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url, max_attempts=1
            ) as storage,
            pytest.raises(TransientStorageError),
        ):
            storage.write("a.json", b"{}")
    assert proxy.requests == []


def test_an_http_proxy_with_credentials_gets_them_on_every_lean_put(
    s3_server: SeaweedS3Server,
    cloud_env: dict[str, str],
    untrusting: None,
    monkeypatch: pytest.MonkeyPatch,
    unique_prefix: str,
) -> None:
    """``HTTP_PROXY=http://user:secret@...`` for a plain-HTTP endpoint: each lean PUT goes
    to the proxy in absolute form with the proxy's credentials (``Proxy-Authorization``),
    as the SDK's requests do, and none is handed to the SDK."""
    with CountingProxy("127.0.0.1", s3_server.port, record_heads=True) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://user:secret@127.0.0.1:{proxy.port}")
        with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as storage:
            storage.write("a.json", b"{}")
            storage.write("b.json", b"[]")
            lean = lean_put_of(storage)
            assert lean is not None and lean.fallbacks == 0
    assert proxy.heads is not None
    puts = [h for h in proxy.heads if h.method == "PUT"]
    want = "Basic " + base64.b64encode(b"user:secret").decode()
    assert len(puts) == 2 and all(h.headers.get("proxy-authorization") == want for h in puts)


def test_a_daemon_without_the_ca_backs_off_and_ships_once_restarted_with_it(
    tmp_path: Path,
    tls_proxy: TlsProxy,
    s3_server: SeaweedS3Server,
    certs: LoopbackCertificates,
    untrusting: None,
    unique_prefix: str,
) -> None:
    """A daemon whose S3 endpoint's certificate it does not trust does not crash: the
    destination backs off, the log and `status` say the certificate was not verified, and
    it stops cleanly; started again with ``AWS_CA_BUNDLE`` it mirrors the run over TLS."""
    root = tmp_path / "root"
    (root / "runs/r1").mkdir(parents=True)
    (root / "runs/r1/metadata.json").write_text(json.dumps({"run_id": "r1", "model_name": "m"}))
    (root / "runs/r1/t.jsonl").write_text('{"i": 0}\n{"i": 1}\n')
    dest = {
        "name": "s3",
        "url": f"s3://{S3_BUCKET}/{unique_prefix}",
        "endpoint_url": tls_proxy.url,
        "max_attempts": 1,
        "retry": {"initial_backoff_s": 0.2, "max_backoff_s": 0.5, "connect_timeout_s": 2.0},
    }
    cfg = write_config(tmp_path / "config.toml", root, tmp_path / "state", [dest])

    def refused_twice(daemon: Daemon) -> bool:
        failed = [
            e
            for e in events(daemon, "pass_failed")
            if "CERTIFICATE_VERIFY_FAILED" in str(e.get("error"))
        ]
        return len(failed) >= 2

    with Daemon(cfg, tmp_path / "untrusting.log") as daemon:
        wait_for(lambda: refused_twice(daemon), timeout_s=30, what="failed passes, backed off")
        assert daemon.alive()
        status = run_cli("status", "--config", str(cfg))
        assert "backoff" in status.stdout and "CERTIFICATE_VERIFY_FAILED" in status.stdout, (
            status.stdout
        )
        assert daemon.terminate() == 0
    assert tls_proxy.requests == 0
    reader = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url)
    env = {"AWS_CA_BUNDLE": str(certs.ca_file)}
    with Daemon(cfg, tmp_path / "trusting.log", env=env) as daemon, reader:
        wait_mirrored(root, reader, timeout_s=60)
        assert daemon.alive()
