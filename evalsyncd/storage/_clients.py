"""One SDK client per event loop, opened on first use and closed on request.

A cloud storage may be used from several event loops (the daemon's, a test's,
the sync bridge's); an SDK client (an aiohttp session inside) belongs to the
loop that opened it. :class:`LoopClients` keeps one per loop, each on its own
:class:`~contextlib.AsyncExitStack`. Clients opened on the bridge loop (by the
sync methods) are also closed at interpreter exit. A storage and the children
it opens (``CloudStorage.child``) share one ``LoopClients``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from evalsyncd.storage._bridge import bridge_loop, on_bridge_close, run_sync

__all__ = ["LoopClients"]


class LoopClients:
    """The SDK clients of one storage (and its children), one per event loop. Thread-safe.

    Args:
        open_client: opens a client for the running loop, registering its cleanup
            on the stack it is given (``CloudStorage._open_client``).
    """

    def __init__(self, open_client: Callable[[AsyncExitStack], Awaitable[Any]]) -> None:
        self._open_client = open_client
        self._tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[tuple[AsyncExitStack, Any]]] = {}
        self._lock = threading.Lock()
        self.bridge_hooked = False
        """Whether a client was opened on the bridge loop (closed at exit, or by :meth:`close`)."""

    async def get(self) -> Any:
        """The client of the running event loop, opened on first use (concurrent callers
        share one opening; a failed opening is retried by the next call)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            for dead in [lp for lp in self._tasks if lp.is_closed()]:
                # a loop closed without aclose() (asyncio.run without `async with`): its
                # client can no longer be closed; forget it rather than keep it forever
                del self._tasks[dead]
            task = self._tasks.get(loop)
            if task is None or (task.done() and task.exception() is not None):
                task = loop.create_task(self._open_on(loop))
                self._tasks[loop] = task
        _stack, client = await asyncio.shield(task)
        return client

    async def _open_on(self, loop: asyncio.AbstractEventLoop) -> tuple[AsyncExitStack, Any]:
        stack = AsyncExitStack()
        try:
            client = await self._open_client(stack)
        except BaseException:
            await stack.aclose()
            raise
        if loop is bridge_loop() and not self.bridge_hooked:
            self.bridge_hooked = True
            on_bridge_close(self.aclose)
        return stack, client

    async def aclose(self) -> None:
        """Close the client of the running event loop, if one is open (the next
        :meth:`get` opens a new one)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            task = self._tasks.pop(loop, None)
        if task is None:
            return
        try:
            stack, _client = await task
        except Exception:
            return
        await stack.aclose()

    def close(self) -> None:
        """Close the client opened on the bridge loop (for the sync methods), if any."""
        if self.bridge_hooked:
            run_sync(self.aclose())
