"""How the store's reads reach a storage: awaited, and at most N at a time.

The reads of :mod:`evalsyncd.store` are written once, as coroutines, against
:class:`Reads`: the few storage calls they need. :func:`reads_of` picks its
implementation once per storage, by capability:

- a storage that implements :class:`~evalsyncd.storage.AsyncStorage` (the
  cloud backends natively, ``LocalStorage`` through its worker threads, and
  wrappers of them) is awaited directly;
- a sync-only :class:`~evalsyncd.storage.Storage` has each call run in a
  worker thread (``asyncio.to_thread``), so several are in flight at once.

Only "not found" (``FileNotFoundError``, and ``NotADirectoryError``, which a
local path below a regular file raises) means missing: :meth:`Reads.read_or_none`
turns it into ``None``; every other error propagates, so an outage is never
reported as "missing".
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from evalsyncd.catalog import aread_catalog_bytes, read_catalog_bytes
from evalsyncd.storage import AsyncStorage, Storage
from evalsyncd.storage._bridge import run_sync

__all__ = ["MISSING", "Reads", "both", "bounded_map", "reads_of"]

T = TypeVar("T")
R = TypeVar("R")

MISSING = (FileNotFoundError, NotADirectoryError)
"""Errors that mean "this object does not exist": a definite answer, not an outage."""


class Reads(ABC):
    """The storage reads of the store, awaited (see :func:`reads_of`).

    Each method is documented on :class:`~evalsyncd.storage.Storage`; errors
    are the storage's own.
    """

    local: bool = False
    """The reads are of local disk (a ``LocalStorage``, or a foreign storage with sync
    methods only): the sync twins may be called inside a running event loop too, and
    block it no longer than the reference's sync reads do."""

    def sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one read coroutine for a sync caller, through the storage bridge
        (:func:`~evalsyncd.storage._bridge.run_sync`).

        Raises:
            RuntimeError: called inside a running event loop, on a storage that is not
                :attr:`local` (await the ``a*`` twin there).
        """
        return run_sync(coro, from_running_loop=self.local)

    @abstractmethod
    async def read(self, path: str) -> bytes:
        """See :meth:`Storage.read`."""

    @abstractmethod
    async def read_range(self, path: str, offset: int, length: int) -> bytes:
        """See :meth:`Storage.read_range` (``length`` bytes from ``offset``)."""

    @abstractmethod
    async def list_dir(self, prefix: str) -> list[str]:
        """See :meth:`Storage.list_dir`."""

    @abstractmethod
    async def exists(self, path: str) -> bool:
        """See :meth:`Storage.exists`."""

    @abstractmethod
    async def read_catalog(self, prefix: str) -> bytes | None:
        """The run catalog's bytes of the store at ``prefix``; see :mod:`evalsyncd.catalog`."""

    async def read_or_none(self, path: str) -> bytes | None:
        """The whole file, or ``None`` if it does not exist.

        Raises:
            StorageError: the storage failed (anything but "not found").
        """
        try:
            return await self.read(path)
        except MISSING:
            return None


class _Awaited(Reads):
    """The reads of an :class:`AsyncStorage`: its ``a*`` methods, nothing else."""

    def __init__(self, storage: AsyncStorage) -> None:
        self._s = storage
        self.local = isinstance(storage, _DeclaresNative) and not storage.async_native

    async def read(self, path: str) -> bytes:
        return await self._s.aread(path)

    async def read_range(self, path: str, offset: int, length: int) -> bytes:
        return await self._s.aread_range(path, offset, length)

    async def list_dir(self, prefix: str) -> list[str]:
        return await self._s.alist_dir(prefix)

    async def exists(self, path: str) -> bool:
        return await self._s.aexists(path)

    async def read_catalog(self, prefix: str) -> bytes | None:
        return await aread_catalog_bytes(self._s, prefix)


class _Threaded(Reads):
    """The reads of a sync-only :class:`Storage`, each in a worker thread."""

    local = True

    def __init__(self, storage: Storage) -> None:
        self._s = storage

    async def read(self, path: str) -> bytes:
        return await asyncio.to_thread(self._s.read, path)

    async def read_range(self, path: str, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self._s.read_range, path, offset, length)

    async def list_dir(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._s.list_dir, prefix)

    async def exists(self, path: str) -> bool:
        return await asyncio.to_thread(self._s.exists, path)

    async def read_catalog(self, prefix: str) -> bytes | None:
        return await asyncio.to_thread(read_catalog_bytes, self._s, prefix)


@runtime_checkable
class _DeclaresNative(Protocol):
    """A storage that declares whether its ``a*`` methods are native (see ``Backend``)."""

    async_native: bool


def reads_of(storage: Storage | AsyncStorage) -> Reads:
    """The awaited reads of ``storage``: its async methods if it has them, else threads."""
    if isinstance(storage, AsyncStorage):
        return _Awaited(storage)
    return _Threaded(storage)


async def bounded_map(fn: Callable[[T], Awaitable[R]], items: Sequence[T], limit: int) -> list[R]:
    """``[await fn(x) for x in items]``, with at most ``limit`` calls in flight.

    Results are in the order of ``items``. On the first error the other calls
    are cancelled and the error is raised as it is.
    """
    results: list[R | None] = [None] * len(items)
    it = iter(enumerate(items))

    async def worker() -> None:
        for i, item in it:
            results[i] = await fn(item)

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(items)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return results  # type: ignore[return-value]


async def both(a: Awaitable[T], b: Awaitable[R]) -> tuple[T, R]:
    """Await two awaitables concurrently; on an error, cancel the other and raise it as is."""
    ta, tb = asyncio.ensure_future(a), asyncio.ensure_future(b)
    try:
        return await ta, await tb
    except BaseException:
        for task in (ta, tb):
            task.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)
        raise
