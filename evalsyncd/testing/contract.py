"""The storage contract as an importable test suite, in the style of fsspec's ``tests/abstract``.

:class:`StorageContract` holds the behaviour every backend keeps (the contract
of :mod:`evalsyncd.storage._base`, its capabilities included). A backend's test
module subclasses it and provides a ``storage`` fixture giving a fresh,
empty, opened storage (and cleaning up after)::

    import pytest
    from evalsyncd.storage.memory import MemoryStorage, drop_bucket
    from evalsyncd.testing.contract import StorageContract

    class TestMemoryStorage(StorageContract):
        url_schemes = ("memory",)

        @pytest.fixture
        def storage(self):
            with MemoryStorage("my-test-bucket") as storage:
                yield storage
            drop_bucket("my-test-bucket")

Every test runs on that backend, through its sync and its async methods. Needs
pytest (the ``test`` extra). ``tests/test_storage_contract.py`` runs it on
``LocalStorage``, ``S3Storage`` (SeaweedFS), ``GCSStorage`` (fake-gcs-server)
and ``MemoryStorage``.
"""

from __future__ import annotations

import asyncio
import base64
import pickle
import threading
from typing import ClassVar

import crc32c
import pytest

from evalsyncd.errors import ConflictError, InvalidKeyError, ObjectNotFoundError
from evalsyncd.storage import Backend, StorageStat

__all__ = ["StorageContract"]

MiB = 1024 * 1024


class StorageContract:
    """The behaviour tests every backend passes; subclass with a ``storage`` fixture.

    Attributes:
        url_schemes: the schemes ``storage.url()`` may name.
    """

    url_schemes: ClassVar[tuple[str, ...]] = ("file", "s3", "gs")

    def test_write_then_read_roundtrips(self, storage: Backend) -> None:
        """write stores the exact bytes and read returns them."""
        storage.write("a/b/c.json", b'{"x": 1}')
        assert storage.read("a/b/c.json") == b'{"x": 1}'

    def test_write_overwrites(self, storage: Backend) -> None:
        """A second write replaces the whole content."""
        storage.write("f.bin", b"long original content")
        storage.write("f.bin", b"short")
        assert storage.read("f.bin") == b"short"

    def test_empty_file(self, storage: Backend) -> None:
        """A 0-byte file exists, has size 0 and reads as b''."""
        storage.write("empty.json", b"")
        assert storage.exists("empty.json")
        st = storage.stat("empty.json")
        assert st is not None and st.size == 0
        assert storage.read("empty.json") == b""

    def test_read_missing_raises_file_not_found(self, storage: Backend) -> None:
        """read and read_range of a missing file raise FileNotFoundError (ObjectNotFoundError)."""
        with pytest.raises(FileNotFoundError):
            storage.read("nope.txt")
        with pytest.raises(ObjectNotFoundError):
            storage.read_range("nope.txt", 0, 10)

    def test_stat_and_exists(self, storage: Backend) -> None:
        """stat gives size and a plausible mtime; both say missing for a missing file."""
        assert storage.stat("x.txt") is None
        assert not storage.exists("x.txt")
        storage.write("x.txt", b"12345")
        st = storage.stat("x.txt")
        assert isinstance(st, StorageStat)
        assert st.size == 5
        assert st.mtime > 1_600_000_000
        assert storage.exists("x.txt")

    def test_append_creates_and_extends(self, storage: Backend) -> None:
        """append creates a missing file, then adds to its end."""
        storage.append("log.jsonl", b"1\n")
        storage.append("log.jsonl", b"2\n")
        storage.append("log.jsonl", b"3\n")
        assert storage.read("log.jsonl") == b"1\n2\n3\n"
        st = storage.stat("log.jsonl")
        assert st is not None and st.size == 6

    def test_append_at_offset(self, storage: Backend) -> None:
        """append(offset=N) succeeds when the size is N."""
        storage.append("f.jsonl", b"aaa\n", offset=0)
        storage.append("f.jsonl", b"bbb\n", offset=4)
        assert storage.read("f.jsonl") == b"aaa\nbbb\n"

    def test_append_retry_is_idempotent(self, storage: Backend) -> None:
        """Repeating an append that was already applied is a no-op."""
        storage.append("f.jsonl", b"aaa\n", offset=0)
        storage.append("f.jsonl", b"bbb\n", offset=4)
        storage.append("f.jsonl", b"bbb\n", offset=4)
        assert storage.read("f.jsonl") == b"aaa\nbbb\n"

    def test_append_offset_mismatch_conflicts_without_loss(self, storage: Backend) -> None:
        """A wrong offset raises ConflictError and changes nothing."""
        storage.append("f.jsonl", b"aaa\n", offset=0)
        with pytest.raises(ConflictError) as info:
            storage.append("f.jsonl", b"zzz\n", offset=2)
        assert info.value.actual_size in (4, None)
        with pytest.raises(ConflictError):
            storage.append("f.jsonl", b"zzz\n", offset=0)  # same size as applied, different bytes
        with pytest.raises(ConflictError):
            storage.append("f.jsonl", b"zzz\n", offset=10)
        assert storage.read("f.jsonl") == b"aaa\n"

    def test_append_race_one_writer_wins(self, storage: Backend) -> None:
        """Two appends at the same offset: exactly one applies, the other conflicts."""
        storage.append("race.jsonl", b"base\n", offset=0)
        storage.append("race.jsonl", b"first\n", offset=5)
        with pytest.raises(ConflictError):
            storage.append("race.jsonl", b"second\n", offset=5)
        assert storage.read("race.jsonl") == b"base\nfirst\n"

    def test_concurrent_appends_at_same_offset(self, storage: Backend) -> None:
        """Concurrent conditional appends racing at one offset never lose or mix bytes."""
        storage.append("race.jsonl", b"base\n", offset=0)

        async def contend() -> list[BaseException | None]:
            async def one(i: int) -> None:
                await storage.aappend("race.jsonl", f"writer-{i}\n".encode(), offset=5)

            results = await asyncio.gather(*(one(i) for i in range(4)), return_exceptions=True)
            await storage.aclose()
            return [r if isinstance(r, BaseException) else None for r in results]

        outcomes = asyncio.run(contend())
        winners = [i for i, r in enumerate(outcomes) if r is None]
        assert all(isinstance(r, ConflictError) for r in outcomes if r is not None), outcomes
        assert len(winners) == 1, outcomes
        assert storage.read("race.jsonl") == f"base\nwriter-{winners[0]}\n".encode()

    def test_appends_cross_the_multipart_minimum(self, storage: Backend) -> None:
        """Appends growing a file from below to above 5 MiB keep every byte in order."""
        chunk = (b"x" * 1023 + b"\n") * 1024  # 1 MiB of lines
        expected = b""
        for i in range(7):
            piece = chunk.replace(b"x", str(i).encode(), 1)
            storage.append("big.jsonl", piece, offset=len(expected))
            expected += piece
        storage.append("big.jsonl", b"tail\n", offset=len(expected))
        expected += b"tail\n"
        st = storage.stat("big.jsonl")
        assert st is not None and st.size == len(expected)
        assert storage.read("big.jsonl") == expected
        assert (
            storage.read_range("big.jsonl", 5 * MiB - 3, 10) == expected[5 * MiB - 3 : 5 * MiB + 7]
        )
        storage.flush()
        assert storage.read("big.jsonl") == expected

    @pytest.mark.parametrize(
        "name",
        [
            "with space.json",
            "plus+sign.json",
            "per%20cent.json",
            "hash#tag.json",
            "ünï/cødé ☃.jsonl",
        ],
    )
    def test_unusual_keys_roundtrip(self, storage: Backend, name: str) -> None:
        """Keys with spaces, +, %, # and non-ASCII characters are stored as they are."""
        storage.write(f"k/{name}", b"data")
        assert storage.read(f"k/{name}") == b"data"
        storage.append(f"k/{name}", b"more", offset=4)
        assert storage.read(f"k/{name}") == b"datamore"
        top = name.split("/")[0]
        assert top in storage.list_dir("k")

    def test_read_range(self, storage: Backend) -> None:
        """read_range returns the slice; at or past the end it is short or empty."""
        storage.write("r.bin", b"0123456789")
        assert storage.read_range("r.bin", 0, 3) == b"012"
        assert storage.read_range("r.bin", 7) == b"789"
        assert storage.read_range("r.bin", 8, 100) == b"89"
        assert storage.read_range("r.bin", 10) == b""
        assert storage.read_range("r.bin", 10, 5) == b""
        assert storage.read_range("r.bin", 25, 5) == b""
        assert storage.read_range("r.bin", 3, 0) == b""

    def test_list_dir_shows_files_and_directories(self, storage: Backend) -> None:
        """list_dir returns sorted immediate children, files and directories, names only."""
        storage.write("runs/r1/metadata.json", b"{}")
        storage.write("runs/r2/metadata.json", b"{}")
        storage.write("runs/index.txt", b"")
        storage.append("runs.jsonl", b"{}\n")
        assert storage.list_dir("runs") == ["index.txt", "r1", "r2"]
        assert storage.list_dir("runs/") == ["index.txt", "r1", "r2"]
        assert storage.list_dir("runs/r1") == ["metadata.json"]
        assert storage.list_dir("missing") == []
        assert "runs" in storage.list_dir("") and "runs.jsonl" in storage.list_dir("")

    def test_list_dir_pages_past_1000_keys(self, storage: Backend) -> None:
        """list_dir returns every child of a directory holding more than 1,000 keys."""
        names = [f"f{i:05d}.json" for i in range(1105)]

        async def fill() -> None:
            sem = asyncio.Semaphore(32)

            async def put(name: str) -> None:
                async with sem:
                    await storage.awrite(f"many/{name}", b"1")

            await asyncio.gather(*(put(n) for n in names))
            await storage.aclose()

        asyncio.run(fill())
        assert storage.list_dir("many") == names

    def test_remove(self, storage: Backend) -> None:
        """remove deletes a file and is silent when it is missing; remove_dir never fails."""
        storage.write("d/f.txt", b"x")
        storage.remove("d/f.txt")
        assert not storage.exists("d/f.txt")
        storage.remove("d/f.txt")
        storage.remove_dir("d")
        storage.remove_dir("never-existed")

    def test_remove_then_append_starts_fresh(self, storage: Backend) -> None:
        """After remove, append at offset 0 recreates the file."""
        storage.append("f.jsonl", b"old\n", offset=0)
        storage.remove("f.jsonl")
        storage.append("f.jsonl", b"new\n", offset=0)
        assert storage.read("f.jsonl") == b"new\n"

    @pytest.mark.parametrize("bad", ["", "/abs/path", "a/../b", "../up", "./x", "a//b", "a/./b"])
    def test_bad_keys_are_refused(self, storage: Backend, bad: str) -> None:
        """Empty, absolute and dot-segment keys raise ValueError before any I/O."""
        with pytest.raises(InvalidKeyError):
            storage.write(bad, b"x")
        with pytest.raises(ValueError):
            storage.read(bad)

    def test_pickle_roundtrip(self, storage: Backend) -> None:
        """Instances pickle (configuration only) and the copy reads the same data."""
        storage.write("p.txt", b"pickled")
        clone = pickle.loads(pickle.dumps(storage))
        try:
            assert clone.url("p.txt") == storage.url("p.txt")
            assert clone.read("p.txt") == b"pickled"
        finally:
            clone.close()

    def test_async_twins(self, storage: Backend) -> None:
        """The a-prefixed methods behave like the sync ones, inside async with."""

        async def scenario() -> None:
            async with storage:
                await storage.awrite("as/x.json", b"{}")
                await storage.aappend("as/y.jsonl", b"1\n", offset=0)
                await storage.aappend("as/y.jsonl", b"2\n", offset=2)
                assert await storage.aread("as/y.jsonl") == b"1\n2\n"
                assert await storage.aread_range("as/y.jsonl", 2) == b"2\n"
                assert await storage.aexists("as/x.json")
                st = await storage.astat("as/y.jsonl")
                assert st is not None and st.size == 4
                assert await storage.alist_dir("as") == ["x.json", "y.jsonl"]
                await storage.aremove("as/x.json")
                await storage.aremove_dir("as")
                assert not await storage.aexists("as/x.json")
                await storage.aflush()

        asyncio.run(scenario())

    def test_sync_use_from_thread_while_loop_runs(self, storage: Backend) -> None:
        """Sync methods work from worker threads while another event loop is running."""
        storage.write("t.txt", b"threaded")

        async def main() -> list[bytes]:
            return list(
                await asyncio.gather(*(asyncio.to_thread(storage.read, "t.txt") for _ in range(4)))
            )

        assert asyncio.run(main()) == [b"threaded"] * 4

        results: list[bytes] = []
        threads = [
            threading.Thread(target=lambda: results.append(storage.read("t.txt"))) for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [b"threaded"] * 4

    def test_sync_call_inside_running_loop_is_refused(self, storage: Backend) -> None:
        """A cloud backend's sync method called on a loop thread raises a clear RuntimeError."""
        if not storage.async_native:
            pytest.skip("this backend's sync methods never touch an event loop")

        async def main() -> None:
            with pytest.raises(RuntimeError, match="running event loop"):
                storage.read("anything")

        asyncio.run(main())

    def test_url(self, storage: Backend) -> None:
        """url() names the backend's scheme and ends with the path."""
        url = storage.url("runs/r1/metadata.json")
        assert url.split("://")[0] in self.url_schemes
        assert url.endswith("runs/r1/metadata.json")

    def test_parent_segment_key_says_it_escapes(self, storage: Backend) -> None:
        """A key with a '..' segment is refused with a ValueError saying it escapes the root."""
        for bad in ("../x", "a/../../x"):
            with pytest.raises(ValueError, match="escapes"):
                storage.write(bad, b"x")
            with pytest.raises(ValueError, match="escapes"):
                storage.read(bad)

    def test_capabilities_are_declared(self, storage: Backend) -> None:
        """The backend is a Backend: every capability is present and of its declared type."""
        assert isinstance(storage, Backend)
        assert isinstance(storage.supports_tail, bool)
        assert isinstance(storage.async_native, bool)
        assert isinstance(storage.append_in_place_min_bytes, int)
        assert storage.append_in_place_min_bytes >= 0
        assert storage.local_root is None or storage.local_root.is_dir()
        if not storage.supports_tail:
            with pytest.raises(NotImplementedError):
                storage.tail_writer("w")

    def test_checksum_when_given_matches_the_bytes(self, storage: Backend) -> None:
        """achecksum is None for a missing file; a checksum it gives is the content's CRC32C."""
        storage.write("c/sum.json", b'{"checked": true}')

        async def both() -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
            try:
                return await storage.achecksum("c/missing.json"), await storage.achecksum(
                    "c/sum.json"
                )
            finally:
                await storage.aclose()

        missing, present = asyncio.run(both())
        assert missing is None
        if present is not None:
            crc = crc32c.crc32c(b'{"checked": true}').to_bytes(4, "big")
            assert present == ("crc32c", base64.b64encode(crc).decode())

    def test_create_internal_only_if_absent(self, storage: Backend) -> None:
        """acreate_internal creates once; a second create conflicts and keeps the first bytes."""

        async def run() -> bytes:
            try:
                await storage.acreate_internal("claim.json", b'{"first": true}')
                with pytest.raises(ConflictError):
                    await storage.acreate_internal("claim.json", b'{"second": true}')
                return await storage.aread_internal("claim.json")
            finally:
                await storage.aclose()

        assert asyncio.run(run()) == b'{"first": true}'

    def test_internal_area_roundtrip(self, storage: Backend) -> None:
        """write_internal/read_internal keep the daemon's objects, hidden from list_dir."""
        with pytest.raises(FileNotFoundError):
            storage.read_internal("nothing.json")
        storage.write("visible.json", b"{}")
        storage.write_internal("state.json", b'{"n": 1}')
        assert storage.read_internal("state.json") == b'{"n": 1}'

        async def aread() -> bytes:
            try:
                await storage.awrite_internal("state.json", b'{"n": 2}')
                return await storage.aread_internal("state.json")
            finally:
                await storage.aclose()

        assert asyncio.run(aread()) == b'{"n": 2}'
        if storage.local_root is None:  # object stores hide the area; a directory shows it
            assert storage.list_dir("") == ["visible.json"]
