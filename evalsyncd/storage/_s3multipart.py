"""Appends to S3 objects of 5 MiB and more: one multipart upload, the old bytes copied on the server.

The upload's first part(s) are ``UploadPartCopy`` of the object itself
(``CopySourceIfMatch`` on the ETag read, parts of at most 5 GiB), its last
part(s) carry the new bytes, and ``CompleteMultipartUpload`` is sent with
``If-Match``: another writer's change in between makes it a
:class:`~evalsyncd.errors.ConflictError`. On any failure the upload is aborted,
so none is left behind. Bytes on the wire: about ``len(data)``.

A server's "200 OK" is not proof. Each answer is checked (a part without an
ETag, as ``rclone serve s3`` answers ``UploadPartCopy``, is a
:class:`~evalsyncd.errors.ServerBehaviourError`, not a ``KeyError``), and the
post-condition is checked before the caller's journal advances: one ``HEAD``
after ``CompleteMultipartUpload`` must show the ETag it answered and the old
size plus ``len(data)``. Another ETag means another writer replaced the object
(a server that ignores ``If-Match`` on Complete): a ``ConflictError`` the caller
reconciles. The right ETag with a wrong size means the server built a wrong
object (an empty copied part): a ``ServerBehaviourError`` naming both sizes.
Cost: one request more per append of 5 MiB and more.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import botocore.exceptions as bexc
import structlog

from evalsyncd.errors import ConflictError, ServerBehaviourError
from evalsyncd.storage._leftovers import note_left
from evalsyncd.storage._s3errors import BOUNDARY, boundary, error_code
from evalsyncd.storage._s3requests import S3Requests

__all__ = [
    "MAX_PART_BYTES",
    "MULTIPART_MIN_BYTES",
    "append_multipart",
    "check_appended",
    "copy_ranges",
]

log = structlog.get_logger("evalsyncd.storage")

MiB: Final = 1024 * 1024
MULTIPART_MIN_BYTES: Final = 5 * MiB
"""S3's minimum size of every part of a multipart upload but the last."""
MAX_PART_BYTES: Final = 5 * 1024 * MiB
"""S3's maximum size of one part (uploaded or copied)."""


def copy_ranges(size: int) -> list[tuple[int, int]]:
    """Split ``[0, size)`` into near-equal ``(start, end)`` ranges of at most 5 GiB."""
    count = max(1, -(-size // MAX_PART_BYTES))
    step = -(-size // count)
    return [(lo, min(lo + step, size)) for lo in range(0, size, step)]


async def append_multipart(
    requests: S3Requests,
    client: Any,
    key: str,
    url: str,
    *,
    etag: str | None,
    size: int,
    metadata: dict[str, str],
    data: bytes,
) -> str:
    """Append ``data`` to the object ``key`` of ``size`` bytes at ``etag``.

    Args:
        requests: the bucket's requests (for its name).
        client: the event loop's S3 client.
        key: the object's key; ``url`` names it in errors.
        etag: the ETag the object had when its size was read (the guard).
        size: its size then, bytes (at least 5 MiB: S3's minimum part size).
        metadata: the object's user metadata, kept on the new object.
        data: the bytes to add.

    Returns:
        The new ETag.

    Raises:
        ConflictError: the object changed since ``etag`` (the upload is aborted), or
            another writer replaced it right after (the post-condition found another ETag).
        ServerBehaviourError: an answer without the ETag S3 always sends, or the
            completed object has the right ETag and a wrong size.
        StorageError: any other failure (the upload is aborted).
    """
    bucket = requests.bucket
    with boundary(url):
        upload = await client.create_multipart_upload(
            Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C", Metadata=metadata
        )
    upload_id = upload.get("UploadId")
    if not upload_id:
        answer = "an answer without an UploadId"
        raise ServerBehaviourError(
            f"{url}: the server answered CreateMultipartUpload with {answer}",
            url=url,
            feature="CreateMultipartUpload",
            answer=answer,
        )
    try:
        with boundary(url):
            ranges = copy_ranges(size)

            async def copy(number: int, lo: int, hi: int) -> dict[str, Any]:
                kwargs: dict[str, Any] = {}
                if len(ranges) > 1:
                    kwargs["CopySourceRange"] = f"bytes={lo}-{hi - 1}"
                resp = await client.upload_part_copy(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": bucket, "Key": key},
                    CopySourceIfMatch=etag,
                    **kwargs,
                )
                result = resp.get("CopyPartResult") or {}
                part = {"PartNumber": number, "ETag": _etag(result, "UploadPartCopy", resp, url)}
                if "ChecksumCRC32C" in result:
                    part["ChecksumCRC32C"] = result["ChecksumCRC32C"]
                return part

            async def upload_part(number: int, chunk: bytes) -> dict[str, Any]:
                resp = await client.upload_part(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                    ChecksumAlgorithm="CRC32C",
                )
                part = {"PartNumber": number, "ETag": _etag(resp, "UploadPart", resp, url)}
                if "ChecksumCRC32C" in resp:
                    part["ChecksumCRC32C"] = resp["ChecksumCRC32C"]
                return part

            chunks = [data[i : i + MAX_PART_BYTES] for i in range(0, len(data), MAX_PART_BYTES)]
            parts = await asyncio.gather(
                *(copy(n, lo, hi) for n, (lo, hi) in enumerate(ranges, 1)),
                *(upload_part(len(ranges) + n, c) for n, c in enumerate(chunks, 1)),
            )
            done = await client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": list(parts)},
                IfMatch=etag,
            )
    except BaseException:
        await asyncio.shield(_abort(client, bucket, key, upload_id, url))
        raise
    new_etag = _etag(done, "CompleteMultipartUpload", done, url)
    await check_appended(requests, client, key, url, etag=new_etag, size=size + len(data))
    return new_etag


def _etag(where: dict[str, Any], call: str, resp: dict[str, Any], url: str) -> str:
    """The ``ETag`` of an S3 answer, or a ``ServerBehaviourError`` naming what came instead."""
    value = where.get("ETag")
    if not value:
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        fields = sorted(k for k in resp if k != "ResponseMetadata")
        answer = f"HTTP {status} without an ETag (fields: {', '.join(fields) or 'none'})"
        raise ServerBehaviourError(
            f"{url}: the server answered {call} with {answer}; it does not support "
            f"{call} as S3 does (run `evalsyncd check` on this URL)",
            url=url,
            feature=call,
            answer=answer,
        )
    return str(value)


async def check_appended(
    requests: S3Requests, client: Any, key: str, url: str, *, etag: str, size: int
) -> None:
    """Check an append's post-condition with one ``HEAD``: the object is at ``etag``
    and holds ``size`` bytes.

    Raises:
        ConflictError: the object is at another ETag (another writer replaced it),
            or is gone; ``actual_size`` says what it holds.
        ServerBehaviourError: the ETag is ours and the size is not ``size``.
    """
    head = await requests.head(client, key, url)
    if head is None:
        raise ConflictError(f"{url}: the object vanished right after an append", url=url)
    got_size = int(head.get("ContentLength", -1))
    if head.get("ETag") != etag:
        raise ConflictError(
            f"{url}: another writer replaced the object right after an append "
            f"(ETag {head.get('ETag')} instead of {etag}: the server did not enforce If-Match)",
            url=url,
            actual_size=got_size,
        )
    if got_size != size:
        answer = f"ETag {etag} with {got_size} bytes instead of {size}"
        raise ServerBehaviourError(
            f"{url}: the server completed a multipart append into a wrong object ({answer}): "
            "it copied another object than the one CopySourceIfMatch named (another "
            "writer's append, completed meanwhile, is in it before this one's bytes), or "
            "its UploadPartCopy is broken (run `evalsyncd check` on this URL)",
            url=url,
            feature="UploadPartCopy",
            answer=answer,
        )


async def _abort(client: Any, bucket: str, key: str, upload_id: str, url: str) -> None:
    """Abort a multipart upload; a failure is logged (S3 lifecycle rules reap the rest)."""
    try:
        await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except bexc.ClientError as exc:
        if error_code(exc) != "NoSuchUpload":
            log.warning("s3_abort_failed", url=url, upload_id=upload_id, error=repr(exc))
            note_left(url)  # reaped later (evalsyncd.storage.reap)
    except BOUNDARY as exc:
        log.warning("s3_abort_failed", url=url, upload_id=upload_id, error=repr(exc))
        note_left(url)
