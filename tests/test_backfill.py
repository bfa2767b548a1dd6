"""A backfill: a tree of runs mirrored from scratch, as `sync --once` and `run` do it.

Over MemoryStorage (its call counts are the requests): a drain sends each new file
straight to its main object, without a tail object; the daemon's first pass makes
new runs listable (tail object, then the run catalog) before it sends their main
objects. The speed itself is measured in ``bench/backfill.py``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import urlsplit

from evalsyncd.config import DestinationSettings, RetrySettings
from evalsyncd.storage import S3Storage
from evalsyncd.storage.memory import MemoryStorage
from evalsyncd.store import BenchmarkResult, EvalStore, StoredTrajectory, StoredTurn
from evalsyncd.sync.destination import Destination
from evalsyncd.sync.journal import Journal
from evalsyncd.sync.scheduler import PassReport, Scheduler
from evalsyncd.sync.shipper import Batch, Meter, Outcome
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.testing.servers import SeaweedS3Server
from tests.conftest import S3_BUCKET


def _tree(root: Path, runs: int) -> list[str]:
    """``runs`` finalized runs written by ``EvalStore``; returns every file, relative."""
    store = EvalStore(root)
    for i in range(runs):
        run_id = f"step{i:04d}_20240101_000000_{i:06x}"
        store.create_run("m", ["gsm8k"], checkpoint_name=f"step{i}", run_id=run_id)
        for k in range(3):
            turn = StoredTurn(role="assistant", content="A" * 50, token_count=1)
            store.write_trajectory(
                run_id, "gsm8k", StoredTrajectory(idx=k, benchmark="gsm8k", turns=[turn])
            )
        result = BenchmarkResult(name="gsm8k", score=0.5, num_examples=3, num_correct=1)
        store.write_result(run_id, result)
        store.write_summary(run_id, {"gsm8k": result})
        store.finalize_run(run_id)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _destination(storage: MemoryStorage, journal: Journal, root: Path) -> Destination:
    fields = {"name": "mem", "url": storage.url(), "max_main_lag_s": 60.0}
    settings = DestinationSettings.model_construct(**fields)  # type: ignore[arg-type]
    return Destination(settings, storage, journal, root, flush_interval_s=0.01)


def _plain(storage: MemoryStorage) -> MemoryStorage:
    """A reader of the main objects alone (what every other tool sees)."""
    plain = MemoryStorage(storage.bucket, storage.prefix)
    plain.read_tail = False
    return plain


def test_a_drain_sends_new_files_straight_to_their_main_objects(
    memory_storage: MemoryStorage, tmp_path: Path
) -> None:
    """``sync --once`` of a tree the destination never saw: one write per file, no file's
    bytes in a tail object (they would only be promoted in the same pass), every row acknowledged,
    the run catalog after; then a second drain sends nothing."""
    root = tmp_path / "root"
    files = _tree(root, 3)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _destination(memory_storage, journal, root)
            for path in files:
                d.mark(path)
            assert await d.drain(d.clock() + 30.0)
            for path in files:
                row = journal.get("mem", path)
                size = (root / path).stat().st_size
                assert row is not None and row.acked_offset == row.tail_offset == size, path
            before = dict(memory_storage.faults.calls)
            for path in files:
                d.mark(path)
            assert await d.drain(d.clock() + 30.0)
            assert memory_storage.faults.calls["write"] == before["write"]

    asyncio.run(scenario())
    calls = memory_storage.faults.calls
    assert calls["write"] == len(files)
    # one tail object, whatever the number of runs: no file's bytes, only the mark that
    # runs' metadata changed outside the tail log (readers then trust the catalog that
    # follows it in place of a LIST of runs/; the catalog is a plain put)
    assert calls["internal_create"] == 1
    assert memory_storage.read_internal("catalog.json")
    plain = _plain(memory_storage)
    for path in files:
        assert plain.read(path) == (root / path).read_bytes(), path


def test_new_runs_are_listed_before_their_main_objects_are_sent(
    memory_storage: MemoryStorage, tmp_path: Path
) -> None:
    """The daemon's first pass over a backfill writes one tail object and stops there: the
    run catalog follows (a step after the pass), so ``EvalStore`` on the bucket lists every
    run while no main object exists yet; the next pass, at once, sends the main objects
    of the finalized runs."""
    root = tmp_path / "root"
    files = _tree(root, 4)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _destination(memory_storage, journal, root)
            for path in files:
                d.mark(path)
            assert await d.run_pass()
            assert memory_storage.faults.calls["write"] == 0
            reader = MemoryStorage(memory_storage.bucket, memory_storage.prefix)
            runs = await EvalStore(reader).alist_runs()
            assert len(runs) == 4
            assert await d.run_pass()
            assert d.shipper.behind == 1  # runs.jsonl: no run of its own, due when quiet

    asyncio.run(scenario())
    plain = _plain(memory_storage)
    for path in files:
        if path != "runs.jsonl":
            assert plain.read(path) == (root / path).read_bytes(), path


def test_a_shipper_with_more_due_gets_the_next_pass_at_once(tmp_path: Path) -> None:
    """``Outcome.more``: the scheduler runs the steps, then the next pass at once, not a
    ``flush_interval_s`` (here 60 s) later."""
    batches: list[dict[str, int]] = []
    steps: list[int] = []
    second = asyncio.Event()

    class Shipper:
        behind = 0

        async def ship(self, batch: Batch) -> Outcome:
            batches.append(dict(batch.paths))
            if len(batches) == 2:
                second.set()
            return Outcome(done=list(batch.paths), more=len(batches) == 1)

        def next_due_in(self) -> float | None:
            return None

        def drain_all(self) -> None:
            pass

    class Step:
        async def after_pass(self, report: PassReport) -> None:
            steps.append(len(batches))

        def next_due_in(self) -> float | None:
            return None

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", tmp_path) as journal:
            s = Scheduler(
                "d",
                Shipper(),
                journal,
                Meter("d"),
                flush_interval_s=60.0,
                retry=RetrySettings(),
                steps=[Step()],
            )
            s.mark("runs/r/metadata.json")
            task = asyncio.create_task(s.run())
            async with asyncio.timeout(10):
                await second.wait()
            s.stop()
            await task

    asyncio.run(scenario())
    assert batches[:2] == [{"runs/r/metadata.json": 1}, {}]
    assert steps[:2] == [1, 2]  # the step ran between the two passes


def test_s3_requests_carry_evalsyncds_user_agent(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str]
) -> None:
    """Every S3 request names evalsyncd in its ``User-Agent`` (given in the client's
    configuration, so botocore sends it as it is instead of rebuilding it per request;
    the lean ``PutObject`` path sends the same), as seen on the wire."""
    target = urlsplit(s3_server.endpoint_url)
    assert target.hostname is not None and target.port is not None
    proxy = CountingProxy(target.hostname, target.port, record_heads=True)
    with proxy, S3Storage(S3_BUCKET, f"ua-{time.time_ns()}", endpoint_url=proxy.url) as storage:
        storage.write("ua.json", b"{}")
        storage.write("big.json", b"x" * (2 * 1024 * 1024))  # through the SDK
        assert storage.read("ua.json") == b"{}"
    assert proxy.heads is not None
    assert {h.method for h in proxy.heads} >= {"PUT", "GET"}
    agents = [h.headers.get("user-agent", "") for h in proxy.heads]
    assert all(agent.split()[0] == "evalsyncd" for agent in agents), agents
