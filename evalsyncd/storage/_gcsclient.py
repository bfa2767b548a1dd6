"""The GCS client of one event loop: the SDK client and its requests, translated.

:class:`GCSClient` is what ``GCSStorage`` opens per event loop: the
gcloud-aio-storage client on its own aiohttp session, the per-key append locks,
and every request the backend sends, each through :meth:`GCSClient.guarded`,
the error boundary (:func:`translate_error`, the table in :mod:`.gcs`).
"""

from __future__ import annotations

import asyncio
import json
import math
import mimetypes
import time
import weakref
from collections.abc import Awaitable
from typing import Any, Final, Literal, TypeVar

import aiohttp
import structlog
from gcloud.aio.storage import Storage as _SDKClient

from evalsyncd.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConflictError,
    InvalidRequestError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage._leftovers import note_left

__all__ = [
    "GCSClient",
    "PreconditionFailed",
    "content_type",
    "http_status",
    "translate_error",
]

T = TypeVar("T")

log = structlog.get_logger("evalsyncd.storage")

_BUCKET_CHECK_TTL_S: Final = 60.0
_DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"


def _status_class(status: int, on_404: type[StorageError]) -> type[StorageError]:
    if status == 404:
        return on_404
    if status in (401, 403):
        return AccessDeniedError
    if status == 412:
        return ConflictError
    if status in (408, 429) or status >= 500:
        return TransientStorageError
    if 400 <= status < 500:
        return InvalidRequestError
    # Not an error status: a ContentTypeError or an unexpected redirect, most
    # likely from a proxy in the way. Worth a retry, never "missing".
    return TransientStorageError


def translate_error(
    exc: BaseException,
    *,
    url: str | None,
    on_404: type[StorageError] = ObjectNotFoundError,
) -> StorageError | None:
    """Map a gcloud-aio / aiohttp exception to the evalsyncd error tree.

    This is the only place where GCS errors are classified (see the module
    docstring for the table).

    Args:
        exc: the exception gcloud-aio-storage (or aiohttp under it) raised.
        url: the ``gs://`` URL concerned, stored on the new error.
        on_404: the class a 404 becomes: :class:`ObjectNotFoundError` when the
            bucket is known to exist, :class:`BucketNotFoundError` otherwise.

    Returns:
        The translated error (the caller raises it ``from exc``), or ``None``
        if ``exc`` is not an SDK or network error and should propagate as is.
    """
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, aiohttp.ClientResponseError):
        cls = _status_class(exc.status, on_404)
        message = f"{url}: HTTP {exc.status} {exc.message}".strip()
        if cls is ConflictError:
            return ConflictError(message, url=url, actual_size=None)
        return cls(message, url=url)
    if isinstance(exc, aiohttp.InvalidURL):
        return InvalidRequestError(f"{url}: invalid URL {exc}", url=url)
    if isinstance(exc, aiohttp.ClientError | TimeoutError | json.JSONDecodeError):
        # ClientConnectionError (refused, reset, ServerDisconnectedError,
        # ServerTimeoutError), ClientPayloadError (a body cut short), timeouts,
        # and a 2xx whose body is not the JSON it should be.
        return TransientStorageError(f"{url}: {type(exc).__name__}: {exc}", url=url)
    return None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an aiohttp response error, else ``None``."""
    return exc.status if isinstance(exc, aiohttp.ClientResponseError) else None


class PreconditionFailed(Exception):
    """Internal: a conditional write got 412; ``aappend`` re-reads and decides."""


def content_type(key: str) -> str:
    """The Content-Type an object gets from its key's extension."""
    return mimetypes.guess_type(key)[0] or _DEFAULT_CONTENT_TYPE


class GCSClient:
    """One event loop's connection to a bucket; see the module docstring.

    Args:
        api: the gcloud-aio-storage client (on a session the caller closes).
        bucket: the bucket name; ``bucket_url`` (``gs://bucket``) names it in errors.
        timeout: the per-request timeout handed to gcloud-aio (an aiohttp
            ``ClientTimeout``: total and connect limits, seconds).
        emulator: requests go to an emulator (fake-gcs-server quirks apply).
    """

    def __init__(
        self, api: _SDKClient, *, bucket: str, bucket_url: str, timeout: Any, emulator: bool
    ) -> None:
        self.api = api
        self.bucket = bucket
        self.bucket_url = bucket_url
        self.timeout: int = timeout  # gcloud-aio annotates int, passes it on to aiohttp
        self.emulator = emulator
        self.bucket_seen_until = -math.inf
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def lock_for(self, key: str) -> asyncio.Lock:
        """The lock serialising appends to ``key`` on this loop."""
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    async def guarded(
        self, call: Awaitable[T], *, url: str, target: Literal["object", "bucket"]
    ) -> T:
        """Await ``call``, translating SDK errors (see :func:`translate_error`).

        ``target`` says what a 404 is about: a request on the bucket (list,
        upload) means the bucket is missing; on an object, the bucket is checked.
        """
        try:
            return await call
        except Exception as exc:
            on_404: type[StorageError] = BucketNotFoundError
            if target == "object" and http_status(exc) == 404 and await self.bucket_exists():
                on_404 = ObjectNotFoundError
            err = translate_error(exc, url=url, on_404=on_404)
            if err is None or err is exc:
                raise
            raise err from exc

    async def bucket_exists(self) -> bool:
        """Whether the bucket exists (a 1-item list; "yes" is cached for a minute).

        Raises:
            StorageError: the check itself failed (an outage is never "missing").
        """
        if time.monotonic() < self.bucket_seen_until:
            return True
        try:
            await self.api.list_objects(
                self.bucket,
                params={"maxResults": "1", "fields": "nextPageToken"},
                timeout=self.timeout,
            )
        except Exception as exc:
            status = http_status(exc)
            if status == 404:
                return False
            if status in (401, 403):
                return True  # may read objects but not list them: trust the object's 404
            err = translate_error(exc, url=self.bucket_url, on_404=BucketNotFoundError)
            if err is None:
                raise
            raise err from exc
        self.bucket_seen_until = time.monotonic() + _BUCKET_CHECK_TTL_S
        return True

    async def metadata(self, key: str, url: str) -> dict[str, Any] | None:
        """The object's JSON metadata (one request), or ``None`` if it is missing."""
        try:
            meta: dict[str, Any] = await self.guarded(
                self.api.download_metadata(self.bucket, key, timeout=self.timeout),
                url=url,
                target="object",
            )
        except ObjectNotFoundError:
            return None
        return meta

    async def download(
        self, key: str, url: str, *, start: int = 0, end: int | None = None
    ) -> bytes:
        """Bytes ``[start, end)`` of an object (``b""`` when ``start`` is at or past its end)."""
        headers: dict[str, str] = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
            if self.emulator:
                # fake-gcs-server sends a 416 body longer than its Content-Length,
                # which poisons a kept-alive connection: don't reuse this one.
                headers["Connection"] = "close"

        async def get() -> bytes:
            try:
                data: bytes = await self.api.download(
                    self.bucket, key, headers=headers, timeout=self.timeout
                )
            except aiohttp.ClientResponseError as exc:
                if exc.status == 416:  # range starts at or past the end
                    return b""
                raise
            return data

        return await self.guarded(get(), url=url, target="object")

    async def upload(
        self, key: str, data: bytes, *, generation: str | None = None
    ) -> dict[str, Any]:
        """One single-request upload; with ``generation``, a conditional multipart one.

        Multipart (metadata in the body) is used for conditional uploads because
        fake-gcs-server honours ``ifGenerationMatch`` only there; GCS honours it
        on both. Never resumable: one request, no hidden retries.
        """
        ctype = content_type(key)
        parameters = None if generation is None else {"ifGenerationMatch": generation}
        result: dict[str, Any] = await self.api.upload(
            self.bucket,
            key,
            data,
            content_type=ctype,
            parameters=parameters,
            metadata=None if generation is None else {"Content-Type": ctype},
            force_resumable_upload=False,
            timeout=self.timeout,
        )
        return result

    async def conditional_upload(
        self, key: str, url: str, data: bytes, *, generation: str
    ) -> dict[str, Any]:
        """A conditional upload (``ifGenerationMatch=generation``; "0": create).

        Raises:
            PreconditionFailed: the generation did not match (412).
        """

        async def put() -> dict[str, Any]:
            try:
                return await self.upload(key, data, generation=generation)
            except aiohttp.ClientResponseError as exc:
                if exc.status == 412:
                    raise PreconditionFailed from exc
                raise

        return await self.guarded(put(), url=url, target="bucket")

    async def delete_quietly(self, key: str, url: str) -> None:
        """Delete a temporary object; a failure is logged, never raised (the append stands)."""
        try:
            await self.api.delete(self.bucket, key, timeout=self.timeout)
        except Exception as exc:
            if http_status(exc) == 404:
                return
            log.warning("gcs_temporary_object_left", url=url, error=repr(exc))
            note_left(url)  # reaped later (evalsyncd.storage.reap)

    async def list(
        self,
        prefix: str,
        url: str,
        *,
        delimiter: str | None = None,
        page_size: int,
        limit: int | None = None,
    ) -> tuple[list[str], list[str]]:
        """List objects under ``prefix``, every page (or until ``limit`` names).

        Args:
            prefix: the name prefix; ``url`` names it in errors.
            page_size: names per request (``maxResults``; at most ``limit``).
            delimiter: ``"/"`` for one level of a directory.
            limit: stop once this many names are listed.

        Returns:
            ``(names, prefixes)``: object names in name order and, with a
            delimiter, the "directory" prefixes.

        Raises:
            BucketNotFoundError: the bucket is missing.
        """
        names: list[str] = []
        prefixes: list[str] = []
        params = {"prefix": prefix, "maxResults": str(min(limit or page_size, page_size))}
        if delimiter is not None:
            params["delimiter"] = delimiter
        params["fields"] = (
            "items(name),prefixes,nextPageToken" if delimiter else ("items(name),nextPageToken")
        )
        while True:
            page: dict[str, Any] = await self.guarded(
                self.api.list_objects(self.bucket, params=dict(params), timeout=self.timeout),
                url=url,
                target="bucket",
            )
            names += [item["name"] for item in page.get("items", ())]
            prefixes += page.get("prefixes", ())
            token = page.get("nextPageToken")
            if not token or (limit is not None and len(names) >= limit):
                break
            params["pageToken"] = token
        return names, prefixes
