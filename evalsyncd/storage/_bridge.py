"""The one sync-to-async seam: run coroutines on a private background event loop.

Cloud backends are async-native; each of their sync methods is one line,
``return run_sync(self.aread(path))``. Modelled on fsspec's ``asyn.sync``:

- one daemon thread runs one event loop for the whole process, started lazily;
- calling :func:`run_sync` from a thread that is running an event loop raises
  ``RuntimeError`` (it would deadlock or block that loop): use the ``a*`` methods;
- several threads may call :func:`run_sync` at once; their coroutines run
  concurrently on the bridge loop;
- after ``fork()`` the child starts a fresh loop (the parent's thread is gone).

Clients that backends open on the bridge loop are closed by hooks registered
with :func:`on_bridge_close`, which run at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["bridge_loop", "on_bridge_close", "run_sync"]

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_close_hooks: list[Callable[[], Awaitable[None]]] = []


def bridge_loop() -> asyncio.AbstractEventLoop:
    """Return the bridge's event loop, starting its thread on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="evalsyncd-storage-bridge", daemon=True
            )
            thread.start()
            _loop, _thread = loop, thread
        return _loop


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_sync(
    coro: Coroutine[Any, Any, T],
    timeout_s: float | None = None,
    *,
    from_running_loop: bool = False,
) -> T:
    """Run ``coro`` on the bridge loop and return its result (or raise its error).

    Args:
        coro: the coroutine to run.
        timeout_s: optional limit in seconds; ``TimeoutError`` when exceeded
            (the coroutine is cancelled).
        from_running_loop: allow a call from a thread whose event loop is
            running, which is then blocked until the result: only for reads of
            local disk, which block no longer than the sync call they stand for.

    Raises:
        RuntimeError: when called from a thread whose event loop is running
            (unless ``from_running_loop``).
    """
    if not from_running_loop and _loop_running():
        coro.close()
        raise RuntimeError(
            "a synchronous storage method was called from inside a running event loop; "
            "await the a-prefixed method instead (e.g. `await storage.aread(path)`)"
        )
    future = asyncio.run_coroutine_threadsafe(coro, bridge_loop())
    try:
        return future.result(timeout_s)
    except TimeoutError:
        future.cancel()
        raise


def on_bridge_close(hook: Callable[[], Awaitable[None]]) -> None:
    """Register an async ``hook`` to run on the bridge loop at interpreter exit."""
    with _lock:
        _close_hooks.append(hook)


def _shutdown() -> None:
    global _loop, _thread
    with _lock:
        loop, thread, hooks = _loop, _thread, list(_close_hooks)
        _close_hooks.clear()
    if loop is None or thread is None:
        return

    async def close_all() -> None:
        await asyncio.gather(*(hook() for hook in hooks), return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(close_all(), loop).result(10.0)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10.0)
        if not loop.is_running():
            loop.close()
        with _lock:
            _loop = _thread = None


def _after_fork_in_child() -> None:
    global _loop, _thread, _lock
    _loop = _thread = None
    _close_hooks.clear()
    _lock = threading.Lock()


atexit.register(_shutdown)
os.register_at_fork(after_in_child=_after_fork_in_child)
