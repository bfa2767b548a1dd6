"""``S3Storage``: the storage contract on Amazon S3 (and S3-compatible servers), via aiobotocore.

aiobotocore 3 is used directly rather than through aioboto3, whose newest
release pins aiobotocore 2 (botocore 1.40): botocore 1.43 costs about 20 %
less CPU per request (``docs/decisions/s3-client.md``, ``bench/sdkcpu.py``).

The backend is split by job:

- this module: settings, the client, keys, reads of main objects, ``write``,
  ``remove``, and which mechanism an ``append`` takes;
- :mod:`._s3segments`: the segment log (appends below 5 MiB, compaction, the
  caches of this instance), with the layout of the segment objects;
- :mod:`._s3multipart`: appends of 5 MiB and more, copied on the server;
- :mod:`._s3requests`: the translated S3 calls; :mod:`._s3errors`: the error map.

How ``append(path, data)`` travels, at about ``len(data)`` bytes on the wire:

- file missing: ``PutObject`` of the main object with ``If-None-Match: *``
  (a new epoch);
- main object of ``multipart_threshold`` (5 MiB) or more and no pending
  segments: a multipart upload whose first part(s) are ``UploadPartCopy`` of
  the main object (``CopySourceIfMatch``, parts of at most 5 GiB) and whose last
  part carries ``data``, completed with ``If-Match``; aborted on any failure;
- otherwise (below 5 MiB, where S3 cannot concatenate on the server): ``data``
  becomes the segment at the file's current size (see :mod:`._s3segments`).
  A main object without an epoch (written by ``write`` or another tool) is
  rewritten instead, with ``If-Match``, to start an epoch.

Wire cost (measured through a counting proxy, requests and responses included):
a file grown to 8 MiB in 64 appends costs about 1.95x its size, to 64 MiB in
256 appends about 1.1x. Below 5 MiB every byte travels at least twice (as a
segment, then inside the first object of 5 MiB, which S3 cannot assemble on the
server), so ``compact_ratio`` is 2 rather than 1; with tiny appends the
``max_segments`` cap dominates (a compaction every 33 appends).

Errors are translated at this boundary (:mod:`._s3errors`, see
:mod:`evalsyncd.errors`).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any, Final

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

from evalsyncd.errors import (
    ConflictError,
    InvalidKeyError,
    ObjectNotFoundError,
    TransientStorageError,
)
from evalsyncd.storage._base import StorageStat, check_key
from evalsyncd.storage._cloud import INTERNAL_DIR, CloudStorage
from evalsyncd.storage._s3errors import boundary
from evalsyncd.storage._s3multipart import MULTIPART_MIN_BYTES, MiB, append_multipart
from evalsyncd.storage._s3requests import S3Requests
from evalsyncd.storage._s3segments import (
    ATTEMPTS,
    EPOCH_META,
    Changed,
    SegmentLog,
    SegmentPaths,
    SegmentPolicy,
    View,
    epoch_meta,
    new_epoch,
)

__all__ = ["MULTIPART_MIN_BYTES", "S3Storage"]

_RUNTIME: Final = ("_requests", "_segments")

USER_AGENT: Final = "evalsyncd"
"""The ``User-Agent`` of every request (botocore adds its own name and version). Given,
botocore sends it as it is; left to
botocore, it is rebuilt twice per request from a dozen components, about 5 % of the
CPU of a small ``PutObject`` (a backfill is a stream of them; ``bench/backfill.py``)."""


class S3Storage(CloudStorage):
    """Files as S3 objects under ``s3://{bucket}/{prefix}/``; see the module docstring.

    Implements ``Storage`` and ``AsyncStorage``. Keys are ``{prefix}/{path}``,
    used as they are (UTF-8). Paths under ``.evalsyncd/`` are reserved.
    Credentials come from the standard AWS chain (environment, shared files,
    ``profile``, instance metadata). Instances hold configuration only and pickle.

    Appends below 5 MiB are the job of its segment log
    (:class:`~evalsyncd.storage._s3segments.SegmentLog`, ``_segments``), requests
    go through :class:`~evalsyncd.storage._s3requests.S3Requests` (``_requests``):
    both runtime state, rebuilt after unpickling.

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
        max_segments: pending segments per file before compaction.
        compact_ratio: compact when pending segments exceed this many times the
            main object's size (2 rather than 1: see the module docstring's wire cost).
        max_lag_s: compact on append once the oldest pending segment this
            instance wrote is this many seconds old, so tools reading only the
            main object stay at most about this far behind an active file
            (an idle one is compacted by ``flush()``).
        cache_max_bytes: memory for the bytes of small files this instance
            appends to (compaction then needs no download).

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
        max_segments: int = 32,
        compact_ratio: float = 2.0,
        max_lag_s: float = 60.0,
        cache_max_bytes: int = 64 * MiB,
    ) -> None:
        if multipart_threshold < MULTIPART_MIN_BYTES:
            raise ValueError(f"multipart_threshold must be >= {MULTIPART_MIN_BYTES} bytes")
        if max_attempts < 1 or max_segments < 1 or compact_ratio <= 0:
            raise ValueError("max_attempts and max_segments must be >= 1, compact_ratio > 0")
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
        self.max_segments = max_segments
        self.compact_ratio = compact_ratio
        self.max_lag_s = max_lag_s
        self.cache_max_bytes = cache_max_bytes
        super().__init__(bucket, prefix)

    multipart_copy: bool = True
    """Capability of the server: ``UploadPartCopy`` works, so appends to objects of
    ``multipart_threshold`` and more copy the old bytes on the server. ``False``
    (a server that lacks it, found by :mod:`evalsyncd.storage.probe`): such appends
    go to the segment log, whose compaction rewrites the whole object with
    ``If-Match`` (correct; about the object's size on the wire per compaction)."""

    # -- runtime state (never pickled) -------------------------------------------------

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._requests = S3Requests(self.bucket)
        policy = SegmentPolicy(
            multipart_threshold=self.multipart_threshold,
            max_segments=self.max_segments,
            compact_ratio=self.compact_ratio,
            max_lag_s=self.max_lag_s,
            cache_max_bytes=self.cache_max_bytes,
        )
        paths = SegmentPaths(main_key=self._key, segment_dir=self._segment_dir, url=self.url)
        self._segments = SegmentLog(self._requests, policy, paths)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in _RUNTIME:
            state.pop(name, None)
        return state

    # -- client ------------------------------------------------------------------------

    async def _open_client(self, stack: AsyncExitStack) -> Any:
        with boundary(self.url()):
            session = AioSession(profile=self.profile)
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
            return await stack.enter_async_context(
                session.create_client(
                    "s3", endpoint_url=self.endpoint_url, region_name=region, config=config
                )
            )

    # -- keys ----------------------------------------------------------------------------

    def _key(self, path: str) -> str:
        check_key(path)
        if path.split("/", 1)[0] == INTERNAL_DIR:
            raise InvalidKeyError(f"invalid storage key {path!r}: {INTERNAL_DIR}/ is reserved")
        return self._join(path)

    def _segment_dir(self, path: str) -> str:
        """Key prefix of all segments of ``path``, every epoch: ``…/seg/{path}/``."""
        return self._internal_key("seg", path) + "/"

    # -- reading ---------------------------------------------------------------------------

    async def _main_read(self, path: str) -> bytes:
        """See :meth:`Storage.read`: the main object plus its chain of segments."""
        key, url = self._key(path), self.url(path)
        client = await self._client()
        for _attempt in range(ATTEMPTS):
            body, resp = await self._requests.get(client, key, url)
            epoch = resp.get("Metadata", {}).get(EPOCH_META)
            if epoch is None:
                return body
            view = await self._segments.view(client, path)
            if view.epoch != epoch or view.main_size < len(body):
                continue  # rewritten meanwhile
            try:
                return body + await self._segments.read_span(
                    client, path, view, len(body), view.size
                )
            except Changed:
                continue
        raise TransientStorageError(f"{url}: the file kept changing while it was read", url=url)

    async def _main_read_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        """See :meth:`Storage.read_range`: one ranged GET while the bytes are in the main object."""
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
            epoch = resp.get("Metadata", {}).get(EPOCH_META)
            if epoch is None or (length is not None and len(body) == length):
                return body
            view = await self._segments.view(client, path)
            if view.epoch != epoch:
                continue
            lo = offset + len(body)
            hi = view.size if end is None else min(end, view.size)
            if lo >= hi:
                return body
            try:
                return body + await self._segments.read_span(client, path, view, lo, hi)
            except Changed:
                continue
        raise TransientStorageError(f"{url}: the file kept changing while it was read", url=url)

    async def _main_stat(self, path: str) -> StorageStat | None:
        """See :meth:`Storage.stat`: size of main object + chain; version = main ETag."""
        check_key(path)
        view = await self._segments.view(await self._client(), path)
        if not view.exists:
            return None
        return StorageStat(size=view.size, mtime=view.mtime, version=view.etag)

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

        The new main object has no epoch, so pending segments of the old content
        are invisible at once. Those this instance appended are deleted
        afterwards; any others (left by another process, or by a crash) are
        invisible garbage that the next compaction of the file deletes. Skipping
        that listing keeps a write at one request.
        """
        key, url = self._key(path), self.url(path)
        client = await self._client()
        data = bytes(data)
        had_segments = self._segments.is_pending(path)
        self._segments.drop_hint(path)
        etag = await self._requests.put(client, key, url, data)
        self._segments.forget(path)
        if had_segments:
            await self._segments.cleanup(client, path)
        return etag

    async def aremove(self, path: str) -> None:
        """See :meth:`Storage.remove`: deletes the main object, then its segments."""
        key, url = self._key(path), self.url(path)
        client = await self._client()
        self._segments.drop_hint(path)
        await self._requests.delete(client, [key], url)
        self._segments.forget(path)
        await self._segments.cleanup(client, path)

    async def aappend(self, path: str, data: bytes, *, offset: int | None = None) -> str | None:
        """See :meth:`Storage.append` and the module docstring for the mechanisms.

        Returns:
            The main object's ETag after the append (unchanged by a segment append).

        Raises:
            ConflictError: ``offset`` did not match the size (``actual_size`` says
                what it is), or another writer won a race at the same offset.
        """
        key, url = self._key(path), self.url(path)
        client = await self._client()
        segments = self._segments
        data = bytes(data)
        for attempt in range(ATTEMPTS):
            hint = segments.take_hint(path)
            if attempt == 0 and hint is not None and offset is not None and hint.size == offset:
                view = hint
            else:
                view = await segments.view(client, path)
            size = view.size
            if offset is not None and size != offset:
                if size == offset + len(data) and await segments.holds(
                    client, path, view, offset, data
                ):
                    return view.etag  # already applied: a retry
                raise ConflictError(
                    f"{url}: append at offset {offset} but the file holds {size} bytes",
                    url=url,
                    actual_size=size,
                )
            try:
                return await self._append_at(client, path, key, view, data)
            except ConflictError as exc:
                # Lost a race, or won it and lost the response (botocore retried).
                now = await segments.view(client, path)
                applied = now.size == size + len(data) or (
                    offset is None and now.size > size + len(data)
                )
                if applied and await segments.holds(client, path, now, size, data):
                    return now.etag
                if offset is not None:
                    raise ConflictError(
                        f"{url}: another writer changed the file during an append at {offset}",
                        url=url,
                        actual_size=now.size,
                    ) from exc
        raise ConflictError(f"{url}: append kept losing races with other writers", url=url)

    async def _append_at(
        self, client: Any, path: str, key: str, view: View, data: bytes
    ) -> str | None:
        """Append ``data`` at ``view.size`` by the mechanism that fits; see the module docstring."""
        url = self.url(path)
        segments = self._segments
        if not view.exists:
            epoch = new_epoch()
            etag = await self._requests.put(
                client, key, url, data, IfNoneMatch="*", Metadata=epoch_meta(epoch)
            )
            segments.cache.put(path, epoch, data)
            return etag
        if not data:
            return view.etag
        if view.epoch is None and (view.size < self.multipart_threshold or not self.multipart_copy):
            # No epoch yet (written by write() or another tool): rewrite to start one.
            content = await segments.content(client, path, view) + data
            epoch = new_epoch()
            etag = await self._requests.put(
                client, key, url, content, IfMatch=view.etag, Metadata=epoch_meta(epoch)
            )
            segments.cache.put(path, epoch, content)
            return etag
        if view.main_size >= self.multipart_threshold and not view.chain and self.multipart_copy:
            return await self._append_multipart(client, path, key, view, data)
        return await segments.append(client, path, view, data)

    async def _append_multipart(
        self, client: Any, path: str, key: str, view: View, data: bytes
    ) -> str:
        """Main object (copied on the server) + ``data`` as one multipart upload."""
        etag = await append_multipart(
            self._requests,
            client,
            key,
            self.url(path),
            etag=view.etag,
            size=view.main_size,
            metadata=epoch_meta(view.epoch),
            data=data,
        )
        self._segments.cache.put(path, None, None)
        return etag

    async def aflush(self) -> None:
        """See :meth:`Storage.flush`: compact every file this instance left segments in.

        Raises:
            StorageError: the first failure, after every file was tried; those
                files stay on the list for the next flush.
        """
        if not self._segments.has_pending():
            return
        await self._segments.flush(await self._client())
