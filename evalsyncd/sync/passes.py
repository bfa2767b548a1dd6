"""The mechanics of an upload pass: phases, the byte budget, failed requests' memory.

- :func:`by_phase`: run one coroutine per file, phase by phase (see
  :func:`~evalsyncd.sync.files.phase_of`), all files of a phase concurrently;
- :func:`worst_error`: the storage error a failed phase reports (permanent first);
- :class:`ByteBudget`: at most so many file bytes in memory for uploads at once;
- :func:`log_failure`: the one log line of an unexpected error syncing a file;
- :func:`release_frames`: free the request bodies a failed upload's traceback holds.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import TypeVar

import structlog

from evalsyncd.errors import PermanentStorageError, StorageError
from evalsyncd.sync.files import phase_of

__all__ = ["ByteBudget", "Held", "by_phase", "log_failure", "release_frames", "worst_error"]

T = TypeVar("T")
log = structlog.get_logger("evalsyncd.sync")


async def by_phase(
    items: Iterable[T],
    path_of: Callable[[T], str],
    run: Callable[[T], Awaitable[None]],
) -> AsyncGenerator[list[tuple[T, BaseException | None]], None]:
    """Run ``run(item)`` for every item, one phase after the other.

    Yields:
        Per phase, in phase order, ``(item, exception or None)`` for each item
        of the phase, once all of them finished. The caller stops the pass by
        leaving the loop (later phases are then never started).
    """
    phases: dict[int, list[T]] = {}
    for item in items:
        phases.setdefault(phase_of(path_of(item)), []).append(item)
    for phase in sorted(phases):
        results = await asyncio.gather(*(run(i) for i in phases[phase]), return_exceptions=True)
        yield list(zip(phases[phase], results, strict=True))
        del results


def worst_error(results: Iterable[tuple[object, BaseException | None]]) -> StorageError | None:
    """The storage error a phase fails with: the first permanent one, else the first one."""
    error: StorageError | None = None
    for _item, result in results:
        if isinstance(result, StorageError) and (
            error is None
            or (
                isinstance(result, PermanentStorageError)
                and not isinstance(error, PermanentStorageError)
            )
        ):
            error = result
    return error


def log_failure(event: str, destination: str, key: str, exc: BaseException) -> None:
    """Log an unexpected error syncing one file (a bug, a local I/O error), with its traceback."""
    log.error(
        event,
        destination=destination,
        key=key,
        error=f"{type(exc).__name__}: {exc}",
        exc_info=exc,
    )


def release_frames(exc: BaseException) -> None:
    """Clear the locals of the frames an exception (and its causes) holds.

    A failed upload's traceback references its request body through the frames
    of the SDK, and exceptions with tracebacks form reference cycles that only
    the cyclic garbage collector frees, late. During a long outage that let
    megabytes of request bodies pile up per failure; clearing the frames frees
    them at once, so memory stays flat however long the outage.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen or len(seen) > 32:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
        stack += [e.__cause__, e.__context__]


class ByteBudget:
    """At most ``limit`` bytes held at once; a request above the limit takes all of it.

    Args:
        limit: bytes.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.free = limit
        self._cond = asyncio.Condition()
        self._waiting = 0  # holders waiting for bytes to come free

    def hold(self, n: int) -> Held:
        """Hold ``n`` bytes of the budget (at least 1, at most ``limit``) while inside
        (``async with budget.hold(n):``).

        First come, first served: while anyone waits, a new holder waits too. With
        nobody waiting and the bytes free (every small file of a backfill), no lock
        is taken.
        """
        return Held(self, min(max(n, 1), self.limit))

    async def _take(self, n: int) -> None:
        if self._waiting or self.free < n:
            self._waiting += 1
            try:
                async with self._cond:
                    await self._cond.wait_for(lambda: self.free >= n)
                    self.free -= n
            finally:
                self._waiting -= 1
        else:
            self.free -= n

    async def _give(self, n: int) -> None:
        self.free += n
        if self._waiting:
            async with self._cond:
                self._cond.notify_all()


class Held:
    """``n`` bytes of a :class:`ByteBudget`, held inside ``async with`` (see
    :meth:`ByteBudget.hold`; a class, not a generator: one per file of a pass)."""

    __slots__ = ("_budget", "_n")

    def __init__(self, budget: ByteBudget, n: int) -> None:
        self._budget = budget
        self._n = n

    async def __aenter__(self) -> None:
        await self._budget._take(self._n)

    async def __aexit__(self, *exc: object) -> None:
        await self._budget._give(self._n)
