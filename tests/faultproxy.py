"""A fault-injecting HTTP/1.1 proxy for reliability tests, on loopback.

    with FaultProxy("127.0.0.1", server_port) as proxy:
        proxy.add(Rule(action="slowdown", method="PUT", times=3))
        proxy.add(Rule(action="reset_after", path_contains="/compose", times=1))
        client_talks_to(proxy.url)

Each request from a client is read whole (headers, then a ``Content-Length``
or chunked body), matched against the rules in order, and then:

- ``"pass"``: forwarded to the server (on a fresh upstream connection with
  ``Connection: close``), the response relayed;
- ``"slowdown"``: answered ``503 SlowDown`` with S3's XML error body, not forwarded;
- ``"status"``: answered ``Rule.status`` (GCS-style JSON error body), not forwarded;
- ``"reset_before"``: the client connection is reset (RST) before anything is
  forwarded: the server never sees the request;
- ``"reset_after"``: forwarded, the server's full response read, then the client
  connection is reset: the server applied the request but the client never
  learns it (the "lost response" case);
- ``"delay"``: forwarded, and the response held back ``Rule.delay_s`` seconds
  (past the client's timeout) before it is relayed;
- ``"empty_200"``: answered ``200 OK`` with an empty body, not forwarded (how
  ``rclone serve s3`` answers ``UploadPartCopy``: no ``CopyPartResult``, no ETag);
- ``"checksum_206"``: forwarded, and a 206 answer gets an ``x-amz-checksum-crc32c``
  that is not its part's (``rclone serve s3`` sends the whole object's checksum).
- ``"wrong_checksum"``: forwarded, and a 2xx answer gets an ``x-amz-checksum-crc32c``
  of other bytes (a server that stored something else than it was sent).

``Rule.header`` matches a request header by name (an ``UploadPartCopy`` is a
``PUT ...?partNumber=...&uploadId=...`` with ``x-amz-copy-source``).

The ``Host`` header and the body are forwarded unchanged, so SigV4 signatures
stay valid. The proxy runs its own event loop in a daemon thread, so it serves
the daemon subprocess and blocking test code alike. ``log`` lists
``(method, target, action)`` of every request seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
import threading
from dataclasses import dataclass, field

from evalsyncd.testing.proxy import LoopbackProxy

__all__ = ["FaultProxy", "Rule"]

_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class Rule:
    """When a request matches (every given criterion holds), apply ``action``.

    Attributes:
        action: see the module docstring.
        method: HTTP method to match (``None``: any).
        path_contains: substring of the request target (path and query).
        path_regex: regular expression searched in the request target.
        times: how many matching requests get the action (``None``: all).
        skip: let this many matching requests pass first.
        status: the status of ``"status"`` answers (429, 503, ...).
        delay_s: how long ``"delay"`` holds a response back, seconds.
        probability: chance that a matching request (past ``skip``) gets the action.
        header: a request header name (any case) the request must carry.
    """

    action: str
    method: str | None = None
    path_contains: str | None = None
    path_regex: str | None = None
    times: int | None = 1
    skip: int = 0
    status: int = 503
    delay_s: float = 5.0
    probability: float = 1.0
    header: str | None = None
    fired: int = field(default=0, init=False)
    seen: int = field(default=0, init=False)

    def matches(self, method: str, target: str, head: bytes = b"") -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.header is not None and f"\r\n{self.header.lower()}:".encode() not in head.lower():
            return False
        if self.path_contains is not None and self.path_contains not in target:
            return False
        return not (self.path_regex is not None and not re.search(self.path_regex, target))


class _Closed(Exception):
    pass


class FaultProxy(LoopbackProxy):
    """Forward HTTP/1.1 from ``127.0.0.1:port`` to ``target_host:target_port``, with faults.

    Args:
        target_host: the server's address.
        target_port: the server's port.
        seed: randomness of ``Rule.probability``.
    """

    def __init__(self, target_host: str, target_port: int, *, seed: int = 0) -> None:
        super().__init__(target_host, target_port)
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def add(self, rule: Rule) -> Rule:
        """Append a rule (rules are tried in order; the first that fires wins)."""
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule: all requests pass from now on."""
        with self._lock:
            self.rules.clear()

    def fired(self, action: str | None = None) -> int:
        """How many requests got ``action`` (any fault when ``None``)."""
        with self._lock:
            return sum(1 for _m, _t, a in self.log if a != "pass" and (action in (None, a)))

    def _decide(self, method: str, target: str, head: bytes = b"") -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if not rule.matches(method, target, head):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip:
                    continue
                if rule.times is not None and rule.fired >= rule.times:
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                rule.fired += 1
                self.log.append((method, target, rule.action))
                return rule
            self.log.append((method, target, "pass"))
            return None

    # -- one client connection -------------------------------------------------------

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Read one request, apply the first matching rule, forward or fail it."""
        try:
            head, body = await _read_request(reader, writer)
        except (_Closed, asyncio.IncompleteReadError):
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target, _version = request_line.split(" ", 2)
        rule = self._decide(method, target, head)
        action = rule.action if rule is not None else "pass"
        if action == "empty_200":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return
        if action == "reset_before":
            _reset(writer)
            return
        if action in ("slowdown", "status"):
            assert rule is not None
            writer.write(_error_response(action, rule.status))
            await writer.drain()
            return
        try:
            response = await self._forward(head, body)
        except OSError:
            _reset(writer)
            return
        if action == "reset_after":
            _reset(writer)
            return
        if action == "delay":
            assert rule is not None
            await asyncio.sleep(rule.delay_s)
        if (action == "checksum_206" and response.startswith(b"HTTP/1.1 206")) or (
            action == "wrong_checksum" and response.startswith(b"HTTP/1.1 2")
        ):
            head_end = response.index(b"\r\n\r\n")
            kept = [
                ln
                for ln in response[:head_end].split(b"\r\n")
                if not ln.lower().startswith(b"x-amz-checksum-")
            ]
            kept.append(b"x-amz-checksum-crc32c: AAAAAA==")
            response = b"\r\n".join(kept) + response[head_end:]
        writer.write(response)
        await writer.drain()
        # The upstream answered with Connection: close; so do we (the base closes).

    async def _forward(self, head: bytes, body: bytes) -> bytes:
        """Send one request upstream with ``Connection: close``; the whole response."""
        lines = head.split(b"\r\n")
        kept = [ln for ln in lines[1:] if ln and not ln.lower().startswith(b"connection:")]
        new_head = b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"
        r, w = await self.open_upstream()
        try:
            w.write(new_head + body)
            await w.drain()
            return await r.read()
        finally:
            self.close_upstream(w)


async def _read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[bytes, bytes]:
    """One request: its head (without the final CRLF CRLF and any ``Expect``) and its
    raw body bytes. ``Expect: 100-continue`` is answered here, so the body follows."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise _Closed from exc
    head = head[:-4]
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"expect", b"").lower() == b"100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        head = b"\r\n".join(
            ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"expect:")
        )
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            parts.append(size_line)
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then an empty line
                    trailer = await reader.readuntil(b"\r\n")
                    parts.append(trailer)
                    if trailer == b"\r\n":
                        break
                break
            parts.append(await reader.readexactly(size + 2))
        return head, b"".join(parts)
    length = int(headers.get(b"content-length", b"0") or 0)
    body = await reader.readexactly(length) if length else b""
    return head, body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _error_response(action: str, status: int) -> bytes:
    if action == "slowdown":
        body, ctype, reason = _SLOWDOWN_BODY, b"application/xml", b"Slow Down"
        status = 503
    else:
        reason = {429: b"Too Many Requests", 503: b"Service Unavailable"}.get(status, b"Error")
        body = (
            b'{"error": {"code": %d, "message": "injected by faultproxy", '
            b'"errors": [{"reason": "rateLimitExceeded"}]}}' % status
        )
        ctype = b"application/json"
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, reason, ctype, len(body))
    ) + body
