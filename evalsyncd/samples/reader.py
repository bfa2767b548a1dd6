"""``SampleReader``: pages, filters, search and single samples of one host's runs.

Every read goes through the storage's ranged reads (``aread_range``), so on a
bucket it sees what the daemon's tail log holds too. Only
``runs/{run_id}/{benchmark}/trajectories.jsonl`` is read; nothing is written
to the storage. The index (:mod:`evalsyncd.samples.index`) lives on local disk.

Costs, for a file of ``N`` bytes read in chunks of ``chunk_size`` bytes:

- :meth:`SampleReader.ahead`: the first samples without an index, from one
  ranged read of :data:`HEAD_BYTES` (more only while fewer samples than asked
  were found).
- :meth:`SampleReader.aindex`: the first time, ``N / chunk_size`` reads
  (memory: one chunk plus the longest line); afterwards one read of the last
  indexed bytes plus whatever the file grew by.
- :meth:`SampleReader.apage` / :meth:`SampleReader.asample`: the index check,
  then one ranged read for a page of consecutive samples (a filtered page:
  one read per run of nearby samples, concurrently).
- :meth:`SampleReader.asearch`: streams the file from the start until the page
  of matches is full (memory bounded as for the index).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from evalsyncd.errors import SampleError, SampleNotFoundError, SearchPatternError, StorageError
from evalsyncd.samples.index import (
    CACHE_FILE,
    FileState,
    IndexCache,
    SampleIndex,
    default_cache_dir,
)
from evalsyncd.samples.lines import (
    BadLine,
    LineScanner,
    ParsedLine,
    SampleEntry,
    SampleFilter,
    parse_line,
)
from evalsyncd.storage import AsyncStorage, Storage, SupportsChild
from evalsyncd.store.aio import MISSING, bounded_map, reads_of
from evalsyncd.store.layout import StoreLayout
from evalsyncd.store.models import StoredTrajectory, StoredTurn
from evalsyncd.store.reader import EvalStoreReader, local_or_storage

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_PREVIEW_CHARS",
    "HEAD_BYTES",
    "RunSamples",
    "SamplePreview",
    "SampleReader",
    "SearchResult",
]

logger = logging.getLogger("evalsyncd.samples")

DEFAULT_CHUNK_SIZE = 4 << 20
"""Bytes per ranged read when streaming a file (index build, search): 4 MiB."""

HEAD_BYTES = 256 << 10
"""Bytes of the first read of :meth:`SampleReader.ahead` (256 KiB)."""

DEFAULT_MAX_CONCURRENCY = 32
"""Default bound on concurrent storage reads of one call (bulk reads, filtered pages)."""

DEFAULT_PREVIEW_CHARS = 20_000
"""Default characters of each turn's content (and of the error) a preview keeps."""

_MERGE_GAP = 256 << 10
"""Samples of a page closer than this many bytes are fetched by one ranged read."""

_BIG_LINE = 1 << 20
"""Parsed samples at least this long (bytes) are kept in memory (4 at most) for the next
reads of them (:meth:`SampleReader.asample_preview`, :meth:`SampleReader.atext`)."""

_MAX_READ = 64 << 20
"""Reads grow up to this size (bytes) while a line longer than a chunk is read."""


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One page of a search's matches.

    Attributes:
        matches: the matching samples, in file order.
        more: at least one more match exists after these.
        next_offset: the ``offset`` of the next page of matches.
        scanned_bytes: bytes of the file read to answer.
        bad_lines: lines skipped on the way (not samples).
    """

    matches: list[tuple[SampleEntry, StoredTrajectory]]
    more: bool
    next_offset: int
    scanned_bytes: int
    bad_lines: list[BadLine] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RunSamples:
    """The samples of one run's benchmark, read by :meth:`SampleReader.aread_many`.

    Attributes:
        run_id: the run.
        benchmark: the benchmark.
        samples: its trajectories in file order (``[]`` when the file is missing or failed).
        error: why the read failed (``"TypeName: message"``, naming the URL), else ``None``.
    """

    run_id: str
    benchmark: str
    samples: list[StoredTrajectory]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SamplePreview:
    """One sample with long texts cut, for a first screen.

    Attributes:
        entry: where the sample is.
        trajectory: the record, each turn's ``content`` (and the ``error``) cut
            to ``max_chars`` characters.
        truncated: per cut turn (its 0-based position), the full length in
            characters; load the rest with :meth:`SampleReader.atext`.
        error_chars: the full length of the error, when it was cut; else ``None``.
    """

    entry: SampleEntry
    trajectory: StoredTrajectory
    truncated: dict[int, int]
    error_chars: int | None = None


def _search_texts(t: StoredTrajectory) -> Iterator[str]:
    """The texts a search looks at: example id, error, each turn's content, logs."""
    yield t.example_id
    if t.error is not None:
        yield str(t.error)
    for turn in t.turns:
        yield turn.content if isinstance(turn.content, str) else json.dumps(turn.content)
    if t.logs:
        yield json.dumps(t.logs, ensure_ascii=False)


def _matcher(pattern: str, regex: bool) -> tuple[Callable[[str], bool], bytes | None]:
    """A test of one text, and bytes every matching raw line contains (``None``: no such)."""
    if regex:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise SearchPatternError(f"invalid regular expression {pattern!r}: {exc}") from None
        return (lambda text: rx.search(text) is not None), None
    if not pattern:
        raise SearchPatternError("empty search text")
    needle = pattern.lower()
    raw: bytes | None = None
    if pattern.isascii() and pattern.isprintable() and not set(pattern) & {'"', "\\", "/"}:
        raw = needle.encode("ascii")  # JSON writes these characters as they are
    return (lambda text: needle in text.lower()), raw


class SampleReader:
    """The sample reads of one host's store (a local root, or a host prefix in a bucket).

    Args:
        storage: the storage, rooted at the host's store (a fleet reader opens
            one reader per host with ``storage.child(host)``, or passes
            ``prefix=host`` on a storage without ``child``, such as a local fleet
            root), or a local directory.
        cache_dir: where the index cache lives (default :func:`default_cache_dir`).
        prefix: the store's prefix inside ``storage`` (``""``: its root).
        chunk_size: bytes per ranged read when streaming a file.
        max_concurrency: bound on concurrent reads of one call.

    Raises:
        ValueError: ``chunk_size`` or ``max_concurrency`` is below 1.

    The methods are coroutines; call them on one event loop (the storage's).
    Names are checked (:func:`~evalsyncd.store.layout.check_name`): an invalid
    run id or benchmark raises ``ValueError`` before any I/O. Storage failures
    raise their :class:`~evalsyncd.errors.StorageError`; an unusable cache
    directory raises ``OSError``.
    """

    def __init__(
        self,
        storage: Storage | AsyncStorage | str | Path,
        cache_dir: Path | None = None,
        *,
        prefix: str = "",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        if chunk_size < 1 or max_concurrency < 1:
            raise ValueError(
                f"chunk_size and max_concurrency must be >= 1, not {chunk_size}, {max_concurrency}"
            )
        store = (
            local_or_storage(storage, mkdir=False) if isinstance(storage, str | Path) else storage
        )
        if prefix.strip("/") and isinstance(store, SupportsChild):
            store, prefix = store.child(prefix), ""
        self.storage = store
        self._layout = StoreLayout(prefix)
        self._reads = reads_of(store)
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.chunk_size = chunk_size
        self.max_concurrency = max_concurrency
        self._cache: IndexCache | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._big: OrderedDict[tuple[str, int, int], StoredTrajectory] = OrderedDict()
        self._known: dict[str, FileState] = {}
        self.range_reads = 0
        """Ranged reads this reader asked the storage for (a storage may add requests of
        its own: an S3 or GCS storage reads its tail log's index once a second)."""

    def __repr__(self) -> str:
        return f"SampleReader({self.storage.url(self._layout.prefix or '')!r})"

    def path(self, run_id: str, benchmark: str) -> str:
        """The storage path of a benchmark's ``trajectories.jsonl`` (checks the names)."""
        return self._layout.trajectories(run_id, benchmark)

    def url(self, run_id: str, benchmark: str) -> str:
        """The URL of a benchmark's ``trajectories.jsonl``: the index's key."""
        return self.storage.url(self.path(run_id, benchmark))

    async def _cache_of(self) -> IndexCache:
        if self._cache is None:
            try:
                self._cache = await asyncio.to_thread(IndexCache, self.cache_dir)
            except sqlite3.Error as exc:
                raise OSError(
                    f"sample index cache {self.cache_dir / CACHE_FILE} is unusable: {exc}"
                ) from exc
        return self._cache

    async def _read(self, path: str, offset: int, length: int) -> bytes:
        self.range_reads += 1
        return await self._reads.read_range(path, offset, length)

    # -- the index -------------------------------------------------------------------

    async def aindex(self, run_id: str, benchmark: str) -> SampleIndex:
        """Build or extend the index of a benchmark's file, and return a snapshot of it.

        The first call streams the whole file; later calls check that the
        indexed prefix is unchanged (one ranged read) and index only what was
        appended. A file that shrank or whose indexed bytes changed is indexed
        again from the start. A missing file gives an empty index with
        ``exists=False``. Concurrent calls for one file share one build.

        Raises:
            ValueError: invalid run id or benchmark name.
            StorageError: the storage failed.
            OSError: the cache directory is unusable.
        """
        path = self.path(run_id, benchmark)
        url = self.storage.url(path)
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            return await self._build(path, url)

    async def _index(self, run_id: str, benchmark: str, refresh: bool) -> SampleIndex:
        """:meth:`aindex`, or without ``refresh`` the last index this reader built of the file."""
        if not refresh:
            url = self.url(run_id, benchmark)
            known = self._known.get(url)
            if known is not None:
                return SampleIndex(await self._cache_of(), known)
        return await self.aindex(run_id, benchmark)

    async def _build(self, path: str, url: str) -> SampleIndex:
        self._known.pop(url, None)
        cache = await self._cache_of()
        state = await asyncio.to_thread(cache.state, url)
        chunk = self.chunk_size
        scanner: LineScanner | None = None
        data = b""
        done = False
        offset = 0
        if state is not None and state.indexed_bytes > 0:
            k = state.tail_len
            try:
                head = await self._read(path, state.indexed_bytes - k, k + chunk)
            except MISSING:
                await asyncio.to_thread(cache.reset, url)
                return SampleIndex(None, None, exists=False, url=url)
            if len(head) >= k and zlib.crc32(head[:k]) == state.tail_crc:
                scanner = LineScanner(state.indexed_bytes, state.lines, head[:k])
                data = head[k:]
                offset = state.indexed_bytes + len(data)
                done = len(head) < k + chunk
            else:
                logger.info("%s changed below its indexed %d bytes: re-indexing", url, k)
        if scanner is None:
            for key in [k for k in self._big if k[0] == url]:
                del self._big[key]
            if state is None or state.indexed_bytes > 0:
                state = await asyncio.to_thread(cache.reset, url)
            try:
                data = await self._read(path, 0, chunk)
            except MISSING:
                return SampleIndex(None, None, exists=False, url=url)
            scanner = LineScanner()
            offset, done = len(data), len(data) < chunk
        assert state is not None
        cur: FileState = state
        read_size = chunk
        big: list[tuple[SampleEntry, StoredTrajectory]] = []
        while True:
            for entry, t in big:
                self._keep_big(url, entry, t)
            big.clear()
            ingest = asyncio.to_thread(self._ingest, cache, cur, scanner, data, done, big)
            if scanner.pending >= read_size:  # a long line: fewer, bigger reads
                read_size = min(read_size * 2, _MAX_READ)
            if done:
                cur = await ingest
                break
            nxt, cur = await asyncio.gather(self._read(path, offset, read_size), ingest)
            data = nxt
            offset += len(nxt)
            done = len(nxt) < read_size
        for entry, t in big:
            self._keep_big(url, entry, t)
        self._known[url] = cur
        return SampleIndex(cache, cur)

    def _ingest(
        self,
        cache: IndexCache,
        state: FileState,
        scanner: LineScanner,
        data: bytes,
        done: bool,
        big: list[tuple[SampleEntry, StoredTrajectory]],
    ) -> FileState:
        """Index the lines ``data`` completes (in a worker thread); big samples go to ``big``."""
        entries: list[SampleEntry] = []
        bad: list[BadLine] = []
        for parsed in scanner.lines(data):
            if isinstance(parsed, BadLine):
                bad.append(parsed)
                continue
            entries.append(parsed.entry)
            if parsed.entry.length >= _BIG_LINE:
                big.append((parsed.entry, parsed.trajectory))
            if parsed.note is not None:
                bad.append(parsed.note)
        new = replace(
            state,
            indexed_bytes=scanner.offset,
            lines=scanner.line,
            tail_crc=zlib.crc32(scanner.tail),
            tail_len=len(scanner.tail),
            complete=done,
        )
        cache.add(new, entries, bad)
        return new

    def _keep_big(self, url: str, entry: SampleEntry, t: StoredTrajectory) -> None:
        """Keep a parsed big sample for the next reads of it (at most 4, newest last)."""
        if entry.length < _BIG_LINE:
            return
        self._big[(url, entry.start, entry.length)] = t
        self._big.move_to_end((url, entry.start, entry.length))
        while len(self._big) > 4:
            self._big.popitem(last=False)

    # -- reads without an index ------------------------------------------------------

    async def ahead(
        self,
        run_id: str,
        benchmark: str,
        limit: int,
        filter: SampleFilter = SampleFilter.ALL,
    ) -> list[tuple[SampleEntry, StoredTrajectory]]:
        """The first ``limit`` samples passing ``filter``, without waiting for an index.

        One ranged read of :data:`HEAD_BYTES` bytes, then reads of doubling size
        (at most ``chunk_size``) only while fewer than ``limit`` samples were
        found and the file goes on (a rare filter may read the whole file). Bad lines are skipped with a warning on the
        ``evalsyncd.samples`` logger (the index lists them). A missing file gives ``[]``.

        Raises:
            ValueError: invalid name, or ``limit`` below 1.
            StorageError: the storage failed.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        path = self.path(run_id, benchmark)
        url = self.storage.url(path)
        scanner = LineScanner()
        which = SampleFilter(filter)
        out: list[tuple[SampleEntry, StoredTrajectory]] = []
        offset, size = 0, HEAD_BYTES
        while len(out) < limit:
            try:
                data = await self._read(path, offset, size)
            except MISSING:
                if offset == 0:
                    return []
                raise
            offset += len(data)
            for parsed in scanner.lines(data, url):
                if isinstance(parsed, BadLine):
                    logger.warning("%s", parsed)
                elif which.keep(parsed.entry):
                    out.append((parsed.entry, parsed.trajectory))
                    if len(out) >= limit:
                        break
            if len(data) < size:
                break
            size = min(size * 2, max(self.chunk_size, HEAD_BYTES))
        return out

    # -- reads through the index -----------------------------------------------------

    async def apage(
        self,
        run_id: str,
        benchmark: str,
        number: int,
        size: int,
        filter: SampleFilter = SampleFilter.ALL,
        *,
        refresh: bool = True,
    ) -> list[tuple[SampleEntry, StoredTrajectory]]:
        """The ``number``-th page (0-based) of ``size`` samples passing ``filter``.

        Extends the index first (:meth:`aindex`; with ``refresh=False`` an index
        this process built before is used as it is, without that read), then
        reads the page's bytes: one ranged read for consecutive samples. ``[]``
        past the last page.

        Raises:
            ValueError: invalid name, page number or size.
            StorageError: the storage failed.
        """
        index = await self._index(run_id, benchmark, refresh)
        entries = index.page(number, size, SampleFilter(filter))
        return await self._records(run_id, benchmark, entries)

    async def asample(
        self, run_id: str, benchmark: str, line: int
    ) -> tuple[SampleEntry, StoredTrajectory]:
        """The sample at 0-based ``line``, whole.

        Raises:
            SampleNotFoundError: no sample at that line (missing file, line out
                of range, or a bad line).
            StorageError: the storage failed.
        """
        index = await self.aindex(run_id, benchmark)
        entry = index.find(line)
        if entry is None:
            raise SampleNotFoundError(
                f"{index.url or self.url(run_id, benchmark)}: no sample at line {line + 1}"
            )
        return (await self._records(run_id, benchmark, [entry]))[0]

    async def asample_preview(
        self, run_id: str, benchmark: str, line: int, *, max_chars: int = DEFAULT_PREVIEW_CHARS
    ) -> SamplePreview:
        """The sample at ``line`` with each turn's content and its error cut to ``max_chars``.

        Raises:
            SampleNotFoundError, StorageError: see :meth:`asample`.
        """
        entry, t = await self.asample(run_id, benchmark, line)
        truncated: dict[int, int] = {}
        turns: list[StoredTurn] = []
        for i, turn in enumerate(t.turns):
            content = turn.content
            if isinstance(content, str) and len(content) > max_chars:
                truncated[i] = len(content)
                turn = replace(turn, content=content[:max_chars])
            turns.append(turn)
        error, error_chars = t.error, None
        if error is not None and len(error) > max_chars:
            error, error_chars = error[:max_chars], len(error)
        return SamplePreview(entry, replace(t, turns=turns, error=error), truncated, error_chars)

    async def atext(
        self, run_id: str, benchmark: str, line: int, turn: int | None, offset: int, length: int
    ) -> str:
        """Characters ``[offset, offset + length)`` of one turn's content (``turn=None``: the error).

        The parsed sample is kept in memory for the next calls when it is big
        (up to 4 such samples), so paging through a long text reads it once.

        Raises:
            SampleNotFoundError: no such sample, or no such turn.
            StorageError: the storage failed.
        """
        index = await self.aindex(run_id, benchmark)
        entry = index.find(line)
        if entry is None:
            raise SampleNotFoundError(f"{index.url}: no sample at line {line + 1}")
        _, t = (await self._records(run_id, benchmark, [entry]))[0]
        if turn is None:
            text = t.error or ""
        elif 0 <= turn < len(t.turns):
            content = t.turns[turn].content
            text = content if isinstance(content, str) else json.dumps(content)
        else:
            raise SampleNotFoundError(f"{index.url} line {line + 1}: no turn {turn}")
        return text[max(0, offset) : max(0, offset) + max(0, length)]

    async def _records(
        self, run_id: str, benchmark: str, entries: list[SampleEntry], *, retry: bool = True
    ) -> list[tuple[SampleEntry, StoredTrajectory]]:
        """Read and parse ``entries`` (one read per group of nearby samples)."""
        if not entries:
            return []
        path = self.path(run_id, benchmark)
        url = self.storage.url(path)
        if len(entries) == 1 and (
            cached := self._big.get((url, entries[0].start, entries[0].length))
        ):
            self._big.move_to_end((url, entries[0].start, entries[0].length))
            return [(entries[0], cached)]
        spans: list[list[SampleEntry]] = [[entries[0]]]
        for e in entries[1:]:
            if 0 <= e.start - spans[-1][-1].end <= _MERGE_GAP:
                spans[-1].append(e)
            else:
                spans.append([e])

        async def fetch(group: list[SampleEntry]) -> bytes:
            first = group[0].start
            return await self._read(path, first, group[-1].end - first)

        try:
            blobs = await bounded_map(fetch, spans, self.max_concurrency)
        except MISSING as exc:
            raise SampleNotFoundError(f"{url}: the file disappeared ({exc})") from exc
        out: list[tuple[SampleEntry, StoredTrajectory]] = []
        stale = False
        for group, blob in zip(spans, blobs, strict=True):
            base = group[0].start
            for e in group:
                parsed = parse_line(blob[e.start - base : e.end - base], e.line, e.start)
                if not isinstance(parsed, ParsedLine) or parsed.entry != e:
                    stale = True
                    break
                out.append((e, parsed.trajectory))
                self._keep_big(url, e, parsed.trajectory)
        if not stale:
            return out
        if not retry:
            raise SampleError(f"{url}: the file changed while it was read; try again")
        logger.info("%s: the file changed under its index; re-indexing", url)
        cache = await self._cache_of()
        await asyncio.to_thread(cache.reset, url)
        index = await self.aindex(run_id, benchmark)
        fresh = [index.find(e.line) for e in entries]
        return await self._records(
            run_id, benchmark, [e for e in fresh if e is not None], retry=False
        )

    async def aiter_lines(self, run_id: str, benchmark: str) -> AsyncIterator[ParsedLine | BadLine]:
        """Every sample (with its record) and bad line of the file, streamed in file order.

        Reads ranges of ``chunk_size`` bytes, the next one while this one is
        parsed in a worker thread; memory stays at about two chunks plus the
        longest line. A missing file yields nothing. Bad lines carry the file's URL.

        Raises:
            ValueError: invalid run id or benchmark name.
            StorageError: the storage failed (also when the file disappears midway).
        """
        path = self.path(run_id, benchmark)
        url = self.storage.url(path)
        scanner = LineScanner()
        chunk = self.chunk_size

        def parse(data: bytes) -> list[ParsedLine | BadLine]:
            out: list[ParsedLine | BadLine] = []
            for parsed in scanner.lines(data, url):
                out.append(parsed)
                if isinstance(parsed, ParsedLine) and parsed.note is not None:
                    out.append(replace(parsed.note, url=url))
            return out

        try:
            data = await self._read(path, 0, chunk)
        except MISSING:
            return
        pos = len(data)
        while True:
            if len(data) < chunk:
                for item in await asyncio.to_thread(parse, data):
                    yield item
                return
            nxt, items = await asyncio.gather(
                self._read(path, pos, chunk), asyncio.to_thread(parse, data)
            )
            for item in items:
                yield item
            data = nxt
            pos += len(nxt)

    # -- search ----------------------------------------------------------------------

    async def asearch(
        self,
        run_id: str,
        benchmark: str,
        pattern: str,
        *,
        regex: bool = False,
        filter: SampleFilter = SampleFilter.ALL,
        offset: int = 0,
        limit: int = 50,
    ) -> SearchResult:
        """A page of the samples whose contents match ``pattern``, in file order.

        Searched: the ``example_id``, the ``error``, every turn's ``content`` and
        the ``logs`` (as JSON). Text search is case-insensitive; a regex is
        Python's :mod:`re` syntax, as given (use ``(?i)`` to ignore case). The file
        is streamed from the start in chunks (memory: one chunk plus the longest
        line) until ``offset + limit`` matches and one more were found.

        Args:
            pattern: the text or regular expression.
            regex: ``pattern`` is a regular expression.
            filter: only samples passing it.
            offset: matches to skip (``next_offset`` of the previous page).
            limit: matches to return.

        Raises:
            SearchPatternError: an invalid regex, or an empty text (a ``ValueError``).
            ValueError: invalid name, ``offset`` below 0 or ``limit`` below 1.
            StorageError: the storage failed.
        """
        if offset < 0 or limit < 1:
            raise ValueError(f"offset must be >= 0 and limit >= 1, not {offset}, {limit}")
        test, raw_needle = _matcher(pattern, regex)
        which = SampleFilter(filter)
        path = self.path(run_id, benchmark)
        url = self.storage.url(path)
        scanner = LineScanner()
        found = 0
        matches: list[tuple[SampleEntry, StoredTrajectory]] = []
        bad: list[BadLine] = []
        pos, chunk = 0, self.chunk_size

        def scan(data: bytes) -> bool:
            """Feed one chunk; True once the page is full and one more match was seen."""
            nonlocal found
            for line, start, raw in scanner.feed(data):
                if raw is None:
                    if len(bad) < 100:
                        length = scanner.offset - start - 1
                        bad.append(BadLine(line, start, length, "longer than the limit", url))
                    continue
                if raw_needle is not None and raw_needle not in raw.lower():
                    continue
                parsed = parse_line(raw, line, start)
                if isinstance(parsed, BadLine):
                    if len(bad) < 100:
                        bad.append(replace(parsed, url=url))
                    continue
                if parsed is None or not which.keep(parsed.entry):
                    continue
                if not any(test(text) for text in _search_texts(parsed.trajectory)):
                    continue
                found += 1
                if found > offset + limit:
                    return True
                if found > offset:
                    matches.append((parsed.entry, parsed.trajectory))
            return False

        more = False
        while True:
            try:
                data = await self._read(path, pos, chunk)
            except MISSING:
                if pos == 0:
                    break
                raise
            pos += len(data)
            if await asyncio.to_thread(scan, data):
                more = True
                break
            if len(data) < chunk:
                break
        return SearchResult(matches, more, offset + len(matches), pos, bad)

    # -- bulk ------------------------------------------------------------------------

    async def aread_many(
        self,
        runs: Sequence[tuple[str, str]],
        *,
        filter: SampleFilter = SampleFilter.ALL,
        max_concurrency: int | None = None,
    ) -> list[RunSamples]:
        """The samples of many ``(run_id, benchmark)`` pairs, read concurrently.

        Each file is read as :meth:`EvalStoreReader.aread_trajectories
        <evalsyncd.store.EvalStore.aread_trajectories>` reads it (same parsing,
        same skipped lines), with at most ``max_concurrency`` (default: the
        reader's) files in flight. A pair that fails (a storage error, an
        invalid name) gets its ``error`` set; the others are still read.

        Returns:
            One :class:`RunSamples` per pair, in the order of ``runs``.
        """
        limit = max_concurrency or self.max_concurrency
        reader = EvalStoreReader(self.storage, self._layout.prefix, chunk_size=self.chunk_size)  # type: ignore[arg-type]
        which = SampleFilter(filter)
        options = {
            SampleFilter.ALL: {},
            SampleFilter.CORRECT: {"correct_only": True},
            SampleFilter.INCORRECT: {"incorrect_only": True},
            SampleFilter.ERRORS: {"errors_only": True},
        }[which]

        async def one(pair: tuple[str, str]) -> RunSamples:
            run_id, benchmark = pair
            try:
                samples = await reader.aread_trajectories(run_id, benchmark, **options)
            except (StorageError, OSError, ValueError) as exc:
                return RunSamples(run_id, benchmark, [], f"{type(exc).__name__}: {exc}")
            return RunSamples(run_id, benchmark, samples)

        return await bounded_map(one, list(runs), limit)
