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

Errors are translated at this boundary by :func:`translate_error` (one table;
it and the requests live in :mod:`._gcsclient`, the client of one event loop):

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
import os
import uuid
from contextlib import AsyncExitStack, suppress
from datetime import datetime
from typing import Any, cast

import aiohttp
import structlog
from gcloud.aio.storage import Storage as _SDKClient

from evalsyncd.errors import ConflictError, ObjectNotFoundError, ServerBehaviourError
from evalsyncd.storage._base import StorageStat
from evalsyncd.storage._cas import load_default_cas
from evalsyncd.storage._cloud import INTERNAL_DIR, CloudStorage
from evalsyncd.storage._gcsclient import GCSClient, PreconditionFailed, translate_error

__all__ = ["GCSStorage", "translate_error"]

log = structlog.get_logger("evalsyncd.storage")

_APPEND_AREA = "gcs-append"
_MAX_APPEND_ATTEMPTS = 5


def _size(meta: dict[str, Any]) -> int:
    """An object resource's ``size``, bytes; absent means 0 (Google's testbench omits it
    for an empty object, where GCS sends ``"0"``)."""
    return int(meta.get("size") or 0)


def _generation(meta: dict[str, Any], url: str, call: str = "the object's metadata") -> str:
    """An object resource's ``generation``; every GCS answer carries one.

    Raises:
        ServerBehaviourError: it is missing.
    """
    value = meta.get("generation")
    if value in (None, ""):
        answer = f"an object resource without generation (fields: {', '.join(sorted(meta))})"
        raise ServerBehaviourError(
            f"{url}: the server answered {call} with {answer}",
            url=url,
            feature="generation",
            answer=answer,
        )
    return str(value)


def _stat_of(meta: dict[str, Any], url: str = "") -> StorageStat:
    updated = meta.get("updated") or meta.get("timeCreated")
    mtime = datetime.fromisoformat(updated).timestamp() if updated else 0.0
    return StorageStat(size=_size(meta), mtime=mtime, version=_generation(meta, url))


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
        load_default_cas()  # its requests (and the token's) use aiohttp's default TLS context
        return aiohttp.ClientSession(timeout=self._timeout())

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)

    async def _open_client(self, stack: AsyncExitStack) -> GCSClient:
        session = self._new_session()
        stack.push_async_callback(session.close)
        api = _SDKClient(
            # cast: gcloud-aio annotates a requests session when requests is installed
            service_file=self.service_file,
            session=cast(Any, session),
            api_root=self.endpoint_url,
        )
        emulator = self.endpoint_url is not None or bool(os.environ.get("STORAGE_EMULATOR_HOST"))
        # gcloud-aio annotates ``timeout`` as int but hands it to aiohttp, which
        # takes a ClientTimeout (or float seconds): keep the connect limit too.
        return GCSClient(
            api,
            bucket=self.bucket,
            bucket_url=self.url(),
            timeout=self._timeout(),
            emulator=emulator,
        )

    async def _gcs(self) -> GCSClient:
        client: GCSClient = await self._client()
        return client

    # -- error boundary ------------------------------------------------------------

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
        return await c.download(key, self.url(path))

    async def awrite(self, path: str, data: bytes) -> str | None:
        """See :meth:`Storage.write`: one upload, atomic on GCS.

        Returns:
            The new generation, as a string.
        """
        key = self._key(path)
        c = await self._gcs()
        meta = await c.guarded(c.upload(key, data), url=self.url(path), target="bucket")
        return _generation(meta, self.url(path), "an upload")

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
                except PreconditionFailed:
                    log.info("gcs_append_precondition_failed", url=url, offset=offset)
        raise ConflictError(
            f"{url}: the object kept changing during {_MAX_APPEND_ATTEMPTS} append attempts",
            url=url,
        )

    async def _append_once(
        self, c: GCSClient, key: str, url: str, data: bytes, offset: int | None
    ) -> str:
        meta = await c.metadata(key, url)
        if meta is None:
            if offset not in (None, 0):
                raise ConflictError(
                    f"{url}: append at offset {offset} but the object does not exist",
                    url=url,
                    actual_size=0,
                )
            created = await c.conditional_upload(key, url, data, generation="0")
            return _generation(created, url, "an upload")

        size, generation = _size(meta), _generation(meta, url)
        if offset is not None and size != offset:
            end = offset + len(data)
            if data and size == end and await c.download(key, url, start=offset, end=end) == data:
                return generation  # already applied: an idempotent retry
            raise ConflictError(
                f"{url}: append at offset {offset} but the object holds {size} bytes",
                url=url,
                actual_size=size,
            )
        if not data:
            return generation
        if size == 0:
            replaced = await c.conditional_upload(key, url, data, generation=generation)
            return _generation(replaced, url, "an upload")

        composed = await self._compose_append(c, key, url, data, meta)
        new_size = _size(composed)  # a compose answer without size: 0, caught just below
        if new_size != size + len(data):
            # Only possible where compose ignores ifGenerationMatch (emulators).
            raise ConflictError(
                f"{url}: compose produced {new_size} bytes, expected {size + len(data)}: "
                "another writer changed the object (the server ignored ifGenerationMatch)",
                url=url,
                actual_size=new_size,
            )
        return _generation(composed, url, "compose")

    async def _compose_append(
        self, c: GCSClient, key: str, url: str, data: bytes, meta: dict[str, Any]
    ) -> dict[str, Any]:
        delta = self._internal_key(_APPEND_AREA, uuid.uuid4().hex)
        delta_url = f"{self.scheme}://{self.bucket}/{delta}"
        try:
            await c.guarded(c.upload(delta, data), url=delta_url, target="bucket")

            async def compose() -> dict[str, Any]:
                try:
                    result: dict[str, Any] = await c.api.compose(
                        self.bucket,
                        key,
                        [key, delta],
                        content_type=meta.get("contentType") or None,
                        params={"ifGenerationMatch": _generation(meta, url)},
                        timeout=c.timeout,
                    )
                except aiohttp.ClientResponseError as exc:
                    if exc.status == 412:
                        raise PreconditionFailed from exc
                    raise
                return result

            return await c.guarded(compose(), url=url, target="object")
        finally:
            await c.delete_quietly(delta, delta_url)

    # -- the internal area's objects (the tail log, the catalog) ----------------------------

    async def _list_keys(self, prefix: str, url: str, limit: int | None = None) -> list[str]:
        """Names under ``prefix`` in name order: one list request per page."""
        c = await self._gcs()
        keys, _ = await c.list(prefix, url, page_size=self.page_size, limit=limit)
        return keys

    async def _internal_get(self, key: str, url: str, start: int, end: int | None) -> bytes:
        """Bytes ``[start, end)`` of an object of the internal area: one ranged download."""
        c = await self._gcs()
        if start == 0 and end is None:
            return await c.download(key, url)
        return await c.download(key, url, start=start, end=end)

    async def _internal_put(self, key: str, url: str, data: bytes, *, create: bool) -> None:
        """One upload; with ``create``, ``ifGenerationMatch=0`` (``ConflictError`` if it exists)."""
        c = await self._gcs()
        if not create:
            await c.guarded(c.upload(key, data), url=url, target="bucket")
            return
        try:
            await c.conditional_upload(key, url, data, generation="0")
        except PreconditionFailed as exc:
            raise ConflictError(f"{url}: the object exists", url=url) from exc

    async def _delete_keys(self, keys: list[str], url: str) -> None:
        """One delete per object, concurrently (missing ones are fine)."""
        c = await self._gcs()

        async def one(key: str) -> None:
            with suppress(ObjectNotFoundError):
                await c.guarded(
                    c.api.delete(self.bucket, key, timeout=c.timeout),
                    url=f"{self.scheme}://{self.bucket}/{key}",
                    target="object",
                )

        await asyncio.gather(*(one(k) for k in keys))

    async def _main_stat(self, path: str) -> StorageStat | None:
        """See :meth:`Storage.stat`: size, ``updated`` as mtime, generation as version."""
        key = self._key(path)
        c = await self._gcs()
        meta = await c.metadata(key, self.url(path))
        return None if meta is None else _stat_of(meta, self.url(path))

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
        meta = await c.metadata(key, self.url(path))
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
            if await c.metadata(key, url) is None:
                raise ObjectNotFoundError(f"{url}: no such object", url=url)
            return b""
        return await c.download(
            key, url, start=offset, end=None if length is None else offset + length
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
        keys, prefixes = await c.list(dir_key, url, page_size=self.page_size, delimiter="/")
        names = {key[len(dir_key) :] for key in keys}
        names.update(p[len(dir_key) :].rstrip("/") for p in prefixes)
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
            await c.guarded(
                c.api.delete(self.bucket, key, timeout=c.timeout),
                url=self.url(path),
                target="object",
            )
