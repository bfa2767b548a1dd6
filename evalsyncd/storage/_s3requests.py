"""The S3 requests of one bucket, each translated at the boundary (:mod:`._s3errors`).

:class:`S3Requests` is what ``S3Storage``, its reader of older versions' segments
(:mod:`._s3legacy`) and its multipart appends (:mod:`._s3multipart`) send:
one method per S3 call, taking the event loop's client (``S3Storage._client``)
and the ``s3://`` URL that errors name. It remembers one thing, that the bucket
exists, so a 404 without a body (a ``HEAD``) costs one ``HeadBucket`` at most
once to tell a missing object from a missing bucket.
"""

from __future__ import annotations

from typing import Any, Final

import botocore.exceptions as bexc
import structlog

from evalsyncd.errors import BucketNotFoundError
from evalsyncd.storage._s3errors import (
    BOUNDARY,
    boundary,
    error_code,
    http_status,
    required_etag,
    translate,
)
from evalsyncd.storage._s3put import MAX_BYTES, LeanPut, S3Client

__all__ = ["S3Requests"]

log = structlog.get_logger("evalsyncd.storage")

_LEAN_KWARGS: Final = frozenset({"IfMatch", "IfNoneMatch"})
"""The ``PutObject`` conditions :class:`~evalsyncd.storage._s3put.LeanPut` sends."""

_DELETE_BATCH: Final = 1000
"""Keys per ``DeleteObjects`` request (S3's limit)."""


class S3Requests:
    """Translated S3 calls on one bucket; runtime state of an ``S3Storage`` (never pickled).

    Args:
        bucket: the bucket name.
    """

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.bucket_ok = False
        """Whether a request proved the bucket exists (a 404 then means the object)."""
        self.whole_reads = False
        """Whether a ranged GET met the whole object's checksum on a part (then logged once)."""

    async def ensure_bucket(self, client: Any, url: str) -> None:
        """Tell a missing object from a missing bucket after a 404 without a body (HEAD).

        Raises:
            BucketNotFoundError: the bucket is missing.
        """
        if self.bucket_ok:
            return
        try:
            await client.head_bucket(Bucket=self.bucket)
        except bexc.ClientError as exc:
            if http_status(exc) == 404 or error_code(exc) == "NoSuchBucket":
                raise BucketNotFoundError(
                    f"{url}: no such bucket {self.bucket!r}", url=url
                ) from exc
            if http_status(exc) != 403:  # 403: the bucket exists, listing it is not allowed
                raise translate(exc, url) from exc
        except BOUNDARY as exc:
            raise translate(exc, url) from exc
        self.bucket_ok = True

    async def head(self, client: Any, key: str, url: str) -> dict[str, Any] | None:
        """``HeadObject``, or ``None`` if the object is missing (and the bucket is there)."""
        try:
            head: dict[str, Any] = await client.head_object(Bucket=self.bucket, Key=key)
        except bexc.ClientError as exc:
            if http_status(exc) == 404 and error_code(exc) != "NoSuchBucket":
                await self.ensure_bucket(client, url)
                return None
            raise translate(exc, url) from exc
        except BOUNDARY as exc:
            raise translate(exc, url) from exc
        self.bucket_ok = True
        return head

    async def get(
        self,
        client: Any,
        key: str,
        url: str,
        *,
        start: int = 0,
        end: int | None = None,
        if_match: str | None = None,
    ) -> tuple[bytes, dict[str, Any]]:
        """Bytes ``[start, end)`` of an object (to its end if ``end`` is None): one ``GetObject``.

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
        with boundary(url):
            try:
                resp: dict[str, Any] = await client.get_object(**kwargs)
                async with resp["Body"] as body:
                    data: bytes = await body.read()
            except bexc.ClientError as exc:
                if http_status(exc) != 416:
                    raise
                headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                total = str(headers.get("content-range", "")).rpartition("/")[2]
                return b"", {"Size": int(total) if total.isdigit() else None}
            except bexc.FlexibleChecksumError:
                if "Range" not in kwargs:
                    raise
                # The server sent the whole object's checksum with a part of it (as
                # ``rclone serve s3`` does on a 206): read it whole, which that checksum
                # validates, and keep the range (the code below slices).
                if not self.whole_reads:
                    self.whole_reads = True
                    log.warning("s3_ranged_get_checksum_mismatch", url=url, fallback="whole GETs")
                del kwargs["Range"]
                resp = await client.get_object(**kwargs)
                async with resp["Body"] as body:
                    data = await body.read()
                resp.pop("ContentRange", None)
        self.bucket_ok = True
        if (start or end is not None) and "ContentRange" not in resp:  # Range ignored or dropped
            data = data[start:] if end is None else data[start:end]
        return data, resp

    async def put(self, client: Any, key: str, url: str, data: bytes, **kwargs: Any) -> str:
        """``PutObject`` with a CRC32C checksum (``kwargs``: its conditions, metadata).

        Bodies of up to :data:`~evalsyncd.storage._s3put.MAX_BYTES` go through the
        client's :class:`~evalsyncd.storage._s3put.LeanPut` when it has one
        (``IfMatch`` and ``IfNoneMatch`` the only conditions); the SDK sends the rest,
        and again what the lean path did not take.

        Returns:
            The new ETag.
        """
        lean: LeanPut | None = None
        if (
            isinstance(client, S3Client)
            and len(data) <= MAX_BYTES
            and kwargs.keys() <= _LEAN_KWARGS
        ):
            with boundary(url):
                lean = await client.lean_put()
        if lean is not None and lean.enabled:
            etag = await lean.put(
                key,
                url,
                data,
                if_match=kwargs.get("IfMatch"),
                if_none_match=kwargs.get("IfNoneMatch"),
            )
            if etag is not None:
                return etag
        with boundary(url):
            resp = await client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ChecksumAlgorithm="CRC32C", **kwargs
            )
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return required_etag(resp.get("ETag"), status, url)

    async def delete(self, client: Any, keys: list[str], url: str) -> None:
        """Delete objects (missing ones are fine): ``DeleteObject`` for one, else
        ``DeleteObjects``, 1,000 keys per request."""
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            with boundary(url):
                if len(batch) == 1:
                    await client.delete_object(Bucket=self.bucket, Key=batch[0])
                    continue
                resp = await client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors = [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise translate(bexc.ClientError({"Error": errors[0]}, "DeleteObjects"), url)

    async def list(
        self,
        client: Any,
        url: str,
        prefix: str,
        *,
        delimiter: str | None = None,
        limit: int | None = None,
        proves_bucket: bool = True,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """``ListObjectsV2`` under ``prefix``, every page (or until ``limit`` objects).

        Args:
            delimiter: ``"/"`` for one level of a directory.
            limit: stop after this many objects (pages of at most that many keys).
            proves_bucket: record that the bucket exists (:attr:`bucket_ok`).
                Segment listings pass ``False``: a ``stat`` of a missing file
                has always cost its ``HeadBucket`` once, and request counts are
                measured (``bench/reqrate.py``).

        Returns:
            ``(objects, common prefixes)``: the ``Contents`` entries in key order
            (at least ``limit`` of them when there are that many) and, with a
            delimiter, the ``CommonPrefixes`` names.
        """
        objects: list[dict[str, Any]] = []
        prefixes: list[str] = []
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter is not None:
            params["Delimiter"] = delimiter
        if limit:
            params["PaginationConfig"] = {"PageSize": min(limit, 1000)}
        with boundary(url):
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(**params):
                objects += page.get("Contents", ())
                prefixes += [common["Prefix"] for common in page.get("CommonPrefixes", ())]
                if limit is not None and len(objects) >= limit:
                    break
        if proves_bucket:
            self.bucket_ok = True
        return objects, prefixes
