"""The daemon's core in parts: a scheduler with a scripted shipper, each shipper alone.

No server: the scheduler needs no storage at all, the shippers run over
MemoryStorage (the same paths run against real servers in the daemon tests).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path

import pytest

from evalsyncd.config import RetrySettings
from evalsyncd.errors import AccessDeniedError, TransientStorageError
from evalsyncd.storage.memory import MemoryStorage
from evalsyncd.sync.journal import Journal
from evalsyncd.sync.passes import ByteBudget
from evalsyncd.sync.perfile import PerFileShipper
from evalsyncd.sync.plan import Policy
from evalsyncd.sync.scheduler import PassReport, Scheduler
from evalsyncd.sync.shipper import Batch, Context, Meter, Outcome
from evalsyncd.sync.states import DestinationState
from evalsyncd.sync.tailmode import TailShipper

KEY = "runs/r/b/trajectories.jsonl"


class _Scripted:
    """A shipper that returns the outcomes it is given, and records the batches."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.batches: list[Batch] = []
        self.behind = 0

    async def ship(self, batch: Batch) -> Outcome:
        self.batches.append(batch)
        return self.outcomes.pop(0) if self.outcomes else Outcome(done=list(batch.paths))

    def next_due_in(self) -> float | None:
        return None

    def drain_all(self) -> None:
        pass


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _scheduler(
    journal: Journal, shipper: _Scripted, clock: _Clock, steps: list[object] | None = None
) -> Scheduler:
    return Scheduler(
        "d",
        shipper,
        journal,
        Meter("d"),
        flush_interval_s=1.0,
        retry=RetrySettings(initial_backoff_s=2.0, max_backoff_s=8.0, parked_retry_s=300.0),
        steps=steps or [],  # type: ignore[arg-type]
        chunk_bytes=4096,
        retry_chunk_bytes=1024,
        clock=clock,
        wall=clock,
        rng=random.Random(1),
    )


def test_the_scheduler_applies_an_outcome(tmp_path: Path) -> None:
    """Done and failed paths leave the dirty set, deferred ones wait after_s, again ones are
    marked again; a path marked during the pass stays dirty."""
    clock = _Clock()

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", tmp_path) as journal:
            shipper = _Scripted(
                Outcome(
                    done=["a", "late"],
                    failed={"b": "OSError: boom"},
                    deferred={"c": 5.0},
                    again={"d": True},
                )
            )
            s = _scheduler(journal, shipper, clock)
            for p in ("a", "b", "c", "d", "late"):
                s.mark(p)
            real_ship = shipper.ship

            async def ship(batch: Batch) -> Outcome:
                if not shipper.batches:
                    s.mark("late")  # a change during the first pass
                return await real_ship(batch)

            shipper.ship = ship  # type: ignore[method-assign]
            assert await s.run_pass()
            assert sorted(s.pending_paths()) == ["c", "d", "late"]
            assert shipper.batches[0].chunk_bytes == 4096
            clock.now = 1.0
            assert await s.run_pass()
            assert "c" not in shipper.batches[1].paths  # deferred for 5 s
            clock.now = 6.0
            assert await s.run_pass()
            assert "c" in shipper.batches[2].paths and s.is_idle()

    asyncio.run(scenario())


def test_a_failed_outcome_backs_off_then_parks(tmp_path: Path) -> None:
    """An outcome with a transient error: BACKOFF, retry_at in the future, smaller chunks;
    a permanent one parks for parked_retry_s; success returns to HEALTHY. The scheduler
    waits for retry_at (a time it is told, not a sleep it chose)."""
    clock = _Clock()

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", tmp_path) as journal:
            shipper = _Scripted(
                Outcome(error=TransientStorageError("slow down")),
                Outcome(error=AccessDeniedError("denied")),
            )
            s = _scheduler(journal, shipper, clock)
            s.mark("a")
            assert not await s.run_pass()
            assert s.state is DestinationState.BACKOFF and 1.0 <= s.retry_at <= 2.0
            assert s.chunk_bytes == 1024 and s.pending_paths() == ["a"]
            clock.now = s.retry_at
            assert not await s.run_pass()
            assert s.state is DestinationState.PARKED and s.retry_at == clock.now + 300.0
            clock.now = s.retry_at
            assert await s.run_pass()
            assert s.state is DestinationState.HEALTHY and s.is_idle() and s.chunk_bytes == 4096
            assert s.stats.failures == {"TransientStorageError": 1, "AccessDeniedError": 1}

    asyncio.run(scenario())


def test_a_failing_step_fails_the_pass(tmp_path: Path) -> None:
    """Steps run after a successful pass with its paths; a step's storage error makes the
    pass a failed one (BACKOFF), the shipper's work stays acknowledged."""
    clock = _Clock()
    seen: list[list[str]] = []

    class Step:
        def __init__(self) -> None:
            self.fail = True

        async def after_pass(self, report: PassReport) -> None:
            seen.append(list(report.paths))
            if self.fail:
                self.fail = False
                raise TransientStorageError("catalog upload failed")

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", tmp_path) as journal:
            s = _scheduler(journal, _Scripted(), clock, [Step()])
            s.mark("runs/r/metadata.json")
            assert not await s.run_pass()
            assert s.state is DestinationState.BACKOFF and s.is_idle()
            clock.now = s.retry_at
            assert await s.run_pass()

    asyncio.run(scenario())
    assert seen == [["runs/r/metadata.json"], []]


def _context(storage: MemoryStorage, journal: Journal, root: Path) -> Context:
    return Context(
        name="mem",
        root=root,
        storage=storage,
        journal=journal,
        policy=Policy(flush_interval_s=0.01, invalid_json_grace_s=0.0),
        budget=ByteBudget(1 << 20),
        direct_append_bytes=1 << 30,
    )


def _write_lines(path: Path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        for i in range(n):
            f.write(json.dumps({"i": i}).encode() + b"\n")


@pytest.mark.parametrize("tail", [False, True], ids=["per-file shipper", "tail shipper"])
def test_a_shipper_alone_ships_a_batch_and_reports_failures(
    memory_storage: MemoryStorage, tmp_path: Path, tail: bool
) -> None:
    """Each shipper, built from a context without any scheduler: a failing request is an
    outcome's error (nothing journaled), the next batch ships, a partial line waits."""
    root = tmp_path / "root"
    _write_lines(root / KEY, 5)
    with open(root / KEY, "ab") as f:
        f.write(b'{"partial"')
    op = "internal_create" if tail else "write"
    memory_storage.faults.fail(op, error=TransientStorageError)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            ctx = _context(memory_storage, journal, root)
            shipper: PerFileShipper | TailShipper = (
                TailShipper(ctx, memory_storage.tail_writer(journal.writer_id()))
                if tail
                else PerFileShipper(ctx)
            )
            failed = await shipper.ship(Batch({KEY: 1}, 1 << 20))
            assert isinstance(failed.error, TransientStorageError) and not failed.done
            assert journal.get("mem", KEY) is None
            shipped = await shipper.ship(Batch({KEY: 2}, 1 << 20))
            assert shipped.error is None and shipped.done == [KEY]
            row = journal.get("mem", KEY)
            assert row is not None and row.tail_offset == (root / KEY).read_bytes().rfind(b"\n") + 1
            if tail:
                shipper.drain_all()
                assert (await shipper.ship(Batch({}, 1 << 20))).error is None
                assert shipper.behind == 0

    asyncio.run(scenario())
    plain = MemoryStorage(memory_storage.bucket, memory_storage.prefix)
    plain.read_tail = False
    data = (root / KEY).read_bytes()
    assert plain.read(KEY) == data[: data.rfind(b"\n") + 1]


def test_a_jsonl_truncated_to_nothing_empties_its_object(
    memory_storage: MemoryStorage, tmp_path: Path
) -> None:
    """A JSONL file truncated to no complete line (regression: the old content stayed in
    the bucket until a new line came, forever if none did)."""
    root = tmp_path / "root"
    _write_lines(root / KEY, 3)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            shipper = PerFileShipper(_context(memory_storage, journal, root))
            assert (await shipper.ship(Batch({KEY: 1}, 1 << 20))).done == [KEY]
            (root / KEY).write_bytes(b'{"half')
            assert (await shipper.ship(Batch({KEY: 2}, 1 << 20))).done == [KEY]

    asyncio.run(scenario())
    assert memory_storage.read(KEY) == b""


def test_a_failure_after_the_first_chunk_leaves_the_file_behind(
    memory_storage: MemoryStorage, tmp_path: Path
) -> None:
    """Per-file, several chunks: the second fails; the journal does not hold the file's stat,
    so the next batch sends the rest without the file changing (regression)."""
    root = tmp_path / "root"
    _write_lines(root / KEY, 200)
    memory_storage.faults.fail("append", error=TransientStorageError)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            shipper = PerFileShipper(_context(memory_storage, journal, root))
            failed = await shipper.ship(Batch({KEY: 1}, 1024))
            assert failed.error is not None
            row = journal.get("mem", KEY)
            assert row is not None and 0 < row.acked_offset < (root / KEY).stat().st_size
            assert not row.unchanged((root / KEY).stat())  # a scan marks it again
            assert (await shipper.ship(Batch({KEY: 2}, 1024))).done == [KEY]

    asyncio.run(scenario())
    assert memory_storage.read(KEY) == (root / KEY).read_bytes()


def test_a_tail_only_file_deleted_while_down_is_not_resurrected(
    memory_storage: MemoryStorage, tmp_path: Path
) -> None:
    """mirror_deletes: a file whose tail write landed but whose journal row was lost, then
    deleted locally before the restart, is forgotten by the index and has no object
    (regression: recovery promoted it to a main object nobody removed)."""
    root = tmp_path / "root"
    _write_lines(root / KEY, 3)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            ctx = _context(memory_storage, journal, root)
            writer = memory_storage.tail_writer(journal.writer_id())
            assert (await TailShipper(ctx, writer).ship(Batch({KEY: 1}, 1 << 20))).done == [KEY]
            journal.forget("mem", KEY)  # the commit that a kill -9 lost
            journal.commit()
            (root / KEY).unlink()
            ctx = _context(memory_storage, journal, root)
            ctx.policy = Policy(
                flush_interval_s=0.01, invalid_json_grace_s=0.0, mirror_deletes=True
            )
            restarted = TailShipper(ctx, memory_storage.tail_writer(journal.writer_id()))
            assert (await restarted.ship(Batch({}, 1 << 20))).error is None
            assert restarted.behind == 0

    asyncio.run(scenario())
    assert not memory_storage.exists(KEY)


def test_a_landed_but_unjournaled_json_is_not_taken_for_the_old_one(
    memory_storage: MemoryStorage, tmp_path: Path
) -> None:
    """A JSON write that lands but whose answer is lost, then the file goes back to the
    content sent before: it is sent again, not recorded as sent (regression: the row
    still held the old content's CRC32C, so the object kept the lost write's content)."""
    root = tmp_path / "root"
    path = root / "runs/r/metadata.json"
    path.parent.mkdir(parents=True)

    def write(data: bytes, age_s: float) -> None:
        path.write_bytes(data)
        t = time.time() - age_s
        os.utime(path, (t, t))

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            shipper = PerFileShipper(_context(memory_storage, journal, root))
            key = "runs/r/metadata.json"
            write(b'{"v": 1}', 100)
            assert (await shipper.ship(Batch({key: 1}, 1 << 20))).done == [key]
            write(b'{"v": 2}', 90)
            memory_storage.faults.fail("write", lost_response=True)
            assert (await shipper.ship(Batch({key: 2}, 1 << 20))).error is not None
            write(b'{"v": 1}', 80)
            assert (await shipper.ship(Batch({key: 3}, 1 << 20))).done == [key]

    asyncio.run(scenario())
    assert memory_storage.read("runs/r/metadata.json") == b'{"v": 1}'
