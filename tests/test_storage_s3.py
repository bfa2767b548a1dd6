"""S3Storage beyond the shared contract: segments, compaction, multipart appends,
crash states, races, error translation and wire cost, on a real SeaweedFS server.

Raw objects are inspected with a plain botocore client (no mocking of S3).
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
import socket
import string
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import botocore.exceptions as bexc
import pytest

from evalsyncd.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConflictError,
    InvalidKeyError,
    InvalidRequestError,
    ObjectNotFoundError,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage import S3Storage
from evalsyncd.storage._s3errors import CODE_MAP as _CODE_MAP
from evalsyncd.storage._s3errors import EXCEPTION_MAP as _EXCEPTION_MAP
from evalsyncd.storage._s3errors import translate as _translate
from evalsyncd.storage._s3segments import EPOCH_META as _EPOCH_META
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.testing.servers import SeaweedS3Server
from tests.conftest import S3_BUCKET

MiB = 1024 * 1024


@pytest.fixture
def raw(s3_server: SeaweedS3Server) -> Iterator[Any]:
    """A plain (sync) botocore S3 client on the test server, to look at raw objects."""
    client = s3_server.raw_client()
    try:
        yield client
    finally:
        client.close()


def keys_under(raw: Any, prefix: str) -> list[str]:
    """Every key under ``prefix`` (no delimiter)."""
    keys: list[str] = []
    for page in raw.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", ())]
    return keys


def segment_keys(raw: Any, storage: S3Storage, path: str) -> list[str]:
    """The raw keys of the segment objects of ``path`` (every epoch)."""
    return keys_under(raw, storage._segment_dir(path))


def main_object(raw: Any, storage: S3Storage, path: str) -> bytes:
    """The main object's bytes alone, as a tool without evalsyncd sees them."""
    body: bytes = raw.get_object(Bucket=S3_BUCKET, Key=storage._key(path))["Body"].read()
    return body


def lines(n_bytes: int, tag: int = 0) -> bytes:
    """``n_bytes`` (a multiple of 1024) of 1 KiB JSONL-like lines."""
    line = (f"{tag:06d}" + "x" * 1017 + "\n").encode()
    return line * (n_bytes // 1024)


# -- segments and compaction ------------------------------------------------------------


def test_small_appends_make_segments_and_flush_compacts(s3_storage: S3Storage, raw: Any) -> None:
    """Below 5 MiB appends become segments; the main object is always an exact prefix; flush compacts."""
    expected = b""
    for i in range(3):  # 2 segments of 20 lines: they do not yet outweigh 2x the main object
        piece = f'{{"i": {i}}}\n'.encode() * 20
        s3_storage.append("log.jsonl", piece, offset=len(expected))
        expected += piece
        main = main_object(raw, s3_storage, "log.jsonl")
        assert expected.startswith(main) and main
    assert segment_keys(raw, s3_storage, "log.jsonl"), "expected pending segments"
    assert s3_storage.read("log.jsonl") == expected
    st = s3_storage.stat("log.jsonl")
    assert st is not None and st.size == len(expected)
    s3_storage.flush()
    assert main_object(raw, s3_storage, "log.jsonl") == expected
    assert segment_keys(raw, s3_storage, "log.jsonl") == []
    assert s3_storage.read("log.jsonl") == expected


def test_segments_compact_geometrically(s3_storage: S3Storage, raw: Any) -> None:
    """Pending segments never exceed the cap, and compaction keeps the main object growing."""
    expected = b""
    for i in range(80):
        piece = f"{i:04d}\n".encode()
        s3_storage.append("many.jsonl", piece, offset=len(expected))
        expected += piece
        assert len(segment_keys(raw, s3_storage, "many.jsonl")) <= s3_storage.max_segments
    assert s3_storage.read("many.jsonl") == expected
    assert len(main_object(raw, s3_storage, "many.jsonl")) >= len(expected) // 3


def test_list_dir_hides_the_internal_area(s3_storage: S3Storage, raw: Any) -> None:
    """list_dir never shows .evalsyncd, which holds segments, and its keys are reserved."""
    s3_storage.append("a.jsonl", b"1\n", offset=0)
    s3_storage.append("a.jsonl", b"2\n", offset=2)
    assert keys_under(raw, f"{s3_storage.prefix}/.evalsyncd/")
    assert s3_storage.list_dir("") == ["a.jsonl"]
    with pytest.raises(InvalidKeyError):
        s3_storage.write(".evalsyncd/x", b"")
    with pytest.raises(ValueError):
        s3_storage.read(".evalsyncd/seg/a.jsonl")


def test_crash_mid_compaction_reads_correctly(s3_storage: S3Storage, raw: Any) -> None:
    """Stale segments left by a crash after the main rewrite are skipped, then cleaned up."""
    parts = [b"alpha\n", b"beta\n", b"gamma\n"]
    expected = b""
    for p in parts:
        s3_storage.append("c.jsonl", p, offset=len(expected))
        expected += p
    stale = segment_keys(raw, s3_storage, "c.jsonl")
    assert stale
    # The crash state: main rewritten as main + segments, segments not yet deleted.
    key = s3_storage._key("c.jsonl")
    epoch = raw.head_object(Bucket=S3_BUCKET, Key=key)["Metadata"][_EPOCH_META]
    raw.put_object(Bucket=S3_BUCKET, Key=key, Body=expected, Metadata={_EPOCH_META: epoch})
    fresh = S3Storage(S3_BUCKET, s3_storage.prefix, endpoint_url=s3_storage.endpoint_url)
    with fresh:
        assert fresh.read("c.jsonl") == expected
        assert fresh.read_range("c.jsonl", 6, 5) == b"beta\n"
        st = fresh.stat("c.jsonl")
        assert st is not None and st.size == len(expected)
        fresh.append("c.jsonl", b"delta\n", offset=len(expected))
        fresh.flush()
        assert fresh.read("c.jsonl") == expected + b"delta\n"
        assert segment_keys(raw, fresh, "c.jsonl") == []


def test_crash_during_write_never_mixes_contents(s3_storage: S3Storage, raw: Any) -> None:
    """Segments of the old content that survive a write (crash before cleanup) stay invisible."""
    s3_storage.append("w.jsonl", b"old-1\n", offset=0)
    s3_storage.append("w.jsonl", b"old-2\n", offset=6)
    assert segment_keys(raw, s3_storage, "w.jsonl")
    # The crash state of write(): the new main object is in place, old segments remain.
    raw.put_object(Bucket=S3_BUCKET, Key=s3_storage._key("w.jsonl"), Body=b"new-1\n")
    assert s3_storage.read("w.jsonl") == b"new-1\n"
    assert s3_storage.read_range("w.jsonl", 0) == b"new-1\n"
    st = s3_storage.stat("w.jsonl")
    assert st is not None and st.size == 6
    s3_storage.append("w.jsonl", b"new-2\n", offset=6)
    assert s3_storage.read("w.jsonl") == b"new-1\nnew-2\n"


def test_write_and_remove_clear_segments(s3_storage: S3Storage, raw: Any) -> None:
    """write and remove delete the file's pending segments."""
    s3_storage.append("r.jsonl", b"1\n", offset=0)
    s3_storage.append("r.jsonl", b"2\n", offset=2)
    assert segment_keys(raw, s3_storage, "r.jsonl")
    s3_storage.write("r.jsonl", b"fresh\n")
    assert segment_keys(raw, s3_storage, "r.jsonl") == []
    assert s3_storage.read("r.jsonl") == b"fresh\n"
    s3_storage.append("r.jsonl", b"3\n", offset=6)
    s3_storage.append("r.jsonl", b"4\n", offset=8)
    s3_storage.remove("r.jsonl")
    assert keys_under(raw, f"{s3_storage.prefix}/") == []
    assert not s3_storage.exists("r.jsonl")


def test_stale_view_segment_append_conflicts_without_loss(s3_storage: S3Storage) -> None:
    """A segment written from an out-of-date view is detected, removed and reported as a conflict."""
    s3_storage.append("s.jsonl", b"base\n", offset=0)

    async def scenario() -> None:
        async with s3_storage:
            client = await s3_storage._client()
            view = await s3_storage._segments.view(client, "s.jsonl")
            # Another writer appends at the same offset and compacts in between.
            await s3_storage.aappend("s.jsonl", b"other\n", offset=5)
            await s3_storage.aflush()
            with pytest.raises(ConflictError):
                await s3_storage._segments.append(client, "s.jsonl", view, b"mine!\n")

    asyncio.run(scenario())
    assert s3_storage.read("s.jsonl") == b"base\nother\n"


# -- multipart appends ------------------------------------------------------------------


def test_multipart_append_leaves_no_uploads(s3_storage: S3Storage, raw: Any) -> None:
    """Appends to an object of 5 MiB or more use multipart copy and leave no upload behind."""
    base = lines(5 * MiB + 1024)
    s3_storage.write("big.jsonl", base)
    s3_storage.append("big.jsonl", b"tail-1\n", offset=len(base))
    s3_storage.append("big.jsonl", b"tail-2\n", offset=len(base) + 7)
    s3_storage.append("big.jsonl", b"tail-2\n", offset=len(base) + 7)  # a retry: no-op
    expected = base + b"tail-1\ntail-2\n"
    assert main_object(raw, s3_storage, "big.jsonl") == expected
    etag = raw.head_object(Bucket=S3_BUCKET, Key=s3_storage._key("big.jsonl"))["ETag"]
    assert "-" in etag, "expected a multipart ETag"
    assert segment_keys(raw, s3_storage, "big.jsonl") == []
    uploads = raw.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=s3_storage.prefix)
    assert uploads.get("Uploads", []) == []


def test_multipart_append_sends_its_guards(s3_storage: S3Storage) -> None:
    """Each multipart append guards the copy (CopySourceIfMatch) and the complete (IfMatch) with the ETag it read."""
    base = lines(5 * MiB)
    etag = s3_storage.write("guards.jsonl", base)
    sent: dict[str, dict[str, Any]] = {}

    def record(params: dict[str, Any], model: Any, **_kwargs: Any) -> None:
        sent[model.name] = dict(params)

    async def scenario() -> None:
        async with s3_storage:
            client = await s3_storage._client()
            client.meta.events.register("provide-client-params.s3", record)
            try:
                await s3_storage.aappend("guards.jsonl", b"more\n", offset=len(base))
            finally:
                client.meta.events.unregister("provide-client-params.s3", record)

    asyncio.run(scenario())
    assert sent["UploadPartCopy"]["CopySourceIfMatch"] == etag
    assert sent["CompleteMultipartUpload"]["IfMatch"] == etag
    assert sent["UploadPart"]["ChecksumAlgorithm"] == "CRC32C"
    assert "AbortMultipartUpload" not in sent


def test_multipart_conflict_when_object_changes_before_complete(
    s3_storage: S3Storage, raw: Any
) -> None:
    """Another writer replacing the object between the copy and the complete: ConflictError, upload aborted, no loss."""
    base = lines(5 * MiB)
    s3_storage.write("m.jsonl", base)
    other = lines(5 * MiB, tag=7) + b"other writer\n"
    key = s3_storage._key("m.jsonl")
    fired: list[str] = []

    def overwrite(**_kwargs: Any) -> None:
        if not fired:
            fired.append("x")
            raw.put_object(Bucket=S3_BUCKET, Key=key, Body=other)

    async def scenario() -> None:
        async with s3_storage:
            client = await s3_storage._client()
            client.meta.events.register("before-call.s3.CompleteMultipartUpload", overwrite)
            try:
                with pytest.raises(ConflictError) as info:
                    await s3_storage.aappend("m.jsonl", b"mine\n", offset=len(base))
                assert info.value.actual_size == len(other)
            finally:
                client.meta.events.unregister("before-call.s3.CompleteMultipartUpload", overwrite)

    asyncio.run(scenario())
    assert fired
    assert main_object(raw, s3_storage, "m.jsonl") == other
    uploads = raw.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=s3_storage.prefix)
    assert uploads.get("Uploads", []) == []


def test_multipart_copy_guard_conflicts_on_stale_view(s3_storage: S3Storage, raw: Any) -> None:
    """UploadPartCopy with CopySourceIfMatch refuses a changed source: ConflictError, nothing left behind."""
    base = lines(5 * MiB)
    s3_storage.write("g.jsonl", base)

    async def scenario() -> None:
        async with s3_storage:
            client = await s3_storage._client()
            view = await s3_storage._segments.view(client, "g.jsonl")
            await s3_storage.aappend("g.jsonl", b"winner\n", offset=len(base))
            with pytest.raises(ConflictError):
                await s3_storage._append_multipart(
                    client, "g.jsonl", s3_storage._key("g.jsonl"), view, b"loser\n"
                )

    asyncio.run(scenario())
    assert s3_storage.read("g.jsonl") == base + b"winner\n"
    uploads = raw.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=s3_storage.prefix)
    assert uploads.get("Uploads", []) == []


@pytest.mark.xfail(
    strict=False,
    reason="emulator limit: SeaweedFS checks If-Match on CompleteMultipartUpload non-atomically, "
    "so concurrent completes can both succeed (its PutObject conditions are atomic; AWS's are); "
    "the guards the client sends are checked in test_multipart_append_sends_its_guards",
)
def test_concurrent_multipart_appends_one_wins(s3_storage: S3Storage) -> None:
    """Concurrent conditional appends to a large object: exactly one applies, the others conflict."""
    base = lines(5 * MiB)
    s3_storage.write("race.jsonl", base)

    async def contend() -> list[BaseException | None]:
        async with s3_storage:
            results = await asyncio.gather(
                *(
                    s3_storage.aappend("race.jsonl", f"w{i}\n".encode(), offset=len(base))
                    for i in range(3)
                ),
                return_exceptions=True,
            )
        return [r if isinstance(r, BaseException) else None for r in results]

    outcomes = asyncio.run(contend())
    winners = [i for i, r in enumerate(outcomes) if r is None]
    assert len(winners) == 1, outcomes
    assert all(isinstance(r, ConflictError) for r in outcomes if r is not None), outcomes
    assert s3_storage.read("race.jsonl") == base + f"w{winners[0]}\n".encode()


# -- error translation ------------------------------------------------------------------


def test_wrong_credentials_are_access_denied(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad secret is AccessDeniedError (a PermissionError), never FileNotFoundError."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage = S3Storage(S3_BUCKET, "denied", endpoint_url=s3_server.endpoint_url, max_attempts=1)
    with storage:
        for call in (
            lambda: storage.read("x.json"),
            lambda: storage.stat("x.json"),
            lambda: storage.exists("x.json"),
            lambda: storage.write("x.json", b"{}"),
            lambda: storage.list_dir(""),
        ):
            with pytest.raises(AccessDeniedError) as info:
                call()
            assert isinstance(info.value, PermissionError)
            assert not isinstance(info.value, FileNotFoundError)
            assert isinstance(info.value.__cause__, bexc.ClientError)


def test_missing_bucket_is_not_a_missing_file(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str]
) -> None:
    """A missing bucket is BucketNotFoundError, also on HEAD (stat, exists), not FileNotFoundError."""
    storage = S3Storage("no-such-bucket-here", "p", endpoint_url=s3_server.endpoint_url)
    with storage:
        for call in (
            lambda: storage.read("x.json"),
            lambda: storage.read_range("x.json", 0, 4),
            lambda: storage.stat("x.json"),
            lambda: storage.exists("x.json"),
            lambda: storage.list_dir(""),
            lambda: storage.append("x.jsonl", b"1\n", offset=0),
        ):
            with pytest.raises(BucketNotFoundError) as info:
                call()
            assert not isinstance(info.value, FileNotFoundError)


def test_unreachable_server_is_transient(cloud_env: dict[str, str]) -> None:
    """A closed port is TransientStorageError (an outage), never "missing"; with short timeouts it is fast."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    storage = S3Storage(
        S3_BUCKET,
        "p",
        endpoint_url=f"http://127.0.0.1:{port}",
        connect_timeout_s=0.5,
        read_timeout_s=0.5,
        max_attempts=1,
    )
    started = time.monotonic()
    with storage:
        for call in (
            lambda: storage.read("x.json"),
            lambda: storage.stat("x.json"),
            lambda: storage.exists("x.json"),
            lambda: storage.list_dir(""),
            lambda: storage.write("x.json", b"{}"),
            lambda: storage.append("x.jsonl", b"1\n", offset=0),
        ):
            with pytest.raises(TransientStorageError) as info:
                call()
            assert not isinstance(info.value, FileNotFoundError)
            assert info.value.__cause__ is not None
    assert time.monotonic() - started < 15


def test_missing_object_is_file_not_found(s3_storage: S3Storage) -> None:
    """A missing key in an existing bucket is ObjectNotFoundError; stat/exists say missing."""
    with pytest.raises(ObjectNotFoundError):
        s3_storage.read("nope.json")
    with pytest.raises(FileNotFoundError):
        s3_storage.read_range("nope.json", 0, 0)
    assert s3_storage.stat("nope.json") is None
    assert not s3_storage.exists("nope.json")


def _instantiate(cls: type[BaseException]) -> BaseException:
    """An instance of a botocore exception, filling its message template's fields."""
    fmt = getattr(cls, "fmt", "")
    fields = {name: "x" for _t, name, _s, _c in string.Formatter().parse(fmt) if name}
    try:
        return cls(**fields)
    except TypeError:
        return cls.__new__(cls)


def _client_error(code: str, status: int) -> bexc.ClientError:
    return bexc.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "Op",
    )


def test_every_handled_exception_class_is_mapped() -> None:
    """Each exception class in the map, and every botocore error class, becomes the intended StorageError."""
    for exc_type, expected in _EXCEPTION_MAP:
        exc = (
            _instantiate(exc_type) if issubclass(exc_type, bexc.BotoCoreError) else exc_type("boom")
        )
        assert type(_translate(exc, "s3://b/k")) is expected, exc_type
    for _name, cls in inspect.getmembers(bexc, inspect.isclass):
        if not issubclass(cls, bexc.BotoCoreError):
            continue
        got = _translate(_instantiate(cls), "s3://b/k")
        assert isinstance(got, StorageError) and not isinstance(got, ObjectNotFoundError), cls
        if issubclass(cls, bexc.HTTPClientError):
            assert isinstance(got, TransientStorageError), cls
    for exc in (
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectionError(),
        TimeoutError(),
        ConnectionResetError(),
    ):
        assert isinstance(_translate(exc, None), TransientStorageError), exc


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("NoSuchKey", 404, ObjectNotFoundError),
        ("404", 404, ObjectNotFoundError),
        ("NoSuchBucket", 404, BucketNotFoundError),
        ("AccessDenied", 403, AccessDeniedError),
        ("InvalidAccessKeyId", 403, AccessDeniedError),
        ("SignatureDoesNotMatch", 403, AccessDeniedError),
        ("403", 403, AccessDeniedError),
        ("PreconditionFailed", 412, ConflictError),
        ("412", 412, ConflictError),
        ("SlowDown", 503, TransientStorageError),
        ("InternalError", 500, TransientStorageError),
        ("RequestTimeout", 400, TransientStorageError),
        ("Whatever", 429, TransientStorageError),
        ("Whatever", 502, TransientStorageError),
        ("EntityTooSmall", 400, InvalidRequestError),
        ("InvalidArgument", 400, InvalidRequestError),
        ("Odd", 409, InvalidRequestError),
    ],
)
def test_client_error_codes_are_mapped(
    code: str, status: int, expected: type[StorageError]
) -> None:
    """S3 error codes and HTTP statuses map to the intended error class."""
    assert type(_translate(_client_error(code, status), "s3://b/k")) is expected


def test_code_map_covers_only_storage_errors() -> None:
    """Every S3 error code in the table maps to a StorageError subclass, transient and permanent disjoint."""
    for code, cls in _CODE_MAP.items():
        got = _translate(_client_error(code, 400), None)
        assert type(got) is cls, code
        assert not (
            isinstance(got, TransientStorageError) and isinstance(got, PermanentStorageError)
        )


# -- pickling -------------------------------------------------------------------------


def test_pickle_drops_runtime_state(s3_storage: S3Storage) -> None:
    """A pickled S3Storage carries settings, not its cache, pending list or clients."""
    import pickle

    s3_storage.append("p.jsonl", b"1\n", offset=0)
    s3_storage.append("p.jsonl", b"2\n", offset=2)
    state = s3_storage.__getstate__()
    assert not {"_cache", "_pending", "_clients", "_state_lock"} & set(state)
    clone = pickle.loads(pickle.dumps(s3_storage))
    try:
        assert clone.max_segments == s3_storage.max_segments
        assert clone.read("p.jsonl") == b"1\n2\n"
    finally:
        clone.close()


# -- wire cost --------------------------------------------------------------------------


def _measure_growth(s3_server: SeaweedS3Server, total: int, appends: int) -> tuple[int, int, float]:
    """Grow one file to ``total`` bytes in ``appends`` equal appends through a counting proxy."""
    target = urlsplit(s3_server.endpoint_url)
    assert target.hostname is not None and target.port is not None
    delta = lines(total // appends)
    with CountingProxy(target.hostname, target.port) as proxy:
        storage = S3Storage(S3_BUCKET, f"wire/{total}-{time.time_ns()}", endpoint_url=proxy.url)

        async def grow() -> None:
            async with storage:
                for i in range(appends):
                    await storage.aappend("grow.jsonl", delta, offset=i * len(delta))

        started = time.monotonic()
        asyncio.run(grow())
        elapsed = time.monotonic() - started
        up, down = proxy.bytes_up, proxy.bytes_down
        with storage:
            assert storage.read("grow.jsonl") == delta * appends
    ratio = (up + down) / total
    print(
        f"\nS3 wire cost, {total // MiB} MiB in {appends} appends: up {up} B, down {down} B, "
        f"ratio {ratio:.3f}x ({elapsed:.1f} s)"
    )
    return up, down, ratio


def test_wire_cost_8_mib_in_64_appends(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str]
) -> None:
    """Growing a file to 8 MiB in 64 appends costs at most 2x its size on the wire (up + down)."""
    _up, _down, ratio = _measure_growth(s3_server, 8 * MiB, 64)
    assert ratio <= 2.0


@pytest.mark.slow
def test_wire_cost_64_mib_in_256_appends(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str]
) -> None:
    """Growing a file to 64 MiB in 256 appends costs at most 1.15x its size on the wire (up + down)."""
    _up, _down, ratio = _measure_growth(s3_server, 64 * MiB, 256)
    assert ratio <= 1.15


def test_view_hint_of_another_writers_append_is_never_trusted(s3_storage: S3Storage) -> None:
    """A remembered view made stale by another writer yields a conflict, never a lost or doubled byte."""
    other = pickle.loads(pickle.dumps(s3_storage))
    try:
        s3_storage.append("h.jsonl", b"base\n", offset=0)
        s3_storage.append("h.jsonl", b"mine-1\n", offset=5)  # leaves a view hint at size 12
        other.append("h.jsonl", b"other\n", offset=12)  # the hint is now stale
        with pytest.raises(ConflictError) as info:
            s3_storage.append("h.jsonl", b"mine-2\n", offset=12)
        assert info.value.actual_size == 18
        s3_storage.append("h.jsonl", b"mine-2\n", offset=18)
        other.flush()
        s3_storage.flush()
        assert s3_storage.read("h.jsonl") == b"base\nmine-1\nother\nmine-2\n"
        assert other.read("h.jsonl") == b"base\nmine-1\nother\nmine-2\n"
    finally:
        other.close()
