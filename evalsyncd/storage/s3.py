"""``S3Storage``: the storage contract on Amazon S3 (and S3-compatible servers), via aiobotocore.

aiobotocore 3 is used directly rather than through aioboto3, whose newest
release pins aiobotocore 2 (botocore 1.40): botocore 1.43 costs about 20 %
less CPU per request (``docs/decisions/s3-client.md``, ``bench/sdkcpu.py``).

Layout under ``s3://{bucket}/{prefix}/``::

    {prefix}/{path}                                   the main object of a file
    {prefix}/.evalsyncd/seg/{path}/@{epoch}/{start}   a pending append segment:
                                                      bytes [start, start+size) of
                                                      the file; start is 20 digits

A file is its **main object** followed by the **chain** of its segments: the
segment whose start is the main object's size, then the one starting where that
one ends, and so on. Segments belong to an **epoch**, a random 16-hex-digit id
stored in the main object's metadata (``x-amz-meta-evalsyncd-epoch``); segments
of any other epoch are invisible. A file keeps its epoch while it only grows
(segment appends, compaction, multipart appends); ``write`` (and ``remove``)
end it, so stale segments can never be read as part of new content, whatever
crashes in between. Within one epoch the file is append-only: its bytes
``[0, size)`` never change, which makes a segment whose start lies below the
main object's size *stale* (already inside it): readers skip it, cleanup deletes
it.

How ``append(path, data)`` travels, at about ``len(data)`` bytes on the wire:

- file missing: ``PutObject`` of the main object with ``If-None-Match: *``
  (a new epoch);
- main object of ``multipart_threshold`` (5 MiB) or more and no pending
  segments: a multipart upload whose first part(s) are ``UploadPartCopy`` of
  the main object (``CopySourceIfMatch``, parts of at most 5 GiB) and whose last
  part carries ``data``, completed with ``If-Match``; aborted on any failure;
- otherwise (below 5 MiB, where S3 cannot concatenate on the server): ``data``
  becomes the segment at the file's current size, created with
  ``If-None-Match: *`` so that of two writers racing at one offset exactly one
  wins. The append is confirmed once a ``HEAD`` shows the main object
  unchanged (same ETag and epoch): the segment is then on the chain.
  A main object without an epoch (written by ``write`` or another tool) is
  rewritten instead, with ``If-Match``, to start an epoch.

**Compaction** rewrites the main object as main + chain (``PutObject`` with
``If-Match`` on the ETag read), then deletes the compacted segments. A crash
between the two leaves stale segments, which readers skip. It runs after an
append when the pending segments outweigh ``compact_ratio`` times the main
object (unless appends of the last one's size reach the multipart threshold
within the segment budget: that compaction comes soon anyway), when there are
more than ``max_segments`` of them, when the oldest is ``max_lag_s`` old, when
the file reaches ``multipart_threshold`` (later appends then use multipart),
and on ``flush()`` for every file this instance appended segments to. The bytes
of small files this instance appended to are kept in memory (at most
``cache_max_bytes`` in all), so compaction uploads but seldom downloads.
Compaction is best effort inside ``append``: a failure is logged and the
append still succeeds (``flush`` raises it).

Wire cost (measured through a counting proxy, requests and responses included):
a file grown to 8 MiB in 64 appends costs about 1.95x its size, to 64 MiB in
256 appends about 1.1x. Below 5 MiB every byte travels at least twice (as a
segment, then inside the first object of 5 MiB, which S3 cannot assemble on the
server), so ``compact_ratio`` is 2 rather than 1; with tiny appends the
``max_segments`` cap dominates (a compaction every 33 appends).

Consistency: a view of a file lists its segments *before* reading the main
object. Since the main object only grows within an epoch and segments are
deleted only once inside it, the chain from the main object read afterwards is
always contiguous: the view is the file as it was at some instant.

Errors are translated at this boundary by :func:`_translate` (see
:mod:`evalsyncd.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import botocore.exceptions as bexc
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

from evalsyncd.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConflictError,
    InvalidKeyError,
    InvalidRequestError,
    ObjectNotFoundError,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage._base import StorageStat, check_key
from evalsyncd.storage._cloud import INTERNAL_DIR, CloudStorage
from evalsyncd.storage.tail import TAIL_DIR

__all__ = ["MULTIPART_MIN_BYTES", "S3Storage"]

log = structlog.get_logger("evalsyncd.storage")

MiB: Final = 1024 * 1024
MULTIPART_MIN_BYTES: Final = 5 * MiB
"""S3's minimum size of every part of a multipart upload but the last."""
MAX_PART_BYTES: Final = 5 * 1024 * MiB
"""S3's maximum size of one part (uploaded or copied)."""

_EPOCH_META: Final = "evalsyncd-epoch"
_SEGMENT_RE: Final = re.compile(r"@([0-9a-f]{16})/([0-9]{20})")
_ATTEMPTS: Final = 4  # re-reads when a file changes under a read or a blind append
_DELETE_BATCH: Final = 1000
_MAX_VIEW_HINTS: Final = 4096  # paths whose last view is remembered (a few hundred bytes each)

# -- error translation -----------------------------------------------------------------

_CODE_MAP: Final[dict[str, type[StorageError]]] = {
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

_EXCEPTION_MAP: Final[tuple[tuple[type[BaseException], type[StorageError]], ...]] = (
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

_BOUNDARY: Final = (bexc.ClientError, bexc.BotoCoreError, aiohttp.ClientError, OSError)
# asyncio.TimeoutError is TimeoutError (an OSError) on Python 3.11+.


def _error_code(exc: bexc.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def _status(exc: bexc.ClientError) -> int:
    meta = exc.response.get("ResponseMetadata", {})
    return int(meta.get("HTTPStatusCode", 0) or 0)


def _translate(exc: BaseException, url: str | None) -> StorageError:
    """The :mod:`evalsyncd.errors` class for an SDK or network error (not raised here).

    ``ClientError`` goes by its S3 error code (:data:`_CODE_MAP`), then by its
    HTTP status: 404 missing, 401/403 denied, 412 conflict, 408/429/5xx
    transient, other 4xx invalid request. Other exceptions go by
    :data:`_EXCEPTION_MAP`. The caller chains it: ``raise _translate(exc, url) from exc``.

    Args:
        exc: what the SDK (or aiohttp, or the socket layer) raised.
        url: the ``s3://`` URL of the object or prefix concerned.

    Returns:
        A :class:`StorageError` subclass instance carrying ``url``.
    """
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, bexc.ClientError):
        code, status = _error_code(exc), _status(exc)
        cls = _CODE_MAP.get(code)
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
    for exc_type, cls in _EXCEPTION_MAP:
        if isinstance(exc, exc_type):
            return cls(f"{url}: {type(exc).__name__}: {exc}", url=url)
    return PermanentStorageError(f"{url}: {type(exc).__name__}: {exc}", url=url)


@contextlib.contextmanager
def _boundary(url: str | None) -> Iterator[None]:
    """Translate SDK and network errors raised inside the block (chained)."""
    try:
        yield
    except _BOUNDARY as exc:
        raise _translate(exc, url) from exc


# -- the view of one file ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Segment:
    key: str
    epoch: str
    start: int
    size: int
    mtime: float

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True, slots=True)
class _View:
    """One file at one instant: its main object and the chain of segments after it.

    ``garbage`` holds the listed segments that are not on the chain: stale ones
    (inside the main object), those of other epochs and strays.
    """

    etag: str | None
    main_size: int
    epoch: str | None
    main_mtime: float
    chain: tuple[_Segment, ...] = ()
    garbage: tuple[_Segment, ...] = ()

    @property
    def exists(self) -> bool:
        return self.etag is not None

    @property
    def size(self) -> int:
        return self.chain[-1].end if self.chain else self.main_size

    @property
    def mtime(self) -> float:
        return max([self.main_mtime, *(s.mtime for s in self.chain)])

    @property
    def pending_bytes(self) -> int:
        return self.size - self.main_size


class _Changed(Exception):
    """The file changed while it was being read: read it again."""


def _new_epoch() -> str:
    return secrets.token_hex(8)


def _meta(epoch: str | None) -> dict[str, str]:
    return {_EPOCH_META: epoch} if epoch else {}


def _copy_ranges(size: int) -> list[tuple[int, int]]:
    """Split ``[0, size)`` into near-equal ``(start, end)`` ranges of at most 5 GiB."""
    count = max(1, -(-size // MAX_PART_BYTES))
    step = -(-size // count)
    return [(lo, min(lo + step, size)) for lo in range(0, size, step)]


class S3Storage(CloudStorage):
    """Files as S3 objects under ``s3://{bucket}/{prefix}/``; see the module docstring.

    Implements ``Storage`` and ``AsyncStorage``. Keys are ``{prefix}/{path}``,
    used as they are (UTF-8). Paths under ``.evalsyncd/`` are reserved.
    Credentials come from the standard AWS chain (environment, shared files,
    ``profile``, instance metadata). Instances hold configuration only and pickle.

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
            main object's size (2 rather than 1: see the wire-cost note below).
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

    # -- runtime state (never pickled) -------------------------------------------------

    _S3_RUNTIME: Final = (
        "_state_lock",
        "_cache",
        "_cache_bytes",
        "_pending",
        "_bucket_ok",
        "_views",
    )

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._state_lock = threading.Lock()
        # path -> (epoch, bytes [0, n) of the file in that epoch), least recently used first
        self._cache: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._cache_bytes = 0
        # path -> time.monotonic() of the oldest segment this instance wrote and did not compact
        self._pending: dict[str, float] = {}
        self._bucket_ok = False
        # path -> the view left by this instance's last segment append (a hint: it saves
        # the LIST + HEAD of the next conditional append; every append still confirms
        # the main object with a HEAD, so a stale hint only costs a conflict and a retry)
        self._views: OrderedDict[str, _View] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in self._S3_RUNTIME:
            state.pop(name, None)
        return state

    def _cache_get(self, path: str, epoch: str | None) -> bytes:
        with self._state_lock:
            entry = self._cache.get(path)
            if entry is None or entry[0] != epoch:
                return b""
            self._cache.move_to_end(path)
            return entry[1]

    def _cache_put(self, path: str, epoch: str | None, content: bytes | None) -> None:
        """Remember ``content`` as bytes ``[0, n)`` of ``path`` in ``epoch`` (``None`` forgets)."""
        with self._state_lock:
            old = self._cache.pop(path, None)
            if old is not None:
                self._cache_bytes -= len(old[1])
            if content is None or epoch is None or len(content) >= self.multipart_threshold:
                return
            self._cache[path] = (epoch, content)
            self._cache_bytes += len(content)
            while self._cache_bytes > self.cache_max_bytes and self._cache:
                _path, (_epoch, dropped) = self._cache.popitem(last=False)
                self._cache_bytes -= len(dropped)

    def _track(self, path: str, pending: bool) -> None:
        with self._state_lock:
            if pending:
                self._pending.setdefault(path, time.monotonic())
            else:
                self._pending.pop(path, None)

    # -- client ------------------------------------------------------------------------

    async def _open_client(self, stack: AsyncExitStack) -> Any:
        with _boundary(self.url()):
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

    def _segment_key(self, path: str, epoch: str, start: int) -> str:
        """Key of the segment of ``path`` holding bytes from ``start`` in ``epoch``."""
        return f"{self._segment_dir(path)}@{epoch}/{start:020d}"

    # -- primitive requests (translated) -----------------------------------------------

    async def _ensure_bucket(self, client: Any, url: str) -> None:
        """Tell a missing object from a missing bucket after a 404 without a body (HEAD)."""
        if self._bucket_ok:
            return
        try:
            await client.head_bucket(Bucket=self.bucket)
        except bexc.ClientError as exc:
            if _status(exc) == 404 or _error_code(exc) == "NoSuchBucket":
                raise BucketNotFoundError(
                    f"{url}: no such bucket {self.bucket!r}", url=url
                ) from exc
            if _status(exc) != 403:  # 403: the bucket exists, listing it is not allowed
                raise _translate(exc, url) from exc
        except _BOUNDARY as exc:
            raise _translate(exc, url) from exc
        self._bucket_ok = True

    async def _head(self, client: Any, key: str, url: str) -> dict[str, Any] | None:
        """``HeadObject``, or ``None`` if the object is missing (and the bucket is there)."""
        try:
            head: dict[str, Any] = await client.head_object(Bucket=self.bucket, Key=key)
        except bexc.ClientError as exc:
            if _status(exc) == 404 and _error_code(exc) != "NoSuchBucket":
                await self._ensure_bucket(client, url)
                return None
            raise _translate(exc, url) from exc
        except _BOUNDARY as exc:
            raise _translate(exc, url) from exc
        self._bucket_ok = True
        return head

    async def _get(
        self,
        client: Any,
        key: str,
        url: str,
        *,
        start: int = 0,
        end: int | None = None,
        if_match: str | None = None,
    ) -> tuple[bytes, dict[str, Any]]:
        """Bytes ``[start, end)`` of an object (to its end if ``end`` is None).

        Returns:
            ``(data, response)``; ``data`` is ``b""`` when ``start`` is at or past the
            end (S3's 416 ``InvalidRange``); the response then has only ``"Size"``.

        Raises:
            ObjectNotFoundError, ConflictError (``if_match`` failed), and the rest.
        """
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        with _boundary(url):
            try:
                resp: dict[str, Any] = await client.get_object(**kwargs)
            except bexc.ClientError as exc:
                if _status(exc) != 416:
                    raise
                headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                total = str(headers.get("content-range", "")).rpartition("/")[2]
                return b"", {"Size": int(total) if total.isdigit() else None}
            async with resp["Body"] as body:
                data: bytes = await body.read()
        self._bucket_ok = True
        if start and "ContentRange" not in resp:  # the server ignored Range
            data = data[start:] if end is None else data[start:end]
        return data, resp

    async def _put(self, client: Any, key: str, url: str, data: bytes, **kwargs: Any) -> str:
        """``PutObject`` with a CRC32C checksum; returns the new ETag."""
        with _boundary(url):
            resp = await client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ChecksumAlgorithm="CRC32C", **kwargs
            )
        return str(resp["ETag"])

    async def _list_segments(self, client: Any, path: str, url: str) -> list[_Segment]:
        """Every segment object of ``path``, all epochs, in key order."""
        base = self._segment_dir(path)
        segments: list[_Segment] = []
        with _boundary(url):
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=base + "@"):
                for obj in page.get("Contents", ()):
                    match = _SEGMENT_RE.fullmatch(obj["Key"][len(base) :])
                    if match is None:  # a segment of a deeper path such as "{path}/@x"
                        continue
                    segments.append(
                        _Segment(
                            key=obj["Key"],
                            epoch=match[1],
                            start=int(match[2]),
                            size=int(obj["Size"]),
                            mtime=obj["LastModified"].timestamp(),
                        )
                    )
        return segments

    async def _delete(self, client: Any, keys: list[str], url: str) -> None:
        """Delete objects (missing ones are fine), 1,000 per request."""
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            with _boundary(url):
                if len(batch) == 1:
                    await client.delete_object(Bucket=self.bucket, Key=batch[0])
                    continue
                resp = await client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors = [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise _translate(bexc.ClientError({"Error": errors[0]}, "DeleteObjects"), url)

    # -- views -----------------------------------------------------------------------------

    async def _view(self, client: Any, path: str) -> _View:
        """The file now: its segments are listed *before* its main object is read."""
        url = self.url(path)
        segments = await self._list_segments(client, path, url)
        head = await self._head(client, self._key(path), url)
        return self._make_view(head, segments)

    @staticmethod
    def _make_view(head: dict[str, Any] | None, segments: list[_Segment]) -> _View:
        if head is None:
            return _View(None, 0, None, 0.0, (), tuple(segments))
        epoch = head.get("Metadata", {}).get(_EPOCH_META)
        main_size = int(head["ContentLength"])
        by_start = {s.start: s for s in segments if s.epoch == epoch and s.size > 0}
        chain: list[_Segment] = []
        pos = main_size
        while (seg := by_start.pop(pos, None)) is not None:
            chain.append(seg)
            pos = seg.end
        on_chain = {s.key for s in chain}
        return _View(
            etag=str(head["ETag"]),
            main_size=main_size,
            epoch=epoch,
            main_mtime=head["LastModified"].timestamp(),
            chain=tuple(chain),
            garbage=tuple(s for s in segments if s.key not in on_chain),
        )

    async def _read_span(self, client: Any, path: str, view: _View, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the file as ``view`` describes it.

        Raises:
            _Changed: the main object or a segment changed or went away meanwhile.
        """
        url = self.url(path)
        jobs = []
        if start < min(end, view.main_size):
            jobs.append(
                self._get(
                    client,
                    self._key(path),
                    url,
                    start=start,
                    end=min(end, view.main_size),
                    if_match=view.etag,
                )
            )
        for seg in view.chain:
            lo, hi = max(start, seg.start), min(end, seg.end)
            if lo < hi:
                whole = lo == seg.start and hi == seg.end
                jobs.append(
                    self._get(client, seg.key, url)
                    if whole
                    else self._get(client, seg.key, url, start=lo - seg.start, end=hi - seg.start)
                )
        try:
            parts = await asyncio.gather(*jobs)
        except (ObjectNotFoundError, ConflictError) as exc:
            raise _Changed from exc
        data = b"".join(p for p, _resp in parts)
        if len(data) != end - start:
            raise _Changed
        return data

    async def _content(self, client: Any, path: str, view: _View, known: bytes = b"") -> bytes:
        """All bytes of the file in ``view``: ``known`` (a prefix), the cache, then downloads."""
        have = known if len(known) >= view.size else self._cache_get(path, view.epoch)
        have = have[: view.size]
        if len(have) < view.size:
            have += await self._read_span(client, path, view, len(have), view.size)
        return have

    # -- reading ---------------------------------------------------------------------------

    async def _main_read(self, path: str) -> bytes:
        """See :meth:`Storage.read`: the main object plus its chain of segments."""
        key, url = self._key(path), self.url(path)
        client = await self._client()
        for _attempt in range(_ATTEMPTS):
            body, resp = await self._get(client, key, url)
            epoch = resp.get("Metadata", {}).get(_EPOCH_META)
            if epoch is None:
                return body
            view = await self._view(client, path)
            if view.epoch != epoch or view.main_size < len(body):
                continue  # rewritten meanwhile
            try:
                return body + await self._read_span(client, path, view, len(body), view.size)
            except _Changed:
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
        for _attempt in range(_ATTEMPTS):
            body, resp = await self._get(client, key, url, start=offset, end=end)
            if "Size" in resp:  # 416: offset at or past the main object's end
                head = await self._head(client, key, url)
                if head is None:
                    raise ObjectNotFoundError(f"{url}: no such object", url=url)
                resp = head
            epoch = resp.get("Metadata", {}).get(_EPOCH_META)
            if epoch is None or (length is not None and len(body) == length):
                return body
            view = await self._view(client, path)
            if view.epoch != epoch:
                continue
            lo = offset + len(body)
            hi = view.size if end is None else min(end, view.size)
            if lo >= hi:
                return body
            try:
                return body + await self._read_span(client, path, view, lo, hi)
            except _Changed:
                continue
        raise TransientStorageError(f"{url}: the file kept changing while it was read", url=url)

    async def _main_stat(self, path: str) -> StorageStat | None:
        """See :meth:`Storage.stat`: size of main object + chain; version = main ETag."""
        check_key(path)
        view = await self._view(await self._client(), path)
        if not view.exists:
            return None
        return StorageStat(size=view.size, mtime=view.mtime, version=view.etag)

    async def _main_exists(self, path: str) -> bool:
        """See :meth:`Storage.exists`: one ``HEAD`` of the main object."""
        key = self._key(path)
        return await self._head(await self._client(), key, self.url(path)) is not None

    async def _main_list_dir(self, prefix: str) -> list[str]:
        """See :meth:`Storage.list_dir`: ``ListObjectsV2`` with ``/`` as delimiter, all pages.

        The daemon's ``.evalsyncd`` area is hidden.
        """
        dir_key = self._dir_key(prefix)
        url = self.url(prefix.strip("/"))
        names: set[str] = set()
        client = await self._client()
        with _boundary(url):
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=dir_key, Delimiter="/"):
                for obj in page.get("Contents", ()):
                    names.add(obj["Key"][len(dir_key) :])
                for common in page.get("CommonPrefixes", ()):
                    names.add(common["Prefix"][len(dir_key) :].rstrip("/"))
        self._bucket_ok = True
        names.discard("")
        if not prefix.strip("/"):
            names.discard(INTERNAL_DIR)
        return sorted(names)

    # -- the tail log's objects (see evalsyncd.storage.tail) --------------------------------

    def _tail_key(self, name: str) -> str:
        return self._internal_key(TAIL_DIR, name)

    async def _tail_list(self, limit: int | None = None) -> list[str]:
        """Names under ``.evalsyncd/tail/``, newest first (key order): ``ListObjectsV2``."""
        base = self._tail_key("")
        client = await self._client()
        names: list[str] = []
        with _boundary(self._tail_url()):
            paginator = client.get_paginator("list_objects_v2")
            config = {"PageSize": min(limit, 1000)} if limit else {}
            async for page in paginator.paginate(
                Bucket=self.bucket, Prefix=base, PaginationConfig=config
            ):
                names += [obj["Key"][len(base) :] for obj in page.get("Contents", ())]
                if limit is not None and len(names) >= limit:
                    break
        self._bucket_ok = True
        return names[:limit] if limit is not None else names

    async def _internal_get(self, key: str, url: str, start: int, end: int | None) -> bytes:
        """Bytes ``[start, end)`` of an object of the internal area: one ranged ``GetObject``."""
        data, _resp = await self._get(await self._client(), key, url, start=start, end=end)
        return data

    async def _internal_put(self, key: str, url: str, data: bytes, *, create: bool) -> None:
        """``PutObject``; with ``create``, ``If-None-Match: *`` (``ConflictError`` if it exists)."""
        extra = {"IfNoneMatch": "*"} if create else {}
        await self._put(await self._client(), key, url, data, **extra)

    async def _tail_delete(self, names: list[str]) -> None:
        """``DeleteObjects``, 1,000 keys per request."""
        await self._delete(
            await self._client(), [self._tail_key(n) for n in names], self._tail_url()
        )

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
        with self._state_lock:
            had_segments = path in self._pending
            self._views.pop(path, None)
        etag = await self._put(client, key, url, data)
        self._cache_put(path, None, None)
        self._track(path, pending=False)
        if had_segments:
            await self._cleanup(client, path)
        return etag

    async def aremove(self, path: str) -> None:
        """See :meth:`Storage.remove`: deletes the main object, then its segments."""
        key, url = self._key(path), self.url(path)
        client = await self._client()
        with self._state_lock:
            self._views.pop(path, None)
        await self._delete(client, [key], url)
        self._cache_put(path, None, None)
        self._track(path, pending=False)
        await self._cleanup(client, path)

    async def _cleanup(self, client: Any, path: str) -> None:
        """Delete the segments of ``path`` that can never be read again.

        Listing first, then reading the main object: a segment of another
        epoch than the main object's then, or inside it, is dead for good.
        """
        url = self.url(path)
        segments = await self._list_segments(client, path, url)
        if not segments:
            return
        view = self._make_view(await self._head(client, self._key(path), url), segments)
        dead = [s.key for s in view.garbage if s.epoch != view.epoch or s.start < view.main_size]
        await self._delete(client, dead, url)

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
        data = bytes(data)
        for attempt in range(_ATTEMPTS):
            with self._state_lock:
                hint = self._views.pop(path, None)
            if attempt == 0 and hint is not None and offset is not None and hint.size == offset:
                view = hint
            else:
                view = await self._view(client, path)
            size = view.size
            if offset is not None and size != offset:
                if size == offset + len(data) and await self._holds(
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
                now = await self._view(client, path)
                applied = now.size == size + len(data) or (
                    offset is None and now.size > size + len(data)
                )
                if applied and await self._holds(client, path, now, size, data):
                    return now.etag
                if offset is not None:
                    raise ConflictError(
                        f"{url}: another writer changed the file during an append at {offset}",
                        url=url,
                        actual_size=now.size,
                    ) from exc
        raise ConflictError(f"{url}: append kept losing races with other writers", url=url)

    async def _holds(self, client: Any, path: str, view: _View, start: int, data: bytes) -> bool:
        """Whether bytes ``[start, start+len(data))`` of the file in ``view`` equal ``data``."""
        if not data:
            return True
        try:
            return await self._read_span(client, path, view, start, start + len(data)) == data
        except _Changed:
            return False

    async def _append_at(
        self, client: Any, path: str, key: str, view: _View, data: bytes
    ) -> str | None:
        """Append ``data`` at ``view.size`` by the mechanism that fits; see the module docstring."""
        url = self.url(path)
        if not view.exists:
            epoch = _new_epoch()
            etag = await self._put(client, key, url, data, IfNoneMatch="*", Metadata=_meta(epoch))
            self._cache_put(path, epoch, data)
            return etag
        if not data:
            return view.etag
        if view.epoch is None and view.size < self.multipart_threshold:
            # No epoch yet (written by write() or another tool): rewrite to start one.
            content = await self._content(client, path, view) + data
            epoch = _new_epoch()
            etag = await self._put(
                client, key, url, content, IfMatch=view.etag, Metadata=_meta(epoch)
            )
            self._cache_put(path, epoch, content)
            return etag
        if view.main_size >= self.multipart_threshold and not view.chain:
            return await self._append_multipart(client, path, key, view, data)
        return await self._append_segment(client, path, key, view, data)

    async def _append_segment(
        self, client: Any, path: str, key: str, view: _View, data: bytes
    ) -> str | None:
        url = self.url(path)
        epoch = view.epoch
        assert epoch is not None and view.etag is not None
        seg_key = self._segment_key(path, epoch, view.size)
        await self._put(client, seg_key, url, data, IfNoneMatch="*")
        head = await self._head(client, key, url)
        if (
            head is None
            or head["ETag"] != view.etag
            or head.get("Metadata", {}).get(_EPOCH_META) != view.epoch
        ):
            # The main object changed: the segment counts only if it is on the chain now.
            now = await self._view(client, path)
            if all(s.key != seg_key for s in now.chain):
                if any(s.key == seg_key for s in now.garbage):
                    with contextlib.suppress(StorageError):
                        await self._delete(client, [seg_key], url)
                raise ConflictError(f"{url}: the file changed during the append", url=url)
            view = now
        else:
            seg = _Segment(seg_key, epoch, view.size, len(data), time.time())
            view = _View(
                view.etag,
                view.main_size,
                view.epoch,
                view.main_mtime,
                (*view.chain, seg),
                view.garbage,
            )
        known = self._cache_get(path, view.epoch)
        known = known + data if len(known) == view.size - len(data) else b""
        self._cache_put(path, view.epoch, known or None)
        self._track(path, pending=True)
        if not self._should_compact(path, view, len(data)):
            with self._state_lock:
                self._views[path] = view
                while len(self._views) > _MAX_VIEW_HINTS:
                    self._views.popitem(last=False)
            return view.etag
        try:
            return await self._compact(client, path, view, known)
        except StorageError as exc:  # best effort: the append itself succeeded
            log.warning("s3_compaction_failed", url=url, error=repr(exc))
            return view.etag

    def _should_compact(self, path: str, view: _View, delta: int) -> bool:
        """The schedule: see the module docstring. ``delta`` is the size of the last append."""
        if view.size >= self.multipart_threshold or len(view.chain) > self.max_segments:
            return True
        # Segments outweigh the main object: compact, unless appends of this size
        # reach the multipart threshold (which compacts) within the segment budget.
        to_threshold = self.multipart_threshold - view.size
        if view.pending_bytes > self.compact_ratio * view.main_size and to_threshold > (
            self.max_segments - len(view.chain)
        ) * max(delta, 1):
            return True
        with self._state_lock:
            since = self._pending.get(path)
        return since is not None and time.monotonic() - since >= self.max_lag_s

    async def _compact(self, client: Any, path: str, view: _View, known: bytes = b"") -> str | None:
        """Rewrite the main object as main + chain (``If-Match``), then delete the segments.

        Returns:
            The new main ETag.

        Raises:
            ConflictError: the main object changed since ``view`` was taken.
        """
        url = self.url(path)
        if view.chain:
            content = await self._content(client, path, view, known)
            etag: str | None = await self._put(
                client, self._key(path), url, content, IfMatch=view.etag, Metadata=_meta(view.epoch)
            )
            self._cache_put(path, view.epoch, content)
            # The conditional write proves the view was current: all it lists is now dead.
            dead = [s.key for s in (*view.chain, *view.garbage)]
        else:
            etag = view.etag
            dead = [
                s.key for s in view.garbage if s.epoch == view.epoch and s.start < view.main_size
            ]
        self._track(path, pending=False)
        if dead:
            try:
                await self._delete(client, dead, url)
            except StorageError as exc:  # stale segments are harmless; the next cleanup retries
                log.info("s3_segment_cleanup_failed", url=url, error=repr(exc))
        return etag

    async def _append_multipart(
        self, client: Any, path: str, key: str, view: _View, data: bytes
    ) -> str:
        """Main object (copied on the server) + ``data`` as one multipart upload."""
        url = self.url(path)
        etag = view.etag
        with _boundary(url):
            upload = await client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ChecksumAlgorithm="CRC32C", Metadata=_meta(view.epoch)
            )
        upload_id = upload["UploadId"]
        try:
            with _boundary(url):
                ranges = _copy_ranges(view.main_size)

                async def copy(number: int, lo: int, hi: int) -> dict[str, Any]:
                    kwargs: dict[str, Any] = {}
                    if len(ranges) > 1:
                        kwargs["CopySourceRange"] = f"bytes={lo}-{hi - 1}"
                    resp = await client.upload_part_copy(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        CopySource={"Bucket": self.bucket, "Key": key},
                        CopySourceIfMatch=etag,
                        **kwargs,
                    )
                    result = resp["CopyPartResult"]
                    part = {"PartNumber": number, "ETag": result["ETag"]}
                    if "ChecksumCRC32C" in result:
                        part["ChecksumCRC32C"] = result["ChecksumCRC32C"]
                    return part

                async def upload_part(number: int, chunk: bytes) -> dict[str, Any]:
                    resp = await client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                        ChecksumAlgorithm="CRC32C",
                    )
                    part = {"PartNumber": number, "ETag": resp["ETag"]}
                    if "ChecksumCRC32C" in resp:
                        part["ChecksumCRC32C"] = resp["ChecksumCRC32C"]
                    return part

                chunks = [data[i : i + MAX_PART_BYTES] for i in range(0, len(data), MAX_PART_BYTES)]
                parts = await asyncio.gather(
                    *(copy(n, lo, hi) for n, (lo, hi) in enumerate(ranges, 1)),
                    *(upload_part(len(ranges) + n, c) for n, c in enumerate(chunks, 1)),
                )
                done = await client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": list(parts)},
                    IfMatch=etag,
                )
        except BaseException:
            await asyncio.shield(self._abort(client, key, upload_id, url))
            raise
        self._cache_put(path, None, None)
        return str(done["ETag"])

    async def _abort(self, client: Any, key: str, upload_id: str, url: str) -> None:
        try:
            await client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except bexc.ClientError as exc:
            if _error_code(exc) != "NoSuchUpload":
                log.warning("s3_abort_failed", url=url, upload_id=upload_id, error=repr(exc))
        except _BOUNDARY as exc:
            log.warning("s3_abort_failed", url=url, upload_id=upload_id, error=repr(exc))

    async def aflush(self) -> None:
        """See :meth:`Storage.flush`: compact every file this instance left segments in.

        Raises:
            StorageError: the first failure, after every file was tried; those
                files stay on the list for the next flush.
        """
        with self._state_lock:
            paths = list(self._pending)
            for path in paths:  # compaction changes the main object's ETag
                self._views.pop(path, None)
        if not paths:
            return
        client = await self._client()
        errors: list[StorageError] = []
        for path in paths:
            for _attempt in range(_ATTEMPTS):
                try:
                    view = await self._view(client, path)
                    if view.exists:
                        await self._compact(client, path, view)
                    else:
                        self._track(path, pending=False)
                    break
                except ConflictError:
                    continue  # someone else changed it: look again
                except StorageError as exc:
                    errors.append(exc)
                    break
        if errors:
            raise errors[0]
