"""Finding the tail log that holds a key's pending bytes, wherever a storage is rooted.

A destination keeps its tail log at ``{destination prefix}/.evalsyncd/tail/``
(:mod:`evalsyncd.storage.tail`). A reader may be rooted there, below it (a
sub-prefix such as ``s3://b/host/train``) or above it (the fleet prefix
reading ``host-1/...``). To see what a reader at the destination's prefix
sees, it looks for the tail log at the *levels* (key prefixes) that can hold
one, in this order (:func:`search_levels`)::

    1. the storage's own prefix                     (the common case: found at once)
    2. each prefix above it, nearest first          (a reader at a sub-prefix)
    3. the levels below it, down to ``depth``       (a fleet prefix reading a host)
       levels, shallowest first, never into a
       store's ``runs/``

and stops at the first level whose tail log has an object. Destinations do
not nest (a prefix has one owner and a destination never writes another's
``.evalsyncd/``), so at most one level holds a tail log for a key and the
order only decides the cost.

A level named ``runs`` below the storage's prefix is a store's runs directory,
never a destination's prefix (a prefix holding ``runs/`` is one store, as
:class:`~evalsyncd.fleet.Fleet` reads it), so the search stops there: a reader
at a store's prefix reading ``runs/{id}/...`` probes its own prefix and those
above it, not ``runs/``.

Cost: probing a level is the tail log's own first request (a LIST with
``MaxKeys=1`` of ``{level}/.evalsyncd/tail/``, then the newest header when
there is one), so finding the tail at the storage's own prefix costs nothing
extra. Each level's answer is cached in a :class:`LevelCache` shared by a
storage, its children and its views of other levels: a level with a tail log
is read again after the reader's ``tail_refresh_s`` (as the index always
was), a level without one after ``tail_probe_ttl_s`` (its own prefix: after
``tail_refresh_s``). A listing of a directory that shows no ``.evalsyncd/``
child tells, for free, that the directory holds no tail log
(:meth:`LevelCache.learn_absent`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from evalsyncd.storage.tail import TailIndex

__all__ = ["EMPTY_INDEX", "INTERNAL_DIR", "LevelCache", "search_levels"]

INTERNAL_DIR: Final = ".evalsyncd"
"""Name of the daemon's area under a destination's prefix."""

EMPTY_INDEX: Final = TailIndex(writer="", seq=-1, created=0.0)
"""The index of a level without a tail log."""

_NOT_A_DESTINATION: Final = frozenset({INTERNAL_DIR, "runs"})
"""Names of directories below which the search never goes: the daemon's own area, and
a store's runs directory."""


def _parent(level: str) -> str:
    return level.rpartition("/")[0]


def search_levels(root: str, directory: str, depth: int) -> list[str]:
    """The levels to probe for the tail log of a key, in probe order.

    Args:
        root: the storage's prefix (``""``: the bucket's root), no slashes at the ends.
        directory: the full key prefix of the key's directory (``root`` itself or
            under it), no slashes at the ends.
        depth: how many levels below ``root`` may hold a tail log.

    Returns:
        ``root``, its ancestors nearest first (ending with ``""``), then the levels
        from ``root`` down to ``directory``, at most ``depth`` of them, shallowest
        first; levels inside a ``.evalsyncd`` area or a store's ``runs`` directory are
        left out.

    >>> search_levels("a/b", "a/b/c/d", 1)
    ['a/b', 'a', '', 'a/b/c']
    >>> search_levels("", "h/runs", 2)
    ['', 'h']
    """
    levels = [root]
    up = root
    while up:
        up = _parent(up)
        levels.append(up)
    rest = directory[len(root) :].strip("/") if root else directory.strip("/")
    below = root
    for part in rest.split("/")[:depth] if rest else ():
        if part in _NOT_A_DESTINATION:
            break
        below = f"{below}/{part}" if below else part
        levels.append(below)
    return levels


class LevelCache:
    """Each level's tail index, per event loop, shared by a storage, its children and views.

    Thread-safe. Concurrent callers on one loop share one read of a level.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[
            tuple[asyncio.AbstractEventLoop, str], tuple[float, asyncio.Future[TailIndex]]
        ] = {}
        self._views: dict[str, Any] = {}

    def view(self, level: str, make: Callable[[], Any]) -> Any:
        """The storage rooted at ``level`` made by ``make`` on first use, then reused."""
        with self._lock:
            found = self._views.get(level)
            if found is None:
                found = self._views[level] = make()
            return found

    async def index(
        self,
        level: str,
        read: Callable[[], Awaitable[TailIndex]],
        *,
        max_age_s: float,
        absent_max_age_s: float,
        refresh: bool = False,
    ) -> TailIndex:
        """The tail index of ``level``: cached, or read by ``read()``.

        Args:
            level: the level's key prefix.
            read: reads the level's newest index (``EMPTY_INDEX``-like, seq -1, when
                it has no tail log).
            max_age_s: reuse a level with a tail log this long, seconds.
            absent_max_age_s: reuse a level without one this long, seconds.
            refresh: read again even if fresh (a read in progress is still shared).

        Raises:
            StorageError: the read failed (not cached: the next call reads again).
        """
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        with self._lock:
            cached = self._entries.get((loop, level))
            task: asyncio.Future[TailIndex] | None = None
            if cached is not None:
                at, fut = cached
                if not fut.done():
                    task = fut
                elif not refresh and not fut.cancelled() and fut.exception() is None:
                    limit = max_age_s if fut.result().seq >= 0 else absent_max_age_s
                    if now - at < limit:
                        task = fut
            if task is None:
                task = loop.create_task(_call(read))
                self._entries[(loop, level)] = (now, task)
            elif task.done():
                return task.result()  # fresh: no await (a read of many files asks per file)
        return await asyncio.shield(task)

    def learn_absent(self, level: str) -> None:
        """Record that ``level`` holds no tail log now (a listing showed no ``.evalsyncd/``)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        fut: asyncio.Future[TailIndex] = loop.create_future()
        fut.set_result(EMPTY_INDEX)
        with self._lock:
            cached = self._entries.get((loop, level))
            if cached is None or cached[1].done():
                self._entries[(loop, level)] = (time.monotonic(), fut)


async def _call(read: Callable[[], Awaitable[TailIndex]]) -> TailIndex:
    return await read()
