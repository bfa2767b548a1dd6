"""Probe a bucket for the server features evalsyncd relies on, and report each one.

S3-compatible servers (MinIO, Ceph RGW, SeaweedFS, moto, ``rclone serve s3``
...) and GCS emulators each lack some of what AWS and GCS do. :func:`aprobe`
tries every feature the design relies on, on small objects under
``{prefix}/.evalsyncd/probe/{random}/`` that it deletes afterwards, and
returns one :class:`FeatureResult` per feature with the server's answer:

==========================  =============================================================
feature                     checked by
==========================  =============================================================
``conditional-create``      a second create of an existing object is refused (S3
                            ``If-None-Match: *``, GCS ``ifGenerationMatch=0``)
``if-match``                a write with a stale version is refused (S3 ``If-Match`` on
                            ``PutObject``, GCS ``ifGenerationMatch``)
``ranged-get``              a ranged GET answers 206 (S3: ``Content-Range``) with the
                            right bytes
``checksums``               an upload with a CRC32C checksum is accepted (S3
                            ``x-amz-checksum-crc32c``; GCS: not sent, always ok)
``multipart-copy``          S3: ``UploadPartCopy`` of an object, completed, gives the same
                            bytes; GCS: ``compose`` of [object, delta] gives both
``copy-source-if-match``    S3: ``UploadPartCopy`` with a stale ``CopySourceIfMatch`` is
                            refused; GCS: ``compose`` with a stale ``ifGenerationMatch``
``complete-if-match``       S3: ``CompleteMultipartUpload`` with a stale ``If-Match`` is
                            refused (GCS: same as ``copy-source-if-match``)
==========================  =============================================================

What a missing feature means (:attr:`FeatureResult.consequence`):

- ``conditional-create`` missing: the tail log cannot tell two daemons apart
  (its fence): run one daemon per prefix, or ``max_main_lag_s = 0``;
- ``if-match`` missing: another writer's change is not detected by the server;
  evalsyncd's post-condition checks (size and version after each append) still
  refuse to acknowledge a wrong result;
- ``ranged-get`` missing: readers fall back to whole reads (slower, correct);
- ``checksums`` missing: the server refused a checksum header; nothing works;
- ``multipart-copy`` missing: appends of 5 MiB and more would corrupt the
  object: the fallback is a whole rewrite (``S3Storage.multipart_copy = False``);
- ``copy-source-if-match`` / ``complete-if-match`` missing: concurrent appends
  are caught by the post-condition (a ``HEAD``) instead of the server.

Cost: about 12 small requests on S3 and 10 on GCS, once; no object is bigger
than 64 bytes. The probe knows nothing of the daemon; the daemon and
``evalsyncd check URL`` call it.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import aiohttp
import botocore.exceptions as bexc
import structlog

from evalsyncd.errors import ConflictError, StorageError, TransientStorageError
from evalsyncd.storage._cloud import CloudStorage
from evalsyncd.storage._loaded import is_gcs, is_s3
from evalsyncd.storage._s3errors import BOUNDARY, http_status, translate

log = structlog.get_logger("evalsyncd.storage")

__all__ = ["FEATURES", "FeatureResult", "ProbeReport", "aadapt", "aprobe", "probe"]

FEATURES: Final = (
    "conditional-create",
    "if-match",
    "ranged-get",
    "checksums",
    "multipart-copy",
    "copy-source-if-match",
    "complete-if-match",
)
"""The features probed, in report order."""

_CONSEQUENCE: Final = {
    "conditional-create": "the tail log's fence is off: never run two daemons on one prefix",
    "if-match": "other writers are caught by evalsyncd's post-condition checks, not the server",
    "ranged-get": "readers read whole objects (slower, still correct)",
    "checksums": "uploads are refused: this server cannot be used",
    "multipart-copy": "appends of 5 MiB and more rewrite the whole object instead "
    "(S3Storage.multipart_copy = False)",
    "copy-source-if-match": "concurrent appends are caught by the post-condition HEAD",
    "complete-if-match": "concurrent appends are caught by the post-condition HEAD",
}

_REQUIRED: Final = frozenset({"checksums"})


@dataclass(frozen=True)
class FeatureResult:
    """One feature's result.

    Attributes:
        feature: one of :data:`FEATURES`.
        ok: whether the server behaves as evalsyncd relies on.
        answer: what the server answered, in one line.
        consequence: ``""`` when ok; else what evalsyncd does about it.
    """

    feature: str
    ok: bool
    answer: str
    consequence: str = ""


@dataclass
class ProbeReport:
    """The features of the server behind one URL.

    Attributes:
        url: the probed prefix.
        results: one per feature probed, in :data:`FEATURES` order.
    """

    url: str
    results: list[FeatureResult] = field(default_factory=list)

    def get(self, feature: str) -> FeatureResult | None:
        """The result of ``feature``, or ``None`` if it was not probed."""
        return next((r for r in self.results if r.feature == feature), None)

    def missing(self) -> list[FeatureResult]:
        """The features the server lacks."""
        return [r for r in self.results if not r.ok]

    @property
    def usable(self) -> bool:
        """Whether evalsyncd can use the server (perhaps with fallbacks)."""
        return not any(r.feature in _REQUIRED for r in self.missing())

    def to_dict(self) -> dict[str, Any]:
        """``{"url", "usable", "results": [...]}``: the JSON of ``evalsyncd check --json``."""
        return {
            "url": self.url,
            "usable": self.usable,
            "results": [asdict(r) for r in self.results],
        }


def _result(feature: str, ok: bool, answer: str) -> FeatureResult:
    return FeatureResult(feature, ok, answer, "" if ok else _CONSEQUENCE[feature])


def probe(storage: CloudStorage) -> ProbeReport:
    """See :func:`aprobe` (through the storage's bridge loop)."""
    from evalsyncd.storage._bridge import run_sync

    return run_sync(aprobe(storage))


async def aprobe(storage: CloudStorage) -> ProbeReport:
    """Probe the server behind ``storage`` (S3 or GCS) under ``{prefix}/.evalsyncd/probe/``.

    Returns:
        The report; every feature has a result (a failed check is a result, not
        an exception).

    Raises:
        StorageError: the probe could not run at all (bucket missing, access
            denied, server unreachable: the first request failed).
        TypeError: ``storage`` is neither an ``S3Storage`` nor a ``GCSStorage``.
    """
    base = storage._internal_key("probe", secrets.token_hex(6))
    report = ProbeReport(url=storage.url())
    if is_s3(storage):
        await _probe_s3(storage, base, report)
    elif is_gcs(storage):
        await _probe_gcs(storage, base, report)
    else:
        raise TypeError(f"cannot probe {type(storage).__name__}: S3Storage or GCSStorage only")
    return report


# -- S3 -------------------------------------------------------------------------------------


def _s3_answer(exc: BaseException) -> str:
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {})
        return f"HTTP {http_status(exc)} {err.get('Code', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


def _unless_transient(exc: BaseException, url: str) -> None:
    """Raise a transient failure (5xx, 429, a reset, a timeout) as such: it says nothing
    about a feature, so the probe fails (and is tried again later) instead."""
    translated = translate(exc, url)
    if isinstance(translated, TransientStorageError):
        raise translated from exc


async def _s3_refused(call: Any, url: str) -> tuple[bool, str]:
    """Run a request that must be refused with 412; ``(refused, answer)``."""
    try:
        resp = await call
    except BOUNDARY as exc:
        _unless_transient(exc, url)
        if not isinstance(exc, bexc.ClientError):
            raise translate(exc, url) from exc
        return http_status(exc) == 412, _s3_answer(exc)
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
    return False, f"HTTP {status}: accepted"


async def _probe_s3(storage: Any, base: str, report: ProbeReport) -> None:
    client = await storage._client()
    bucket = storage.bucket
    url = storage.url()
    a, b, c = f"{base}/a", f"{base}/b", f"{base}/c"
    body = b"evalsyncd probe: 0123456789abcdef\n"
    out: dict[str, FeatureResult] = {}
    try:
        try:
            first = await client.put_object(
                Bucket=bucket, Key=a, Body=body, ChecksumAlgorithm="CRC32C", IfNoneMatch="*"
            )
        except bexc.ClientError as exc:
            if http_status(exc) in (400, 501) and "checksum" in str(exc).lower():
                out["checksums"] = _result("checksums", False, _s3_answer(exc))
                report.results = [out["checksums"]]
                return
            raise translate(exc, url) from exc
        except BOUNDARY as exc:
            raise translate(exc, url) from exc
        out["checksums"] = _result("checksums", True, "CRC32C accepted")
        etag = str(first.get("ETag", ""))
        ok, answer = await _s3_refused(
            client.put_object(Bucket=bucket, Key=a, Body=b"x", IfNoneMatch="*"), url
        )
        out["conditional-create"] = _result("conditional-create", ok, answer)
        ok, answer = await _s3_refused(
            client.put_object(Bucket=bucket, Key=a, Body=b"x", IfMatch='"0000"'), url
        )
        out["if-match"] = _result("if-match", ok, answer)
        head = await client.head_object(Bucket=bucket, Key=a)
        etag = str(head.get("ETag", etag))
        out["ranged-get"] = await _s3_ranged(client, bucket, a, body, url)
        # multipart: UploadPartCopy of a (one part, so no 5 MiB minimum) into b
        await client.put_object(Bucket=bucket, Key=b, Body=b"old")
        b_etag = str((await client.head_object(Bucket=bucket, Key=b)).get("ETag", ""))
        out.update(await _s3_multipart(client, bucket, a, etag, b, b_etag, c, body, url))
    except StorageError:
        raise
    except BOUNDARY as exc:
        raise translate(exc, url) from exc
    finally:
        with contextlib.suppress(StorageError):
            await storage._delete_keys([a, b, c], url)
    report.results = [out[f] for f in FEATURES if f in out]


async def _s3_ranged(client: Any, bucket: str, key: str, body: bytes, url: str) -> FeatureResult:
    try:
        resp = await client.get_object(Bucket=bucket, Key=key, Range="bytes=5-9")
        async with resp["Body"] as stream:
            got = await stream.read()
    except BOUNDARY as exc:
        if not isinstance(exc, bexc.FlexibleChecksumError):
            _unless_transient(exc, url)
        return _result("ranged-get", False, _s3_answer(exc))
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status != 206 or got != body[5:10]:
        return _result("ranged-get", False, f"HTTP {status} with {len(got)} bytes")
    return _result("ranged-get", True, "HTTP 206, right bytes")


async def _s3_multipart(
    client: Any,
    bucket: str,
    src: str,
    etag: str,
    dst: str,
    dst_etag: str,
    scratch: str,
    body: bytes,
    url: str,
) -> dict[str, FeatureResult]:
    out: dict[str, FeatureResult] = {}
    # 1. a stale CopySourceIfMatch must be refused; a stale If-Match on Complete too
    upload = (await client.create_multipart_upload(Bucket=bucket, Key=scratch))["UploadId"]
    try:
        ok, answer = await _s3_refused(
            client.upload_part_copy(
                Bucket=bucket,
                Key=scratch,
                UploadId=upload,
                PartNumber=1,
                CopySource={"Bucket": bucket, "Key": src},
                CopySourceIfMatch='"0000"',
            ),
            url,
        )
        out["copy-source-if-match"] = _result("copy-source-if-match", ok, answer)
    finally:
        await _abort(client, bucket, scratch, upload)
    # 2. the real thing: dst := copy of src, completed with If-Match on dst's ETag
    upload = (await client.create_multipart_upload(Bucket=bucket, Key=dst))["UploadId"]
    try:
        try:
            resp = await client.upload_part_copy(
                Bucket=bucket,
                Key=dst,
                UploadId=upload,
                PartNumber=1,
                CopySource={"Bucket": bucket, "Key": src},
                CopySourceIfMatch=etag,
            )
        except BOUNDARY as exc:
            _unless_transient(exc, url)
            out["multipart-copy"] = _result("multipart-copy", False, _s3_answer(exc))
            out["complete-if-match"] = _result("complete-if-match", False, "not reached")
            return out
        part_etag = (resp.get("CopyPartResult") or {}).get("ETag")
        if not part_etag:
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            out["multipart-copy"] = _result(
                "multipart-copy", False, f"UploadPartCopy: HTTP {status} without a part ETag"
            )
            out["complete-if-match"] = _result("complete-if-match", False, "not reached")
            return out
        parts = {"Parts": [{"PartNumber": 1, "ETag": part_etag}]}
        ok, answer = await _s3_refused(
            client.complete_multipart_upload(
                Bucket=bucket, Key=dst, UploadId=upload, MultipartUpload=parts, IfMatch='"0000"'
            ),
            url,
        )
        out["complete-if-match"] = _result("complete-if-match", ok, answer)
        try:
            await client.complete_multipart_upload(
                Bucket=bucket, Key=dst, UploadId=upload, MultipartUpload=parts, IfMatch=dst_etag
            )
        except BOUNDARY as exc:
            _unless_transient(exc, url)
            if not ok:  # the stale Complete went through: dst is already the copy
                pass
            else:
                out["multipart-copy"] = _result(
                    "multipart-copy", False, f"CompleteMultipartUpload: {_s3_answer(exc)}"
                )
                return out
        got = await client.get_object(Bucket=bucket, Key=dst)
        async with got["Body"] as stream:
            data = await stream.read()
        if data == body:
            out["multipart-copy"] = _result("multipart-copy", True, "right bytes")
        else:
            out["multipart-copy"] = _result(
                "multipart-copy", False, f"the copy holds {len(data)} bytes, not {len(body)}"
            )
    finally:
        await _abort(client, bucket, dst, upload)
    return out


async def _abort(client: Any, bucket: str, key: str, upload: str) -> None:
    try:
        await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
    except (bexc.ClientError, *BOUNDARY):
        pass  # completed, or already gone


# -- GCS ------------------------------------------------------------------------------------


async def _gcs_refused(call: Any, url: str) -> tuple[bool, str]:
    try:
        await call
    except aiohttp.ClientResponseError as exc:
        if exc.status in (408, 429) or exc.status >= 500:
            raise TransientStorageError(f"{url}: probe: HTTP {exc.status}", url=url) from exc
        return exc.status == 412, f"HTTP {exc.status}"
    except ConflictError as exc:
        return True, f"HTTP 412 ({exc})"
    return False, "HTTP 200: accepted"


async def _probe_gcs(storage: Any, base: str, report: ProbeReport) -> None:
    c = await storage._gcs()
    url = storage.url()
    a, d, s = f"{base}/a", f"{base}/d", f"{base}/s"
    body = b"evalsyncd probe: 0123456789abcdef\n"
    out: dict[str, FeatureResult] = {}
    try:
        created = await c.guarded(c.upload(a, body, generation="0"), url=url, target="bucket")
        generation = str(created.get("generation", ""))
        out["checksums"] = _result("checksums", True, "not sent on GCS")
        ok, answer = await _gcs_refused(c.upload(a, b"x", generation="0"), url)
        out["conditional-create"] = _result("conditional-create", ok, answer)
        ok, answer = await _gcs_refused(c.upload(a, b"x", generation="1"), url)
        out["if-match"] = _result("if-match", ok, answer)
        got = await c.download(a, url, start=5, end=10)
        out["ranged-get"] = _result(
            "ranged-get",
            got == body[5:10],
            "right bytes" if got == body[5:10] else f"{len(got)} bytes, not 5",
        )
        await c.guarded(c.upload(d, b"tail\n"), url=url, target="bucket")
        ok, answer = await _gcs_refused(
            c.api.compose(
                storage.bucket,
                s,
                [a, d],
                params={"ifGenerationMatch": "1"},
                timeout=c.timeout,
            ),
            url,
        )
        out["copy-source-if-match"] = _result("copy-source-if-match", ok, f"compose: {answer}")
        out["complete-if-match"] = _result("complete-if-match", ok, f"compose: {answer}")
        try:
            composed = await c.api.compose(
                storage.bucket,
                a,
                [a, d],
                params={"ifGenerationMatch": generation},
                timeout=c.timeout,
            )
            data = await c.download(a, url)
            want = body + b"tail\n"
            size = composed.get("size")
            ok = data == want and str(size) == str(len(want))
            answer = "right bytes" if ok else f"{len(data)} bytes, size field {size!r}"
        except aiohttp.ClientResponseError as exc:
            if exc.status in (408, 429) or exc.status >= 500:
                raise TransientStorageError(f"{url}: probe: HTTP {exc.status}", url=url) from exc
            ok, answer = False, f"compose: HTTP {exc.status}"
        out["multipart-copy"] = _result("multipart-copy", ok, answer)
    except StorageError:
        raise
    except aiohttp.ClientResponseError as exc:
        cls = (
            TransientStorageError if exc.status in (408, 429) or exc.status >= 500 else StorageError
        )
        raise cls(f"{url}: probe failed: HTTP {exc.status}", url=url) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise TransientStorageError(f"{url}: probe failed: {exc!r}", url=url) from exc
    finally:
        for key in (a, d, s):
            await c.delete_quietly(key, url)
    report.results = [out[f] for f in FEATURES if f in out]


# -- fallbacks: what a storage does about a missing feature -----------------------------------

_REPORTS: dict[tuple[str, str, str | None], ProbeReport] = {}
"""Probe reports of this process, per (backend, URL, endpoint): one probe per destination."""


async def aadapt(storage: Any) -> ProbeReport | None:
    """Probe the server behind ``storage`` once per process and apply the fallbacks.

    A missing ``multipart-copy`` turns ``S3Storage.multipart_copy`` off (appends of
    5 MiB and more go through whole rewrites). Other missing features need no
    change (see the module docstring). The result is logged once: event
    ``server_probed`` (info) when every feature is there, ``server_features_missing``
    (warning) with each missing feature, the server's answer and the fallback.

    Returns:
        The report, or ``None`` for a storage that is not S3 or GCS (nothing to probe).

    Raises:
        ServerBehaviourError: a required feature is missing (the server is unusable);
            the message names the feature and the server's answer.
        StorageError: the probe could not run (the caller may go on: every append
            still checks its post-condition).
    """
    from evalsyncd.errors import ServerBehaviourError

    if not (is_s3(storage) or is_gcs(storage)):
        return None
    key = (type(storage).__name__, storage.url(), getattr(storage, "endpoint_url", None))
    report = _REPORTS.get(key)
    fresh = report is None
    if report is None:
        report = _REPORTS[key] = await aprobe(storage)
    copy = report.get("multipart-copy")
    if is_s3(storage) and copy is not None and not copy.ok:
        storage.multipart_copy = False
    if fresh:
        missing = report.missing()
        if missing:
            log.warning(
                "server_features_missing",
                url=report.url,
                missing={r.feature: r.answer for r in missing},
                fallbacks={r.feature: r.consequence for r in missing},
            )
        else:
            log.info("server_probed", url=report.url, features=list(FEATURES))
    if not report.usable:
        bad = next(r for r in report.missing() if r.feature in _REQUIRED)
        raise ServerBehaviourError(
            f"{report.url}: the server lacks {bad.feature} ({bad.answer}); {bad.consequence}",
            url=report.url,
            feature=bad.feature,
            answer=bad.answer,
        )
    return report
