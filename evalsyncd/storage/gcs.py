"""``GCSStorage``: the storage contract on Google Cloud Storage, via gcloud-aio-storage.

Layout under ``gs://{bucket}/{prefix}/``::

    {prefix}/
    ├── {path}                       one object per file, key used as is (UTF-8)
    └── .evalsyncd/gcs-append/{hex}  a delta in flight during an append (deleted
                                     right after its compose; hidden from list_dir)

Appending (``aappend``), the design's "upload the delta, compose, delete":

1. ``GET`` the object's metadata (size, generation ``G``); with ``offset=N``,
   check ``size == N`` (or that exactly this append is already there: a retry,
   answered without writing).
2. Missing object: create it with a multipart upload carrying
   ``ifGenerationMatch=0``. Empty object: overwrite it with
   ``ifGenerationMatch=G``. Otherwise upload the delta as a temporary object
   under ``{prefix}/.evalsyncd/gcs-append/``, then ``compose`` [object, delta]
   into the object with ``ifGenerationMatch=G``, then delete the delta (always,
   also when the compose fails).
3. A 412 means another writer changed the object between steps 1 and 2: the
   metadata is read again; with ``offset`` the append then conflicts
   (:class:`~evalsyncd.errors.ConflictError`) unless it turns out to be applied.

Bytes on the wire per append: ``len(data)`` plus about 5 KiB of headers and
JSON for the four requests (measured on fake-gcs-server, whose metadata carries
ACLs), at every object size; the object's own bytes never travel. A delta is
left behind only if the process dies between its upload and its delete (or the
delete fails, which is logged as ``gcs_temporary_object_left``); readers ignore
``.evalsyncd/``.
GCS allows about one mutation per second on one object: faster appends to one
object get 429, which is a :class:`~evalsyncd.errors.TransientStorageError`.

Concurrency: appends to one key through one ``GCSStorage`` (on one event loop)
are serialised by an in-process lock, which saves the requests a loser of a
race would waste. Across processes and hosts the guard is GCS's
``ifGenerationMatch``: compose and the creating upload are atomic and
conditional on real GCS. fake-gcs-server ignores ``ifGenerationMatch`` on
compose and on simple uploads; as a cheap second line, the size the compose
reports is checked against the expected size, so a lost race on such a server
is at least reported as a ``ConflictError`` (after the fact) and never silently
acknowledged.

Errors are translated at this boundary by :func:`translate_error` (one table):

=============================================  ===================================
gcloud-aio / aiohttp                           evalsyncd
=============================================  ===================================
404, bucket present                            ObjectNotFoundError (FileNotFoundError)
404, bucket missing                            BucketNotFoundError
401, 403                                       AccessDeniedError (PermissionError)
412                                            ConflictError
408, 429, 5xx                                  TransientStorageError
other 4xx                                      InvalidRequestError
connection errors, timeouts, payload errors    TransientStorageError
=============================================  ===================================

A 404 on an object is told apart from a missing bucket by listing the bucket
(one request, cached as "present" for a minute), so an outage or a missing
bucket is never reported as a missing object.
"""

from __future__ import annotations

import asyncio
import json
import math
import mimetypes
import os
import time
import uuid
import weakref
from collections.abc import Awaitable
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar, cast

import aiohttp
import structlog
from gcloud.aio.storage import Storage as _GCSClient

from evalsyncd.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConflictError,
    InvalidRequestError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage._base import StorageStat
from evalsyncd.storage._cloud import INTERNAL_DIR, CloudStorage
from evalsyncd.storage.tail import TAIL_DIR

__all__ = ["GCSStorage", "translate_error"]

T = TypeVar("T")

log = structlog.get_logger("evalsyncd.storage")

_APPEND_AREA = "gcs-append"
_MAX_APPEND_ATTEMPTS = 5
_BUCKET_CHECK_TTL_S = 60.0
_DEFAULT_CONTENT_TYPE = "application/octet-stream"


# -- error translation -------------------------------------------------------------


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


def _http_status(exc: BaseException) -> int | None:
    return exc.status if isinstance(exc, aiohttp.ClientResponseError) else None


class _PreconditionFailed(Exception):
    """Internal: a conditional write got 412; ``aappend`` re-reads and decides."""


# -- the per-loop client --------------------------------------------------------


@dataclass
class _Client:
    """What one event loop's storage holds open: the SDK client and its state."""

    api: _GCSClient
    emulator: bool
    locks: weakref.WeakValueDictionary[str, asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary
    )
    bucket_seen_until: float = -math.inf

    def lock_for(self, key: str) -> asyncio.Lock:
        lock = self.locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self.locks[key] = lock
        return lock


def _content_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or _DEFAULT_CONTENT_TYPE


def _stat_of(meta: dict[str, Any]) -> StorageStat:
    updated = meta.get("updated") or meta.get("timeCreated")
    mtime = datetime.fromisoformat(updated).timestamp() if updated else 0.0
    return StorageStat(size=int(meta["size"]), mtime=mtime, version=str(meta["generation"]))


class GCSStorage(CloudStorage):
    """Objects in a GCS bucket under a prefix; implements ``Storage`` and ``AsyncStorage``.

    Credentials: with ``STORAGE_EMULATOR_HOST`` set (read when a client opens)
    or ``endpoint_url`` given, requests go to that server without credentials;
    otherwise to ``https://storage.googleapis.com`` with Application Default
    Credentials, or with the service-account key file ``service_file``.

    Instances hold configuration only and pickle; each event loop that uses
    one gets its own aiohttp session and gcloud-aio client, closed by
    ``aclose()`` / ``async with`` (or ``close()`` / ``with`` for sync use).
    See the module docstring for how ``append`` works and what it costs.

    Args:
        bucket: bucket name.
        prefix: key prefix ("" for the bucket root).
        service_file: path of a service-account JSON key; ``None`` for ADC.
        endpoint_url: a custom JSON API root such as ``http://127.0.0.1:4443``
            (an emulator, or a proxy in front of one); called without credentials.
        timeout_s: limit on each HTTP request, in seconds (the whole exchange,
            body included).
        connect_timeout_s: limit on establishing a connection, in seconds.
        page_size: objects per ``list`` request (``maxResults``, at most 1000).

    Raises:
        ValueError: an invalid bucket name, a non-positive timeout or a page size
            outside 1..1000.
    """

    scheme = "gs"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        service_file: str | None = None,
        endpoint_url: str | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        page_size: int = 1000,
    ) -> None:
        super().__init__(bucket, prefix)
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if not 1 <= page_size <= 1000:
            raise ValueError(f"page_size must be in 1..1000, not {page_size}")
        self.service_file = service_file
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.page_size = page_size

    # -- client ------------------------------------------------------------------

    def _new_session(self) -> aiohttp.ClientSession:
        """The aiohttp session of one client (a seam for tests that trace requests)."""
        return aiohttp.ClientSession(timeout=self._timeout())

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)

    @property
    def _request_timeout(self) -> int:
        # gcloud-aio annotates ``timeout`` as int but hands it to aiohttp, which
        # takes a ClientTimeout (or float seconds): keep the connect limit too.
        return cast(int, self._timeout())

    async def _open_client(self, stack: AsyncExitStack) -> _Client:
        session = self._new_session()
        stack.push_async_callback(session.close)
        api = _GCSClient(
            service_file=self.service_file, session=session, api_root=self.endpoint_url
        )
        emulator = self.endpoint_url is not None or bool(os.environ.get("STORAGE_EMULATOR_HOST"))
        return _Client(api=api, emulator=emulator)

    async def _gcs(self) -> _Client:
        client: _Client = await self._client()
        return client

    # -- error boundary ------------------------------------------------------------

    async def _guarded(
        self, c: _Client, call: Awaitable[T], *, url: str, target: Literal["object", "bucket"]
    ) -> T:
        """Await ``call``, translating SDK errors (see :func:`translate_error`).

        ``target`` says what a 404 is about: a request on the bucket (list,
        upload) means the bucket is missing; on an object, the bucket is checked.
        """
        try:
            return await call
        except Exception as exc:
            on_404: type[StorageError] = BucketNotFoundError
            if target == "object" and _http_status(exc) == 404 and await self._bucket_exists(c):
                on_404 = ObjectNotFoundError
            err = translate_error(exc, url=url, on_404=on_404)
            if err is None or err is exc:
                raise
            raise err from exc

    async def _bucket_exists(self, c: _Client) -> bool:
        """Whether the bucket exists (a 1-item list; "yes" is cached for a minute).

        Raises:
            StorageError: the check itself failed (an outage is never "missing").
        """
        if time.monotonic() < c.bucket_seen_until:
            return True
        try:
            await c.api.list_objects(
                self.bucket,
                params={"maxResults": "1", "fields": "nextPageToken"},
                timeout=self._request_timeout,
            )
        except Exception as exc:
            status = _http_status(exc)
            if status == 404:
                return False
            if status in (401, 403):
                return True  # may read objects but not list them: trust the object's 404
            err = translate_error(exc, url=self.url(), on_404=BucketNotFoundError)
            if err is None:
                raise
            raise err from exc
        c.bucket_seen_until = time.monotonic() + _BUCKET_CHECK_TTL_S
        return True

    async def _metadata(self, c: _Client, key: str, url: str) -> dict[str, Any] | None:
        try:
            meta: dict[str, Any] = await self._guarded(
                c,
                c.api.download_metadata(self.bucket, key, timeout=self._request_timeout),
                url=url,
                target="object",
            )
        except ObjectNotFoundError:
            return None
        return meta

    async def _download(
        self, c: _Client, key: str, url: str, *, start: int = 0, end: int | None = None
    ) -> bytes:
        """Bytes ``[start, end)`` of an object (``b""`` when ``start`` is at or past its end)."""
        headers: dict[str, str] = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
            if c.emulator:
                # fake-gcs-server sends a 416 body longer than its Content-Length,
                # which poisons a kept-alive connection: don't reuse this one.
                headers["Connection"] = "close"

        async def get() -> bytes:
            try:
                data: bytes = await c.api.download(
                    self.bucket, key, headers=headers, timeout=self._request_timeout
                )
            except aiohttp.ClientResponseError as exc:
                if exc.status == 416:  # range starts at or past the end
                    return b""
                raise
            return data

        return await self._guarded(c, get(), url=url, target="object")

    # -- the async contract ----------------------------------------------------------

    async def _main_read(self, path: str) -> bytes:
        """See :meth:`Storage.read`.

        Raises:
            ObjectNotFoundError: the object is missing.
            BucketNotFoundError: the bucket is missing.
            TransientStorageError: network trouble, 408, 429, 5xx.
        """
        key = self._key(path)
        c = await self._gcs()
        return await self._download(c, key, self.url(path))

    async def awrite(self, path: str, data: bytes) -> str | None:
        """See :meth:`Storage.write`: one upload, atomic on GCS.

        Returns:
            The new generation, as a string.
        """
        key = self._key(path)
        c = await self._gcs()
        meta = await self._guarded(
            c, self._upload(c, key, data), url=self.url(path), target="bucket"
        )
        return str(meta["generation"])

    async def aappend(self, path: str, data: bytes, *, offset: int | None = None) -> str | None:
        """See :meth:`Storage.append` and the module docstring (compose with preconditions).

        Args:
            path: the file's path under the prefix.
            data: the bytes to add.
            offset: the size in bytes the object must have, or ``None`` to append
                at whatever its end is.

        Returns:
            The object's generation after the append, as a string.

        Raises:
            ConflictError: ``offset`` does not match (``actual_size`` says the
                size found), or another writer kept winning the race.
            ValueError: ``offset`` is negative.
        """
        if offset is not None and offset < 0:
            raise ValueError(f"negative offset {offset}")
        key = self._key(path)
        url = self.url(path)
        c = await self._gcs()
        async with c.lock_for(key):
            for _attempt in range(_MAX_APPEND_ATTEMPTS):
                try:
                    return await self._append_once(c, key, url, data, offset)
                except _PreconditionFailed:
                    log.info("gcs_append_precondition_failed", url=url, offset=offset)
        raise ConflictError(
            f"{url}: the object kept changing during {_MAX_APPEND_ATTEMPTS} append attempts",
            url=url,
        )

    async def _append_once(
        self, c: _Client, key: str, url: str, data: bytes, offset: int | None
    ) -> str:
        meta = await self._metadata(c, key, url)
        if meta is None:
            if offset not in (None, 0):
                raise ConflictError(
                    f"{url}: append at offset {offset} but the object does not exist",
                    url=url,
                    actual_size=0,
                )
            created = await self._conditional_upload(c, key, url, data, generation="0")
            return str(created["generation"])

        size, generation = int(meta["size"]), str(meta["generation"])
        if offset is not None and size != offset:
            end = offset + len(data)
            if (
                data
                and size == end
                and await self._download(c, key, url, start=offset, end=end) == data
            ):
                return generation  # already applied: an idempotent retry
            raise ConflictError(
                f"{url}: append at offset {offset} but the object holds {size} bytes",
                url=url,
                actual_size=size,
            )
        if not data:
            return generation
        if size == 0:
            replaced = await self._conditional_upload(c, key, url, data, generation=generation)
            return str(replaced["generation"])

        composed = await self._compose_append(c, key, url, data, meta)
        new_size = int(composed["size"])
        if new_size != size + len(data):
            # Only possible where compose ignores ifGenerationMatch (emulators).
            raise ConflictError(
                f"{url}: compose produced {new_size} bytes, expected {size + len(data)}: "
                "another writer changed the object (the server ignored ifGenerationMatch)",
                url=url,
                actual_size=new_size,
            )
        return str(composed["generation"])

    async def _upload(
        self, c: _Client, key: str, data: bytes, *, generation: str | None = None
    ) -> dict[str, Any]:
        """One single-request upload; with ``generation``, a conditional multipart one.

        Multipart (metadata in the body) is used for conditional uploads because
        fake-gcs-server honours ``ifGenerationMatch`` only there; GCS honours it
        on both. Never resumable: one request, no hidden retries.
        """
        content_type = _content_type(key)
        parameters = None if generation is None else {"ifGenerationMatch": generation}
        result: dict[str, Any] = await c.api.upload(
            self.bucket,
            key,
            data,
            content_type=content_type,
            parameters=parameters,
            metadata=None if generation is None else {"Content-Type": content_type},
            force_resumable_upload=False,
            timeout=self._request_timeout,
        )
        return result

    async def _conditional_upload(
        self, c: _Client, key: str, url: str, data: bytes, *, generation: str
    ) -> dict[str, Any]:
        async def put() -> dict[str, Any]:
            try:
                return await self._upload(c, key, data, generation=generation)
            except aiohttp.ClientResponseError as exc:
                if exc.status == 412:
                    raise _PreconditionFailed from exc
                raise

        return await self._guarded(c, put(), url=url, target="bucket")

    async def _compose_append(
        self, c: _Client, key: str, url: str, data: bytes, meta: dict[str, Any]
    ) -> dict[str, Any]:
        delta = self._internal_key(_APPEND_AREA, uuid.uuid4().hex)
        delta_url = f"{self.scheme}://{self.bucket}/{delta}"
        try:
            await self._guarded(c, self._upload(c, delta, data), url=delta_url, target="bucket")

            async def compose() -> dict[str, Any]:
                try:
                    result: dict[str, Any] = await c.api.compose(
                        self.bucket,
                        key,
                        [key, delta],
                        content_type=meta.get("contentType") or None,
                        params={"ifGenerationMatch": str(meta["generation"])},
                        timeout=self._request_timeout,
                    )
                except aiohttp.ClientResponseError as exc:
                    if exc.status == 412:
                        raise _PreconditionFailed from exc
                    raise
                return result

            return await self._guarded(c, compose(), url=url, target="object")
        finally:
            await self._delete_quietly(c, delta, delta_url)

    # -- the tail log's objects (see evalsyncd.storage.tail) --------------------------------

    def _tail_key(self, name: str) -> str:
        return self._internal_key(TAIL_DIR, name)

    async def _tail_list(self, limit: int | None = None) -> list[str]:
        """Names under ``.evalsyncd/tail/``, newest first (name order): one list per page."""
        base = self._tail_key("")
        c = await self._gcs()
        names: list[str] = []
        params = {
            "prefix": base,
            "maxResults": str(min(limit or self.page_size, self.page_size)),
            "fields": "items(name),nextPageToken",
        }
        while True:
            page: dict[str, Any] = await self._guarded(
                c,
                c.api.list_objects(self.bucket, params=dict(params), timeout=self._request_timeout),
                url=self._tail_url(),
                target="bucket",
            )
            names += [item["name"][len(base) :] for item in page.get("items", ())]
            token = page.get("nextPageToken")
            if not token or (limit is not None and len(names) >= limit):
                break
            params["pageToken"] = token
        return names[:limit] if limit is not None else names

    async def _internal_get(self, key: str, url: str, start: int, end: int | None) -> bytes:
        """Bytes ``[start, end)`` of an object of the internal area: one ranged download."""
        c = await self._gcs()
        if start == 0 and end is None:
            return await self._download(c, key, url)
        return await self._download(c, key, url, start=start, end=end)

    async def _internal_put(self, key: str, url: str, data: bytes, *, create: bool) -> None:
        """One upload; with ``create``, ``ifGenerationMatch=0`` (``ConflictError`` if it exists)."""
        c = await self._gcs()
        if not create:
            await self._guarded(c, self._upload(c, key, data), url=url, target="bucket")
            return
        try:
            await self._conditional_upload(c, key, url, data, generation="0")
        except _PreconditionFailed as exc:
            raise ConflictError(f"{url}: the object exists", url=url) from exc

    async def _tail_delete(self, names: list[str]) -> None:
        """One delete per object, concurrently (missing ones are fine)."""
        c = await self._gcs()

        async def one(name: str) -> None:
            with suppress(ObjectNotFoundError):
                await self._guarded(
                    c,
                    c.api.delete(self.bucket, self._tail_key(name), timeout=self._request_timeout),
                    url=self._tail_url(name),
                    target="object",
                )

        await asyncio.gather(*(one(n) for n in names))

    async def _delete_quietly(self, c: _Client, key: str, url: str) -> None:
        """Delete a temporary object; a failure is logged, never raised (the append stands)."""
        try:
            await c.api.delete(self.bucket, key, timeout=self._request_timeout)
        except Exception as exc:
            if _http_status(exc) == 404:
                return
            log.warning("gcs_temporary_object_left", url=url, error=repr(exc))

    async def _main_stat(self, path: str) -> StorageStat | None:
        """See :meth:`Storage.stat`: size, ``updated`` as mtime, generation as version."""
        key = self._key(path)
        c = await self._gcs()
        meta = await self._metadata(c, key, self.url(path))
        return None if meta is None else _stat_of(meta)

    async def achecksum(self, path: str) -> tuple[str, str] | None:
        """The checksum GCS keeps for the whole object: ``("crc32c", base64 of the
        big-endian CRC32C)`` (GCS computes it for every object, composed ones too),
        or ``None`` if the object is missing or has none. One metadata request.
        (``md5Hash`` is absent on composed objects and never used.) ``None`` too
        while the tail log holds bytes of the file that its object lacks."""
        if await self._tail_entry(path) is not None:
            return None
        key = self._key(path)
        c = await self._gcs()
        meta = await self._metadata(c, key, self.url(path))
        value = meta.get("crc32c") if meta is not None else None
        return ("crc32c", str(value)) if value else None

    async def _main_read_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        """See :meth:`Storage.read_range`: one ranged GET (a 416 at the end gives ``b""``).

        Raises:
            ValueError: ``offset`` or ``length`` is negative.
            ObjectNotFoundError: the object is missing.
        """
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid range offset={offset} length={length}")
        key = self._key(path)
        url = self.url(path)
        c = await self._gcs()
        if length == 0:
            if await self._metadata(c, key, url) is None:
                raise ObjectNotFoundError(f"{url}: no such object", url=url)
            return b""
        return await self._download(
            c, key, url, start=offset, end=None if length is None else offset + length
        )

    async def _main_list_dir(self, prefix: str) -> list[str]:
        """See :meth:`Storage.list_dir`: ``/``-delimited listing, every page.

        The daemon's ``.evalsyncd`` area at the top of the prefix is left out.

        Raises:
            BucketNotFoundError: the bucket is missing.
        """
        dir_key = self._dir_key(prefix)
        hidden = INTERNAL_DIR if dir_key == self._dir_key("") else None
        url = self.url(prefix.strip("/"))
        c = await self._gcs()
        names: set[str] = set()
        params = {
            "prefix": dir_key,
            "delimiter": "/",
            "maxResults": str(self.page_size),
            "fields": "items(name),prefixes,nextPageToken",
        }
        while True:
            page: dict[str, Any] = await self._guarded(
                c,
                c.api.list_objects(self.bucket, params=dict(params), timeout=self._request_timeout),
                url=url,
                target="bucket",
            )
            names.update(item["name"][len(dir_key) :] for item in page.get("items", ()))
            names.update(p[len(dir_key) :].rstrip("/") for p in page.get("prefixes", ()))
            token = page.get("nextPageToken")
            if not token:
                break
            params["pageToken"] = token
        names.discard("")
        if hidden is not None:
            names.discard(hidden)
        return sorted(names)

    async def aremove(self, path: str) -> None:
        """See :meth:`Storage.remove`: no error if the object is missing.

        Raises:
            BucketNotFoundError: the bucket is missing.
        """
        key = self._key(path)
        c = await self._gcs()
        with suppress(ObjectNotFoundError):
            await self._guarded(
                c,
                c.api.delete(self.bucket, key, timeout=self._request_timeout),
                url=self.url(path),
                target="object",
            )
