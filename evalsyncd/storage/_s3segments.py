"""The S3 segment log: appends below 5 MiB, where S3 cannot concatenate on the server.

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

A segment append (:meth:`SegmentLog.append`) writes ``data`` as the segment at
the file's current size, created with ``If-None-Match: *`` so that of two
writers racing at one offset exactly one wins. The append is confirmed once a
``HEAD`` shows the main object unchanged (same ETag and epoch): the segment is
then on the chain.

**Compaction** rewrites the main object as main + chain (``PutObject`` with
``If-Match`` on the ETag read), then deletes the compacted segments. A crash
between the two leaves stale segments, which readers skip. It runs after an
append when the pending segments outweigh ``compact_ratio`` times the main
object (unless appends of the last one's size reach the multipart threshold
within the segment budget: that compaction comes soon anyway), when there are
more than ``max_segments`` of them, when the oldest is ``max_lag_s`` old, when
the file reaches ``multipart_threshold`` (later appends then use multipart),
and on :meth:`SegmentLog.flush` for every file this log appended segments to.
The bytes of small files this log appended to are kept in memory
(:class:`FileCache`, at most ``cache_max_bytes`` in all), so compaction uploads
but seldom downloads. Compaction is best effort inside ``append``: a failure is
logged and the append still succeeds (``flush`` raises it).

Consistency: a view of a file (:class:`View`) lists its segments *before*
reading the main object. Since the main object only grows within an epoch and
segments are deleted only once inside it, the chain from the main object read
afterwards is always contiguous: the view is the file as it was at some instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog

from evalsyncd.errors import ConflictError, ObjectNotFoundError, StorageError
from evalsyncd.storage._s3requests import S3Requests

__all__ = [
    "ATTEMPTS",
    "EPOCH_META",
    "Changed",
    "FileCache",
    "Segment",
    "SegmentLog",
    "SegmentPaths",
    "SegmentPolicy",
    "View",
    "epoch_meta",
    "make_view",
    "new_epoch",
]

log = structlog.get_logger("evalsyncd.storage")

EPOCH_META: Final = "evalsyncd-epoch"
"""The main object's user-metadata key holding its epoch."""
ATTEMPTS: Final = 4
"""Re-reads when a file changes under a read or a blind append."""
_SEGMENT_RE: Final = re.compile(r"@([0-9a-f]{16})/([0-9]{20})")
_MAX_VIEW_HINTS: Final = 4096  # paths whose last view is remembered (a few hundred bytes each)


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
    """One file at one instant: its main object and the chain of segments after it.

    ``garbage`` holds the listed segments that are not on the chain: stale ones
    (inside the main object), those of other epochs and strays.
    """

    etag: str | None
    main_size: int
    epoch: str | None
    main_mtime: float
    chain: tuple[Segment, ...] = ()
    garbage: tuple[Segment, ...] = ()

    @property
    def exists(self) -> bool:
        """Whether the main object exists."""
        return self.etag is not None

    @property
    def size(self) -> int:
        """The file's size: main object plus chain, bytes."""
        return self.chain[-1].end if self.chain else self.main_size

    @property
    def mtime(self) -> float:
        """The newest modification of the main object or a chained segment, Unix seconds."""
        return max([self.main_mtime, *(s.mtime for s in self.chain)])

    @property
    def pending_bytes(self) -> int:
        """Bytes in segments, not yet in the main object."""
        return self.size - self.main_size


class Changed(Exception):
    """The file changed while it was being read: read it again."""


def new_epoch() -> str:
    """A fresh epoch id: 16 random hex digits."""
    return secrets.token_hex(8)


def epoch_meta(epoch: str | None) -> dict[str, str]:
    """The main object's user metadata for ``epoch`` (none without one)."""
    return {EPOCH_META: epoch} if epoch else {}


class FileCache:
    """Bytes ``[0, n)`` of small files in one epoch, least recently used first. Thread-safe.

    Args:
        max_bytes: memory bound, bytes.
        max_file_bytes: files of this size or more are never kept (multipart
            appends need no download).
    """

    def __init__(self, max_bytes: int, max_file_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self._items: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: str, epoch: str | None) -> bytes:
        """The known bytes of ``path`` in ``epoch`` (``b""`` when none)."""
        with self._lock:
            entry = self._items.get(path)
            if entry is None or entry[0] != epoch:
                return b""
            self._items.move_to_end(path)
            return entry[1]

    def put(self, path: str, epoch: str | None, content: bytes | None) -> None:
        """Remember ``content`` as bytes ``[0, n)`` of ``path`` in ``epoch`` (``None`` forgets)."""
        with self._lock:
            old = self._items.pop(path, None)
            if old is not None:
                self._bytes -= len(old[1])
            if content is None or epoch is None or len(content) >= self.max_file_bytes:
                return
            self._items[path] = (epoch, content)
            self._bytes += len(content)
            while self._bytes > self.max_bytes and self._items:
                _path, (_epoch, dropped) = self._items.popitem(last=False)
                self._bytes -= len(dropped)


@dataclass(frozen=True, slots=True)
class SegmentPolicy:
    """When to compact; see the module docstring and ``S3Storage``'s arguments.

    Attributes:
        multipart_threshold: bytes from which a file is appended to by multipart.
        max_segments: pending segments per file before compaction.
        compact_ratio: compact when pending bytes exceed this many times the main object.
        max_lag_s: compact on append once the oldest pending segment is this old, seconds.
        cache_max_bytes: memory for the bytes of small files, bytes.
    """

    multipart_threshold: int
    max_segments: int
    compact_ratio: float
    max_lag_s: float
    cache_max_bytes: int


@dataclass(frozen=True, slots=True)
class SegmentPaths:
    """How the owning storage names a file's objects (its bound methods: a child
    storage's prefix is its own).

    Attributes:
        main_key: a file path's main object key (validated).
        segment_dir: the key prefix of all of a path's segments, ending in ``/``.
        url: a file path's ``s3://`` URL, for errors and logs.
    """

    main_key: Callable[[str], str]
    segment_dir: Callable[[str], str]
    url: Callable[[str], str]


class SegmentLog:
    """The segment protocol of one ``S3Storage`` (runtime state: never pickled).

    It remembers, per file this instance appended to: the oldest pending
    segment's time (for ``max_lag_s`` and :meth:`flush`), the file's bytes
    (:class:`FileCache`) and the view its last append left (a hint: it saves
    the LIST + HEAD of the next conditional append; every append still confirms
    the main object with a HEAD, so a stale hint only costs a conflict and a retry).

    Args:
        requests: the bucket's translated requests.
        policy: the compaction settings.
        paths: how the storage names a file's objects.
    """

    def __init__(self, requests: S3Requests, policy: SegmentPolicy, paths: SegmentPaths) -> None:
        self.requests = requests
        self.policy = policy
        self._main_key, self._segment_dir, self._url = paths.main_key, paths.segment_dir, paths.url
        self.cache = FileCache(policy.cache_max_bytes, policy.multipart_threshold)
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}  # path -> time.monotonic() of its oldest segment
        self._hints: OrderedDict[str, View] = OrderedDict()

    # -- what this instance remembers -------------------------------------------------------

    def is_pending(self, path: str) -> bool:
        """Whether this log left segments of ``path`` that it did not compact."""
        with self._lock:
            return path in self._pending

    def take_hint(self, path: str) -> View | None:
        """The view the last append of ``path`` left, forgotten as it is taken."""
        with self._lock:
            return self._hints.pop(path, None)

    def drop_hint(self, path: str) -> None:
        """Forget the view hint of ``path`` (its main object is about to change)."""
        with self._lock:
            self._hints.pop(path, None)

    def forget(self, path: str) -> None:
        """Forget the bytes and pending state of ``path`` (written whole, or removed)."""
        self.cache.put(path, None, None)
        self._track(path, pending=False)

    def _track(self, path: str, pending: bool) -> None:
        with self._lock:
            if pending:
                self._pending.setdefault(path, time.monotonic())
            else:
                self._pending.pop(path, None)

    # -- views ------------------------------------------------------------------------------

    def segment_key(self, path: str, epoch: str, start: int) -> str:
        """Key of the segment of ``path`` holding bytes from ``start`` in ``epoch``."""
        return f"{self._segment_dir(path)}@{epoch}/{start:020d}"

    async def list_segments(self, client: Any, path: str) -> list[Segment]:
        """Every segment object of ``path``, all epochs, in key order: one listing."""
        base = self._segment_dir(path)
        objects, _ = await self.requests.list(
            client, self._url(path), base + "@", proves_bucket=False
        )
        segments: list[Segment] = []
        for obj in objects:
            match = _SEGMENT_RE.fullmatch(obj["Key"][len(base) :])
            if match is None:  # a segment of a deeper path such as "{path}/@x"
                continue
            segments.append(
                Segment(
                    key=obj["Key"],
                    epoch=match[1],
                    start=int(match[2]),
                    size=int(obj["Size"]),
                    mtime=obj["LastModified"].timestamp(),
                )
            )
        return segments

    async def view(self, client: Any, path: str) -> View:
        """The file now: its segments are listed *before* its main object is read."""
        segments = await self.list_segments(client, path)
        head = await self.requests.head(client, self._main_key(path), self._url(path))
        return make_view(head, segments)

    async def read_span(self, client: Any, path: str, view: View, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the file as ``view`` describes it (concurrent GETs).

        Raises:
            Changed: the main object or a segment changed or went away meanwhile.
        """
        url = self._url(path)
        get = self.requests.get
        jobs = []
        if start < min(end, view.main_size):
            jobs.append(
                get(
                    client,
                    self._main_key(path),
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
                    get(client, seg.key, url)
                    if whole
                    else get(client, seg.key, url, start=lo - seg.start, end=hi - seg.start)
                )
        try:
            parts = await asyncio.gather(*jobs)
        except (ObjectNotFoundError, ConflictError) as exc:
            raise Changed from exc
        data = b"".join(p for p, _resp in parts)
        if len(data) != end - start:
            raise Changed
        return data

    async def content(self, client: Any, path: str, view: View, known: bytes = b"") -> bytes:
        """All bytes of the file in ``view``: ``known`` (a prefix), the cache, then downloads."""
        have = known if len(known) >= view.size else self.cache.get(path, view.epoch)
        have = have[: view.size]
        if len(have) < view.size:
            have += await self.read_span(client, path, view, len(have), view.size)
        return have

    async def holds(self, client: Any, path: str, view: View, start: int, data: bytes) -> bool:
        """Whether bytes ``[start, start+len(data))`` of the file in ``view`` equal ``data``."""
        if not data:
            return True
        try:
            return await self.read_span(client, path, view, start, start + len(data)) == data
        except Changed:
            return False

    # -- appending and compacting -------------------------------------------------------------

    async def append(self, client: Any, path: str, view: View, data: bytes) -> str | None:
        """Append ``data`` as the segment at ``view.size``, then compact if it is time.

        Returns:
            The main object's ETag (changed only if compaction ran).

        Raises:
            ConflictError: the file changed since ``view`` (a stray segment is removed).
        """
        url = self._url(path)
        epoch = view.epoch
        assert epoch is not None and view.etag is not None
        seg_key = self.segment_key(path, epoch, view.size)
        await self.requests.put(client, seg_key, url, data, IfNoneMatch="*")
        head = await self.requests.head(client, self._main_key(path), url)
        if (
            head is None
            or head["ETag"] != view.etag
            or head.get("Metadata", {}).get(EPOCH_META) != view.epoch
        ):
            # The main object changed: the segment counts only if it is on the chain now.
            now = await self.view(client, path)
            if all(s.key != seg_key for s in now.chain):
                if any(s.key == seg_key for s in now.garbage):
                    with contextlib.suppress(StorageError):
                        await self.requests.delete(client, [seg_key], url)
                raise ConflictError(f"{url}: the file changed during the append", url=url)
            view = now
        else:
            seg = Segment(seg_key, epoch, view.size, len(data), time.time())
            view = View(
                view.etag,
                view.main_size,
                view.epoch,
                view.main_mtime,
                (*view.chain, seg),
                view.garbage,
            )
        known = self.cache.get(path, view.epoch)
        known = known + data if len(known) == view.size - len(data) else b""
        self.cache.put(path, view.epoch, known or None)
        self._track(path, pending=True)
        if not self._should_compact(path, view, len(data)):
            with self._lock:
                self._hints[path] = view
                while len(self._hints) > _MAX_VIEW_HINTS:
                    self._hints.popitem(last=False)
            return view.etag
        try:
            return await self.compact(client, path, view, known)
        except StorageError as exc:  # best effort: the append itself succeeded
            log.warning("s3_compaction_failed", url=url, error=repr(exc))
            return view.etag

    def _should_compact(self, path: str, view: View, delta: int) -> bool:
        """The schedule: see the module docstring. ``delta`` is the size of the last append."""
        p = self.policy
        if view.size >= p.multipart_threshold or len(view.chain) > p.max_segments:
            return True
        # Segments outweigh the main object: compact, unless appends of this size
        # reach the multipart threshold (which compacts) within the segment budget.
        to_threshold = p.multipart_threshold - view.size
        if view.pending_bytes > p.compact_ratio * view.main_size and to_threshold > (
            p.max_segments - len(view.chain)
        ) * max(delta, 1):
            return True
        with self._lock:
            since = self._pending.get(path)
        return since is not None and time.monotonic() - since >= p.max_lag_s

    async def compact(self, client: Any, path: str, view: View, known: bytes = b"") -> str | None:
        """Rewrite the main object as main + chain (``If-Match``), then delete the segments.

        Returns:
            The new main ETag.

        Raises:
            ConflictError: the main object changed since ``view`` was taken.
        """
        url = self._url(path)
        if view.chain:
            content = await self.content(client, path, view, known)
            etag: str | None = await self.requests.put(
                client,
                self._main_key(path),
                url,
                content,
                IfMatch=view.etag,
                Metadata=epoch_meta(view.epoch),
            )
            self.cache.put(path, view.epoch, content)
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
                await self.requests.delete(client, dead, url)
            except StorageError as exc:  # stale segments are harmless; the next cleanup retries
                log.info("s3_segment_cleanup_failed", url=url, error=repr(exc))
        return etag

    async def cleanup(self, client: Any, path: str) -> None:
        """Delete the segments of ``path`` that can never be read again.

        Listing first, then reading the main object: a segment of another
        epoch than the main object's then, or inside it, is dead for good.
        """
        segments = await self.list_segments(client, path)
        if not segments:
            return
        url = self._url(path)
        view = make_view(await self.requests.head(client, self._main_key(path), url), segments)
        dead = [s.key for s in view.garbage if s.epoch != view.epoch or s.start < view.main_size]
        await self.requests.delete(client, dead, url)

    async def flush(self, client: Any) -> None:
        """Compact every file this log left segments in (see ``S3Storage.aflush``).

        Raises:
            StorageError: the first failure, after every file was tried; those
                files stay on the list for the next flush.
        """
        with self._lock:
            paths = list(self._pending)
            for path in paths:  # compaction changes the main object's ETag
                self._hints.pop(path, None)
        errors: list[StorageError] = []
        for path in paths:
            for _attempt in range(ATTEMPTS):
                try:
                    view = await self.view(client, path)
                    if view.exists:
                        await self.compact(client, path, view)
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

    def has_pending(self) -> bool:
        """Whether any file has segments this log did not compact."""
        with self._lock:
            return bool(self._pending)


def make_view(head: dict[str, Any] | None, segments: list[Segment]) -> View:
    """The view of a file from its ``HeadObject`` response (``None``: missing) and segments."""
    if head is None:
        return View(None, 0, None, 0.0, (), tuple(segments))
    epoch = head.get("Metadata", {}).get(EPOCH_META)
    main_size = int(head["ContentLength"])
    by_start = {s.start: s for s in segments if s.epoch == epoch and s.size > 0}
    chain: list[Segment] = []
    pos = main_size
    while (seg := by_start.pop(pos, None)) is not None:
        chain.append(seg)
        pos = seg.end
    on_chain = {s.key for s in chain}
    return View(
        etag=str(head["ETag"]),
        main_size=main_size,
        epoch=epoch,
        main_mtime=head["LastModified"].timestamp(),
        chain=tuple(chain),
        garbage=tuple(s for s in segments if s.key not in on_chain),
    )
