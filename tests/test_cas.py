"""The command line's aiohttp loads CA certificates only when a request may need them
(``evalsyncd/storage/_cas.py``); the library's loads them as aiohttp does.

Each case runs in a fresh interpreter: what is checked happens when aiohttp is imported.
The verifying context is tried against a TLS server whose CA is the only one the system
default paths name (``SSL_CERT_FILE``): before the load its handshake fails, after it
the request goes through.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from evalsyncd.testing.servers import SeaweedS3Server
from evalsyncd.testing.tls import LoopbackCertificates, TlsProxy

_PROBE = textwrap.dedent(
    """
    import asyncio, json, ssl, sys
    from evalsyncd.storage._cas import defer_default_cas, load_default_cas

    if sys.argv[1] == "cli":
        defer_default_cas()
    elif sys.argv[1] == "main":  # the command line called from another program
        from evalsyncd.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
    from evalsyncd.storage import S3Storage  # imports aiohttp through aiobotocore
    import aiohttp, aiohttp.connector as connector

    async def get(url):
        try:
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                return f"HTTP {r.status}"
        except aiohttp.ClientConnectorCertificateError as exc:
            return "certificate refused"

    out = {
        "loader": type(connector.__loader__).__name__,
        "unverified": connector._SSL_CONTEXT_UNVERIFIED.verify_mode == ssl.CERT_NONE,
        "before": connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
        "get_before": asyncio.run(get(sys.argv[2])),
    }
    if sys.argv[3] == "gcs":
        from evalsyncd.storage import GCSStorage

        async def gcs_session():  # a GCS client's requests use the default context
            await GCSStorage("bucket", "prefix")._new_session().close()

        asyncio.run(gcs_session())
    else:
        load_default_cas()
    out["after"] = connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"]
    out["get_after"] = asyncio.run(get(sys.argv[2]))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> LoopbackCertificates:
    pytest.importorskip("cryptography", reason="the test CA is made with `cryptography`")
    return LoopbackCertificates.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def https_url(s3_server: SeaweedS3Server, certs: LoopbackCertificates) -> Iterator[str]:
    with TlsProxy("127.0.0.1", s3_server.port, certs) as proxy:
        yield f"https://127.0.0.1:{proxy.port}/"


def _probe(mode: str, url: str, then: str, ca_file: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_DIR", "SSL_CERT_FILE")}
    env["SSL_CERT_FILE"] = str(ca_file)  # the system default paths: the test CA alone
    env["SSL_CERT_DIR"] = str(ca_file.parent / "no-such-dir")
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, url, then],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])  # after any --help
    return result


@pytest.mark.parametrize("then", ["load", "gcs"])
def test_the_command_line_loads_ca_certificates_only_when_a_request_may_need_them(
    https_url: str, certs: LoopbackCertificates, then: str
) -> None:
    """Deferred: the verifying context holds no CA, so a request through it is refused
    (never sent unverified); once loaded (directly, or by making a GCS client) it holds
    the system's CAs and the same request goes through. The module's loader is the
    usual one."""
    out = _probe("cli", https_url, then, certs.ca_file)
    assert out["loader"] == "SourceFileLoader"
    assert out["unverified"] is True
    assert out["before"] == 0
    assert out["get_before"] == "certificate refused"
    assert out["after"] == 1
    assert str(out["get_after"]).startswith("HTTP ")


@pytest.mark.parametrize("mode", ["library", "main"])
def test_the_library_loads_them_as_aiohttp_does(
    https_url: str, certs: LoopbackCertificates, mode: str
) -> None:
    """Without the command line's opt-in (an application using ``EvalStore``, or calling
    ``evalsyncd.cli.main``), aiohttp's verifying context has the system's CAs from its
    import on: the application's own requests work as without evalsyncd."""
    out = _probe(mode, https_url, "load", certs.ca_file)
    assert out["before"] == 1
    assert str(out["get_before"]).startswith("HTTP ")


def test_the_console_script_defers_them() -> None:
    """``evalsyncd`` (the console script, and ``python -m evalsyncd``) opts in before its
    command runs; the class it patched for the import is left as it was."""
    script = textwrap.dedent(
        """
        import ssl, sys
        import evalsyncd.cli as cli

        def command():
            from evalsyncd.storage import S3Storage
            import aiohttp.connector as connector
            stats = connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"]
            untouched = "set_default_verify_paths" not in vars(ssl.SSLContext)
            print(stats, untouched)
            return 0

        cli.main = command
        cli.entrypoint()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True"]
