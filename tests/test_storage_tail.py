"""The tail log (evalsyncd.storage.tail): format, writer and stitched reads on S3 and GCS.

Runs against SeaweedFS and fake-gcs-server through the ``cloud`` fixture, and on
the in-memory backend (its tail internals are the ones CloudStorage stitches).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace

import pytest

from evalsyncd.errors import CorruptObjectError, TransientStorageError
from evalsyncd.storage import GCSStorage, S3Storage
from evalsyncd.storage.memory import MemoryStorage
from evalsyncd.storage.tail import (
    FileTail,
    Piece,
    TailConflictError,
    TailIndex,
    TailWriter,
    decode_header,
    encode_tail_object,
    object_name,
    seq_of,
    tail_damage,
)

Cloud = S3Storage | GCSStorage | MemoryStorage


@pytest.fixture(params=["s3", "gcs", "memory"])
def cloud(request: pytest.FixtureRequest) -> Iterator[Cloud]:
    storage: Cloud = request.getfixturevalue(f"{request.param}_storage")
    storage.tail_refresh_s = 0.0  # every read sees the newest index
    yield storage


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_object_names_sort_newest_first() -> None:
    """Tail object names sort in reverse seq order and decode back to their seq."""
    names = [object_name(s) for s in (0, 1, 2, 10, 2**40)]
    assert sorted(names) == names[::-1]
    assert [seq_of(n) for n in names] == [0, 1, 2, 10, 2**40]
    assert seq_of("stray") is None and seq_of("g" * 16) is None


def test_header_roundtrip_and_corruption() -> None:
    """encode/decode keep the index; a damaged header is a CorruptObjectError naming the URL."""
    ft = FileTail("a", 110, 100, "etag", 1.5, (Piece(3, 0, 4), Piece(4, 0, 6)))
    index = TailIndex("w", 4, 2.0, {"runs/r/t.jsonl": ft}, "tok", {3: 77})
    data, body_at = encode_tail_object(index, b"abcdef")
    parsed = decode_header(data, "s3://b/x")
    assert not isinstance(parsed, int)
    got, end = parsed
    assert end == body_at and data[end:] == b"abcdef"
    assert got.files == {"runs/r/t.jsonl": ft} and got.bodies == {3: 77, 4: body_at}
    assert isinstance(decode_header(data[: body_at - 1], "u"), int)
    with pytest.raises(CorruptObjectError, match="s3://b/x"):
        decode_header(b"garbage" * 10, "s3://b/x")
    bad = data[: body_at - 3] + b"zzz"
    with pytest.raises(CorruptObjectError, match="damaged tail header"):
        decode_header(bad, "s3://b/x")
    wrong = encode_tail_object(
        TailIndex("w", 1, 0.0, {"f": FileTail("a", 9, 0, None, 0.0, (Piece(1, 0, 3),))}), b"abc"
    )[0]
    with pytest.raises(CorruptObjectError, match="inconsistent tail entry"):
        decode_header(wrong, "u")


def test_an_object_encoded_from_its_pieces_equals_one_from_their_bytes() -> None:
    """encode_tail_object given the pieces themselves (joined once, with the header) writes
    the same object as given them joined."""
    ft = FileTail("a", 10, 0, None, 1.0, (Piece(0, 0, 4), Piece(0, 4, 6)))
    index = TailIndex("w", 0, 2.0, {"runs/r/t.jsonl": ft}, "tok")
    assert encode_tail_object(index, [b"abcd", b"efghij"]) == encode_tail_object(
        index, b"abcdefghij"
    )
    assert encode_tail_object(index, []) == encode_tail_object(index, b"")


def test_stitched_reads_main_plus_tail(cloud: Cloud) -> None:
    """Readers see main object + pending pieces; list_dir and stat include tail-only files."""

    async def scenario() -> None:
        writer = cloud.tail_writer("w1")
        await writer.open()
        version = await cloud.awrite("runs/r/t.jsonl", b"line0\n")
        writer.stage_append(
            "runs/r/t.jsonl", 6, b"line1\n", base=6, main_version=version, mtime=1.0
        )
        writer.stage_replace("runs/r/metadata.json", b'{"run_id": "r"}', mtime=1.0)
        await writer.commit()
        writer.stage_append(
            "runs/r/t.jsonl", 12, b"line2\n", base=6, main_version=version, mtime=2.0
        )
        writer.stage_append("runs/new/x.jsonl", 0, b"a\nb\n", base=0, main_version=None, mtime=2.0)
        await writer.commit()

        assert await cloud.aread("runs/r/t.jsonl") == b"line0\nline1\nline2\n"
        assert await cloud.aread_range("runs/r/t.jsonl", 3, 9) == b"e0\nline1\n"
        assert await cloud.aread_range("runs/r/t.jsonl", 12) == b"line2\n"
        assert await cloud.aread("runs/r/metadata.json") == b'{"run_id": "r"}'
        assert await cloud.aread("runs/new/x.jsonl") == b"a\nb\n"
        st = await cloud.astat("runs/r/t.jsonl")
        assert st is not None and st.size == 18
        assert await cloud.aexists("runs/new/x.jsonl")
        assert await cloud.alist_dir("runs") == ["new", "r"]
        assert await cloud.alist_dir("runs/r") == ["metadata.json", "t.jsonl"]
        assert await cloud.alist_dir("") == ["runs"]

        # the main object catches up: the writer drops the pieces, old objects go away
        v2 = await cloud.awrite("runs/r/t.jsonl", b"line0\nline1\nline2\n")
        writer.promoted("runs/r/t.jsonl", 18, v2)
        await cloud.awrite("runs/r/metadata.json", b'{"run_id": "r"}')
        writer.promoted("runs/r/metadata.json", 15, None)
        await writer.commit()
        assert set(writer.index.files) == {"runs/new/x.jsonl"}
        deleted = await writer.collect()
        assert deleted == 1  # seq 0 held only promoted pieces; seq 1 still holds x.jsonl
        assert await cloud.aread("runs/r/t.jsonl") == b"line0\nline1\nline2\n"
        assert await cloud.aread("runs/new/x.jsonl") == b"a\nb\n"
        await cloud.aclose()

    _run(scenario())


def test_reader_with_stale_index_retries(cloud: Cloud) -> None:
    """A reader holding an index whose tail objects were deleted re-reads it and is right."""

    async def scenario() -> None:
        cloud.tail_refresh_s = 3600.0  # keep the first index cached
        writer = cloud.tail_writer("w1")
        await writer.open()
        writer.stage_append("f.jsonl", 0, b"one\n", base=0, main_version=None, mtime=1.0)
        await writer.commit()
        st = await cloud.astat("f.jsonl")  # caches the index, not the piece
        assert st is not None and st.size == 4
        v = await cloud.awrite("f.jsonl", b"one\ntwo\n")
        writer.promoted("f.jsonl", 8, v)
        writer.stage_append("g.jsonl", 0, b"x\n", base=0, main_version=None, mtime=1.0)
        await writer.commit()
        assert await writer.collect() == 1
        # the cached index still points at the deleted object: the read retries
        assert await cloud.aread("f.jsonl") == b"one\ntwo\n"
        await cloud.aclose()

    _run(scenario())


def test_truncated_file_is_never_stitched_with_old_main(cloud: Cloud) -> None:
    """A new entry with base 0 (a rewritten file) ignores the old main object."""

    async def scenario() -> None:
        writer = cloud.tail_writer("w1")
        await writer.open()
        await cloud.awrite("f.jsonl", b"old content\n")
        writer.stage_append("f.jsonl", 0, b"new\n", base=0, main_version=None, mtime=1.0)
        await writer.commit()
        assert await cloud.aread("f.jsonl") == b"new\n"
        st = await cloud.astat("f.jsonl")
        assert st is not None and st.size == 4
        await cloud.aclose()

    _run(scenario())


def test_second_writer_is_detected(cloud: Cloud) -> None:
    """Two writers on one prefix: the one that loses a seq gets TailConflictError."""

    async def scenario() -> None:
        a = TailWriter(cloud, "writer-a")
        b = TailWriter(cloud, "writer-b")
        await a.open()
        await b.open()
        a.stage_replace("x.json", b"{}", mtime=1.0)
        await a.commit()
        b.stage_replace("y.json", b"{}", mtime=1.0)
        with pytest.raises(TailConflictError, match="writer-a"):
            await b.commit()
        assert await cloud.aread("x.json") == b"{}"
        assert not await cloud.aexists("y.json")
        await cloud.aclose()

    _run(scenario())


def test_recovery_reads_newest_index(cloud: Cloud) -> None:
    """A restarted writer recovers the index and continues the sequence."""

    async def scenario() -> None:
        a = TailWriter(cloud, "w")
        await a.open()
        for i in range(3):
            a.stage_append(
                "f.jsonl", 2 * i, f"{i}\n".encode(), base=0, main_version=None, mtime=1.0
            )
            await a.commit()
        b = TailWriter(cloud, "w")
        index = await b.open()
        assert index.seq == 2 and index.files["f.jsonl"].size == 6
        b.stage_append("f.jsonl", 6, b"3\n", base=0, main_version=None, mtime=1.0)
        await b.commit()
        assert await cloud.aread("f.jsonl") == b"0\n1\n2\n3\n"
        await cloud.aclose()

    _run(scenario())


def test_a_reader_that_tails_a_file_fetches_each_piece_once(cloud: Cloud) -> None:
    """Re-reading a growing file fetches only the tail pieces it has not read yet."""

    async def scenario() -> None:
        writer = cloud.tail_writer("w1")
        await writer.open()
        fetched: list[tuple[str, int, int | None]] = []
        real_get = cloud._tail_get

        async def counting_get(name: str, start: int, end: int | None) -> bytes:
            fetched.append((name, start, end))
            return await real_get(name, start, end)

        cloud._tail_get = counting_get  # type: ignore[method-assign]
        expected = b""
        for i in range(3):
            line = f"line {i}\n".encode()
            writer.stage_append(
                "f.jsonl", len(expected), line, base=0, main_version=None, mtime=1.0
            )
            await writer.commit()
            expected += line
            fetched.clear()
            assert await cloud.aread("f.jsonl") == expected
            pieces = [f for f in fetched if f[1] != 0]  # header probes start at 0
            assert len(pieces) == 1, fetched  # only the newest piece
        await cloud.aclose()

    _run(scenario())


def test_a_plain_object_changed_under_pending_pieces_is_read_plain_and_reported(
    cloud: Cloud,
) -> None:
    """A main object changed by another tool while the tail holds pieces building on it
    (a foreign line appended, even one ending where a piece ends, truncated below the tail's
    base, longer than the tail, deleted)
    reads as the plain object, never stitched, stat agrees, and tail_damage names it; a main
    object the writer promoted to a piece end (index not yet committed) still stitches."""
    head, one, two = b"line0\n", b"line1\n", b"line2\n"
    plain = {
        "promoted.jsonl": head + one,  # what the writer itself does: a piece end
        "appended.jsonl": head + b'{"evil": 12}\n',
        "same-size.jsonl": head + b'{"evil": 1}\n',  # ends where the tail's pieces end
        "truncated.jsonl": b"l\n",
        "longer.jsonl": head + one + two + b"more\n",
        "deleted.jsonl": None,
    }

    async def scenario() -> None:
        writer = cloud.tail_writer("w1")
        await writer.open()
        for path in plain:
            version = await cloud.awrite(path, head)
            writer.stage_append(path, 6, one, base=6, main_version=version, mtime=1.0)
            writer.stage_append(path, 12, two, base=6, main_version=version, mtime=1.0)
        await writer.commit()
        for path, data in plain.items():
            if data is None:
                await cloud.aremove(path)
            else:
                await cloud.awrite(path, data)
        cloud.tail_refresh_s = 60.0  # the damage stays on the cached index
        assert await cloud.aread("promoted.jsonl") == head + one + two
        assert await tail_damage(cloud) is None
        for path, data in list(plain.items())[1:]:
            if data is None:
                with pytest.raises(FileNotFoundError):
                    await cloud.aread(path)
                assert await cloud.astat(path) is None
            else:
                assert await cloud.aread(path) == data
                assert await cloud.aread_range(path, 2, 4) == data[2:6]
                st = await cloud.astat(path)
                assert st is not None and st.size == len(data)
            damage = await tail_damage(cloud)
            assert isinstance(damage, CorruptObjectError) and damage.url == cloud.url(path)
            assert "changed by something other than evalsyncd" in str(damage)

        # the writer repairs every file (rewritten whole, entries dropped): no damage is left
        for path in plain:
            version = await cloud.awrite(path, head + one + two)
            writer.promoted(path, 18, version)
        await writer.commit()
        cloud.tail_refresh_s = 0.0
        for path in plain:
            assert await cloud.aread(path) == head + one + two
        assert await tail_damage(cloud) is None
        await cloud.aclose()

    _run(scenario())


def test_marks_are_carried_forward_checked_and_a_mark_alone_writes_an_object(
    memory_storage: MemoryStorage,
) -> None:
    """A mark names the seq of the newest object marked with it, every later header carries
    it (a restarted writer too); a pending mark alone makes commit write an index-only
    object; a failed commit drops it; a header whose marks are not names to seqs at or
    below its own is damaged."""

    async def scenario() -> None:
        w = TailWriter(memory_storage, "w")
        await w.open()
        w.stage_replace("runs/r/metadata.json", b"{}", mtime=1.0)
        w.mark("catalog")
        assert (await w.commit()).marks == {"catalog": 0}
        w.stage_append("f.jsonl", 0, b"1\n", base=0, main_version=None, mtime=1.0)
        assert (await w.commit()).marks == {"catalog": 0}  # carried forward
        assert not w.dirty
        w.mark("catalog")
        assert w.dirty
        index = await w.commit()  # nothing staged but the mark: an object is written
        assert (index.seq, index.marks) == (2, {"catalog": 2})
        again = TailWriter(memory_storage, "w")
        assert (await again.open()).marks == {"catalog": 2}  # read back from the header
        memory_storage.faults.fail("internal_create")
        again.mark("other")
        with pytest.raises(TransientStorageError):
            await again.commit()
        assert not again.dirty and again.index.marks == {"catalog": 2}  # dropped with it
        with pytest.raises(ValueError, match="64"):
            again.mark("x" * 65)
        await memory_storage.aclose()

    _run(scenario())
    for marks in ({"catalog": 5}, {"catalog": -1}, {"catalog": "1"}, {"": 0}, [1]):
        index = TailIndex("w", 4, 2.0, {}, "tok", {})
        data, _ = encode_tail_object(replace(index, marks={"m": 0}), b"")
        header = _header_json(data)
        header["marks"] = marks
        with pytest.raises(CorruptObjectError, match="damaged tail header"):
            decode_header(_with_header(header), "s3://b/x")


def _header_json(data: bytes) -> dict[str, object]:
    import json
    import zlib

    nl = data.index(b"\n")
    length = int(data[len(b"evalsyncd-tail 1 ") : nl])
    out: dict[str, object] = json.loads(zlib.decompress(data[nl + 1 : nl + 1 + length]))
    return out


def _with_header(header: dict[str, object]) -> bytes:
    import json
    import zlib

    packed = zlib.compress(json.dumps(header).encode())
    return b"evalsyncd-tail 1 " + str(len(packed)).encode() + b"\n" + packed
