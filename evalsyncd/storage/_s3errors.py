"""S3 error translation: SDK and network errors to the :mod:`evalsyncd.errors` tree.

``ClientError`` goes by its S3 error code (:data:`CODE_MAP`), then by its HTTP
status; other exceptions go by :data:`EXCEPTION_MAP` (the first ``isinstance``
match wins). :func:`boundary` wraps every request of :mod:`evalsyncd.storage.s3`;
``tests/test_storage_s3.py`` proves every handled SDK exception class is mapped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Final

import aiohttp
import botocore.exceptions as bexc

from evalsyncd.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConflictError,
    InvalidRequestError,
    ObjectNotFoundError,
    PermanentStorageError,
    ServerBehaviourError,
    StorageError,
    TransientStorageError,
)

__all__ = [
    "BOUNDARY",
    "CODE_MAP",
    "EXCEPTION_MAP",
    "boundary",
    "error_code",
    "http_status",
    "required_etag",
    "translate",
]

CODE_MAP: Final[dict[str, type[StorageError]]] = {
    # the object is missing (a HEAD has no body: its code is the status)
    "NoSuchKey": ObjectNotFoundError,
    "NotFound": ObjectNotFoundError,
    "404": ObjectNotFoundError,
    "NoSuchBucket": BucketNotFoundError,
    # credentials
    "AccessDenied": AccessDeniedError,
    "AllAccessDisabled": AccessDeniedError,
    "InvalidAccessKeyId": AccessDeniedError,
    "SignatureDoesNotMatch": AccessDeniedError,
    "InvalidToken": AccessDeniedError,
    "ExpiredToken": AccessDeniedError,
    "TokenRefreshRequired": AccessDeniedError,
    "AccountProblem": AccessDeniedError,
    "InvalidSecurity": AccessDeniedError,
    "Forbidden": AccessDeniedError,
    "Unauthorized": AccessDeniedError,
    "401": AccessDeniedError,
    "403": AccessDeniedError,
    # preconditions: someone else changed the object
    "PreconditionFailed": ConflictError,
    "412": ConflictError,
    "ConditionalRequestConflict": ConflictError,
    "NoSuchUpload": ConflictError,
    # worth retrying
    "SlowDown": TransientStorageError,
    "ServiceUnavailable": TransientStorageError,
    "InternalError": TransientStorageError,
    "RequestTimeout": TransientStorageError,
    "RequestTimeoutException": TransientStorageError,
    "Throttling": TransientStorageError,
    "ThrottlingException": TransientStorageError,
    "TooManyRequests": TransientStorageError,
    "RequestLimitExceeded": TransientStorageError,
    "OperationAborted": TransientStorageError,
    "BadDigest": TransientStorageError,
    "IncompleteBody": TransientStorageError,
    "XAmzContentSHA256Mismatch": TransientStorageError,
    "408": TransientStorageError,
    "429": TransientStorageError,
    "500": TransientStorageError,
    "502": TransientStorageError,
    "503": TransientStorageError,
    "504": TransientStorageError,
}
"""S3 error codes (``ClientError.response["Error"]["Code"]``) and the class each becomes."""

EXCEPTION_MAP: Final[tuple[tuple[type[BaseException], type[StorageError]], ...]] = (
    # no usable credentials
    (bexc.NoCredentialsError, AccessDeniedError),
    (bexc.PartialCredentialsError, AccessDeniedError),
    (bexc.NoAuthTokenError, AccessDeniedError),
    (bexc.UnauthorizedSSOTokenError, AccessDeniedError),
    (bexc.UnknownCredentialError, AccessDeniedError),
    # a credential provider could not be reached: an outage, not a refusal
    (bexc.CredentialRetrievalError, TransientStorageError),
    (bexc.MetadataRetrievalError, TransientStorageError),
    (bexc.TokenRetrievalError, TransientStorageError),
    # network: connect/read timeouts, refused/reset/closed connections, TLS, proxies
    (bexc.EndpointConnectionError, TransientStorageError),
    (bexc.ConnectTimeoutError, TransientStorageError),
    (bexc.ReadTimeoutError, TransientStorageError),
    (bexc.ConnectionClosedError, TransientStorageError),
    (bexc.ProxyConnectionError, TransientStorageError),
    (bexc.SSLError, TransientStorageError),
    (bexc.ResponseStreamingError, TransientStorageError),
    (bexc.HTTPClientError, TransientStorageError),
    (bexc.IncompleteReadError, TransientStorageError),
    (bexc.ChecksumError, TransientStorageError),
    (bexc.FlexibleChecksumError, TransientStorageError),
    (bexc.AwsChunkedWrapperError, TransientStorageError),
    (bexc.CapacityNotAvailableError, TransientStorageError),
    (aiohttp.ClientError, TransientStorageError),
    (asyncio.TimeoutError, TransientStorageError),
    (ConnectionError, TransientStorageError),
    (OSError, TransientStorageError),
    # requests the client itself refuses to send
    (bexc.ParamValidationError, InvalidRequestError),
    (bexc.ValidationError, InvalidRequestError),
    (bexc.BotoCoreError, PermanentStorageError),
)
"""Non-HTTP exceptions and the class each becomes; the first ``isinstance`` match wins."""

BOUNDARY: Final = (bexc.ClientError, bexc.BotoCoreError, aiohttp.ClientError, OSError)
# asyncio.TimeoutError is TimeoutError (an OSError) on Python 3.11+.


def error_code(exc: bexc.ClientError) -> str:
    """The S3 error code of a ``ClientError`` (``"NoSuchKey"``), or ``""``."""
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def http_status(exc: bexc.ClientError) -> int:
    """The HTTP status of a ``ClientError``, or 0 when there was no response."""
    meta = exc.response.get("ResponseMetadata", {})
    return int(meta.get("HTTPStatusCode", 0) or 0)


def translate(exc: BaseException, url: str | None) -> StorageError:
    """The :mod:`evalsyncd.errors` class for an SDK or network error (not raised here).

    ``ClientError`` goes by its S3 error code (:data:`CODE_MAP`), then by its
    HTTP status: 404 missing, 401/403 denied, 412 conflict, 408/429/5xx
    transient, other 4xx invalid request. Other exceptions go by
    :data:`EXCEPTION_MAP`. The caller chains it: ``raise translate(exc, url) from exc``.

    Args:
        exc: what the SDK (or aiohttp, or the socket layer) raised.
        url: the ``s3://`` URL of the object or prefix concerned.

    Returns:
        A :class:`StorageError` subclass instance carrying ``url``.
    """
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, bexc.ClientError):
        code, status = error_code(exc), http_status(exc)
        cls = CODE_MAP.get(code)
        if cls is None:
            if status == 404:
                cls = ObjectNotFoundError
            elif status in (401, 403):
                cls = AccessDeniedError
            elif status == 412:
                cls = ConflictError
            elif status in (408, 429) or status >= 500:
                cls = TransientStorageError
            elif 400 <= status < 500:
                cls = InvalidRequestError
            else:
                cls = TransientStorageError if status == 0 else InvalidRequestError
        return cls(f"{url}: S3 {code or status}: {exc}", url=url)
    for exc_type, cls in EXCEPTION_MAP:
        if isinstance(exc, exc_type):
            return cls(f"{url}: {type(exc).__name__}: {exc}", url=url)
    return PermanentStorageError(f"{url}: {type(exc).__name__}: {exc}", url=url)


@contextlib.contextmanager
def boundary(url: str | None) -> Iterator[None]:
    """Translate SDK and network errors raised inside the block (chained)."""
    try:
        yield
    except BOUNDARY as exc:
        raise translate(exc, url) from exc


def required_etag(etag: object, status: object, url: str) -> str:
    """The ETag of a ``PutObject`` answer (S3 always sends one; the journal keeps it as
    the next ``If-Match``).

    Raises:
        ServerBehaviourError: the answer (HTTP ``status``) had none.
    """
    if not etag:
        answer = f"HTTP {status} without an ETag"
        raise ServerBehaviourError(
            f"{url}: the server answered PutObject with {answer}",
            url=url,
            feature="PutObject",
            answer=answer,
        )
    return str(etag)
