"""The in-memory backend's own behaviour: its buckets and its scriptable faults.

The storage contract itself runs on it in ``tests/test_storage_contract.py``,
the tail log in ``tests/test_storage_tail.py``.
"""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest

from evalsyncd.errors import (
    AccessDeniedError,
    ConflictError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage import Backend
from evalsyncd.storage.memory import OPERATIONS, MemoryStorage, memory_bucket
from evalsyncd.storage.tail import TailWriter


def test_the_next_n_calls_fail_with_the_class_given(memory_storage: MemoryStorage) -> None:
    """fail(op, times=N, error=C): exactly the next N calls of op raise C, then calls succeed."""
    memory_storage.write("f.json", b"{}")
    memory_storage.faults.fail("read", times=2, error=AccessDeniedError)
    for _ in range(2):
        with pytest.raises(AccessDeniedError, match="injected AccessDeniedError on read"):
            memory_storage.read("f.json")
    assert memory_storage.read("f.json") == b"{}"
    assert memory_storage.faults.calls["read"] == 3
    assert memory_storage.faults.pending == []


def test_a_fault_acts_only_on_its_operation(memory_storage: MemoryStorage) -> None:
    """A fault on write leaves reads, stats and appends alone, and a failed write stores nothing."""
    memory_storage.faults.fail("write")
    with pytest.raises(TransientStorageError):
        memory_storage.write("w.json", b"1")
    assert not memory_storage.exists("w.json")
    memory_storage.append("a.jsonl", b"x\n")
    assert memory_storage.read("a.jsonl") == b"x\n"
    memory_storage.write("w.json", b"1")
    assert memory_storage.read("w.json") == b"1"


def test_a_lost_response_leaves_the_write_applied(memory_storage: MemoryStorage) -> None:
    """lost_response: the append takes effect, the caller sees an error; its retry is a no-op."""
    memory_storage.append("log.jsonl", b"a\n", offset=0)
    memory_storage.faults.fail("append", lost_response=True)
    with pytest.raises(TransientStorageError, match="after it took effect"):
        memory_storage.append("log.jsonl", b"b\n", offset=2)
    assert memory_storage.read("log.jsonl") == b"a\nb\n"
    memory_storage.append("log.jsonl", b"b\n", offset=2)  # the retry: already applied
    assert memory_storage.read("log.jsonl") == b"a\nb\n"


def test_conflict_faults_carry_no_size(memory_storage: MemoryStorage) -> None:
    """A scripted ConflictError is raised like a 412: a ConflictError without actual_size."""
    memory_storage.faults.fail("write", error=ConflictError)
    with pytest.raises(ConflictError) as info:
        memory_storage.write("c.json", b"{}")
    assert info.value.actual_size is None


def test_delay_adds_latency_to_the_calls_it_names(memory_storage: MemoryStorage) -> None:
    """delay(op, s, times=1) makes one call of op take at least s longer, and only that one."""
    memory_storage.write("d.json", b"{}")
    memory_storage.faults.delay("read", 0.2, times=1)
    started = time.monotonic()
    assert memory_storage.read("d.json") == b"{}"
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    memory_storage.read("d.json")
    assert time.monotonic() - started < 0.2


def test_delayed_calls_run_concurrently(memory_storage: MemoryStorage) -> None:
    """Latency is a wait on the loop, not a lock: concurrent delayed reads overlap."""
    memory_storage.write("p.json", b"{}")
    memory_storage.faults.delay("read", 0.3)

    async def many() -> float:
        started = time.monotonic()
        try:
            await asyncio.gather(*(memory_storage.aread("p.json") for _ in range(8)))
        finally:
            await memory_storage.aclose()
        return time.monotonic() - started

    assert 0.3 <= asyncio.run(many()) < 8 * 0.3 / 2
    assert memory_storage.faults.calls["read"] == 8


def test_faults_are_the_buckets_shared_by_copies(memory_storage: MemoryStorage) -> None:
    """A pickled copy and a child see the same objects and the same faults as the original."""
    memory_storage.write("sub/s.json", b"shared")
    clone = pickle.loads(pickle.dumps(memory_storage))
    child = memory_storage.child("sub")
    try:
        assert clone.read("sub/s.json") == b"shared"
        assert child.read("s.json") == b"shared"
        memory_storage.faults.fail("read", error=AccessDeniedError)
        with pytest.raises(AccessDeniedError):
            clone.read("sub/s.json")
        assert memory_bucket(memory_storage.bucket).faults is clone.faults
    finally:
        clone.close()


def test_bad_fault_scripts_are_refused(memory_storage: MemoryStorage) -> None:
    """An unknown operation, a count below 1, a negative delay or an error that is not a
    StorageError class raise ValueError."""
    with pytest.raises(ValueError, match="unknown operation"):
        memory_storage.faults.fail("reed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="times"):
        memory_storage.faults.fail("read", times=0)
    with pytest.raises(ValueError, match="negative"):
        memory_storage.faults.delay("read", -1.0)
    with pytest.raises(ValueError, match="times"):
        memory_storage.faults.delay("read", 0.5, times=0)
    with pytest.raises(ValueError, match="StorageError class"):
        memory_storage.faults.fail("read", error=KeyError)  # type: ignore[arg-type]
    assert "internal_create" in OPERATIONS and memory_storage.faults.pending == []


def test_clear_drops_the_script_and_keeps_the_counts(memory_storage: MemoryStorage) -> None:
    """clear() removes pending faults; the call counts stay."""
    memory_storage.faults.fail("stat", times=5)
    with pytest.raises(StorageError):
        memory_storage.stat("x")
    memory_storage.faults.clear()
    assert memory_storage.stat("x") is None
    assert memory_storage.faults.calls["stat"] == 2


def test_tail_commit_survives_failed_and_lost_creates(memory_storage: MemoryStorage) -> None:
    """A tail commit whose create fails changes nothing; one whose answer is lost is recovered
    by the next commit within itself (the taken seq is skipped, the body sent again as the
    next), and readers stitch every committed byte."""

    async def scenario() -> None:
        memory_storage.tail_refresh_s = 0.0
        writer = TailWriter(memory_storage, "w")
        await writer.open()
        writer.stage_append("f.jsonl", 0, b"one\n", base=0, main_version=None, mtime=1.0)
        memory_storage.faults.fail("internal_create")
        with pytest.raises(TransientStorageError):
            await writer.commit()
        assert not await memory_storage.aexists("f.jsonl")

        writer.stage_append("f.jsonl", 0, b"one\n", base=0, main_version=None, mtime=1.0)
        memory_storage.faults.fail("internal_create", lost_response=True)
        with pytest.raises(TransientStorageError):
            await writer.commit()
        assert await memory_storage.aread("f.jsonl") == b"one\n"  # the object exists

        writer.stage_append("f.jsonl", 0, b"one\n", base=0, main_version=None, mtime=1.0)
        writer.stage_append("g.jsonl", 0, b"two\n", base=0, main_version=None, mtime=1.0)
        index = await writer.commit()  # finds its own orphan: the same body, the next seq
        assert {p.seq for ft in index.files.values() for p in ft.pieces} == {index.seq}
        assert await memory_storage.aread("f.jsonl") == b"one\n"
        assert await memory_storage.aread("g.jsonl") == b"two\n"
        assert memory_storage.faults.calls["internal_create"] == 4
        assert await writer.collect() == 1  # the orphan of the lost answer
        await memory_storage.aclose()

    asyncio.run(scenario())


def test_memory_storage_is_a_backend_with_a_tail(memory_storage: MemoryStorage) -> None:
    """The capabilities it declares: a tail log, native async, in-place appends at any size."""
    backend: Backend = memory_storage
    assert backend.supports_tail and backend.async_native
    assert backend.append_in_place_min_bytes == 0 and backend.local_root is None
    assert (
        backend.url("a/b.json")
        == f"memory://{memory_storage.bucket}/{memory_storage.prefix}/a/b.json"
    )
