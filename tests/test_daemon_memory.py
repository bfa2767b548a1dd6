"""The daemon's destination over MemoryStorage: its failure paths in milliseconds, no server.

The same paths run against SeaweedFS and fake-gcs-server in the reliability tests;
here each fault is scripted exactly (which request fails, whether it took effect).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from evalsyncd.config import DestinationSettings, RetrySettings
from evalsyncd.errors import AccessDeniedError, TransientStorageError
from evalsyncd.storage.memory import MemoryStorage
from evalsyncd.sync.destination import Destination, DestinationState
from evalsyncd.sync.journal import Journal

KEY = "runs/r/b/trajectories.jsonl"


def _lines(path: Path, start: int, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"i": i}).encode() + b"\n")


def _settings(storage: MemoryStorage, **overrides: object) -> DestinationSettings:
    # MemoryStorage has no configuration URL (it is process-local): build the settings as
    # the daemon would hold them, without URL validation
    fields = {"name": "mem", "url": storage.url(), **overrides}
    return DestinationSettings.model_construct(**fields)  # type: ignore[arg-type]


def _destination(
    storage: MemoryStorage, journal: Journal, root: Path, **settings: object
) -> Destination:
    return Destination(
        _settings(
            storage, retry=RetrySettings(initial_backoff_s=0.01, max_backoff_s=0.02), **settings
        ),
        storage,
        journal,
        root,
        flush_interval_s=0.01,
    )


async def _failed_once(
    storage: MemoryStorage, journal: Journal, root: Path, **settings: object
) -> Destination:
    """A destination whose first pass, over KEY, failed."""
    d = _destination(storage, journal, root, **settings)
    d.mark(KEY)
    assert not await d.run_pass()
    return d


async def _until_caught_up(d: Destination, passes: int = 20) -> None:
    for _ in range(passes):
        if d.caught_up:
            return
        await d.run_pass()
    raise AssertionError(f"not caught up after {passes} passes: {d.last_error}")


@pytest.mark.parametrize("lag", [60.0, 0.0], ids=["tail log", "per file"])
def test_transient_failures_back_off_then_every_line_arrives_once(
    memory_storage: MemoryStorage, tmp_path: Path, lag: float
) -> None:
    """Two failed requests: the pass fails, the destination backs off (a time, not a sleep),
    the next passes succeed, and the reader sees every line exactly once."""
    root = tmp_path / "root"
    _lines(root / KEY, 0, 50)
    op = "internal_create" if lag else "write"
    memory_storage.faults.fail(op, times=2, error=TransientStorageError)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = await _failed_once(memory_storage, journal, root, max_main_lag_s=lag)
            assert d.state is DestinationState.BACKOFF and d.retry_at > d.clock()
            if d.tail is not None:
                d.tail.drain_all()
            await _until_caught_up(d)
            assert d.state is DestinationState.HEALTHY

    asyncio.run(scenario())
    assert memory_storage.read(KEY) == (root / KEY).read_bytes()


def test_a_lost_tail_response_is_neither_lost_nor_doubled(
    memory_storage: MemoryStorage, tmp_path: Path
) -> None:
    """A tail object that was created but whose answer was lost: the next pass finds the seq
    taken by its own writer and sends the same body as the next one, succeeding at once;
    readers see each line once, before and after the main object catches up."""
    root = tmp_path / "root"
    _lines(root / KEY, 0, 20)
    memory_storage.faults.fail("internal_create", lost_response=True)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = await _failed_once(memory_storage, journal, root)
            _lines(root / KEY, 20, 5)
            d.mark(KEY)
            assert await d.run_pass()  # the taken seq is skipped within the retry
            assert d.is_idle() and d.state is DestinationState.HEALTHY
            reader = MemoryStorage(memory_storage.bucket, memory_storage.prefix)
            assert await reader.aread(KEY) == (root / KEY).read_bytes()
            await reader.aclose()
            assert d.tail is not None
            d.tail.drain_all()
            await _until_caught_up(d)

    asyncio.run(scenario())
    plain = MemoryStorage(memory_storage.bucket, memory_storage.prefix)
    plain.read_tail = False  # the main object alone
    assert plain.read(KEY) == (root / KEY).read_bytes()


def test_a_lost_append_response_is_reconciled_not_repeated(
    memory_storage: MemoryStorage, tmp_path: Path
) -> None:
    """Per-file path: an append applied whose answer was lost is found by comparing bytes
    (journal jumps to the remote size); the next lines follow, none twice."""
    root = tmp_path / "root"
    _lines(root / KEY, 0, 10)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _destination(memory_storage, journal, root, max_main_lag_s=0.0)
            d.mark(KEY)
            assert await d.run_pass()
            _lines(root / KEY, 10, 10)
            memory_storage.faults.fail("append", lost_response=True)
            d.mark(KEY)
            assert not await d.run_pass()
            _lines(root / KEY, 20, 10)
            d.mark(KEY)
            await _until_caught_up(d)

    asyncio.run(scenario())
    assert memory_storage.read(KEY) == (root / KEY).read_bytes()


def test_a_permanent_error_parks_until_parked_retry_s(
    memory_storage: MemoryStorage, tmp_path: Path
) -> None:
    """Access denied parks the destination with its next attempt parked_retry_s away; the
    journal records nothing for the file."""
    root = tmp_path / "root"
    _lines(root / KEY, 0, 3)
    memory_storage.faults.fail("internal_create", error=AccessDeniedError)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = await _failed_once(memory_storage, journal, root)
            assert d.state is DestinationState.PARKED
            assert d.retry_at - d.clock() > d.settings.retry.parked_retry_s - 1
            assert journal.get("mem", KEY) is None

    asyncio.run(scenario())
