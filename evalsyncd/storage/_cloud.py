"""Shared plumbing of the object-store backends (``S3Storage``, ``GCSStorage``).

A backend subclasses :class:`CloudStorage` and implements the ``a*`` methods
natively plus :meth:`CloudStorage._open_client`. This base class provides:

- configuration-only instances: ``bucket``, ``prefix`` and the subclass's own
  settings pickle; clients never do;
- one SDK client per (instance, event loop), opened on first use (or by
  ``async with``) on an :class:`~contextlib.AsyncExitStack` and closed by
  ``aclose()`` / ``__aexit__`` (async use) or ``close()`` / ``__exit__`` (sync
  use; clients on the bridge loop are also closed at interpreter exit);
- the sync methods, each one line through :func:`~evalsyncd.storage._bridge.run_sync`;
- key building: ``{prefix}/{path}``, validated by :func:`check_key`.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from contextlib import AsyncExitStack
from typing import Any, ClassVar, Self

from evalsyncd.storage._base import StorageStat, check_key
from evalsyncd.storage._bridge import bridge_loop, on_bridge_close, run_sync

__all__ = ["INTERNAL_DIR", "CloudStorage"]

INTERNAL_DIR = ".evalsyncd"
"""Name of the area under the prefix where the daemon keeps short-lived objects
(S3 append segments, GCS compose deltas). Readers and ``list_dir`` ignore it."""

_RUNTIME_ATTRS = ("_clients", "_clients_lock", "_bridge_hooked")


class CloudStorage(ABC):
    """Base of the object-store backends: see the module docstring.

    Args:
        bucket: bucket name.
        prefix: key prefix under which paths are resolved ("" for the bucket root).
    """

    scheme: ClassVar[str]

    def __init__(self, bucket: str, prefix: str = "") -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._clients: dict[
            asyncio.AbstractEventLoop, asyncio.Task[tuple[AsyncExitStack, Any]]
        ] = {}
        self._clients_lock = threading.Lock()
        self._bridge_hooked = False

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

    # -- clients -------------------------------------------------------------------

    @abstractmethod
    async def _open_client(self, stack: AsyncExitStack) -> Any:
        """Open an SDK client for the running loop, registering its cleanup on ``stack``."""

    async def _client(self) -> Any:
        """The SDK client of the running event loop, opened on first use."""
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            task = self._clients.get(loop)
            if task is None or (task.done() and task.exception() is not None):
                task = loop.create_task(self._open_on(loop))
                self._clients[loop] = task
        _stack, client = await asyncio.shield(task)
        return client

    async def _open_on(self, loop: asyncio.AbstractEventLoop) -> tuple[AsyncExitStack, Any]:
        stack = AsyncExitStack()
        try:
            client = await self._open_client(stack)
        except BaseException:
            await stack.aclose()
            raise
        if loop is bridge_loop() and not self._bridge_hooked:
            self._bridge_hooked = True
            on_bridge_close(self.aclose)
        return stack, client

    async def aclose(self) -> None:
        """Close the client of the running event loop, if one is open."""
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            task = self._clients.pop(loop, None)
        if task is None:
            return
        try:
            stack, _client = await task
        except Exception:
            return
        await stack.aclose()

    def close(self) -> None:
        """Close the client opened for the sync methods (on the bridge loop)."""
        if self._bridge_hooked:
            run_sync(self.aclose())

    async def __aenter__(self) -> Self:
        await self._client()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the async contract (implemented by each backend) ---------------------------

    @abstractmethod
    async def aread(self, path: str) -> bytes: ...

    @abstractmethod
    async def awrite(self, path: str, data: bytes) -> str | None: ...

    @abstractmethod
    async def aappend(self, path: str, data: bytes, *, offset: int | None = None) -> str | None: ...

    @abstractmethod
    async def astat(self, path: str) -> StorageStat | None: ...

    @abstractmethod
    async def aread_range(self, path: str, offset: int, length: int | None = None) -> bytes: ...

    @abstractmethod
    async def alist_dir(self, prefix: str) -> list[str]: ...

    @abstractmethod
    async def aremove(self, path: str) -> None: ...

    async def aexists(self, path: str) -> bool:
        """See :meth:`Storage.exists`."""
        return await self.astat(path) is not None

    async def aremove_dir(self, path: str) -> None:
        """See :meth:`Storage.remove_dir`: a no-op, object stores have no directories."""
        check_key(path)

    async def aflush(self) -> None:  # noqa: B027 - a no-op unless the backend buffers
        """See :meth:`Storage.flush`: nothing is buffered unless the backend says so."""

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
