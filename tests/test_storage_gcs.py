"""GCSStorage beyond the shared contract: temporary objects, preconditions, errors, wire cost.

All against a real fake-gcs-server (fixtures in conftest). Where the emulator
cannot show a behaviour (it ignores ``ifGenerationMatch`` on compose and on
simple uploads), the tests check what the client sends, captured with an
aiohttp trace config on the storage's own session, and say so.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from evalsyncd.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConflictError,
    InvalidRequestError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage import GCSStorage
from evalsyncd.storage.gcs import translate_error
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.testing.servers import FakeGCSServer

KiB = 1024
MiB = 1024 * KiB

Hook = Callable[[str, URL], Awaitable[None]]


class TracedGCSStorage(GCSStorage):
    """A GCSStorage whose session records every request (method, URL with query).

    ``hook``, if set, is awaited before each request leaves: a test uses it to
    act as another writer at an exact point of an append.
    """

    def __init__(self, *args: Any, hook: Hook | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[tuple[str, URL]] = []
        self.hook = hook

    def _new_session(self) -> aiohttp.ClientSession:
        trace = aiohttp.TraceConfig()

        async def on_request_start(
            _session: aiohttp.ClientSession, _ctx: Any, params: aiohttp.TraceRequestStartParams
        ) -> None:
            self.requests.append((params.method, params.url))
            if self.hook is not None:
                await self.hook(params.method, params.url)

        trace.on_request_start.append(on_request_start)
        return aiohttp.ClientSession(timeout=self._timeout(), trace_configs=[trace])


def _is_compose(method: str, url: URL) -> bool:
    return method == "POST" and url.path.endswith("/compose")


@pytest.fixture
def traced(gcs_storage: GCSStorage) -> Iterator[TracedGCSStorage]:
    """A traced storage on the same bucket and prefix as ``gcs_storage``."""
    storage = TracedGCSStorage(gcs_storage.bucket, gcs_storage.prefix)
    with storage:
        yield storage


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- temporary objects -------------------------------------------------------------


def test_append_leaves_no_temporary_objects(gcs_storage: GCSStorage) -> None:
    """Appends (create, compose, retries, conflicts) leave nothing in .evalsyncd/."""
    data = b""
    for i in range(6):
        piece = f"line {i}\n".encode() * (i + 1)
        gcs_storage.append("log.jsonl", piece, offset=len(data))
        data += piece
    gcs_storage.append("log.jsonl", piece, offset=len(data) - len(piece))  # applied: no-op
    with pytest.raises(ConflictError):
        gcs_storage.append("log.jsonl", b"x\n", offset=1)
    gcs_storage.append("free.jsonl", b"a\n")
    gcs_storage.append("free.jsonl", b"b\n")
    assert gcs_storage.read("log.jsonl") == data
    assert gcs_storage.list_dir(".evalsyncd/gcs-append") == []
    assert gcs_storage.list_dir(".evalsyncd") == []


def test_failed_compose_still_deletes_the_delta(gcs_storage: GCSStorage) -> None:
    """When the compose fails (the object vanished under it), the delta is deleted anyway."""
    gcs_storage.append("f.jsonl", b"base\n", offset=0)
    other = GCSStorage(gcs_storage.bucket, gcs_storage.prefix)

    async def remove_before_compose(method: str, url: URL) -> None:
        if _is_compose(method, url):
            await other.aremove("f.jsonl")

    async def scenario() -> None:
        storage = TracedGCSStorage(
            gcs_storage.bucket, gcs_storage.prefix, hook=remove_before_compose
        )
        try:
            async with storage:
                # fake-gcs-server answers a compose with a missing source with 500
                with pytest.raises(StorageError):
                    await storage.aappend("f.jsonl", b"more\n", offset=5)
                assert any(m == "DELETE" and ".evalsyncd" in u.path for m, u in storage.requests)
        finally:
            await other.aclose()

    asyncio.run(scenario())
    assert gcs_storage.list_dir(".evalsyncd/gcs-append") == []


def test_list_dir_hides_internal_area(gcs_storage: GCSStorage) -> None:
    """list_dir of the prefix's root never shows .evalsyncd, even when it holds objects."""
    gcs_storage.write(".evalsyncd/gcs-append/leftover", b"x")
    gcs_storage.write("runs.jsonl", b"{}\n")
    gcs_storage.write("runs/r1/metadata.json", b"{}")
    assert gcs_storage.list_dir("") == ["runs", "runs.jsonl"]
    assert gcs_storage.list_dir(".evalsyncd") == ["gcs-append"]


def test_list_dir_pages_with_page_tokens(gcs_storage: GCSStorage) -> None:
    """list_dir follows nextPageToken (fake-gcs-server pages only when maxResults is given)."""
    small_pages = GCSStorage(gcs_storage.bucket, gcs_storage.prefix, page_size=7)
    names = [f"f{i:03d}.json" for i in range(45)]

    async def fill() -> None:
        await asyncio.gather(*(gcs_storage.awrite(f"d/{n}", b"1") for n in names))
        await gcs_storage.awrite("d/sub/x.json", b"1")
        await gcs_storage.aclose()

    asyncio.run(fill())
    try:
        assert small_pages.list_dir("d") == sorted([*names, "sub"])
    finally:
        small_pages.close()


# -- preconditions (what the client sends) -----------------------------------------


def test_append_sends_generation_preconditions(traced: TracedGCSStorage) -> None:
    """The creating upload carries ifGenerationMatch=0 and the compose the generation read.

    fake-gcs-server ignores ifGenerationMatch on compose, so this checks the
    request itself (query parameters captured by a trace config), not the
    server's reaction; on GCS these make a lost race fail with 412.
    """
    gen1 = traced.append("p.jsonl", b"one\n", offset=0)
    create = [(m, u) for m, u in traced.requests if m == "POST" and "/upload/" in u.path]
    assert len(create) == 1
    assert create[0][1].query["ifGenerationMatch"] == "0"
    assert create[0][1].query["uploadType"] == "multipart"  # the emulator honours it only there

    traced.requests.clear()
    gen2 = traced.append("p.jsonl", b"two\n", offset=4)
    methods = [(m, u.path.rsplit("/", 1)[-1]) for m, u in traced.requests]
    composes = [u for m, u in traced.requests if _is_compose(m, u)]
    assert len(composes) == 1
    assert composes[0].query["ifGenerationMatch"] == gen1
    delta_uploads = [u for m, u in traced.requests if m == "POST" and "/upload/" in u.path]
    assert len(delta_uploads) == 1
    delta_key = delta_uploads[0].query["name"]
    assert delta_key.startswith(f"{traced.prefix}/.evalsyncd/gcs-append/")
    assert "ifGenerationMatch" not in delta_uploads[0].query
    # order: metadata, delta upload, compose, delete of the delta
    assert [m for m, _ in methods] == ["GET", "POST", "POST", "DELETE"], methods
    assert traced.requests[-1][1].path.endswith(delta_key.rsplit("/", 1)[-1])
    assert gen2 != gen1
    assert traced.read("p.jsonl") == b"one\ntwo\n"


def test_append_to_empty_object_is_a_conditional_upload(traced: TracedGCSStorage) -> None:
    """Appending to a 0-byte object replaces it with ifGenerationMatch=<its generation>."""
    gen0 = traced.write("e.jsonl", b"")
    traced.requests.clear()
    traced.append("e.jsonl", b"first\n", offset=0)
    uploads = [u for m, u in traced.requests if m == "POST" and "/upload/" in u.path]
    assert len(uploads) == 1
    assert uploads[0].query["ifGenerationMatch"] == gen0
    assert not any(_is_compose(m, u) for m, u in traced.requests)
    assert traced.read("e.jsonl") == b"first\n"


def test_create_race_conflicts_without_loss(gcs_storage: GCSStorage) -> None:
    """Another writer creating the object just before our create: 412 -> ConflictError, its bytes kept.

    fake-gcs-server honours ifGenerationMatch on multipart uploads, so this is
    the server's own 412.
    """
    other = GCSStorage(gcs_storage.bucket, gcs_storage.prefix)

    async def create_first(method: str, url: URL) -> None:
        if method == "POST" and url.query.get("ifGenerationMatch") == "0":
            await other.awrite("c.jsonl", b"theirs\n")

    async def scenario() -> None:
        storage = TracedGCSStorage(gcs_storage.bucket, gcs_storage.prefix, hook=create_first)
        try:
            async with storage:
                with pytest.raises(ConflictError) as info:
                    await storage.aappend("c.jsonl", b"ours\n", offset=0)
                assert info.value.actual_size == len(b"theirs\n")
        finally:
            await other.aclose()

    asyncio.run(scenario())
    assert gcs_storage.read("c.jsonl") == b"theirs\n"


def test_append_without_offset_retries_at_the_new_end(gcs_storage: GCSStorage) -> None:
    """append(offset=None) that loses the create race appends after the winner's bytes."""
    other = GCSStorage(gcs_storage.bucket, gcs_storage.prefix)

    async def create_first(method: str, url: URL) -> None:
        if method == "POST" and url.query.get("ifGenerationMatch") == "0":
            await other.awrite("n.jsonl", b"theirs\n")

    async def scenario() -> None:
        storage = TracedGCSStorage(gcs_storage.bucket, gcs_storage.prefix, hook=create_first)
        try:
            async with storage:
                await storage.aappend("n.jsonl", b"ours\n")
        finally:
            await other.aclose()

    asyncio.run(scenario())
    assert gcs_storage.read("n.jsonl") == b"theirs\nours\n"


def test_lost_compose_race_is_reported_on_the_emulator(gcs_storage: GCSStorage) -> None:
    """A writer sneaking in before our compose makes the append raise ConflictError.

    On GCS the compose's ifGenerationMatch makes it fail with 412 and nothing
    changes. fake-gcs-server ignores that precondition and composes anyway; the
    size check on the compose's answer still reports the conflict instead of
    acknowledging the append (limited by the emulator: the object has changed).
    """
    gcs_storage.append("r.jsonl", b"base\n", offset=0)
    other = GCSStorage(gcs_storage.bucket, gcs_storage.prefix)

    async def sneak_in(method: str, url: URL) -> None:
        if _is_compose(method, url):
            await other.awrite("r.jsonl", b"base\nsneaky\n")

    async def scenario() -> None:
        storage = TracedGCSStorage(gcs_storage.bucket, gcs_storage.prefix, hook=sneak_in)
        try:
            async with storage:
                with pytest.raises(ConflictError):
                    await storage.aappend("r.jsonl", b"ours\n", offset=5)
        finally:
            await other.aclose()

    asyncio.run(scenario())
    assert gcs_storage.list_dir(".evalsyncd/gcs-append") == []


# -- errors --------------------------------------------------------------------------


def test_missing_bucket_is_bucket_not_found(cloud_env: dict[str, str]) -> None:
    """Every operation on a missing bucket raises BucketNotFoundError, never FileNotFoundError."""
    storage = GCSStorage("no-such-bucket-evalsyncd", "p")
    calls: list[Callable[[], object]] = [
        lambda: storage.read("f.json"),
        lambda: storage.read_range("f.json", 0, 4),
        lambda: storage.stat("f.json"),
        lambda: storage.exists("f.json"),
        lambda: storage.write("f.json", b"{}"),
        lambda: storage.append("f.jsonl", b"1\n", offset=0),
        lambda: storage.list_dir(""),
        lambda: storage.remove("f.json"),
    ]
    try:
        for call in calls:
            with pytest.raises(BucketNotFoundError) as info:
                call()
            assert not isinstance(info.value, FileNotFoundError)
    finally:
        storage.close()


def test_missing_object_is_file_not_found_and_chained(gcs_storage: GCSStorage) -> None:
    """A missing object is ObjectNotFoundError (a FileNotFoundError) chained to the HTTP 404."""
    with pytest.raises(FileNotFoundError) as info:
        gcs_storage.read("missing.json")
    assert isinstance(info.value, ObjectNotFoundError)
    assert isinstance(info.value.__cause__, aiohttp.ClientResponseError)
    assert info.value.__cause__.status == 404
    assert info.value.url == gcs_storage.url("missing.json")


def test_unreachable_server_is_transient() -> None:
    """A closed port is an outage: TransientStorageError everywhere, never "missing"."""
    storage = GCSStorage(
        "b",
        "p",
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        timeout_s=2,
        connect_timeout_s=1,
    )
    calls: list[Callable[[], object]] = [
        lambda: storage.read("f.json"),
        lambda: storage.stat("f.json"),
        lambda: storage.exists("f.json"),
        lambda: storage.write("f.json", b"{}"),
        lambda: storage.append("f.jsonl", b"1\n", offset=0),
        lambda: storage.list_dir(""),
        lambda: storage.remove("f.json"),
    ]
    try:
        for call in calls:
            with pytest.raises(TransientStorageError) as info:
                call()
            assert isinstance(info.value.__cause__, aiohttp.ClientConnectionError)
    finally:
        storage.close()


def test_silent_server_times_out_as_transient() -> None:
    """A server that accepts but never answers gives TransientStorageError after timeout_s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # never accepted: connect succeeds, no answer ever comes
        port = listener.getsockname()[1]
        storage = GCSStorage("b", "p", endpoint_url=f"http://127.0.0.1:{port}", timeout_s=0.5)
        try:
            with pytest.raises(TransientStorageError) as info:
                storage.stat("f.json")
            assert isinstance(info.value.__cause__, TimeoutError)
        finally:
            storage.close()


def _response_error(status: int) -> aiohttp.ClientResponseError:
    url = URL("http://127.0.0.1/storage/v1/b/b/o/k")
    info = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(info, (), status=status, message="x")


STATUS_CLASSES: dict[type[StorageError], set[int]] = {
    ObjectNotFoundError: {404},
    AccessDeniedError: {401, 403},
    ConflictError: {412},
    TransientStorageError: {408, 429, *range(500, 600)},
}
"""The documented table (gcs.py); every other 4xx is an InvalidRequestError."""


def test_status_mapping_covers_every_status() -> None:
    """Every HTTP error status 400-599 maps to the class the table promises."""
    for status in range(400, 600):
        err = translate_error(_response_error(status), url="gs://b/k")
        want = next((c for c, codes in STATUS_CLASSES.items() if status in codes), None)
        assert type(err) is (want or InvalidRequestError), status
    bucket = translate_error(_response_error(404), url="gs://b/k", on_404=BucketNotFoundError)
    assert type(bucket) is BucketNotFoundError
    assert isinstance(translate_error(_response_error(404), url=None), FileNotFoundError)
    assert isinstance(translate_error(_response_error(403), url=None), PermissionError)
    assert not isinstance(
        translate_error(_response_error(404), url=None, on_404=BucketNotFoundError),
        FileNotFoundError,
    )


def test_network_exceptions_map_to_transient() -> None:
    """Connection errors, disconnects, payload errors and timeouts are transient; others pass."""
    conn_key: Any = type("K", (), {"ssl": False, "host": "h", "port": 1})()
    transient: list[BaseException] = [
        aiohttp.ClientConnectorError(conn_key, OSError(111, "refused")),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "reset"),
        aiohttp.ServerTimeoutError("read timeout"),
        aiohttp.ClientPayloadError("cut short"),
        TimeoutError(),
    ]
    for exc in transient:
        assert type(translate_error(exc, url="gs://b/k")) is TransientStorageError, exc
    assert type(translate_error(aiohttp.InvalidURL("::"), url=None)) is InvalidRequestError
    assert translate_error(ValueError("not ours"), url=None) is None


def test_range_past_end_then_write_keeps_working(gcs_storage: GCSStorage) -> None:
    """A 416 (read at the end) never breaks the next request on a reused connection.

    fake-gcs-server sends a 416 body longer than its Content-Length, which
    poisons a kept-alive connection (a POST right after it fails with a reset);
    the backend does not reuse that connection.
    """

    async def scenario() -> None:
        async with gcs_storage:
            await gcs_storage.awrite("r.bin", b"0123")
            for i in range(20):
                assert await gcs_storage.aread_range("r.bin", 4 + i, 10) == b""
                await gcs_storage.awrite(f"w{i}.json", b"{}")

    asyncio.run(scenario())
    assert len(gcs_storage.list_dir("")) == 21


def test_custom_endpoint_and_pickle(gcs_server: FakeGCSServer, gcs_storage: GCSStorage) -> None:
    """endpoint_url reaches the server without STORAGE_EMULATOR_HOST and survives pickling."""
    import pickle

    storage = GCSStorage(
        gcs_storage.bucket, gcs_storage.prefix, endpoint_url=gcs_server.endpoint_url
    )
    clone: GCSStorage = pickle.loads(pickle.dumps(storage))
    try:
        clone.write("e.json", b"{}")
        assert gcs_storage.read("e.json") == b"{}"
        assert clone.endpoint_url == gcs_server.endpoint_url
    finally:
        clone.close()
        storage.close()


# -- wire cost -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "steps"),
    [
        pytest.param(8 * MiB, 64, id="8MiB-64"),
        # as S3's 64 MiB case: 37 s on 2 cores, in the slow set (pytest -m slow)
        pytest.param(64 * MiB, 256, id="64MiB-256", marks=pytest.mark.slow),
    ],
)
def test_append_wire_cost_is_about_the_delta(
    gcs_server: FakeGCSServer, gcs_storage: GCSStorage, total: int, steps: int
) -> None:
    """Growing a file by appends costs at most 1.1x the appended bytes on the wire (up + down)."""
    target = urlsplit(gcs_server.endpoint_url)
    assert target.hostname is not None and target.port is not None
    chunk = total // steps
    line = b"y" * (chunk // 64 - 1) + b"\n"
    with CountingProxy(target.hostname, target.port) as proxy:
        storage = GCSStorage(gcs_storage.bucket, gcs_storage.prefix, endpoint_url=proxy.url)
        digest = hashlib.sha256()
        try:

            async def grow() -> None:
                size = 0
                for i in range(steps):
                    piece = (f"{i:08d}".encode() + line[8:]) * 64
                    await storage.aappend("grow.jsonl", piece, offset=size)
                    digest.update(piece)
                    size += len(piece)
                await storage.aclose()

            asyncio.run(grow())
        finally:
            storage.close()
        up, down = proxy.bytes_up, proxy.bytes_down
    ratio = (up + down) / total
    print(
        f"\nGCS wire cost, {total // MiB} MiB in {steps} appends: up {up:,} B, down {down:,} B, "
        f"appended {total:,} B, ratio {ratio:.4f} ({(up + down - total) / steps:,.0f} B overhead per append)"
    )
    st = gcs_storage.stat("grow.jsonl")
    assert st is not None and st.size == total
    assert hashlib.sha256(gcs_storage.read("grow.jsonl")).digest() == digest.digest()
    assert gcs_storage.list_dir(".evalsyncd/gcs-append") == []
    assert ratio <= 1.1
