"""Loopback TCP proxies for tests and benchmarks: count bytes and HTTP requests,
add latency, or (subclassed) inject faults, between a client and a local server.

    with CountingProxy("127.0.0.1", server_port) as proxy:   # or one_way_s=0.01
        client_talks_to(proxy.url)
        proxy.reset()
        ...                                                  # the work to measure
        proxy.bytes_up, proxy.bytes_down, proxy.requests
        # CountingProxy(..., record_heads=True).heads: each request's line and headers

``bytes_up`` counts client -> server bytes, ``bytes_down`` server -> client,
headers and bodies as sent (plain HTTP on loopback, no TLS): the tools' own
counters are never used. ``requests`` counts HTTP/1.1 requests by parsing the
client -> server stream (request line, headers, then a ``Content-Length`` or
``chunked`` body), so keep-alive connections and pipelining count correctly.
With ``one_way_s > 0`` every chunk is delivered ``one_way_s`` seconds after it
arrived, in each direction (a delay line, not a rate limit): a request costs at
least ``2 * one_way_s`` more, which stands in for a cloud region.

Each proxy runs its own event loop in a daemon thread, so clients on any event
loop, thread or process can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from typing import Self

__all__ = ["CountingProxy", "HttpRequestCounter", "LoopbackProxy", "RequestHead"]

_CHUNK = 256 * 1024


class LoopbackProxy:
    """Base of the loopback TCP proxies of the tests and benchmarks.

    Listens on ``127.0.0.1`` (a port the kernel chooses) in front of
    ``target_host:target_port``, on its own event loop in a daemon thread, so
    clients on any event loop, thread or process can use it. A subclass
    implements :meth:`serve_connection` for one client connection; the base
    tracks each connection's task and streams, so :meth:`stop` closes them all.

    Args:
        target_host: the server's address.
        target_port: the server's port.
    """

    thread_name = "loopback-proxy"

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:{port}``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Self:
        """Start listening; returns once the port is bound.

        Raises:
            TimeoutError: the proxy's loop did not come up within ``timeout_s`` seconds.
        """
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(serve())
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name=self.thread_name, daemon=True)
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

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await self.serve_connection(reader, writer)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass  # shutting down, or the peer went away
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()
            self._tasks.discard(task)

    async def open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the target, closed by :meth:`stop` if still open.

        Raises:
            OSError: the target refused the connection.
        """
        reader, writer = await asyncio.open_connection(self.target_host, self.target_port)
        self._writers.add(writer)
        return reader, writer

    def close_upstream(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection opened by :meth:`open_upstream`."""
        self._writers.discard(writer)
        writer.close()

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one client connection (the base closes ``writer`` afterwards)."""
        raise NotImplementedError


@dataclass(frozen=True)
class RequestHead:
    """The request line and headers of one HTTP/1.x request (names lower-cased)."""

    method: str
    target: str
    headers: dict[str, str]


class HttpRequestCounter:
    """Counts HTTP/1.x requests in one connection's client -> server byte stream.

    Args:
        heads: where to append each request's :class:`RequestHead` (``None``: count only).
    """

    def __init__(self, heads: list[RequestHead] | None = None) -> None:
        self.requests = 0
        self._heads = heads
        self._buf = b""
        self._body_left = 0  # bytes of a Content-Length body still to skip
        self._chunked = False  # inside a chunked body
        self._broken = False  # unparseable stream: stop counting rather than guess

    def feed(self, data: bytes) -> None:
        """Consume the next bytes of the stream."""
        if self._broken:
            return
        self._buf += data
        while self._buf:
            if self._body_left:
                n = min(self._body_left, len(self._buf))
                self._buf = self._buf[n:]
                self._body_left -= n
                continue
            if self._chunked:
                if not self._chunk_step():
                    return
                continue
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > 1 << 20:
                    self._broken = True
                return
            head, self._buf = self._buf[:end].decode("latin-1"), self._buf[end + 4 :]
            self.requests += 1
            request_line, *header_lines = head.split("\r\n")
            headers: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                headers[name] = value.strip()
                if name == "content-length":
                    self._body_left = int(value.strip() or 0)
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    self._chunked = True
                    self._body_left = 0
            if self._heads is not None:
                method, _, rest = request_line.partition(" ")
                self._heads.append(RequestHead(method, rest.rpartition(" ")[0], headers))

    def _chunk_step(self) -> bool:
        """Consume one chunk of a chunked body; False when more bytes are needed."""
        eol = self._buf.find(b"\r\n")
        if eol < 0:
            return False
        size = int(self._buf[:eol].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            # Last chunk, then optional trailers, then an empty line.
            end = self._buf.find(b"\r\n\r\n", eol)
            if self._buf[eol : eol + 4] == b"\r\n\r\n":
                end = eol
            if end < 0:
                return False
            self._buf = self._buf[end + 4 :]
            self._chunked = False
            return True
        if len(self._buf) < eol + 2 + size + 2:
            return False
        self._buf = self._buf[eol + 2 + size + 2 :]
        return True


class CountingProxy(LoopbackProxy):
    """Forward ``127.0.0.1:{port}`` to ``target_host:target_port``, counting traffic.

    Args:
        target_host: the server's address.
        target_port: the server's port.
        one_way_s: added delay per direction, seconds (0 for none).
        record_heads: keep every request's line and headers in :attr:`heads`.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        one_way_s: float = 0.0,
        record_heads: bool = False,
    ) -> None:
        super().__init__(target_host, target_port)
        self.one_way_s = one_way_s
        self.heads: list[RequestHead] | None = [] if record_heads else None
        """With ``record_heads``, every request's line and headers, in arrival order."""
        self.bytes_up = 0
        self.bytes_down = 0
        self._counters: list[HttpRequestCounter] = []
        self._base_requests = 0

    @property
    def total(self) -> int:
        """``bytes_up + bytes_down``."""
        return self.bytes_up + self.bytes_down

    @property
    def requests(self) -> int:
        """HTTP requests sent through the proxy since the last :meth:`reset`."""
        return sum(c.requests for c in self._counters) - self._base_requests

    def reset(self) -> None:
        """Zero the counters."""
        self.bytes_up = self.bytes_down = self.connections = 0
        self._base_requests = sum(c.requests for c in self._counters)

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Pump both directions through the counters (and the delay line)."""
        counter = HttpRequestCounter(self.heads)
        self._counters.append(counter)
        upstream_r, upstream_w = await self.open_upstream()
        try:
            await asyncio.gather(
                self._pump(reader, upstream_w, counter),
                self._pump(upstream_r, writer, None),
            )
        finally:
            self.close_upstream(upstream_w)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        counter: HttpRequestCounter | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    return
                writer.write(data)
                await writer.drain()

        delayed = asyncio.ensure_future(deliver()) if self.one_way_s > 0 else None
        try:
            while True:
                chunk = await reader.read(_CHUNK)
                if counter is not None:
                    self.bytes_up += len(chunk)
                    counter.feed(chunk)
                else:
                    self.bytes_down += len(chunk)
                if delayed is not None:
                    queue.put_nowait((loop.time() + self.one_way_s, chunk))
                elif chunk:
                    writer.write(chunk)
                    await writer.drain()
                if not chunk:
                    break
            if delayed is not None:
                await delayed
        except (ConnectionError, OSError):
            pass
        finally:
            if delayed is not None and not delayed.done():
                delayed.cancel()
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()
