"""``S3Storage``: the storage contract on Amazon S3 (and S3-compatible servers), via aiobotocore.

aiobotocore 3 is used directly rather than through aioboto3, whose newest
release pins aiobotocore 2 (botocore 1.40): botocore 1.43 costs about 20 %
less CPU per request (``docs/decisions/s3-client.md``, ``bench/sdkcpu.py``).

The backend is split by job:

- this module: settings, the client, keys, reads of main objects, ``write``,
  ``remove``, and which mechanism an ``append`` takes;
- :mod:`._s3multipart`: appends of 5 MiB and more, copied on the server;
- :mod:`._s3legacy`: append segments written by older versions (read, folded);
- :mod:`._s3requests`: the translated S3 calls; :mod:`._s3errors`: the error map.

How ``append(path, data)`` travels (one object per file, nothing else):

- file missing: ``PutObject`` with ``If-None-Match: *``; at offset 0 that is
  the first request (no ``HEAD``), and a 412 sends the append the ways below;
- object of ``multipart_threshold`` (5 MiB) or more: a multipart upload whose
  first part(s) are ``UploadPartCopy`` of the object (``CopySourceIfMatch``,
  parts of at most 5 GiB) and whose last part carries ``data``, completed with
  ``If-Match``; aborted on any failure. About ``len(data)`` on the wire;
- below 5 MiB, where S3 cannot concatenate on the server: the whole object
  rewritten, ``PutObject`` of old bytes + ``data`` with ``If-Match`` on the
  ETag read. The old bytes come from this instance's memory when it wrote the
  object last (:class:`AppendCache`, at most ``cache_max_bytes``): then the
  append is that one request; otherwise a ``HEAD`` and a ``GET`` come first.
  On the wire: the object's new size per append, so a file grown in ``n``
  appends of ``d`` bytes costs about ``d * n**2 / 2`` until it reaches 5 MiB
  (``docs/design.md`` section 6 bounds what that means for the daemon).

A read of a main object is one request (``GET``; ``stat``: one ``HEAD``),
except for an object an older version appended segments to (it carries the
epoch metadata of :mod:`._s3legacy`), which also lists its segments.

Errors are translated at this boundary (:mod:`._s3errors`, see
:mod:`evalsyncd.errors`).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Final

from aiobotocore.config import AioConfig

from evalsyncd.errors import (
    ConflictError,
    InvalidKeyError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage import _s3legacy as legacy
from evalsyncd.storage._base import StorageStat, check_key
from evalsyncd.storage._cloud import INTERNAL_DIR, CloudStorage
from evalsyncd.storage._s3errors import boundary
from evalsyncd.storage._s3multipart import MULTIPART_MIN_BYTES, MiB, append_multipart
from evalsyncd.storage._s3put import LeanPut, S3Client
from evalsyncd.storage._s3requests import S3Requests
from evalsyncd.storage._s3session import new_session, tls_free

__all__ = ["MULTIPART_MIN_BYTES", "AppendCache", "S3Storage"]

USER_AGENT: Final = "evalsyncd"
"""The ``User-Agent`` of every request (botocore adds its own name and version). Given,
botocore sends it as it is; left to botocore, it is rebuilt twice per request from a
dozen components: 7 to 9 % of the CPU of a small ``PutObject`` (a backfill is a stream
of them; ``bench/backfill.py``, ``docs/decisions/s3-client.md``)."""

_RUNTIME: Final = ("_requests", "_cache")
ATTEMPTS: Final = 4
"""Tries when a file changes under a read or an append without ``offset``."""


class AppendCache:
    """The bytes and ETag of small objects this instance wrote last, least recently used
    first; thread-safe. A hit saves an append's ``HEAD`` and ``GET``; a stale entry
    costs one refused ``If-Match`` (then the object is read).

    Args:
        max_bytes: memory bound, bytes.
        max_file_bytes: objects of this size or more are never kept (multipart
            appends need no download).
    """

    def __init__(self, max_bytes: int, max_file_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self._items: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: str) -> tuple[str, bytes] | None:
        """``(etag, content)`` of ``path`` as this instance wrote it last, or ``None``."""
        with self._lock:
            entry = self._items.get(path)
            if entry is not None:
                self._items.move_to_end(path)
            return entry

    def put(self, path: str, etag: str | None, content: bytes | None) -> None:
        """Remember ``content`` at ``etag`` for ``path`` (``None`` either: forget it)."""
        with self._lock:
            old = self._items.pop(path, None)
            if old is not None:
                self._bytes -= len(old[1])
            if etag is None or content is None or len(content) >= self.max_file_bytes:
                return
            self._items[path] = (etag, content)
            self._bytes += len(content)
            while self._bytes > self.max_bytes and self._items:
                _path, (_etag, dropped) = self._items.popitem(last=False)
                self._bytes -= len(dropped)


@dataclass(frozen=True, slots=True)
class _Object:
    """A main object as a ``HEAD`` found it: ETag, size in bytes and mtime in Unix
    seconds (an older version's segments included), and, for an object an older
    version appended segments to, its segment view."""

    etag: str
    size: int
    mtime: float
    old: legacy.View | None = None


class S3Storage(CloudStorage):
    """Files as S3 objects under ``s3://{bucket}/{prefix}/``; see the module docstring.

    Implements ``Storage`` and ``AsyncStorage``. Keys are ``{prefix}/{path}``,
    used as they are (UTF-8). Paths under ``.evalsyncd/`` are reserved.
    Credentials come from the standard AWS chain (environment, shared files,
    ``profile``, instance metadata). Instances hold configuration only and pickle;
    requests go through :class:`~evalsyncd.storage._s3requests.S3Requests`
    (``_requests``) and small objects' bytes are remembered in an
    :class:`AppendCache` (``_cache``): runtime state, rebuilt after unpickling.

    Args:
        bucket: bucket name.
        prefix: key prefix ("" for the bucket root).
        endpoint_url: an S3-compatible endpoint such as ``http://127.0.0.1:8333``;
            ``None`` for AWS.
        region: AWS region; default from the profile or environment, else ``us-east-1``.
        profile: named profile of the shared AWS config files.
        connect_timeout_s: TCP/TLS connect timeout in seconds.
        read_timeout_s: socket read timeout in seconds.
        max_attempts: attempts per request by botocore (standard retry mode),
            including the first; the daemon retries on top.
        addressing_style: ``"path"``, ``"virtual"`` or ``"auto"``; default
            ``"path"`` with an ``endpoint_url``, else ``"auto"``.
        max_pool_connections: HTTP connections per client.
        multipart_threshold: bytes from which appends use multipart uploads
            (S3's minimum part size, 5 MiB, or more).
        cache_max_bytes: memory for the bytes of small objects this instance
            wrote (an append to one of them then needs no download), bytes.
        lean_puts: send ``PutObject`` requests of up to 1 MiB without the SDK's
            request pipeline (:mod:`._s3put`: botocore's URL and signature over
            aiohttp; a failure is sent again through the SDK, on top of its
            ``max_attempts``, unless that is 1); ``False``: every request through
            the SDK.

    Raises:
        ValueError: invalid bucket name or settings.
    """

    scheme = "s3"
    append_in_place_min_bytes = MULTIPART_MIN_BYTES

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 3,
        addressing_style: str | None = None,
        max_pool_connections: int = 32,
        multipart_threshold: int = MULTIPART_MIN_BYTES,
        cache_max_bytes: int = 64 * MiB,
        lean_puts: bool = True,
    ) -> None:
        if multipart_threshold < MULTIPART_MIN_BYTES:
            raise ValueError(f"multipart_threshold must be >= {MULTIPART_MIN_BYTES} bytes")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if cache_max_bytes < 0:
            raise ValueError("cache_max_bytes must be >= 0")
        if addressing_style not in (None, "path", "virtual", "auto"):
            raise ValueError(f"invalid addressing_style {addressing_style!r}")
        self.endpoint_url = endpoint_url
        self.region = region
        self.profile = profile
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_attempts = max_attempts
        self.addressing_style = addressing_style
        self.max_pool_connections = max_pool_connections
        self.multipart_threshold = multipart_threshold
        self.cache_max_bytes = cache_max_bytes
        self.lean_puts = lean_puts
        super().__init__(bucket, prefix)

    multipart_copy: bool = True
    """Capability of the server: ``UploadPartCopy`` works, so appends to objects of
    ``multipart_threshold`` and more copy the old bytes on the server. ``False``
    (a server that lacks it, found by :mod:`evalsyncd.storage.probe`): such appends
    rewrite the whole object with ``If-Match`` too (correct; about the object's size
    on the wire per append)."""

    # -- runtime state (never pickled) -------------------------------------------------

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._requests = S3Requests(self.bucket)
        self._cache = AppendCache(self.cache_max_bytes, self.multipart_threshold)

    def _rooted_at(self, prefix: str) -> S3Storage:
        new = super()._rooted_at(prefix)
        new._cache = AppendCache(self.cache_max_bytes, self.multipart_threshold)  # keyed by path
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in _RUNTIME:
            state.pop(name, None)
        return state

    # -- client ------------------------------------------------------------------------

    async def _open_client(self, stack: AsyncExitStack) -> Any:
        with boundary(self.url()):
            session = new_session(self.profile)  # parsed service data shared per process
            region = self.region or session.get_config_variable("region") or "us-east-1"
            style = self.addressing_style or ("path" if self.endpoint_url else "auto")
            config = AioConfig(
                region_name=region,
                connect_timeout=self.connect_timeout_s,
                read_timeout=self.read_timeout_s,
                retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
                s3={"addressing_style": style},
                max_pool_connections=self.max_pool_connections,
                user_agent=USER_AGENT,
            )
            sdk = await stack.enter_async_context(
                session.create_client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=region,
                    config=config,
                    # no CA bundle to load for a plain-HTTP endpoint (a local server)
                    verify=False if tls_free(self.endpoint_url) else None,
                )
            )
            if not self.lean_puts:
                return S3Client(sdk)
            return S3Client(
                sdk,
                lambda: LeanPut.open(
                    stack,
                    session,
                    sdk,
                    self.bucket,
                    connect_timeout_s=self.connect_timeout_s,
                    read_timeout_s=self.read_timeout_s,
                    max_connections=self.max_pool_connections,
                    user_agent=USER_AGENT,
                    sdk_retries=self.max_attempts > 1,
                ),
            )

    # -- keys ----------------------------------------------------------------------------

    def _key(self, path: str) -> str:
        check_key(path)
        if path.split("/", 1)[0] == INTERNAL_DIR:
            raise InvalidKeyError(f"invalid storage key {path!r}: {INTERNAL_DIR}/ is reserved")
        return self._join(path)

    def _seg_base(self) -> str:
        """Key prefix of every append segment an older version wrote: ``…/.evalsyncd/seg/``."""
        return self._internal_key(legacy.SEGMENT_DIR) + "/"

    async def _old_view(self, client: Any, path: str) -> legacy.View | None:
        """An older version's view of ``path``: segments listed, then a ``HEAD``."""
        return await legacy.view(
            self._requests, client, self._key(path), self._seg_base(), path, self.url(path)
        )

    # -- reading ---------------------------------------------------------------------------

    async def _main_read(self, path: str) -> bytes:
        """See :meth:`Storage.read`: one ``GET`` (an older version's segments stitched)."""
        key, url = self._key(path), self.url(path)
        client = await self._client()
        for _attempt in range(ATTEMPTS):
            body, resp = await self._requests.get(client, key, url)
            epoch = legacy.epoch_of(resp)
            if epoch is None:
                return body
            view = await self._old_view(client, path)
            if view is None or view.epoch != epoch or view.main_size < len(body):
                continue  # rewritten meanwhile
            try:
                rest = await legacy.read_span(
                    self._requests, client, key, url, view, len(body), view.size
                )
            except legacy.Changed:
                continue
            return body + rest
        raise TransientStorageError(f"{url}: the file kept changing while it was read", url=url)

    async def _main_read_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        """See :meth:`Storage.read_range`: one ranged ``GET`` (at or past the end: and a
        ``HEAD``); an older version's segments are stitched."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid range offset={offset} length={length}")
        key, url = self._key(path), self.url(path)
        client = await self._client()
        if length == 0:
            if not await self._main_exists(path):
                raise ObjectNotFoundError(f"{url}: no such object", url=url)
            return b""
        end = None if length is None else offset + length
        for _attempt in range(ATTEMPTS):
            body, resp = await self._requests.get(client, key, url, start=offset, end=end)
            if "Size" in resp:  # 416: offset at or past the main object's end
                head = await self._requests.head(client, key, url)
                if head is None:
                    raise ObjectNotFoundError(f"{url}: no such object", url=url)
                resp = head
            epoch = legacy.epoch_of(resp)
            if epoch is None or (length is not None and len(body) == length):
                return body
            view = await self._old_view(client, path)
            if view is None or view.epoch != epoch:
                continue
            lo = offset + len(body)
            hi = view.size if end is None else min(end, view.size)
            if lo >= hi:
                return body
            try:
                return body + await legacy.read_span(self._requests, client, key, url, view, lo, hi)
            except legacy.Changed:
                continue
        raise TransientStorageError(f"{url}: the file kept changing while it was read", url=url)

    async def _main_stat(self, path: str) -> StorageStat | None:
        """See :meth:`Storage.stat`: one ``HEAD``; version = the ETag."""
        current = await self._current(await self._client(), path)
        if current is None:
            return None
        return StorageStat(size=current.size, mtime=current.mtime, version=current.etag)

    async def _current(self, client: Any, path: str) -> _Object | None:
        """The main object now: one ``HEAD`` (an older version's object: and a listing)."""
        key, url = self._key(path), self.url(path)
        head = await self._requests.head(client, key, url)
        if head is None:
            return None
        if legacy.epoch_of(head) is not None:
            view = await self._old_view(client, path)
            if view is None:
                return None
            return _Object(view.etag, view.size, view.mtime, view)
        return _Object(
            str(head["ETag"]), int(head["ContentLength"]), head["LastModified"].timestamp()
        )

    async def _main_exists(self, path: str) -> bool:
        """See :meth:`Storage.exists`: one ``HEAD`` of the main object."""
        key = self._key(path)
        return await self._requests.head(await self._client(), key, self.url(path)) is not None

    async def _main_list_dir(self, prefix: str) -> list[str]:
        """See :meth:`Storage.list_dir`: ``ListObjectsV2`` with ``/`` as delimiter, all pages.

        The daemon's ``.evalsyncd`` area is hidden.
        """
        dir_key = self._dir_key(prefix)
        url = self.url(prefix.strip("/"))
        objects, prefixes = await self._requests.list(
            await self._client(), url, dir_key, delimiter="/"
        )
        names = {obj["Key"][len(dir_key) :] for obj in objects}
        names.update(common[len(dir_key) :].rstrip("/") for common in prefixes)
        names.discard("")
        if not prefix.strip("/"):
            names.discard(INTERNAL_DIR)
        return sorted(names)

    # -- the internal area's objects (the tail log, the catalog) ----------------------------

    async def _list_keys(self, prefix: str, url: str, limit: int | None = None) -> list[str]:
        """Keys under ``prefix`` in key order: ``ListObjectsV2``, pages of ``limit`` keys."""
        objects, _ = await self._requests.list(await self._client(), url, prefix, limit=limit)
        return [obj["Key"] for obj in objects]

    async def _delete_keys(self, keys: list[str], url: str) -> None:
        """``DeleteObjects``, 1,000 keys per request (missing ones are fine)."""
        await self._requests.delete(await self._client(), keys, url)

    async def _internal_get(self, key: str, url: str, start: int, end: int | None) -> bytes:
        """Bytes ``[start, end)`` of an object of the internal area: one ranged ``GetObject``."""
        data, _resp = await self._requests.get(await self._client(), key, url, start=start, end=end)
        return data

    async def _internal_put(self, key: str, url: str, data: bytes, *, create: bool) -> None:
        """``PutObject``; with ``create``, ``If-None-Match: *`` (``ConflictError`` if it exists)."""
        extra = {"IfNoneMatch": "*"} if create else {}
        await self._requests.put(await self._client(), key, url, data, **extra)

    # -- writing ----------------------------------------------------------------------------

    async def awrite(self, path: str, data: bytes) -> str | None:
        """See :meth:`Storage.write`: one ``PutObject``; returns its ETag.

        The new object has no epoch, so an older version's segments of the old
        content are never read again (the daemon deletes them at its next start).
        """
        key, url = self._key(path), self.url(path)
        data = bytes(data)
        self._cache.put(path, None, None)
        etag = await self._requests.put(await self._client(), key, url, data)
        self._cache.put(path, etag, data)
        return etag

    async def aremove(self, path: str) -> None:
        """See :meth:`Storage.remove`: one ``DeleteObjects`` of the main object."""
        key, url = self._key(path), self.url(path)
        self._cache.put(path, None, None)
        await self._requests.delete(await self._client(), [key], url)

    async def aappend(self, path: str, data: bytes, *, offset: int | None = None) -> str | None:
        """See :meth:`Storage.append` and the module docstring for the mechanisms.

        Returns:
            The object's ETag after the append.

        Raises:
            ConflictError: ``offset`` did not match the size (``actual_size`` says
                what it is), or another writer won a race at the same offset.
        """
        key, url = self._key(path), self.url(path)
        client = await self._client()
        data = bytes(data)
        known = self._cache.get(path)
        if known is not None and data and offset in (None, len(known[1])):
            # The object as this instance wrote it last: one conditional rewrite.
            content = known[1] + data
            try:
                etag = await self._requests.put(client, key, url, content, IfMatch=known[0])
            except ConflictError:
                self._cache.put(path, None, None)  # changed, or our answer was lost: look
            else:
                self._cache.put(path, etag, content)
                return etag
        if known is None and offset == 0:
            # At offset 0 the object is usually missing (a new file): create it with no
            # HEAD first. One that exists (412) takes the path below, which tells our own
            # earlier write (a retry) from another writer's.
            try:
                etag = await self._requests.put(client, key, url, data, IfNoneMatch="*")
            except ConflictError:
                pass
            else:
                self._cache.put(path, etag, data)
                return etag
        for _attempt in range(ATTEMPTS):
            current = await self._current(client, path)
            size = current.size if current is not None else 0
            if offset is not None and size != offset:
                if (
                    current is not None
                    and size == offset + len(data)
                    and await self._holds(client, path, current, offset, data)
                ):
                    return current.etag  # already applied: a retry
                raise ConflictError(
                    f"{url}: append at offset {offset} but the file holds {size} bytes",
                    url=url,
                    actual_size=size,
                )
            try:
                return await self._append_at(client, path, current, data)
            except ConflictError as exc:
                # Lost a race, or won it and lost the answer (botocore retried).
                self._cache.put(path, None, None)
                now = await self._current(client, path)
                now_size = now.size if now is not None else 0
                applied = now_size == size + len(data) or (
                    offset is None and now_size > size + len(data)
                )
                if now is not None and applied and await self._holds(client, path, now, size, data):
                    return now.etag
                if offset is not None:
                    raise ConflictError(
                        f"{url}: another writer changed the file during an append at {offset}",
                        url=url,
                        actual_size=now_size,
                    ) from exc
        raise ConflictError(f"{url}: append kept losing races with other writers", url=url)

    async def _holds(
        self, client: Any, path: str, current: _Object, start: int, data: bytes
    ) -> bool:
        """Whether bytes ``[start, start+len(data))`` of the object ``current`` equal ``data``."""
        if not data:
            return True
        key, url, end = self._key(path), self.url(path), start + len(data)
        try:
            if current.old is not None:
                got = await legacy.read_span(
                    self._requests, client, key, url, current.old, start, end
                )
            else:
                got, _resp = await self._requests.get(
                    client, key, url, start=start, end=end, if_match=current.etag
                )
        except (ObjectNotFoundError, ConflictError, legacy.Changed):
            return False
        return got == data

    async def _append_at(
        self, client: Any, path: str, current: _Object | None, data: bytes
    ) -> str | None:
        """Append ``data`` to ``current`` by the mechanism that fits; see the module docstring."""
        key, url = self._key(path), self.url(path)
        if current is None:
            etag = await self._requests.put(client, key, url, data, IfNoneMatch="*")
            self._cache.put(path, etag, data)
            return etag
        if not data:
            return current.etag
        old = current.old
        if (
            current.size >= self.multipart_threshold
            and self.multipart_copy
            and (old is None or not old.chain)
        ):
            etag = await append_multipart(
                self._requests,
                client,
                key,
                url,
                etag=current.etag,
                size=current.size,
                metadata={},  # an older version's epoch ends here
                data=data,
            )
            self._cache.put(path, None, None)
            return etag
        known = self._cache.get(path)
        if known is not None and known[0] == current.etag and len(known[1]) == current.size:
            content = known[1]
        elif old is not None:
            try:
                content = await legacy.read_span(
                    self._requests, client, key, url, old, 0, current.size
                )
            except legacy.Changed as exc:
                raise ConflictError(f"{url}: the file changed during an append", url=url) from exc
        else:
            content, _resp = await self._requests.get(client, key, url, if_match=current.etag)
            if len(content) != current.size:
                raise ConflictError(f"{url}: the file changed during an append", url=url)
        content += data
        etag = await self._requests.put(client, key, url, content, IfMatch=current.etag)
        self._cache.put(path, etag, content)
        if old is not None and old.chain:  # folded: its segments are dead (best effort)
            with contextlib.suppress(StorageError):
                await self._requests.delete(client, [s.key for s in old.chain], url)
        return etag

    async def afold_old_segments(self) -> int:
        """Fold the append segments an older version left under this prefix into their main
        objects and delete them (:func:`evalsyncd.storage._s3legacy.fold_all`). The daemon
        runs it once at start, on a prefix it owns.

        Returns:
            How many files were folded.

        Raises:
            StorageError: the listing failed.
        """
        return await legacy.fold_all(
            self._requests, await self._client(), self._seg_base(), self._key, self.url
        )
