"""Small ``PutObject`` requests without the SDK's request pipeline.

A backfill is a stream of small ``PutObject`` requests, and the tail log is
too. Through aiobotocore each costs about 0.8 ms of CPU on the machines we
measure (``docs/decisions/s3-client.md``), of which signing is a tenth: the
rest is the SDK's event hooks, endpoint rules, parameter validation and
response parsing, the same for every request to one bucket. :class:`LeanPut`
sends the request itself and keeps the parts that matter from the libraries:

- the URL is the SDK's: taken once per client from a ``PutObject`` the SDK
  builds and signs but never sends (a ``before-send`` hook stops it), so the
  endpoint rules (the region's endpoint, not the global one a presigned URL
  has) and the addressing style are botocore's; the key is encoded as botocore encodes it
  (``percent_encode``, ``/`` and ``~`` kept); the region is the client's;
- the signature is AWS Signature Version 4 by awscrt (:class:`SigV4`), the signer
  botocore uses itself when awscrt is installed, over the client's own
  credentials, refreshed as the SDK refreshes them;
- the bytes go through aiohttp (the SDK's transport), with the client's
  connect and read timeouts, its CA bundle (:func:`ca_bundle`: ``AWS_CA_BUNDLE``
  or ``ca_bundle``, else ``REQUESTS_CA_BUNDLE``, as botocore resolves it; the
  server's name or IP address checked against its certificate) and the
  environment's proxy (``HTTP(S)_PROXY``, ``NO_PROXY``, as botocore reads
  them, once, when the client opens);
- every body carries ``x-amz-checksum-crc32c`` (base64 of the big-endian
  CRC32C, the ``crc32c`` package), which the server verifies, as the SDK's
  ``ChecksumAlgorithm="CRC32C"`` does.

Only answers that need no judgement are taken here: a 2xx with an ETag (and
a CRC32C, if the server sends one, equal to ours), or a precondition failure
(412, 409 ``ConditionalRequestConflict``). Anything else (a network error, a
timeout, a 5xx, a throttle, a denial, a redirect) returns ``None`` and the
caller sends the request again through the SDK, whose standard retry mode,
error parsing and translation then decide: this attempt comes on top of the
SDK's ``max_attempts``. With ``max_attempts = 1`` (no retries wanted) the
failure is raised instead, translated by :func:`~._s3errors.translate`. An
answer that is not transient (a redirect to another region, a refused
signature, a denial) also turns the path off for the client
(:attr:`LeanPut.enabled`), logged once as ``s3_lean_put_off``. Bodies above
:data:`MAX_BYTES` always go through the SDK (which then uses
``Expect: 100-continue``).

Measured in one process, 900-byte objects, 8 in flight, SeaweedFS on loopback:
0.31 to 0.33 ms of CPU per request this way, 1.09 to 1.12 ms through the SDK
(``docs/decisions/s3-client.md``, addendum).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import os
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import botocore.exceptions as bexc
import crc32c
import structlog
import yarl
from aiohttp.helpers import strip_auth_from_url
from awscrt.auth import (
    AwsCredentialsProvider,
    AwsSignatureType,
    AwsSignedBodyHeaderType,
    AwsSigningAlgorithm,
    AwsSigningConfig,
    aws_sign_request,
)
from awscrt.http import HttpHeaders, HttpRequest
from botocore.awsrequest import HeadersDict
from botocore.httpsession import ProxyConfiguration, get_cert_path
from botocore.parsers import create_parser
from botocore.utils import get_environ_proxies, percent_encode

from evalsyncd.errors import PermanentStorageError, ServerBehaviourError, TransientStorageError
from evalsyncd.storage._s3errors import error_code, required_etag, translate

__all__ = ["MAX_BYTES", "LeanPut", "S3Client", "SigV4", "ca_bundle", "tls_context"]

log = structlog.get_logger("evalsyncd.storage")

MAX_BYTES: Final = 1024 * 1024
"""Largest body sent by :class:`LeanPut`, bytes (the SDK sends bigger ones with
``Expect: 100-continue``, which aiohttp does not)."""

_PROBE_KEY: Final = "k"
"""The key of the request the base URL is taken from (built, never sent)."""


class LeanPut:
    """``PutObject`` of bodies up to :data:`MAX_BYTES` on one bucket; see the module docstring.

    Opened per event loop beside the SDK client (:meth:`open`); not thread-safe.

    Args:
        base_url: the bucket's URL up to the key, ending in ``/``
            (``http://127.0.0.1:8333/bench/`` path-style,
            ``https://bench.s3.us-east-1.amazonaws.com/`` virtual-hosted).
        region: the region requests are signed for.
        credentials: the client's credentials (aiobotocore's, refreshable or not).
        http: the aiohttp session the requests go through.
        user_agent: the ``User-Agent`` header.
        proxy: the HTTP(S) proxy URL and its credentials, or ``(None, None)``.
        sdk_retries: send failed requests again through the SDK (its ``max_attempts``
            is above 1); ``False``: raise them, translated.
    """

    def __init__(
        self,
        base_url: str,
        region: str,
        credentials: Any,
        http: aiohttp.ClientSession,
        user_agent: str,
        proxy: tuple[Any, Any] = (None, None),
        sdk_retries: bool = True,
    ) -> None:
        self.base_url = base_url
        self.region = region
        self._credentials = credentials
        self._http = http
        self._user_agent = user_agent
        self._proxy, auth = proxy
        # The proxy's credentials (aiohttp 3.14 deprecates ``proxy_auth``): on the CONNECT
        # of an https:// endpoint's tunnel (``proxy_headers``: never inside the tunnel), or
        # on the request itself for an http:// endpoint, which goes to the proxy in absolute
        # form (aiohttp copies ``proxy_headers`` to neither)
        creds = {"Proxy-Authorization": auth.encode()} if auth else {}
        tunnelled = base_url.startswith("https://")
        self._connect_headers = creds if tunnelled and creds else None
        self._request_headers = [] if tunnelled else list(creds.items())
        base = yarl.URL(base_url)
        self._base_path = base.raw_path
        # As botocore signs it and aiohttp would send it: no default port (":443"), lower case.
        self._signer = SigV4(region, str(base.host_port_subcomponent))
        self.sdk_retries = sdk_retries
        """Whether a failure goes to the SDK to be sent again (``False``: raised at once,
        translated, as the SDK would after its one attempt)."""
        self._parser = create_parser("rest-xml")
        self.fallbacks = 0
        """Requests handed back to the SDK (network errors and answers not taken here)."""
        self.enabled = True
        """``False`` once an answer showed this path cannot do what the SDK does for the
        bucket (anything but success, a precondition or a transient error): every
        ``PutObject`` then goes through the SDK."""

    @classmethod
    async def open(
        cls,
        stack: AsyncExitStack,
        session: Any,
        client: Any,
        bucket: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        user_agent: str,
        sdk_retries: bool = True,
    ) -> LeanPut | None:
        """A sender for ``bucket`` on the SDK ``client`` made by ``session``, closed with ``stack``.

        Returns:
            ``None`` where the SDK must send every request itself: no credentials
            (unsigned requests), proxies set in the AWS config file, or an SDK
            request URL of an unexpected shape.

        Raises:
            PermanentStorageError: an ``https://`` endpoint or proxy and a CA bundle
                (the SDK's, :func:`ca_bundle`) that cannot be loaded; the message names it.
        """
        credentials = await session.get_credentials()
        if credentials is None or client.meta.config.proxies:
            return None
        url = urlsplit(await _sdk_put_url(client, bucket) or "")
        if (
            not url.path.endswith("/" + _PROBE_KEY)
            or url.query
            or url.scheme not in ("http", "https")
        ):
            log.info("s3_lean_put_off", url=f"s3://{bucket}", sdk_url=url.geturl())
            return None
        base = f"{url.scheme}://{url.netloc}{url.path[: -len(_PROBE_KEY)]}"
        # The SDK's proxy, as botocore resolves it once per client (NO_PROXY, a proxy URL
        # without a scheme read as http://, an https:// proxy kept: aiohttp's own reading of
        # the environment differs on the last two), credentials taken from its URL.
        proxy_url = ProxyConfiguration(proxies=get_environ_proxies(base)).proxy_url_for(base)
        proxy = strip_auth_from_url(yarl.URL(proxy_url)) if proxy_url else (None, None)
        # TLS to the endpoint or to an https:// proxy (even for an http:// endpoint, where
        # ssl=False would have aiohttp's unverified context carry the proxy's credentials)
        # is verified with the SDK's CA bundle, as the SDK verifies it
        tls = url.scheme == "https" or (proxy[0] is not None and proxy[0].scheme == "https")
        connector = aiohttp.TCPConnector(
            limit=max_connections,
            ssl=tls_context(session, f"s3://{bucket}") if tls else False,
        )
        http = await stack.enter_async_context(
            aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
                ),
                skip_auto_headers=("Content-Type",),
                auto_decompress=False,
            )
        )
        return cls(base, client.meta.region_name, credentials, http, user_agent, proxy, sdk_retries)

    async def put(
        self,
        key: str,
        url: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> str | None:
        """One ``PutObject`` of ``data`` (at most :data:`MAX_BYTES` bytes) at ``key``.

        Args:
            key: the object key.
            url: the ``s3://`` URL errors name.
            if_match: ``If-Match`` (an ETag), a condition of the write.
            if_none_match: ``If-None-Match`` (``"*"``: only if the object is missing).

        Returns:
            The new ETag; ``None`` when the answer is not one to take here (the
            module docstring): the caller sends the request through the SDK.

        Raises:
            ConflictError: a precondition failed (412, or 409 ``ConditionalRequestConflict``).
            ServerBehaviourError: a 2xx without an ETag, or with a CRC32C of other bytes.
            StorageError: any other failure, translated, when not :attr:`sdk_retries`.
        """
        crc = base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()
        headers = {"User-Agent": self._user_agent, "x-amz-checksum-crc32c": crc}
        if if_match is not None:
            headers["If-Match"] = if_match
        if if_none_match is not None:
            headers["If-None-Match"] = if_none_match
        path = percent_encode(key, safe="/~")
        frozen = await self._credentials.get_frozen_credentials()
        signed = self._signer.sign(frozen, self._base_path + path, headers, data)
        try:
            async with self._http.put(
                yarl.URL(self.base_url + path, encoded=True),  # as signed: not quoted again
                data=data,
                headers=signed + self._request_headers,  # the proxy's: not signed
                allow_redirects=False,
                proxy=self._proxy,
                proxy_headers=self._connect_headers,
            ) as resp:
                body = await resp.read()
                status, answer = resp.status, resp.headers
        except (aiohttp.ClientError, OSError) as exc:  # asyncio.TimeoutError is an OSError
            if not self.sdk_retries:
                raise translate(exc, url) from exc
            self._fallback(url, type(exc).__name__)
            return None
        if not 200 <= status < 300:
            parsed = self._parser.parse(
                {"status_code": status, "headers": HeadersDict(answer.items()), "body": body},
                None,
            )
            error = bexc.ClientError(parsed, "PutObject")
            translated = translate(error, url)
            if status == 412 or error_code(error) == "ConditionalRequestConflict":
                raise translated from error
            if not self.sdk_retries:
                raise translated from error
            self._fallback(url, f"HTTP {status} {error_code(error)}")
            if not isinstance(translated, TransientStorageError):
                # A redirect, a refused signature, a denial: what the SDK does about it
                # (another region's endpoint, a corrected clock) this path does not.
                self.enabled = False
                log.warning("s3_lean_put_off", url=url, answer=f"HTTP {status} {error_code(error)}")
            return None
        etag = required_etag(answer.get("ETag"), status, url)
        echoed = answer.get("x-amz-checksum-crc32c")
        if echoed is not None and echoed != crc:
            raise ServerBehaviourError(
                f"{url}: the server answered PutObject with CRC32C {echoed} for a body whose "
                f"CRC32C is {crc}",
                url=url,
                feature="PutObject checksum",
                answer=f"CRC32C {echoed}, sent {crc}",
            )
        return etag

    def _fallback(self, url: str, why: str) -> None:
        self.fallbacks += 1
        log.debug("s3_lean_put_fallback", url=url, why=why)


class _Built(Exception):
    """Stops the SDK's request once built (:func:`_sdk_put_url`)."""


async def _sdk_put_url(client: Any, bucket: str) -> str | None:
    """The URL the SDK ``client`` sends a ``PutObject`` of key :data:`_PROBE_KEY` in
    ``bucket`` to, from its endpoint rules; the request is built and signed, never sent.

    Not a presigned URL: botocore presigns S3 URLs on AWS with the global endpoint
    (``bucket.s3.amazonaws.com``) where its requests go to the region's
    (``bucket.s3.eu-west-3.amazonaws.com``).
    """
    urls: list[str] = []

    def capture(request: Any, **_kwargs: Any) -> None:
        urls.append(request.url)
        raise _Built  # not retryable: the SDK raises it at once

    event = "before-send.s3.PutObject"
    client.meta.events.register_first(event, capture)
    try:
        await client.put_object(Bucket=bucket, Key=_PROBE_KEY, Body=b"")
    except _Built:
        pass
    finally:
        client.meta.events.unregister(event, capture)
    return urls[0] if urls else None  # None: another hook answered it (a test's stub)


class SigV4:
    """AWS Signature Version 4 of S3 requests by awscrt: the signer botocore itself uses
    when awscrt is installed (``botocore[crt]``), called directly (0.02 ms a request,
    where botocore's ``S3SigV4Auth`` takes 0.09 ms).

    The payload is signed (``x-amz-content-sha256`` of the body), the path is used as
    it is (S3: no normalization, no second encoding), as botocore signs S3 requests.
    ``tests/test_storage_s3.py`` checks the signature against botocore's.

    Args:
        region: the region requests are signed for.
        host: the ``Host`` header (the URL's host, with its port unless the default).
    """

    def __init__(self, region: str, host: str) -> None:
        self.region = region
        self.host = host
        self._keys: tuple[str, str, str | None] | None = None
        self._provider: AwsCredentialsProvider | None = None

    def sign(
        self,
        credentials: Any,
        path: str,
        headers: dict[str, str],
        body: bytes,
        date: datetime.datetime | None = None,
    ) -> list[tuple[str, str]]:
        """The headers of a signed ``PUT`` of ``body`` at ``path`` (encoded, with no query).

        Args:
            credentials: botocore's frozen credentials (``access_key``, ``secret_key``, ``token``).
            headers: the request's other headers, all signed.
            date: the signing time (now when ``None``).

        Returns:
            ``headers`` with ``Host``, ``X-Amz-Date``, ``x-amz-content-sha256``,
            ``Authorization`` (and ``X-Amz-Security-Token``), as ``(name, value)`` pairs.
        """
        keys = (credentials.access_key, credentials.secret_key, credentials.token)
        if keys != self._keys or self._provider is None:
            self._provider = AwsCredentialsProvider.new_static(*keys)
            self._keys = keys
        request = HttpRequest("PUT", path, HttpHeaders([("Host", self.host), *headers.items()]))
        config = AwsSigningConfig(
            algorithm=AwsSigningAlgorithm.V4,
            signature_type=AwsSignatureType.HTTP_REQUEST_HEADERS,
            credentials_provider=self._provider,
            region=self.region,
            service="s3",
            date=date,
            use_double_uri_encode=False,
            should_normalize_uri_path=False,
            signed_body_value=hashlib.sha256(body).hexdigest(),
            signed_body_header_type=AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
        )
        aws_sign_request(request, config).result()
        return list(request.headers)


class S3Client:
    """The SDK client of one event loop, and the :class:`LeanPut` beside it, opened at the
    first ``PutObject`` that may take it (:meth:`lean_put`): a client that only reads (a
    reader's) never builds it, which costs about 5 ms of CPU.

    Any other attribute is the SDK client's (``client.head_object(...)``).

    Args:
        sdk: the aiobotocore client.
        open_lean: opens the client's :class:`LeanPut` (see :meth:`LeanPut.open`);
            ``None``: the SDK sends every request.
    """

    def __init__(
        self, sdk: Any, open_lean: Callable[[], Awaitable[LeanPut | None]] | None = None
    ) -> None:
        self.sdk = sdk
        self._open_lean = open_lean
        self._lean: asyncio.Future[LeanPut | None] | None = None

    async def lean_put(self) -> LeanPut | None:
        """The client's :class:`LeanPut`, opened at the first call (``None``: none).

        Raises:
            PermanentStorageError: what :meth:`LeanPut.open` raised (at every call).
        """
        if self._open_lean is None:
            return None
        if self._lean is None:
            self._lean = asyncio.ensure_future(self._open_lean())
        return await asyncio.shield(self._lean)

    @property
    def lean(self) -> LeanPut | None:
        """The :class:`LeanPut` once :meth:`lean_put` opened it, else ``None``."""
        opening = self._lean
        if opening is None or not opening.done() or opening.cancelled():
            return None
        return None if opening.exception() is not None else opening.result()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sdk, name)


def ca_bundle(session: Any) -> str:
    """The CA bundle the SDK's client of ``session`` verifies servers with: a path.

    As botocore resolves it (``Session.create_client``, then
    ``EndpointCreator._get_verify_value``): the ``ca_bundle`` setting
    (``AWS_CA_BUNDLE``, or ``ca_bundle`` in the AWS config file), else
    ``REQUESTS_CA_BUNDLE``, else botocore's default (certifi's bundle).
    """
    configured = session.get_config_variable("ca_bundle") or os.environ.get("REQUESTS_CA_BUNDLE")
    return str(get_cert_path(configured or True))


def tls_context(session: Any, url: str) -> ssl.SSLContext:
    """The TLS context of the SDK's transport: its CA bundle (:func:`ca_bundle`), the
    server's name or IP address checked against its certificate.

    Args:
        session: the botocore session the SDK client was made by.
        url: the ``s3://`` URL errors name.

    Raises:
        PermanentStorageError: the CA bundle is missing, unreadable or holds no
            certificate; the message names the file and where it was set.
    """
    path = ca_bundle(session)
    try:
        return ssl.create_default_context(cafile=path)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise PermanentStorageError(
            f"{url}: the CA bundle {path!r} (AWS_CA_BUNDLE, ca_bundle in the AWS config "
            f"file, or REQUESTS_CA_BUNDLE) cannot be loaded: {exc}",
            url=url,
        ) from exc
