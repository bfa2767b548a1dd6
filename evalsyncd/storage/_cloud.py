"""Shared plumbing of the object-store backends (``S3Storage``, ``GCSStorage``).

A backend subclasses :class:`CloudStorage` and implements the ``a*`` methods
natively plus :meth:`CloudStorage._open_client`, the main objects (``_main_*``)
and the internal area's objects (``_list_keys``, ``_delete_keys``,
``_internal_get``, ``_internal_put``). This base class provides:

- configuration-only instances: ``bucket``, ``prefix`` and the subclass's own
  settings pickle; clients never do;
- one SDK client per (instance, event loop), opened on first use (or by
  ``async with``) on an :class:`~contextlib.AsyncExitStack` and closed by
  ``aclose()`` / ``__aexit__`` (async use) or ``close()`` / ``__exit__`` (sync
  use; clients on the bridge loop are also closed at interpreter exit): see
  :class:`~evalsyncd.storage._clients.LoopClients`;
- the sync methods, each one line through :func:`~evalsyncd.storage._bridge.run_sync`;
- the readers' view of the tail log (:mod:`evalsyncd.storage.tail`): each public
  read stitches the backend's main object (``_main_*`` methods) with the file's
  pending tail pieces, so readers see what the daemon flushed before the main
  objects catch up, whether the tail log is at this storage's prefix, above it
  (a sub-prefix of a destination) or below it (a fleet prefix reading a host):
  see :mod:`evalsyncd.storage._tailfind`;
- key building: ``{prefix}/{path}``, validated by :func:`check_key`.
"""

from __future__ import annotations

import asyncio
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import AsyncExitStack
from typing import Any, ClassVar, Self

from evalsyncd.errors import (
    CorruptObjectError,
    InvalidKeyError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage._base import StorageStat, check_key
from evalsyncd.storage._bridge import run_sync
from evalsyncd.storage._clients import LoopClients
from evalsyncd.storage._tailfind import INTERNAL_DIR, LevelCache, search_levels
from evalsyncd.storage.tail import (
    TAIL_DIR,
    FileTail,
    Piece,
    PieceCache,
    TailIndex,
    TailWriter,
    boundaries,
    note_damage,
    object_name,
    read_index,
    read_pieces,
    stitch,
)

__all__ = ["INTERNAL_DIR", "CloudStorage"]

# INTERNAL_DIR (".evalsyncd"): the area under a destination's prefix where the daemon
# keeps its objects (the tail log, the catalog, S3 append segments, GCS compose
# deltas). Readers and ``list_dir`` hide it at every level.

_RUNTIME_ATTRS = ("_clients", "_levels", "_pieces", "_damaged")

PREFETCH_GAP_BYTES = 64 * 1024
"""Bytes between two wanted tail pieces that :meth:`CloudStorage.aprefetch_tail` reads
through rather than start another ranged GET."""
PREFETCH_SPAN_BYTES = 4 * 1024 * 1024
"""Most bytes one ranged GET of :meth:`CloudStorage.aprefetch_tail` asks for."""


class CloudStorage(ABC):
    """Base of the object-store backends: see the module docstring.

    Args:
        bucket: bucket name.
        prefix: key prefix under which paths are resolved ("" for the bucket root).

    Raises:
        ValueError: an invalid bucket name; ``InvalidKeyError`` (a ``ValueError``) for a
            prefix that is not a valid key (a ``..`` segment "escapes", ``.``, ``a//b``).
    """

    scheme: ClassVar[str]
    append_in_place_min_bytes: ClassVar[int] = 0
    """Capability: the smallest object size, in bytes, from which ``append`` adds
    bytes without re-sending the object (S3: 5 MiB, multipart copy; GCS: 0, compose)."""
    supports_tail: ClassVar[bool] = True
    """Capability: this backend keeps a tail log (see :mod:`evalsyncd.storage.tail`)."""
    async_native: ClassVar[bool] = True
    """Capability: the ``a*`` methods are native; the sync ones go through the bridge."""
    local_root: ClassVar[None] = None
    """Capability: no local directory holds the files."""
    read_tail: bool = True
    """Readers stitch pending tail pieces (the daemon's own instances turn this off:
    it reconciles against main objects)."""
    tail_refresh_s: float = 1.0
    """How long a read reuses the tail log's index before reading it again, seconds."""
    tail_probe_ttl_s: float = 5.0
    """How long a read trusts that a prefix above or below this storage's own holds no
    tail log, seconds (see :mod:`evalsyncd.storage._tailfind`)."""
    tail_search_depth: int = 1
    """How many levels below this storage's prefix may hold a destination's tail log
    (1: a fleet prefix reading ``{host}/...``); every level above is always searched."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            try:
                check_key(self.prefix)
            except InvalidKeyError as exc:
                # a prefix is a key's first segments: "..", "." and "a//b" are refused alike
                raise InvalidKeyError(
                    f"invalid prefix {prefix!r} in bucket {bucket!r}: {exc}"
                ) from None
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._clients = LoopClients(self._open_client)
        self._pieces = PieceCache()
        self._levels = LevelCache()
        self._damaged: dict[str, CorruptObjectError] = {}
        """URL -> why a main object was read without its tail (see :meth:`_stitched`):
        shared with children and views, at most 16, dropped once the file stitches again."""

    # -- configuration, keys -------------------------------------------------------

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url()!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _RUNTIME_ATTRS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def url(self, path: str = "") -> str:
        """``{scheme}://{bucket}/{prefix}/{path}``; see :meth:`Storage.url`."""
        key = self._join(path) if path else self.prefix
        return f"{self.scheme}://{self.bucket}/{key}" if key else f"{self.scheme}://{self.bucket}"

    def _join(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def _key(self, path: str) -> str:
        """The object key of a file path (validated)."""
        return self._join(check_key(path))

    def _dir_key(self, prefix: str) -> str:
        """The key prefix (ending in ``/``, or ``""``) listing the children of ``prefix``."""
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        key = self._join(prefix) if prefix else self.prefix
        return f"{key}/" if key else ""

    def _internal_key(self, *parts: str) -> str:
        """A key in the daemon's internal area, ``{prefix}/.evalsyncd/{parts...}``."""
        return self._join("/".join((INTERNAL_DIR, *parts)))

    def child(self, path: str) -> Self:
        """The same bucket at ``{prefix}/{path}``, sharing this instance's SDK clients.

        The child opens no client of its own: it uses and, when closed, closes
        the parent's (which reopens one on its next use). It also shares what
        the parent learned about where tail logs are (one probe per level for both).
        """
        sub = path.strip("/")
        if not sub:
            return self
        check_key(sub)
        return self._rooted_at(self._join(sub))

    def _rooted_at(self, prefix: str) -> Self:
        """A storage of the same bucket at ``prefix``, sharing clients and the level cache."""
        new = copy.copy(self)  # configuration only (see __getstate__): fresh runtime state
        new.prefix = prefix
        new._clients = self._clients
        new._levels = self._levels
        new._damaged = self._damaged
        return new

    # -- clients (see evalsyncd.storage._clients) --------------------------------------

    @abstractmethod
    async def _open_client(self, stack: AsyncExitStack) -> Any:
        """Open an SDK client for the running loop, registering its cleanup on ``stack``."""

    async def _client(self) -> Any:
        """The SDK client of the running event loop, opened on first use."""
        return await self._clients.get()

    async def aclose(self) -> None:
        """Close the client of the running event loop, if one is open (a child closes
        the client it shares with its parent: the next use opens a new one)."""
        await self._clients.aclose()

    def close(self) -> None:
        """Close the client opened for the sync methods (on the bridge loop); a child
        closes the one it shares with its parent."""
        self._clients.close()

    async def __aenter__(self) -> Self:
        await self._client()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the main objects (implemented by each backend) ------------------------------

    @abstractmethod
    async def _main_read(self, path: str) -> bytes:
        """The main object's bytes (no tail). Missing: ``ObjectNotFoundError``."""

    @abstractmethod
    async def _main_read_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        """Bytes of the main object (no tail); see :meth:`Storage.read_range`."""

    @abstractmethod
    async def _main_stat(self, path: str) -> StorageStat | None:
        """The main object's size, mtime and version (no tail), or ``None``."""

    @abstractmethod
    async def _main_list_dir(self, prefix: str) -> list[str]:
        """Children of ``prefix`` among the main objects (``.evalsyncd`` hidden)."""

    async def _main_exists(self, path: str) -> bool:
        return await self._main_stat(path) is not None

    @abstractmethod
    async def awrite(self, path: str, data: bytes) -> str | None: ...

    @abstractmethod
    async def aappend(self, path: str, data: bytes, *, offset: int | None = None) -> str | None: ...

    @abstractmethod
    async def aremove(self, path: str) -> None: ...

    # -- the tail log (see evalsyncd.storage.tail) -------------------------------------

    @abstractmethod
    async def _list_keys(self, prefix: str, url: str, limit: int | None = None) -> list[str]:
        """Full keys under the key prefix ``prefix``, in key order: all of them, or at
        least the first ``limit`` when there are that many (a listing in pages of at
        most ``limit``). ``url`` names the prefix in errors."""

    @abstractmethod
    async def _delete_keys(self, keys: list[str], url: str) -> None:
        """Delete objects by key; missing ones are fine. ``url`` names them in errors."""

    @abstractmethod
    async def _internal_get(self, key: str, url: str, start: int, end: int | None) -> bytes:
        """Bytes ``[start, end)`` of the object ``key`` (``b""`` at or past its end).

        Raises:
            ObjectNotFoundError: the object is missing.
        """

    @abstractmethod
    async def _internal_put(self, key: str, url: str, data: bytes, *, create: bool) -> None:
        """Replace the object ``key`` with ``data``; with ``create``, only if it is absent.

        Raises:
            ConflictError: ``create`` and the object exists.
        """

    def _tail_key(self, name: str) -> str:
        """The key of a tail object (``""``: the tail directory, ending in ``/``)."""
        return self._internal_key(TAIL_DIR, name)

    async def _tail_list(self, limit: int | None = None) -> list[str]:
        """Names under ``.evalsyncd/tail/``, newest first (key order); at most ``limit``."""
        base = self._tail_key("")
        names = [key[len(base) :] for key in await self._list_keys(base, self._tail_url(), limit)]
        return names[:limit] if limit is not None else names

    async def _tail_delete(self, names: list[str]) -> None:
        """Delete tail objects (missing ones are fine)."""
        await self._delete_keys([self._tail_key(n) for n in names], self._tail_url())

    async def aread_internal(self, name: str, *, limit: int | None = None) -> bytes:
        """Read ``{prefix}/.evalsyncd/{name}`` (the daemon's own objects, such as the catalog);
        with ``limit``, at most its first ``limit`` bytes (one ranged GET).

        Raises:
            ObjectNotFoundError: the object is missing.
        """
        check_key(name)
        key = self._internal_key(name)
        return await self._internal_get(key, f"{self.scheme}://{self.bucket}/{key}", 0, limit)

    async def awrite_internal(self, name: str, data: bytes) -> None:
        """Replace ``{prefix}/.evalsyncd/{name}`` with ``data`` (one PUT)."""
        check_key(name)
        key = self._internal_key(name)
        await self._internal_put(key, f"{self.scheme}://{self.bucket}/{key}", data, create=False)

    async def acreate_internal(self, name: str, data: bytes) -> None:
        """See :meth:`Backend.acreate_internal`: one conditional PUT.

        Raises:
            ConflictError: the object exists.
        """
        check_key(name)
        key = self._internal_key(name)
        await self._internal_put(key, f"{self.scheme}://{self.bucket}/{key}", data, create=True)

    def read_internal(self, name: str, *, limit: int | None = None) -> bytes:
        """See :meth:`aread_internal`."""
        return run_sync(self.aread_internal(name, limit=limit))

    def write_internal(self, name: str, data: bytes) -> None:
        """See :meth:`awrite_internal`."""
        run_sync(self.awrite_internal(name, data))

    async def _tail_get(self, name: str, start: int, end: int | None) -> bytes:
        """Bytes ``[start, end)`` of a tail object. Missing: ``ObjectNotFoundError``."""
        return await self._internal_get(self._tail_key(name), self._tail_url(name), start, end)

    async def _tail_create(self, name: str, data: bytes) -> None:
        """Create a tail object if absent (``If-None-Match: *`` / ``ifGenerationMatch=0``).

        Raises:
            ConflictError: the name exists.
        """
        await self._internal_put(self._tail_key(name), self._tail_url(name), data, create=True)

    def _tail_url(self, name: str = "") -> str:
        key = self._tail_key(name) if name else self._internal_key(TAIL_DIR)
        return f"{self.scheme}://{self.bucket}/{key}"

    async def aprefetch_tail(self, paths: Iterable[str]) -> int:
        """Bring the tail pieces of many small files into this storage's piece cache in as
        few requests as cover them, before reading the files one by one.

        A reader about to read many files that live only in the tail log (a run listing
        that finds no run catalog reads every run's ``metadata.json``, typically
        pieces of one tail object, side by side) would otherwise send one ranged GET
        per file. Here the wanted pieces of the tail log at this storage's own prefix
        (cached ones, and pieces larger than the cache takes whole, left out) are
        grouped per tail object into spans, a gap of at most
        :data:`PREFETCH_GAP_BYTES` read through, each span at most
        :data:`PREFETCH_SPAN_BYTES` and all of them at most half the cache: one ranged
        GET per span, concurrently. The reads that follow find the pieces cached.

        Best effort: a span that fails or comes back short caches nothing (the reads
        that follow fetch, and report, as usual).

        Args:
            paths: file paths relative to this storage (others are ignored).

        Returns:
            How many pieces were cached. No request when the tail log is not read
            (:attr:`read_tail`), holds none of ``paths``, or only one piece is wanted.
        """
        if not self.read_tail:
            return 0
        index = await self._tail_index()
        cache = self._pieces
        wanted: dict[int, set[Piece]] = {}
        for path in paths:
            ft = index.files.get(path)
            for piece in ft.pieces if ft is not None else ():
                if piece.length <= cache.max_piece_bytes and cache.get(piece) is None:
                    wanted.setdefault(piece.seq, set()).add(piece)
        spans: list[tuple[int, int, int, list[Piece]]] = []  # seq, first, last, pieces
        budget = cache.max_bytes // 2
        for seq, pieces in sorted(wanted.items()):
            body = index.bodies.get(seq)
            if body is None:
                continue
            for piece in sorted(pieces, key=lambda p: p.pos):
                at, end = body + piece.pos, body + piece.pos + piece.length
                last = spans[-1] if spans else None
                if (
                    last is not None
                    and last[0] == seq
                    and at - last[2] <= PREFETCH_GAP_BYTES
                    and max(end, last[2]) - last[1] <= PREFETCH_SPAN_BYTES
                ):
                    last[3].append(piece)
                    spans[-1] = (seq, last[1], max(end, last[2]), last[3])
                else:
                    spans.append((seq, at, end, [piece]))
        kept: list[tuple[int, int, int, list[Piece]]] = []
        for span in spans:
            if budget < span[2] - span[1]:
                break
            budget -= span[2] - span[1]
            kept.append(span)
        if sum(len(span[3]) for span in kept) < 2:
            return 0  # one piece: the read itself fetches it

        async def fetch(seq: int, first: int, last: int, pieces: list[Piece]) -> int:
            try:
                data = await self._tail_get(object_name(seq), first, last)
            except StorageError:
                return 0
            if len(data) != last - first:
                return 0  # shorter than its index says: the reads find and report it
            body = index.bodies[seq]
            for piece in pieces:
                lo = body + piece.pos - first
                cache.put(piece, data[lo : lo + piece.length])
            return len(pieces)

        return sum(await asyncio.gather(*(fetch(*span) for span in kept)))

    def tail_writer(self, writer: str) -> TailWriter:
        """A writer of this prefix's tail log (see :class:`~evalsyncd.storage.tail.TailWriter`)."""
        return TailWriter(self, writer)

    async def _tail_index(self, *, refresh: bool = False) -> TailIndex:
        """The tail log's newest index at this storage's prefix, cached for
        :attr:`tail_refresh_s` seconds.

        Concurrent callers on one loop share one fetch (one LIST and one GET).
        """
        return await self._level_index(self.prefix, refresh=refresh)

    async def _level_index(self, level: str, *, refresh: bool = False) -> TailIndex:
        """The tail index of the prefix ``level`` (seq -1: no tail log there), cached."""
        view = self._view(level)
        absent_s = self.tail_refresh_s
        if level != self.prefix:
            absent_s = max(absent_s, self.tail_probe_ttl_s)
        return await self._levels.index(
            level,
            lambda: read_index(view),
            max_age_s=self.tail_refresh_s,
            absent_max_age_s=absent_s,
            refresh=refresh,
        )

    def _view(self, level: str) -> CloudStorage:
        """The storage rooted at ``level`` that reads a tail log there (this one at its own)."""
        if level == self.prefix:
            return self
        view: CloudStorage = self._levels.view(level, lambda: self._rooted_at(level))
        view.read_tail = self.read_tail
        view.tail_refresh_s = self.tail_refresh_s
        view.tail_probe_ttl_s = self.tail_probe_ttl_s
        view.tail_search_depth = 0
        return view

    async def _tail_root(self, directory: str, *, likely: str | None = None) -> str | None:
        """The prefix whose tail log holds the files of ``directory`` (relative to this
        storage), or ``None``: see :mod:`evalsyncd.storage._tailfind` for the search.

        Args:
            directory: a directory relative to this storage (``""``: its root).
            likely: a level to probe first (a listing showed a ``.evalsyncd/`` there).

        Cost: nothing beyond this prefix's own index read when the tail log is here;
        else one LIST per level searched, at first use, cached.
        """
        if not self.read_tail:
            return None
        full = self._join(directory) if directory else self.prefix
        levels = search_levels(self.prefix, full, self.tail_search_depth)
        if likely is not None and likely in levels:
            levels.remove(likely)
            levels.insert(0, likely)
        for level in levels:
            if (await self._level_index(level)).seq >= 0:
                return level
        return None

    async def _locate(self, path: str) -> tuple[CloudStorage, str]:
        """``(storage, path there)`` that reads ``path`` with its tail log: this storage,
        or one rooted at the prefix of the destination whose tail log covers ``path``."""
        check_key(path)
        if not self.read_tail or INTERNAL_DIR in path.split("/"):
            return self, path
        level = await self._tail_root(path.rpartition("/")[0])
        if level is None or level == self.prefix:
            return self, path
        full = self._join(path)
        return self._view(level), full[len(level) + 1 :] if level else full

    async def _tail_entry(self, path: str) -> FileTail | None:
        """What the tail log covering ``path`` holds of it, or ``None``."""
        if not self.read_tail:
            return None
        where, rel = await self._locate(path)
        return await where._own_entry(rel)

    async def _own_entry(self, path: str) -> FileTail | None:
        """:meth:`_tail_entry` of a ``path`` that :meth:`_locate` found this storage's own
        (no second search)."""
        if not self.read_tail:
            return None
        return (await self._tail_index()).files.get(path)

    async def _stitched(self, path: str, start: int, end: int | None) -> bytes | None:
        """Bytes ``[start, end)`` of main object + tail pieces, or ``None`` when the tail
        holds nothing of ``path`` or the main object is damaged (read the main object alone).

        A main object missing, at a size that is not one the tail builds on (see
        :func:`~evalsyncd.storage.tail.boundaries`: shorter than ``base``, longer than
        the tail's size, or inside a piece) or, at a newer version, holding other bytes
        than the pieces below its size (see :meth:`_builds_on`) is read again with a
        fresh index; when neither moved meanwhile, something other than the writer
        changed it: it is damage, warned once and kept until the file reads without it
        (:func:`~evalsyncd.storage.tail.tail_damage` names it), and the plain object is
        read, never stitched.

        Raises:
            ObjectNotFoundError: neither the main object nor the tail has the file.
            TransientStorageError: the tail kept changing under four attempts.
        """
        seen: tuple[int, str | None, int] | None = None
        for attempt in range(4):
            index = await self._tail_index(refresh=attempt > 0)
            ft = index.files.get(path)
            if ft is None or ft.kind == "r" or ft.base == 0:
                self._damaged.pop(self.url(path), None)  # no main object to build on
            if ft is None:
                return None
            try:
                if ft.kind == "r" or ft.base == 0:
                    stop = ft.size if end is None else min(end, ft.size)
                    return (
                        await read_pieces(self, index, ft, start, stop, self._pieces)
                        if start < stop
                        else b""
                    )
                main = await self._main_stat(path)
                moved = main is not None and main.version != ft.main_version
                if moved and attempt == 0:
                    continue  # the main object moved on: is there a newer index?
                if main is None or not await self._builds_on(index, ft, path, main, moved):
                    state = (index.seq, *((main.version, main.size) if main else (None, -1)))
                    if state != seen:
                        seen = state
                        continue  # the index may be older than the main object: read it again
                    self._remember_damage(index, self._main_damage(path, ft, main))
                    return None
                stop = ft.size if end is None else min(end, ft.size)
                if start >= stop:
                    return b""
                data = await stitch(
                    self, index, ft, start, stop, main.size,
                    lambda at, n: self._main_read_range(path, at, n), self._pieces,
                )  # fmt: skip
                if len(data) == stop - start:
                    self._damaged.pop(self.url(path), None)
                    return data
            except CorruptObjectError:
                return None  # shorter than its index says: the plain object (reported)
            except ObjectNotFoundError:
                continue  # a tail object was deleted (promoted) meanwhile
        raise TransientStorageError(
            f"{self.url(path)}: the tail log kept changing during 4 reads", url=self.url(path)
        )

    async def _builds_on(
        self, index: TailIndex, ft: FileTail, path: str, main: StorageStat, moved: bool
    ) -> bool:
        """Whether the pending pieces of ``ft`` continue the main object ``main``: its size
        is one the tail builds on and, when its version moved past the index's (the writer
        promoted it, or another tool changed it), its bytes above ``base`` are the pieces'.

        Cost: none unless the version moved; then one ranged GET of the main object and
        of the pieces below its size (a state that lasts only until the writer commits
        its next index, unless something else changed the object).
        """
        if main.size not in boundaries(ft):
            return False
        if not moved or main.size == ft.base:
            return True
        lo, n = ft.base, main.size - ft.base
        ours = await read_pieces(self, index, ft, lo, main.size, self._pieces)
        return ours == await self._main_read_range(path, lo, n)

    def _remember_damage(self, index: TailIndex, exc: CorruptObjectError) -> None:
        """Warn about ``exc`` once and keep it (at most 16, the newest) for ``tail_damage``."""
        note_damage(index, exc)
        url = exc.url or ""
        self._damaged.pop(url, None)
        self._damaged[url] = exc
        while len(self._damaged) > 16:
            del self._damaged[next(iter(self._damaged))]

    def _main_damage(self, path: str, ft: FileTail, main: StorageStat | None) -> CorruptObjectError:
        """The error naming a main object the tail log cannot build on."""
        url = self.url(path)
        found = "missing" if main is None else f"{main.size} bytes at version {main.version}"
        return CorruptObjectError(
            f"{url}: the plain object is {found}, the tail log builds on its first {ft.base} "
            f"bytes (version {ft.main_version}) and holds bytes up to {ft.size}: it was changed "
            "by something other than evalsyncd, read without the tail's pending bytes",
            url=url,
        )

    # -- the async contract: main objects and tail, stitched --------------------------

    async def aread(self, path: str) -> bytes:
        """See :meth:`Storage.read`: the main object plus pending tail pieces.

        Cost: the main object's GET; when the tail log is read (:attr:`read_tail`),
        one LIST and one GET of its newest index per :attr:`tail_refresh_s`, and for
        a file with pending pieces a HEAD and one ranged GET per tail object holding them.
        The tail log may be at another prefix than this storage's (a destination above
        or, one level down, below it): see :meth:`_tail_root`.
        """
        where, rel = await self._locate(path)
        if where is not self:
            return await where.aread(rel)
        if await self._own_entry(path) is not None:
            data = await self._stitched(path, 0, None)
            if data is not None:
                return data
        elif self._damaged:
            self._damaged.pop(self.url(path), None)  # nothing pending: nothing to build on
        return await self._main_read(path)

    async def aread_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        """See :meth:`Storage.read_range` and :meth:`aread`."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"negative offset or length: {offset}, {length}")
        where, rel = await self._locate(path)
        if where is not self:
            return await where.aread_range(rel, offset, length)
        if await self._own_entry(path) is not None:
            data = await self._stitched(path, offset, None if length is None else offset + length)
            if data is not None:
                return data
        elif self._damaged:
            self._damaged.pop(self.url(path), None)  # nothing pending: nothing to build on
        return await self._main_read_range(path, offset, length)

    async def astat(self, path: str) -> StorageStat | None:
        """See :meth:`Storage.stat`: with pending tail pieces, the size the tail describes
        (the main object's stat when it is missing or damaged, see :meth:`_stitched`).

        The version is the main object's (``None`` while the file exists only in the tail).
        """
        where, rel = await self._locate(path)
        if where is not self:
            return await where.astat(rel)
        ft = await self._own_entry(path)
        if ft is not None and (ft.kind == "r" or ft.base == 0):
            return StorageStat(size=ft.size, mtime=ft.mtime, version=None)  # the tail alone
        main = await self._main_stat(path)
        if ft is None:
            return main
        if main is None or main.size not in boundaries(ft):
            return main  # damaged: the plain object, as a read gives it (see _stitched)
        return StorageStat(
            size=max(ft.size, main.size), mtime=max(ft.mtime, main.mtime), version=main.version
        )

    async def aexists(self, path: str) -> bool:
        """See :meth:`Storage.exists`."""
        where, rel = await self._locate(path)
        if where is not self:
            return await where.aexists(rel)
        if await self._own_entry(path) is not None:
            return True
        return await self._main_exists(path)

    async def alist_dir(self, prefix: str) -> list[str]:
        """See :meth:`Storage.list_dir`: main objects plus files pending in the tail log
        covering ``prefix`` (found as :meth:`_tail_root` says); ``.evalsyncd`` is hidden
        at every level."""
        top = prefix.strip("/")
        if top:
            check_key(top)
        names = set(await self._main_list_dir(prefix))
        full = self._join(top) if top else self.prefix
        likely = None
        if top and INTERNAL_DIR not in top.split("/"):
            if INTERNAL_DIR in names:
                likely = full  # a destination's area: its tail log, most likely
            else:
                self._levels.learn_absent(full)  # no tail log there: no probe
        names.discard(INTERNAL_DIR)
        if self.read_tail and INTERNAL_DIR not in top.split("/"):
            level = await self._tail_root(top, likely=likely)
            if level is not None:
                rel = full[len(level) :].strip("/")
                lead = f"{rel}/" if rel else ""
                for path in (await self._level_index(level)).files:
                    if path.startswith(lead):
                        names.add(path[len(lead) :].split("/", 1)[0])
        return sorted(names)

    async def aremove_dir(self, path: str) -> None:
        """See :meth:`Storage.remove_dir`: a no-op, object stores have no directories."""
        check_key(path)

    async def aflush(self) -> None:  # noqa: B027 - a no-op unless the backend buffers
        """See :meth:`Storage.flush`: nothing is buffered unless the backend says so."""

    async def achecksum(self, path: str) -> tuple[str, str] | None:
        """See :meth:`Backend.achecksum`: ``None`` (no request) unless the backend keeps one."""
        check_key(path)
        return None

    # -- the sync contract: one line each through the bridge ------------------------

    def read(self, path: str) -> bytes:
        """See :meth:`Storage.read`."""
        return run_sync(self.aread(path))

    def write(self, path: str, data: bytes) -> str | None:
        """See :meth:`Storage.write`."""
        return run_sync(self.awrite(path, data))

    def append(self, path: str, data: bytes, *, offset: int | None = None) -> str | None:
        """See :meth:`Storage.append`."""
        return run_sync(self.aappend(path, data, offset=offset))

    def exists(self, path: str) -> bool:
        """See :meth:`Storage.exists`."""
        return run_sync(self.aexists(path))

    def stat(self, path: str) -> StorageStat | None:
        """See :meth:`Storage.stat`."""
        return run_sync(self.astat(path))

    def read_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        """See :meth:`Storage.read_range`."""
        return run_sync(self.aread_range(path, offset, length))

    def list_dir(self, prefix: str) -> list[str]:
        """See :meth:`Storage.list_dir`."""
        return run_sync(self.alist_dir(prefix))

    def remove(self, path: str) -> None:
        """See :meth:`Storage.remove`."""
        run_sync(self.aremove(path))

    def remove_dir(self, path: str) -> None:
        """See :meth:`Storage.remove_dir`."""
        run_sync(self.aremove_dir(path))

    def flush(self) -> None:
        """See :meth:`Storage.flush`."""
        run_sync(self.aflush())
