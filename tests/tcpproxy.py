"""A counting TCP proxy for wire-cost tests: every byte both ways, on loopback.

    with CountingProxy("127.0.0.1", server_port) as proxy:
        client_talks_to(proxy.url)
        proxy.reset()
        ...                                   # the work to measure
        print(proxy.bytes_up, proxy.bytes_down)

The proxy runs its own event loop in a daemon thread, so it serves clients on
any loop (including the storage bridge's) and blocking test code alike.
``bytes_up`` counts client -> server bytes, ``bytes_down`` server -> client:
HTTP headers and bodies as sent, TLS not involved (plain HTTP on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Self

__all__ = ["CountingProxy"]

_CHUNK = 256 * 1024


class CountingProxy:
    """Forward ``listen_host:port`` to ``target_host:target_port``, counting bytes.

    Args:
        target_host: the server's address.
        target_port: the server's port.
        listen_host: where to listen; the port is chosen by the kernel.
    """

    def __init__(
        self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1"
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """``http://{listen_host}:{port}``."""
        return f"http://{self.listen_host}:{self.port}"

    @property
    def total(self) -> int:
        """``bytes_up + bytes_down``."""
        return self.bytes_up + self.bytes_down

    def reset(self) -> None:
        """Zero the counters (between the setup and the part a test measures)."""
        self.bytes_up = self.bytes_down = 0
        self.connections = 0

    def start(self, timeout_s: float = 10.0) -> Self:
        """Start listening; returns once the port is bound.

        Raises:
            TimeoutError: the proxy's loop did not come up within ``timeout_s`` seconds.
        """
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(serve())
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="counting-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"proxy not listening after {timeout_s} s")
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the listener and every connection, stop the loop, join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self._writers.add(client_w)
        try:
            try:
                server_r, server_w = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                return
            self._writers.add(server_w)
            try:
                await asyncio.gather(
                    self._pump(client_r, server_w, up=True),
                    self._pump(server_r, client_w, up=False),
                )
            finally:
                self._writers.discard(server_w)
                server_w.close()
        finally:
            self._writers.discard(client_w)
            client_w.close()
            self._tasks.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        try:
            while True:
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    break
                if up:
                    self.bytes_up += len(chunk)
                else:
                    self.bytes_down += len(chunk)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()
