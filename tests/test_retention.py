"""Retention: the pure policy (tables), the journaled eviction over MemoryStorage with
scripted faults, the store reading evicted runs from the mirror, and restore.

The real-server, ``kill -9`` test of eviction is in ``tests/test_retention_e2e.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from evalsyncd import EvalStore
from evalsyncd.config import DestinationSettings, RetentionSettings, RetrySettings
from evalsyncd.errors import RunEvictedError, TransientStorageError
from evalsyncd.evicted import MARKER_NAME, parse_marker
from evalsyncd.restore import restore_run
from evalsyncd.storage.memory import MemoryStorage, drop_bucket
from evalsyncd.store import BenchmarkResult, StoredTrajectory
from evalsyncd.sync.destination import Destination, DestinationState
from evalsyncd.sync.journal import Journal
from evalsyncd.sync.retention import (
    DiskUsage,
    Mirror,
    Policy,
    Retention,
    RunView,
    _delete_files,
    choose,
    eligibility,
    recover,
    scan_runs,
)

DAY = 86400.0

# -- the pure policy ---------------------------------------------------------------------

P = Policy(min_age_s=100.0, abandoned_after_s=1000.0)


@pytest.mark.parametrize(
    ("finalized", "quiet_s", "policy", "expected"),
    [
        (True, 100.0, P, "finalized"),
        (True, 99.9, P, None),  # not quiet long enough
        (True, -5.0, P, None),  # dated in the future (clock stepped back): never quiet
        (False, 500.0, P, None),  # open, not yet abandoned
        (False, 1000.0, P, "abandoned"),
        (False, 1e9, Policy(min_age_s=100.0), None),  # open runs never go without the setting
        (False, 200.0, Policy(min_age_s=300.0, abandoned_after_s=100.0), None),  # min_age_s too
    ],
)
def test_eligibility_table(
    finalized: bool, quiet_s: float, policy: Policy, expected: str | None
) -> None:
    """A run is eligible once finalized and quiet for min_age_s, or open and quiet for
    abandoned_after_s; a run dated in the future never is."""
    assert eligibility(RunView("r", finalized, quiet_s, 10), policy) == expected


def _views(*quiet: float, size: int = 10) -> list[RunView]:
    return [RunView(f"r{i}", True, q, size) for i, q in enumerate(quiet)]


@pytest.mark.parametrize(
    ("policy", "runs", "usage", "expected"),
    [
        # no trigger set: every eligible run, oldest first
        (Policy(min_age_s=10), _views(20, 5, 30), None, [("r2", "min_age_s"), ("r0", "min_age_s")]),
        # max_age_s: only those that old
        (Policy(min_age_s=10, max_age_s=25), _views(20, 5, 30), None, [("r2", "max_age_s")]),
        # below the high-water mark: nothing
        (
            Policy(min_age_s=10, high_water=0.8, low_water=0.5),
            _views(20, 30),
            DiskUsage(100, 79),
            [],
        ),
        # above it: oldest first until at or below low water (79 -> 59 -> 49 <= 50)
        (
            Policy(min_age_s=10, high_water=0.7, low_water=0.5),
            _views(20, 30, 40, 15),
            DiskUsage(100, 79),
            [("r2", "high_water"), ("r1", "high_water"), ("r0", "high_water")],
        ),
        # age and space together: the aged run counts towards the space freed
        (
            Policy(min_age_s=10, max_age_s=35, high_water=0.7, low_water=0.65),
            _views(20, 30, 40),
            DiskUsage(100, 80),
            [("r2", "max_age_s"), ("r1", "high_water")],
        ),
        # above the mark with nothing eligible: nothing (the writer's run is not quiet)
        (
            Policy(min_age_s=10, high_water=0.5, low_water=0.4),
            _views(1, 2),
            DiskUsage(100, 99),
            [],
        ),
        # unknown usage: no space trigger
        (Policy(min_age_s=10, high_water=0.5, low_water=0.4), _views(20), None, []),
    ],
)
def test_choose_table(
    policy: Policy, runs: list[RunView], usage: DiskUsage | None, expected: list[tuple[str, str]]
) -> None:
    """Oldest first; by age, or from the high-water mark down to the low-water mark."""
    assert [(c.run_id, c.reason) for c in choose(runs, policy, usage)] == expected


def test_a_run_finalized_without_a_summary_counts_as_finalized(tmp_path: Path) -> None:
    """``finalize_run`` (scores copied into metadata.json) finalizes a run as
    ``write_summary`` does; a run with a benchmark still unscored stays open."""
    store = EvalStore(tmp_path)
    done = store.create_run("m", checkpoint_name="c1", benchmarks=["gsm8k", "mmlu"])
    open_ = store.create_run("m", checkpoint_name="c2", benchmarks=["gsm8k", "mmlu"])
    for run in (done, open_):
        store.write_result(run, BenchmarkResult("gsm8k", 0.5, 2, 1))
    store.write_result(done, BenchmarkResult("mmlu", 0.25, 4, 1))
    store.finalize_run(done)
    store.finalize_run(open_)  # mmlu has no result: not in scores
    finalized = {r.run_id: r.finalized for r in scan_runs(tmp_path)}
    assert finalized == {done: True, open_: False}


def test_marks_are_validated() -> None:
    """high_water and low_water go together, low below high; the message names them."""
    with pytest.raises(ValueError, match="low_water"):
        RetentionSettings(high_water=0.5, low_water=0.6)
    with pytest.raises(ValueError, match="together"):
        RetentionSettings(high_water=0.5)
    assert not RetentionSettings().enabled


# -- the journal --------------------------------------------------------------------------


def test_journal_schema_2_is_upgraded_with_an_evictions_table(tmp_path: Path) -> None:
    """A schema-2 journal (no evictions table) opens read-only as it is, then is upgraded
    to 3 in place by the daemon's open, keeping its rows."""
    root = tmp_path / "root"
    root.mkdir()
    path = tmp_path / "j.sqlite3"
    with Journal(path, root) as j:
        j.set_destination_state("d", "healthy")
    con = sqlite3.connect(path)
    con.execute("DROP TABLE evictions")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    ro = Journal(path, root, readonly=True)
    assert ro.evictions() == {} and "d" in ro.destinations()
    ro.close()
    with Journal(path, root) as j:
        assert j.evictions() == {} and "d" in j.destinations()
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("3",)
    con.close()


# -- eviction over MemoryStorage ------------------------------------------------------------


@pytest.fixture
def buckets() -> Iterator[list[MemoryStorage]]:
    """Two in-memory destinations (their buckets dropped afterwards)."""
    names = [f"ret-{uuid.uuid4().hex}" for _ in range(2)]
    stores = [MemoryStorage(n, "evals/h1") for n in names]
    yield stores
    for n in names:
        drop_bucket(n)


def _write_run(store: EvalStore, name: str, n: int = 20, finalize: bool = True) -> str:
    run_id = store.create_run("m", ["gsm8k", "math"], run_id=name)
    for bench in ("gsm8k", "math"):
        for i in range(n):
            store.write_trajectory(
                run_id, bench, StoredTrajectory(idx=i, benchmark=bench, reward=float(i % 2))
            )
        store.write_result(
            run_id, BenchmarkResult(name=bench, score=0.5, num_examples=n, num_correct=n // 2)
        )
    if finalize:
        store.write_summary(run_id, {})
        store.finalize_run(run_id)
    return run_id


def _age(root: Path, run_id: str, seconds: float) -> None:
    """Date every file of a run ``seconds`` in the past."""
    t = time.time() - seconds
    for p in (root / "runs" / run_id).rglob("*"):
        os.utime(p, (t, t))
    os.utime(root / "runs" / run_id, (t, t))


def _snapshot(store: EvalStore, run_id: str) -> object:
    return (
        store.read_run(run_id),
        store.read_summary(run_id),
        store.list_benchmarks(run_id),
        [store.read_result(run_id, b) for b in ("gsm8k", "math")],
        [store.read_trajectories(run_id, b) for b in ("gsm8k", "math")],
        store.read_single_trajectory(run_id, "math", 7),
        store.read_trajectories(run_id, "gsm8k", correct_only=True),
    )


class Rig:
    """A root, a journal and destinations over MemoryStorage, driven pass by pass."""

    def __init__(self, tmp: Path, storages: list[MemoryStorage], lag: float = 0.0) -> None:
        self.root = tmp / "root"
        self.root.mkdir()
        self.store = EvalStore(self.root)
        self.storages = storages
        self.journal = Journal(tmp / "j.sqlite3", self.root)
        self.dests = [
            Destination(
                DestinationSettings.model_construct(  # type: ignore[call-arg]
                    name=f"d{i}",
                    url=s.url(),
                    max_main_lag_s=lag,
                    retry=RetrySettings(initial_backoff_s=0.01, max_backoff_s=0.02),
                ),
                s,
                self.journal,
                self.root,
                flush_interval_s=0.01,
            )
            for i, s in enumerate(storages)
        ]

    def mirrors(self) -> list[Mirror]:
        return [
            Mirror(
                d.name,
                d.storage,
                d.state.value,
                held=lambda d=d: (
                    set(d.pending_paths())  # type: ignore[misc]
                    | (set(d.tail.writer.index.files) if d.tail else set())
                ),
            )
            for d in self.dests
        ]

    def retention(self, usage: DiskUsage | None = None, **settings: object) -> Retention:
        s = RetentionSettings(**{"enabled": True, "min_age_s": 60.0, **settings})  # type: ignore[arg-type]
        if usage is None:
            return Retention(self.root, s, self.journal, self.mirrors)
        return Retention(self.root, s, self.journal, self.mirrors, usage=lambda _: usage)

    async def sync(self) -> None:
        for d in self.dests:
            for rel in (p.relative_to(self.root).as_posix() for p in self.root.rglob("*")):
                if (self.root / rel).is_file():
                    d.mark(rel)
            for _ in range(20):
                if d.caught_up:
                    break
                if d.tail is not None:
                    d.tail.drain_all()
                await d.run_pass()
            assert d.caught_up, d.last_error


def _local_files(root: Path, run_id: str) -> set[str]:
    return {
        p.relative_to(root).as_posix() for p in (root / "runs" / run_id).rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("lag", [0.0, 60.0], ids=["per file", "tail log"])
def test_a_safe_run_is_evicted_and_reads_fall_through_to_the_mirror(
    tmp_path: Path, buckets: list[MemoryStorage], lag: float
) -> None:
    """A finalized, quiet, mirrored run is evicted: its data files go, metadata.json,
    summary.json and runs.jsonl stay, a marker names the mirrors; every read through
    EvalStore(root, fallback=mirror) returns what it returned before; list_runs marks it;
    the checks cost one request per file per destination (a CRC32C metadata read)."""
    rig = Rig(tmp_path, buckets, lag)
    old = _write_run(rig.store, "old")
    young = _write_run(rig.store, "young")
    _age(rig.root, old, 2 * DAY)
    before = _snapshot(rig.store, old)

    async def scenario() -> None:
        await rig.sync()
        for s in buckets:
            s.faults.calls.clear()
        report = await rig.retention().round()
        assert [r.run_id for r in report.runs if r.evicted] == [old]

    asyncio.run(scenario())
    evicted = {
        f"runs/{old}/{b}/{n}"
        for b in ("gsm8k", "math")
        for n in ("result.json", "trajectories.jsonl")
    }
    for s in buckets:  # one metadata read per file, nothing downloaded
        assert s.faults.calls["checksum"] == len(evicted)
        assert s.faults.calls["read"] + s.faults.calls["read_range"] == 0
    assert _local_files(rig.root, old) == {
        f"runs/{old}/metadata.json",
        f"runs/{old}/summary.json",
        f"runs/{old}/{MARKER_NAME}",
    }
    assert (rig.root / "runs.jsonl").exists() and len(_local_files(rig.root, young)) == 6
    marker = parse_marker((rig.root / "runs" / old / MARKER_NAME).read_bytes(), "m")
    assert set(marker.files) == evicted and marker.mirrors == tuple(s.url() for s in buckets)
    assert rig.journal.evictions()[old].state == "evicted"
    reader = EvalStore(rig.root, fallback=MemoryStorage(buckets[1].bucket, buckets[1].prefix))
    assert _snapshot(reader, old) == before
    listed = {r.run_id: r.evicted for r in reader.list_runs()}
    assert listed == {old: True, young: False}
    with pytest.raises(FileNotFoundError, match=f"{old}.*restore"):
        rig.store.read_result(old, "gsm8k")  # no fallback: says where the run is
    with pytest.raises(RunEvictedError, match=f"{old}.*restore"):
        rig.store.write_trajectory(old, "math", StoredTrajectory(idx=99, benchmark="math"))
    rig.journal.close()


@pytest.mark.parametrize(
    "fault",
    ["parked", "tampered", "missing", "pending", "changed", "future", "reopened", "failing"],
)
def test_an_unsafe_run_is_kept_whole(
    tmp_path: Path, buckets: list[MemoryStorage], fault: str
) -> None:
    """Nothing of a run is deleted when any destination is not proven to hold every byte:
    a parked destination, an object tampered with or missing, work pending in the journal,
    a file changed since its upload, a clock stepped back, a run written to after its
    finalize, a destination failing its checks."""
    rig = Rig(tmp_path, buckets)
    run = _write_run(rig.store, "r")
    _age(rig.root, run, 2 * DAY)
    key = f"runs/{run}/math/trajectories.jsonl"

    async def scenario() -> None:
        await rig.sync()
        if fault == "parked":
            rig.dests[1].state = DestinationState.PARKED
        elif fault == "tampered":
            await buckets[1].awrite(key, b'{"idx": 0, "benchmark": "math"}\n')
        elif fault == "missing":
            await buckets[0].aremove(key)
        elif fault == "pending":
            rig.dests[0].mark(key)
        elif fault == "changed":  # appended by another tool, and dated back
            rig.store._append_jsonl({"idx": 100, "benchmark": "math"}, key)
            _age(rig.root, run, 2 * DAY)
        elif fault == "future":
            t = time.time() + DAY  # the clock was stepped back after the writes
            os.utime(rig.root / key, (t, t))
        elif fault == "reopened":
            rig.store.write_trajectory(run, "math", StoredTrajectory(idx=100, benchmark="math"))
        elif fault == "failing":
            buckets[1].faults.fail("checksum", times=100, error=TransientStorageError)
        report = await rig.retention().round()
        assert not any(r.evicted for r in report.runs)
        assert report.oldest_kept is not None and report.oldest_kept.blocker

    before = {p: (rig.root / p).read_bytes() for p in _local_files(rig.root, run)}
    asyncio.run(scenario())
    after = {p: (rig.root / p).read_bytes() for p in _local_files(rig.root, run)}
    assert set(after) == set(before) and MARKER_NAME not in str(after.keys())
    assert rig.journal.evictions() == {}
    rig.journal.close()


def test_space_high_water_keeps_a_filling_disk_below_the_mark(
    tmp_path: Path, buckets: list[MemoryStorage]
) -> None:
    """A writer keeps adding runs to a disk of injected size: after each round the used
    share is below the high-water mark (the destinations being healthy), oldest first."""
    rig = Rig(tmp_path, buckets[:1])
    total = 200_000

    def used() -> int:
        return sum(p.stat().st_size for p in rig.root.rglob("*") if p.is_file())

    shares = []

    async def scenario() -> None:
        for i in range(8):
            run = _write_run(rig.store, f"run{i}", n=40)
            _age(rig.root, run, DAY - i)  # older runs first
            await rig.sync()
            ret = rig.retention(
                DiskUsage(total, used()), high_water=0.4, low_water=0.25, min_age_s=60.0
            )
            await ret.round()
            shares.append(used() / total)

    asyncio.run(scenario())
    assert max(shares) < 0.4, shares
    evicted = sorted(rig.journal.evictions())
    assert evicted and evicted == [f"run{i}" for i in range(len(evicted))]  # oldest first
    rig.journal.close()


@pytest.mark.parametrize("deleted", [0, 1, 4])
def test_an_interrupted_eviction_is_finished_or_rolled_back(
    tmp_path: Path, buckets: list[MemoryStorage], deleted: int
) -> None:
    """A crash after the intent: with no file deleted yet the run is rolled back whole
    (rows back, marker gone, as quiet as before); with some deleted it is finished and recorded as evicted,
    never half-gone and unrecorded."""
    rig = Rig(tmp_path, buckets)
    run = _write_run(rig.store, "r")
    _age(rig.root, run, 2 * DAY)

    async def prove_only() -> list[tuple[str, int, int]]:
        await rig.sync()
        from evalsyncd.sync.retention import prove

        (r,) = scan_runs(rig.root)
        proof, why = await prove(rig.root, r, rig.mirrors())
        assert proof is not None, why
        return proof

    proof = asyncio.run(prove_only())
    rows_before = rig.journal.entries("d0")
    rig.journal.begin_eviction(run, proof, "test", time.time())
    (rig.root / "runs" / run / MARKER_NAME).write_text(
        '{"run_id": "r", "evicted_at": 0, "mirrors": []}'
    )
    for p, _, _ in proof[:deleted]:
        os.unlink(rig.root / p)
    cut_short = rig.root / "runs" / run / ".evicted.999.tmp"  # a marker write cut short
    cut_short.write_text("{")
    recover(rig.root, rig.journal, [s.url() for s in buckets])
    assert not cut_short.exists()
    ev = rig.journal.evictions()
    if deleted == 0:
        assert ev == {} and rig.journal.entries("d0") == rows_before
        assert not (rig.root / "runs" / run / MARKER_NAME).exists()
        assert len(_local_files(rig.root, run)) == 6
        # the marker written and removed: the run is as quiet as before, still eligible
        (r,) = scan_runs(rig.root)
        assert r.view(time.time()).quiet_s > DAY
    else:
        assert ev[run].state == "evicted"
        assert (rig.root / "runs" / run / MARKER_NAME).exists()
        assert len(_local_files(rig.root, run)) == 3
    rig.journal.close()


def test_restore_brings_an_evicted_run_back_byte_for_byte(
    tmp_path: Path, buckets: list[MemoryStorage]
) -> None:
    """restore writes the evicted files back, removes the marker; writes work again and
    the next round forgets the eviction."""
    rig = Rig(tmp_path, buckets)
    run = _write_run(rig.store, "r")
    _age(rig.root, run, 2 * DAY)
    before = {p: (rig.root / p).read_bytes() for p in _local_files(rig.root, run)}

    async def evict() -> None:
        await rig.sync()
        report = await rig.retention().round()
        assert report.runs[0].evicted

    asyncio.run(evict())
    result = restore_run(
        EvalStore(MemoryStorage(buckets[0].bucket, buckets[0].prefix)), run, rig.root
    )
    assert len(result.files) == 6
    after = {p: (rig.root / p).read_bytes() for p in _local_files(rig.root, run)}
    assert after == before
    rig.store.write_trajectory(run, "math", StoredTrajectory(idx=100, benchmark="math"))
    asyncio.run(rig.retention().round())
    assert rig.journal.evictions() == {}
    rig.journal.close()


def test_cli_evict_dry_run_status_and_evict_on_a_local_mirror(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evict --dry-run` lists what would go and why and deletes nothing; `status` shows the
    bytes held, evictable and evicted and why the oldest run is kept; `evict` evicts (a
    local mirror: compared by download); the mirror then answers the reads."""
    from evalsyncd.cli import main
    from evalsyncd.storage import LocalStorage
    from tests.daemon import write_config

    root, mirror = tmp_path / "root", tmp_path / "mirror"
    root.mkdir()
    store = EvalStore(root)
    old, young = _write_run(store, "old"), _write_run(store, "young")
    _age(root, old, 2 * DAY)
    cfg = write_config(
        tmp_path / "c.toml",
        root,
        tmp_path / "state",
        [{"name": "nfs", "url": mirror.as_uri()}],
        **{"retention.enabled": True, "retention.min_age_s": 3600.0},
    )
    assert main(["sync", "--once", "--config", str(cfg)]) == 0
    before = _snapshot(store, old)
    capsys.readouterr()
    assert main(["evict", "--dry-run", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"would evict {old}" in out and f"kept {young}: 5.9 KiB: quiet 0 s" in out
    assert len(_local_files(root, old)) == 6
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "retention:" in out and "0 B evicted" in out
    assert f"oldest finalized run kept: {old}: safe by the journal: evicted by the next" in out
    assert main(["evict", "--config", str(cfg)]) == 0
    assert f"evicted {old}" in capsys.readouterr().out
    assert len(_local_files(root, old)) == 3
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "(1 runs)" in out and f"oldest finalized run kept: {young}: quiet 0 s" in out
    assert _snapshot(EvalStore(root, fallback=LocalStorage(mirror)), old) == before
    assert _snapshot(EvalStore(root, fallback=mirror.as_uri()), old) == before  # a URL


def test_reads_of_evicted_runs_cost_few_requests(
    tmp_path: Path, buckets: list[MemoryStorage]
) -> None:
    """list_runs of 300 runs (100 evicted) and read_run/read_summary of an evicted run cost
    no request to the mirror (metadata.json and summary.json stay on disk); read_result
    costs one read of the object (and, at first use, one listing per prefix level that
    may hold the tail log, kept for a while)."""
    from evalsyncd.evicted import EvictionMarker, build_marker

    root = tmp_path / "root"
    store = EvalStore(root)
    mirror = buckets[0]
    for r in range(300):
        run_id = store.create_run("m", ["b"], run_id=f"r{r:03d}")
        store.write_result(run_id, BenchmarkResult("b", 1.0, 1, 1))
        store.write_summary(run_id, {})
        if r % 3 == 0:  # evicted: the result lives in the mirror only
            key = f"runs/{run_id}/b/result.json"
            mirror.write(key, (root / key).read_bytes())
            (root / key).unlink()
            marker = EvictionMarker(run_id, 0.0, (mirror.url(),), (key,), 1)
            (root / "runs" / run_id / MARKER_NAME).write_bytes(build_marker(marker))
    fallback = MemoryStorage(mirror.bucket, mirror.prefix)
    reader = EvalStore(root, fallback=fallback)
    mirror.faults.calls.clear()
    runs = reader.list_runs()
    assert len(runs) == 300 and sum(r.evicted for r in runs) == 100
    assert reader.read_run("r000").run_id == "r000" and reader.read_summary("r000") == {}
    assert sum(mirror.faults.calls.values()) == 0
    assert reader.read_result("r000", "b") == BenchmarkResult("b", 1.0, 1, 1)
    # the object, plus at first use one listing per prefix level that may hold the tail
    # log: the mirror's prefix and those above it (a reader may sit below a destination),
    # never the store's runs/ (storage/_tailfind.py); this mirror has none
    calls = mirror.faults.calls
    levels = fallback.prefix.count("/") + 2  # "evals/h1", "evals", ""
    assert calls["read"] + calls["read_range"] == 1
    assert calls["list_keys"] == levels and sum(calls.values()) == 1 + levels, dict(calls)
    # the levels' answers are kept: the next evicted run costs its object alone
    calls.clear()
    assert reader.read_result("r003", "b") == BenchmarkResult("b", 1.0, 1, 1)
    assert sum(calls.values()) == 1


class Crash(BaseException):
    """A simulated kill -9 in the middle of an eviction."""


@pytest.mark.parametrize("seed", range(6))
def test_adversarial_schedule_never_loses_a_run(
    tmp_path: Path, buckets: list[MemoryStorage], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seeded schedule of writes, runs reopened after finalize, syncs through failing
    destinations and lost answers, objects tampered with, parked destinations, a clock
    stepped back, and crashes at random points of an eviction (then recovery): after every
    step each run's bytes are on disk, or the run is marked evicted and every destination
    holds each missing file as a plain object equal to the bytes written."""
    import random

    from evalsyncd.sync import retention as ret

    rng = random.Random(seed)
    rig = Rig(tmp_path, buckets, lag=60.0 if seed % 2 else 0.0)
    model: dict[str, bytes] = {}  # every file written, its last bytes
    runs: list[str] = []
    unlinks = {"left": -1}
    real_unlink = os.unlink

    def unlink(path: object, *args: object, **kwargs: object) -> None:
        if unlinks["left"] == 0:
            raise Crash
        unlinks["left"] -= 1
        real_unlink(path)  # type: ignore[arg-type]

    monkeypatch.setattr(ret.os, "unlink", unlink)

    def record(run_id: str) -> None:
        for p in (rig.root / "runs" / run_id).rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                model[p.relative_to(rig.root).as_posix()] = p.read_bytes()

    async def check() -> None:
        plain = [MemoryStorage(s.bucket, s.prefix) for s in buckets]
        for s in plain:
            s.read_tail = False
        for path, data in model.items():
            run_dir = rig.root / "/".join(path.split("/")[:2])
            local = rig.root / path
            if local.exists():
                assert local.read_bytes() == data, path
                continue
            assert (run_dir / MARKER_NAME).exists(), f"{path} gone, run not marked evicted"
            for s in plain:
                assert await s.aread(path) == data, f"{s.url()}: {path}"

    async def step() -> None:
        what = rng.choice(
            ["new", "new", "reopen", "sync", "sync", "faulty sync", "tamper", "age", "round",
             "round", "parked round", "clock back round", "crash round"]
        )  # fmt: skip
        if what == "new" or not runs:
            run_id = _write_run(rig.store, f"run{len(runs)}", n=rng.randrange(1, 30),
                                finalize=rng.random() < 0.8)  # fmt: skip
            runs.append(run_id)
            record(run_id)
        elif what == "reopen":
            run_id = rng.choice(runs)
            with contextlib.suppress(RunEvictedError):
                rig.store.write_trajectory(
                    run_id, "math", StoredTrajectory(idx=999, benchmark="math")
                )
                record(run_id)
        elif what in ("sync", "faulty sync"):
            if what == "faulty sync":
                s = rng.choice(buckets)
                op = rng.choice(["write", "append", "internal_create", "checksum"])
                s.faults.fail(op, times=rng.randrange(1, 4), lost_response=rng.random() < 0.5)
            with contextlib.suppress(AssertionError):
                await rig.sync()
        elif what == "tamper":
            run_id = rng.choice(runs)
            key = f"runs/{run_id}/gsm8k/trajectories.jsonl"
            if (rig.root / key).exists() and not (
                rig.root / "runs" / run_id / MARKER_NAME
            ).exists():
                with contextlib.suppress(TransientStorageError):  # a fault still scripted
                    await rng.choice(buckets).awrite(key, b'{"idx": 0, "benchmark": "x"}\n')
        elif what == "age":
            for run_id in runs:
                if not (rig.root / "runs" / run_id / MARKER_NAME).exists():
                    _age(rig.root, run_id, rng.uniform(0, 2 * DAY))
        else:
            r = rig.retention()
            if what == "parked round":
                rig.dests[0].state = DestinationState.PARKED
            if what == "clock back round":
                r.clock = lambda: time.time() - 3 * DAY
            if what == "crash round":
                unlinks["left"] = rng.randrange(0, 4)
            try:
                await r.round()
            except Crash:
                unlinks["left"] = -1
                recover(rig.root, rig.journal, [s.url() for s in buckets])  # the restart
            finally:
                unlinks["left"] = -1
                rig.dests[0].state = DestinationState.HEALTHY

    async def scenario() -> None:
        for _ in range(40):
            await step()
            await check()

    asyncio.run(scenario())
    rig.journal.close()


def test_runs_show_reads_an_evicted_run_from_the_mirror_named_by_its_marker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evalsyncd runs show ROOT RUN` on an evicted run answers as before the eviction,
    reading the rest from the mirror (the configuration's first destination, or without
    --config the URL in the run's marker)."""
    from evalsyncd.cli import main
    from tests.daemon import write_config

    root = tmp_path / "root"
    root.mkdir()
    run = _write_run(EvalStore(root), "old")
    _age(root, run, 2 * DAY)
    cfg = write_config(
        tmp_path / "c.toml",
        root,
        tmp_path / "state",
        [{"name": "nfs", "url": (tmp_path / "mirror").as_uri()}],
        **{"retention.enabled": True, "retention.min_age_s": 3600.0},
    )
    assert main(["sync", "--once", "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["runs", "show", "--json", str(root), run]) == 0
    before = capsys.readouterr().out
    assert main(["evict", "--config", str(cfg)]) == 0
    assert len(_local_files(root, run)) == 3
    capsys.readouterr()
    for extra in (["--config", str(cfg)], []):
        assert main(["runs", "show", "--json", str(root), run, *extra]) == 0
        assert capsys.readouterr().out == before


def test_retention_metrics_render_the_last_round() -> None:
    """The retention gauges carry the last round's bytes held, evictable and evicted, and
    the oldest kept run's quiet time; none before the first round."""
    from evalsyncd.metrics import _retention_families
    from evalsyncd.sync.retention import RoundReport, RunReport

    assert list(_retention_families(None)) == []
    report = RoundReport(local_bytes=10, evictable_bytes=4, evicted_bytes=7, evicted_runs=2)
    report.oldest_kept = RunReport("r", 4, True, 90.0, blocker="why")
    got = {m.name: m.samples[0].value for m in _retention_families(report)}
    assert got == {
        "evalsyncd_retention_local_bytes": 10,
        "evalsyncd_retention_evictable_bytes": 4,
        "evalsyncd_retention_evicted_bytes": 7,
        "evalsyncd_retention_evicted_runs": 2,
        "evalsyncd_retention_oldest_kept_seconds": 90.0,
    }


def test_eviction_never_unlinks_through_a_symlink_swapped_in_after_the_proof(
    tmp_path: Path,
) -> None:
    """A benchmark directory (or a run directory) swapped for a symlink between the proof
    and the deletion: the files outside the root, with the same names, stay; the files
    of the root reachable without a symlink go."""
    root = tmp_path / "root"
    (root / "runs/r/gsm8k").mkdir(parents=True)
    (root / "runs/r/gsm8k/trajectories.jsonl").write_bytes(b"x\n")
    (root / "runs/r/result.json").write_bytes(b"{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "trajectories.jsonl").write_bytes(b"someone else's\n")
    os.rename(root / "runs/r/gsm8k", tmp_path / "aside")
    (root / "runs/r/gsm8k").symlink_to(outside)
    _delete_files(root, "r", ["runs/r/gsm8k/trajectories.jsonl", "runs/r/result.json"])
    assert (outside / "trajectories.jsonl").read_bytes() == b"someone else's\n"
    assert not (root / "runs/r/result.json").exists()
