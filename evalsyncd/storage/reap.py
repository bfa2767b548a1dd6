"""Remove what failed cleanups left behind under a prefix: GCS compose deltas and
abandoned S3 multipart uploads; and fold the S3 append segments an older version
left (``S3Storage.afold_old_segments``).

An append deletes its GCS delta (``{prefix}/.evalsyncd/gcs-append/{id}``) and
aborts a failed S3 multipart upload itself; a delete or an abort that fails
(an outage, a reset) leaves the object or the upload behind, invisible to
readers but billed. :func:`areap` finds those older than a safe age, only
under the storage's own prefix, and removes them. Anything younger may belong
to an append in flight (of this daemon or of a library user), so the age must
exceed the longest append (default one hour).

Cost: one listing (GCS: of the delta area; S3: ``ListMultipartUploads`` under
the prefix, first 1,000, and, with ``fold_segments``, one of ``.evalsyncd/seg/``)
plus one request per removal.

A cleanup that fails is noted (:func:`note_left`, by the object's URL), so that
a long-running caller can reap again once that leftover is old enough
(:func:`last_left`) instead of waiting for its next periodic reap.
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime
from typing import Any, Final

import structlog

from evalsyncd.errors import StorageError
from evalsyncd.storage._leftovers import last_left, note_left
from evalsyncd.storage._loaded import is_gcs, is_s3

__all__ = ["DEFAULT_MIN_AGE_S", "areap", "last_left", "note_left"]

log = structlog.get_logger("evalsyncd.storage")

DEFAULT_MIN_AGE_S: Final = 3600.0
"""Leftovers younger than this, seconds, are left alone (an append may be in flight)."""


async def areap(
    storage: Any, *, min_age_s: float = DEFAULT_MIN_AGE_S, fold_segments: bool = True
) -> int:
    """Remove GCS compose deltas / S3 multipart uploads older than ``min_age_s`` seconds.

    Args:
        storage: an ``S3Storage`` or ``GCSStorage`` (anything else: nothing to do).
        min_age_s: the safe age, seconds.
        fold_segments: on S3, also fold the append segments an older version left
            (``S3Storage.afold_old_segments``: one more listing; once, at start, is
            enough: this version writes none).

    Returns:
        How many were removed.

    Raises:
        StorageError: the listing failed (single removals that fail are logged).
    """
    cutoff = time.time() - min_age_s
    if is_gcs(storage):  # (neither SDK is imported for the other's storage)
        removed = await _reap_gcs(storage, cutoff)
    elif is_s3(storage):
        removed = await _reap_s3(storage, cutoff)
        if fold_segments:
            await storage.afold_old_segments()  # an older version's append segments
    else:
        return 0
    if removed:
        log.info("leftovers_removed", url=storage.url(), removed=removed)
    return removed


def _ts(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


async def _reap_gcs(storage: Any, cutoff: float) -> int:
    c = await storage._gcs()
    prefix = storage._internal_key("gcs-append") + "/"
    url = f"gs://{storage.bucket}/{prefix}"
    params = {"prefix": prefix, "fields": "items(name,timeCreated),nextPageToken"}
    old: list[str] = []
    while True:
        page: dict[str, Any] = await c.guarded(
            c.api.list_objects(storage.bucket, params=dict(params), timeout=c.timeout),
            url=url,
            target="bucket",
        )
        for item in page.get("items", ()):
            created = _ts(item.get("timeCreated"))
            if created is not None and created < cutoff:
                old.append(str(item["name"]))
        token = page.get("nextPageToken")
        if not token:
            break
        params["pageToken"] = token
    for name in old:
        await c.delete_quietly(name, f"gs://{storage.bucket}/{name}")
    return len(old)


async def _reap_s3(storage: Any, cutoff: float) -> int:
    from evalsyncd.storage._s3errors import boundary

    client = await storage._client()
    prefix = f"{storage.prefix}/" if storage.prefix else ""
    url = storage.url()
    with boundary(url):
        resp = await client.list_multipart_uploads(Bucket=storage.bucket, Prefix=prefix)
    removed = 0
    for upload in resp.get("Uploads", ()):
        started = _ts(upload.get("Initiated"))
        key = str(upload.get("Key", ""))
        if started is None or started >= cutoff or not key.startswith(prefix):
            continue
        try:
            with boundary(url):
                await client.abort_multipart_upload(
                    Bucket=storage.bucket, Key=key, UploadId=upload["UploadId"]
                )
            removed += 1
        except StorageError as exc:
            log.warning("s3_abort_failed", url=f"s3://{storage.bucket}/{key}", error=str(exc))
    return removed
