"""Append segments left by evalsyncd versions before the one-append design: read, then fold.

Versions up to 0.x appended below 5 MiB on S3 by writing the delta as a
*segment* object and compacting later. Their layout under
``s3://{bucket}/{prefix}/``::

    {prefix}/{path}                                   the main object, with user metadata
                                                      x-amz-meta-evalsyncd-epoch: {epoch}
    {prefix}/.evalsyncd/seg/{path}/@{epoch}/{start}   bytes [start, start+size) of the
                                                      file; epoch 16 hex digits, start
                                                      20 decimal digits

The file was the main object followed by the *chain* of segments of the main
object's epoch: the one starting at its size, then the one starting where that
one ends, and so on. Any other segment (another epoch, or a start inside the
main object) was garbage.

This version never writes segments or epochs. It keeps, for one release:

- **readers**: a main object *with* the epoch metadata is read as main object
  plus chain (one listing of its segments: :func:`view`, :func:`read_span`);
  one without (everything this version writes) costs no listing;
- **writers**: an append to a file with an epoch rewrites it whole, chain
  included, without the epoch (``S3Storage.aappend``), so its segments become
  garbage;
- **the daemon**: at start, :func:`fold_all` folds every chain under its own
  prefix into its main object and deletes every segment (one listing when
  there is none).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog

from evalsyncd.errors import (
    ConflictError,
    CorruptObjectError,
    ObjectNotFoundError,
    StorageError,
)
from evalsyncd.storage._s3multipart import MULTIPART_MIN_BYTES
from evalsyncd.storage._s3requests import S3Requests

__all__ = [
    "EPOCH_META",
    "MAX_SEGMENTS",
    "SEGMENT_DIR",
    "Changed",
    "Segment",
    "View",
    "epoch_of",
    "fold_all",
    "read_span",
    "view",
]

log = structlog.get_logger("evalsyncd.storage")

EPOCH_META: Final = "evalsyncd-epoch"
"""The user-metadata key of a main object that older versions appended segments to."""
SEGMENT_DIR: Final = "seg"
"""The segments' directory in the internal area (``.evalsyncd/seg/``)."""
MAX_SEGMENTS: Final = 4096
"""Segments one file may have (older versions compacted at 32 by default); more is a
damaged or hostile bucket: :class:`~evalsyncd.errors.CorruptObjectError`."""
_SEGMENT_RE: Final = re.compile(r"(.+)/@([0-9a-f]{16})/([0-9]{20})")


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment object: bytes ``[start, start+size)`` of a file in ``epoch``."""

    key: str
    epoch: str
    start: int
    size: int
    mtime: float

    @property
    def end(self) -> int:
        """The file offset just after this segment's bytes."""
        return self.start + self.size


@dataclass(frozen=True, slots=True)
class View:
    """A file with segments at one instant: its main object and the chain after it."""

    etag: str
    main_size: int
    epoch: str | None
    main_mtime: float
    chain: tuple[Segment, ...] = ()

    @property
    def size(self) -> int:
        """Main object plus chain, bytes."""
        return self.chain[-1].end if self.chain else self.main_size

    @property
    def mtime(self) -> float:
        """The newest modification of the main object or a chained segment, Unix seconds."""
        return max([self.main_mtime, *(s.mtime for s in self.chain)])


class Changed(Exception):
    """The file changed while it was being read: read it again."""


def epoch_of(resp: dict[str, Any]) -> str | None:
    """The epoch in a ``HeadObject``/``GetObject`` answer (``None``: no segments to look for)."""
    value = resp.get("Metadata", {}).get(EPOCH_META)
    return str(value) if value else None


def _segments(objects: list[dict[str, Any]], base: str) -> dict[str, list[Segment]]:
    """Segment objects under ``base`` (``…/.evalsyncd/seg/``), by file path."""
    found: dict[str, list[Segment]] = {}
    for obj in objects:
        match = _SEGMENT_RE.fullmatch(obj["Key"][len(base) :])
        if match is None:  # a stray key
            continue
        found.setdefault(match[1], []).append(
            Segment(
                key=obj["Key"],
                epoch=match[2],
                start=int(match[3]),
                size=int(obj["Size"]),
                mtime=obj["LastModified"].timestamp(),
            )
        )
    return found


def _chain(main_size: int, epoch: str | None, segments: list[Segment]) -> tuple[Segment, ...]:
    by_start = {s.start: s for s in segments if s.epoch == epoch and s.size > 0}
    chain: list[Segment] = []
    pos = main_size
    while (seg := by_start.pop(pos, None)) is not None:
        chain.append(seg)
        pos = seg.end
    return tuple(chain)


async def view(
    requests: S3Requests, client: Any, key: str, seg_base: str, path: str, url: str
) -> View | None:
    """The file now, segments listed *before* the main object is read (``None``: missing).

    Within an epoch a main object only grows and a segment is deleted only
    once inside it, so the chain found from the main object read afterwards
    is contiguous.

    Args:
        requests: the bucket's requests; ``client`` the loop's S3 client.
        key: the main object's key; ``url`` names it in errors.
        seg_base: the key prefix of every segment (``{prefix}/.evalsyncd/seg/``).
        path: the file's path under the prefix.

    Raises:
        CorruptObjectError: more than :data:`MAX_SEGMENTS` segments.
    """
    objects, _ = await requests.list(
        client, url, f"{seg_base}{path}/@", proves_bucket=False, limit=MAX_SEGMENTS + 1
    )
    if len(objects) > MAX_SEGMENTS:
        raise CorruptObjectError(
            f"{url}: more than {MAX_SEGMENTS} append segments under "
            f"{seg_base}{path}/ (an older version's layout holds far fewer)",
            url=url,
        )
    segments = _segments(objects, seg_base).get(path, [])
    head = await requests.head(client, key, url)
    if head is None:
        return None
    epoch = epoch_of(head)
    size = int(head["ContentLength"])
    return View(
        etag=str(head["ETag"]),
        main_size=size,
        epoch=epoch,
        main_mtime=head["LastModified"].timestamp(),
        chain=_chain(size, epoch, segments) if epoch else (),
    )


async def read_span(
    requests: S3Requests, client: Any, key: str, url: str, v: View, start: int, end: int
) -> bytes:
    """Bytes ``[start, end)`` of the file as ``v`` describes it (concurrent GETs).

    Raises:
        Changed: the main object or a segment changed or went away meanwhile.
    """
    jobs = []
    if start < min(end, v.main_size):
        jobs.append(
            requests.get(client, key, url, start=start, end=min(end, v.main_size), if_match=v.etag)
        )
    for seg in v.chain:
        lo, hi = max(start, seg.start), min(end, seg.end)
        if lo < hi:
            jobs.append(
                requests.get(client, seg.key, url, start=lo - seg.start, end=hi - seg.start)
            )
    try:
        parts = await asyncio.gather(*jobs)
    except (ObjectNotFoundError, ConflictError) as exc:
        raise Changed from exc
    data = b"".join(p for p, _resp in parts)
    if len(data) != end - start:
        raise Changed
    return data


async def fold_all(
    requests: S3Requests,
    client: Any,
    seg_base: str,
    main_key: Callable[[str], str],
    url: Callable[[str], str],
) -> int:
    """Fold every chain under ``seg_base`` into its main object; delete every segment.

    Per file with segments: a listing-first view, the main object rewritten as
    main + chain without the epoch (also with no chain, below 5 MiB), with
    ``PutObject`` and ``If-Match`` (another writer's change in between leaves the
    file for the next start), then one ``DeleteObjects`` of the segments the
    first listing found. A segment whose path is not a valid key is left alone.
    Cost with no segments: one listing.

    Args:
        requests: the bucket's requests; ``client`` the loop's S3 client.
        seg_base: the key prefix of every segment (``{prefix}/.evalsyncd/seg/``).
        main_key: a file path's main object key; ``url`` its ``s3://`` URL.

    Returns:
        How many files were folded.

    Raises:
        StorageError: the listing failed (a file that fails is logged and kept).
    """
    objects, _ = await requests.list(client, url(""), seg_base, proves_bucket=False)
    folded = 0
    for path, segments in sorted(_segments(objects, seg_base).items()):
        file_url = url(path)
        try:
            key = main_key(path)
        except ValueError as exc:  # not a key this version could have written
            log.warning("s3_segments_not_folded", url=file_url, error=str(exc))
            continue
        try:
            v = await view(requests, client, key, seg_base, path, file_url)
            # A chain is folded; an epoch alone too while the rewrite is small, so that
            # readers stop listing segments for this file.
            if v is not None and (v.chain or (v.epoch and v.size < MULTIPART_MIN_BYTES)):
                content = await read_span(requests, client, key, file_url, v, 0, v.size)
                await requests.put(client, key, file_url, content, IfMatch=v.etag)
                folded += 1
            # The main object has no chain now (or never had one): every segment is dead.
            await requests.delete(client, [s.key for s in segments], file_url)
        except (StorageError, Changed) as exc:
            log.warning("s3_segments_not_folded", url=file_url, error=repr(exc))
    if folded:
        log.info("s3_segments_folded", url=url(""), files=folded)
    return folded
