"""Behaviour of ``evalsyncd.store.EvalStore`` on every backend (local, S3, GCS).

Each test taking ``storage`` runs once per backend against the real servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import evalsyncd
import evalsyncd.store as store_module
from evalsyncd.errors import StorageError, TransientStorageError
from evalsyncd.storage import AnyStorage, GCSStorage, LocalStorage, S3Storage, StorageStat
from evalsyncd.store import (
    BenchmarkResult,
    EvalStore,
    RunMetadata,
    StoredTrajectory,
    StoredTurn,
)

S3_SHORT_TIMEOUTS: dict[str, Any] = {
    "connect_timeout_s": 1.0,
    "read_timeout_s": 2.0,
    "max_attempts": 1,
}

BAD_NAMES = ["", "a/b", "/abs", ".", "..", "a\\b", "nul\x00"]


def traj(
    idx: int, reward: float = 0.0, error: str | None = None, bench: str = "gsm8k"
) -> StoredTrajectory:
    return StoredTrajectory(
        idx=idx,
        benchmark=bench,
        example_id=f"ex-{idx}",
        turns=[
            StoredTurn(role="user", content=f"q{idx} ☃"),
            StoredTurn(role="assistant", content="a"),
        ],
        reward=reward,
        metrics={"correct": float(reward > 0)},
        error=error,
        time_seconds=0.5,
    )


def walk(storage: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    for name in storage.list_dir(prefix):
        path = f"{prefix}/{name}" if prefix else name
        out.extend([path] if storage.exists(path) else walk(storage, path))
    return out


@pytest.fixture
def store(storage: AnyStorage) -> EvalStore:
    """An EvalStore on each backend in turn."""
    return EvalStore(storage)


@contextlib.contextmanager
def clock_at(monkeypatch: pytest.MonkeyPatch, when: datetime) -> Iterator[None]:
    with monkeypatch.context() as m:
        m.setattr(store_module, "_now", lambda: when)
        yield


# ── API ────────────────────────────────────────────────────────────────────────


def test_reexported_from_package() -> None:
    """The store's public names are re-exported from ``evalsyncd`` and listed in ``__all__``."""
    for name in ("EvalStore", "RunMetadata", "BenchmarkResult", "StoredTrajectory", "StoredTurn"):
        assert getattr(evalsyncd, name) is getattr(store_module, name)
        assert name in evalsyncd.__all__
    assert set(store_module.__all__) <= {n for n in dir(store_module) if not n.startswith("_")}


def test_create_run_writes_metadata_and_index(store: EvalStore, storage: AnyStorage) -> None:
    """create_run writes metadata.json and one runs.jsonl line; generated ids have the reference format."""
    run_id = store.create_run(
        "m", ["gsm8k"], checkpoint_path="/ck", checkpoint_name="step7", config={"t": 1}
    )
    assert re.fullmatch(r"step7_\d{8}_\d{6}_[0-9a-f]{6}", run_id)
    meta = store.read_run(run_id)
    assert meta == RunMetadata(run_id, "m", "/ck", "step7", ["gsm8k"], meta.timestamp, {"t": 1}, {})
    datetime.fromisoformat(meta.timestamp)
    index = [json.loads(line) for line in storage.read("runs.jsonl").splitlines()]
    assert index == [
        {"run_id": run_id, "timestamp": meta.timestamp, "model": "m", "checkpoint": "step7"}
    ]
    assert (
        storage.read(f"runs/{run_id}/metadata.json")
        == json.dumps(meta.to_dict(), indent=2).encode()
    )
    assert re.fullmatch(r"base_\d{8}_\d{6}_[0-9a-f]{6}", store.create_run("m", []))
    assert store.create_run("m", [], run_id="mine") == "mine"


def test_results_trajectories_summary_round_trip(store: EvalStore) -> None:
    """Results, trajectories (with each filter), single lookups and summaries read back as written."""
    run_id = store.create_run("m", ["gsm8k", "math"], run_id="r1")
    trajs = [traj(0, 1.0), traj(1, 0.0), traj(2, 0.0, "boom"), traj(3, 0.5)]
    for t in trajs:
        store.write_trajectory(run_id, "gsm8k", t)
    result = BenchmarkResult("gsm8k", 0.5, 4, 2, num_errors=1, pass_at_k={1: 0.5, 10: 0.9})
    store.write_result(run_id, result)
    store.write_summary(run_id, {"gsm8k": result})

    assert store.read_result(run_id, "gsm8k") == result
    assert store.read_result(run_id, "gsm8k").pass_at_k == {1: 0.5, 10: 0.9}  # type: ignore[union-attr]
    assert store.read_trajectories(run_id, "gsm8k") == trajs
    assert [t.idx for t in store.read_trajectories(run_id, "gsm8k", correct_only=True)] == [0, 3]
    assert [t.idx for t in store.read_trajectories(run_id, "gsm8k", incorrect_only=True)] == [1]
    assert [t.idx for t in store.read_trajectories(run_id, "gsm8k", errors_only=True)] == [2]
    assert list(store.iter_trajectories(run_id, "gsm8k")) == trajs
    assert store.read_single_trajectory(run_id, "gsm8k", 2) == trajs[2]
    assert store.read_single_trajectory(run_id, "gsm8k", 42) is None
    assert store.read_summary(run_id) == {
        "gsm8k": {"score": 0.5, "num_examples": 4, "num_correct": 2, "num_errors": 1}
    }
    store.write_trajectory(run_id, "math", traj(0, bench="math"))  # trajectories only: not listed
    assert store.list_benchmarks(run_id) == ["gsm8k"]


def test_missing_things_read_as_missing(store: EvalStore) -> None:
    """Missing runs raise FileNotFoundError; missing results, trajectories and summaries are empty."""
    with pytest.raises(FileNotFoundError):
        store.read_run("nope")
    with pytest.raises(FileNotFoundError):
        store.finalize_run("nope")
    assert store.list_runs() == []
    assert store.list_benchmarks("nope") == []
    assert store.read_result("nope", "gsm8k") is None
    assert store.read_trajectories("nope", "gsm8k") == []
    assert store.read_single_trajectory("nope", "gsm8k", 0) is None
    assert store.read_summary("nope") is None


def test_finalize_run_collects_scores(store: EvalStore) -> None:
    """finalize_run copies each benchmark's score into metadata.json and returns the metadata."""
    run_id = store.create_run("m", ["gsm8k", "math", "absent"], run_id="r")
    store.write_result(run_id, BenchmarkResult("gsm8k", 0.25, 4, 1))
    store.write_result(run_id, BenchmarkResult("math", 1.0, 1, 1))
    meta = store.finalize_run(run_id)
    assert meta.scores == {"gsm8k": 0.25, "math": 1.0}
    assert store.read_run(run_id) == meta
    assert store.list_runs() == [meta]


def test_delete_run_is_idempotent(store: EvalStore, storage: AnyStorage) -> None:
    """delete_run removes the run's files (twice is fine); runs.jsonl keeps its line."""
    keep = store.create_run("m", ["gsm8k"], run_id="keep")
    gone = store.create_run("m", ["gsm8k"], run_id="gone")
    for run_id in (keep, gone):
        store.write_trajectory(run_id, "gsm8k", traj(0))
        store.write_result(run_id, BenchmarkResult("gsm8k", 0.0, 1, 0))
        store.write_summary(run_id, {})
    store.delete_run(gone)
    store.delete_run(gone)
    store.delete_run("never-existed")
    assert [r.run_id for r in store.list_runs()] == ["keep"]
    assert not [p for p in walk(storage) if p.startswith("runs/gone")]
    assert len(storage.read("runs.jsonl").splitlines()) == 2
    with pytest.raises(FileNotFoundError):
        store.read_run(gone)


def test_list_runs_most_recent_first(store: EvalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """list_runs orders by creation timestamp, newest first, whatever the run ids sort to."""
    for run_id, day in [("zzz", 1), ("aaa", 3), ("mmm", 2)]:
        with clock_at(monkeypatch, datetime(2024, 1, day, 12)):
            store.create_run("m", [], run_id=run_id)
    assert [r.run_id for r in store.list_runs()] == ["aaa", "mmm", "zzz"]


def test_url_and_run_dir(storage: AnyStorage) -> None:
    """url() names paths inside the prefix; run_dir() is a local path, and a clear error on cloud."""
    store = EvalStore(storage, prefix="evals/x")
    assert store.url("runs.jsonl") == storage.url("evals/x/runs.jsonl")
    run_id = store.create_run("m", [], run_id="r")
    assert storage.exists("evals/x/runs/r/metadata.json")
    if isinstance(storage, LocalStorage):
        assert Path(store.run_dir(run_id)) == storage.root / "evals/x/runs/r"
    else:
        with pytest.raises(RuntimeError, match="local storage"):
            store.run_dir(run_id)


def test_str_and_path_mean_local_storage(tmp_path: Path) -> None:
    """EvalStore(str) and EvalStore(Path) use a LocalStorage rooted there (created if missing)."""
    for root in (str(tmp_path / "a"), tmp_path / "b"):
        store = EvalStore(root)
        assert isinstance(store.storage, LocalStorage)
        assert store.storage.root == Path(root)
        store.create_run("m", [], run_id="r")
        assert (Path(root) / "runs/r/metadata.json").is_file()


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_refused_before_any_write(
    store: EvalStore, storage: AnyStorage, bad: str
) -> None:
    """Empty names, '/', '\\', NUL, '.' and '..' raise ValueError and nothing is written."""
    calls = [
        lambda: store.create_run("m", [], run_id=bad),
        lambda: store.create_run("m", [bad], run_id="ok"),
        lambda: store.create_run("m", [], checkpoint_name="a/b"),
        lambda: store.write_result(bad, BenchmarkResult("gsm8k", 0, 0, 0)),
        lambda: store.write_result("ok", BenchmarkResult(bad, 0, 0, 0)),
        lambda: store.write_trajectory(bad, "gsm8k", traj(0)),
        lambda: store.write_trajectory("ok", bad, traj(0)),
        lambda: store.write_summary(bad, {}),
        lambda: store.delete_run(bad),
        lambda: store.read_run(bad),
        lambda: store.read_result("ok", bad),
        lambda: store.iter_trajectories(bad, "gsm8k"),
        lambda: store.read_trajectories("ok", bad),
        lambda: store.aiter_trajectories("ok", bad),
        lambda: store.list_benchmarks(bad),
        lambda: store.finalize_run(bad),
        lambda: store.run_dir(bad),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert walk(storage) == []


def test_models_to_from_dict() -> None:
    """Models use the reference fields and defaults; from_dict ignores unknown fields; pass_at_k keys are str in JSON."""
    r = BenchmarkResult.from_dict(
        {"name": "b", "score": 0.5, "num_examples": 10, "num_correct": 4, "num_errors": 1,
         "num_truncated": 1, "pass_at_k": {"1": 0.4}, "future_field": 1}
    )  # fmt: skip
    assert r.pass_at_k == {1: 0.4}
    assert r.to_dict()["pass_at_k"] == {"1": 0.4}
    assert r.num_completed == 8 and r.score_completed == 0.5
    assert BenchmarkResult("b", 0, 0, 0).score_completed == 0.0
    assert BenchmarkResult("b", 0, 0, 0).to_dict() == {
        "name": "b", "score": 0, "num_examples": 0, "num_correct": 0, "num_errors": 0,
        "num_truncated": 0, "metrics": {}, "time_seconds": 0.0, "pass_at_k": {},
    }  # fmt: skip
    t = StoredTrajectory.from_dict(
        {"idx": 3, "benchmark": "b", "turns": [{"role": "user", "content": "x"}], "new": 1}
    )
    assert t == StoredTrajectory(3, "b", turns=[StoredTurn("user", "x", 0, {})])
    assert list(t.to_dict()) == [
        "idx", "benchmark", "example_id", "turns", "reward", "metrics", "logs", "error", "time_seconds"
    ]  # fmt: skip
    m = RunMetadata.from_dict(
        {"run_id": "r", "model_name": "m", "checkpoint_path": None, "checkpoint_name": None,
         "benchmarks": [], "timestamp": "t", "extra": True}
    )  # fmt: skip
    assert m.config == {} and m.scores == {}
    assert RunMetadata.from_dict(m.to_dict()) == m


def test_async_twins_match_sync(store: EvalStore, storage: AnyStorage) -> None:
    """alist_runs, aread_result, aread_trajectories and aiter_trajectories answer like their sync twins."""
    run_id = store.create_run("m", ["gsm8k"], run_id="r")
    for i in range(5):
        store.write_trajectory(run_id, "gsm8k", traj(i, float(i % 2)))
    store.write_result(run_id, BenchmarkResult("gsm8k", 0.4, 5, 2, pass_at_k={2: 0.5}))

    async def main() -> tuple[Any, ...]:
        try:
            runs = await store.alist_runs()
            result = await store.aread_result(run_id, "gsm8k")
            missing = await store.aread_result(run_id, "nope")
            correct = await store.aread_trajectories(run_id, "gsm8k", correct_only=True)
            streamed = [t async for t in store.aiter_trajectories(run_id, "gsm8k")]
            return runs, result, missing, correct, streamed
        finally:
            await storage.aclose()

    runs, result, missing, correct, streamed = asyncio.run(main())
    assert runs == store.list_runs()
    assert result == store.read_result(run_id, "gsm8k")
    assert missing is None
    assert correct == store.read_trajectories(run_id, "gsm8k", correct_only=True)
    assert streamed == store.read_trajectories(run_id, "gsm8k")


def test_sync_list_runs_inside_event_loop_refers_to_async(
    cloud_env: dict[str, str], s3_storage: Any
) -> None:
    """On cloud storage, the sync list_runs called inside a running loop fails clearly (use alist_runs)."""
    store = EvalStore(s3_storage)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="await"):
            store.list_runs()

    asyncio.run(main())


# ── Bad input ────────────────────────────────────────────────────────────────────


def _line(i: int, reward: float = 0.0) -> bytes:
    return (json.dumps(traj(i, reward).to_dict()) + "\n").encode()


TRAJ = "runs/r/gsm8k/trajectories.jsonl"


@pytest.mark.parametrize("chunk_size", [7, 1 << 20])
def test_malformed_blank_crlf_and_truncated_lines(
    storage: AnyStorage, caplog: pytest.LogCaptureFixture, chunk_size: int
) -> None:
    """Bad JSON lines are skipped with a warning naming file and line; blanks, CRLF and a partial last line are handled."""
    data = b"".join(
        [
            _line(0),
            b"\n",  # 2: blank
            b"   \t \n",  # 3: whitespace
            b'{"idx": 1, "benchmark": \n',  # 4: malformed
            _line(2).replace(b"\n", b"\r\n"),  # 5: CRLF
            b"[1, 2]\n",  # 6: not an object
            b'{"benchmark": "gsm8k"}\n',  # 7: no idx
            _line(3),  # 8
            _line(4)[:-10],  # partial last line: a writer mid-append
        ]
    )
    storage.write(TRAJ, data)
    store = EvalStore(storage, chunk_size=chunk_size)
    with caplog.at_level(logging.WARNING, logger="evalsyncd.store"):
        assert [t.idx for t in store.read_trajectories("r", "gsm8k")] == [0, 2, 3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings
    for lineno, message in zip((4, 6, 7), warnings, strict=True):
        assert storage.url(TRAJ) in message and f"line {lineno}:" in message
    storage.append(TRAJ, _line(4)[-10:])  # the writer finishes the line
    assert [t.idx for t in store.read_trajectories("r", "gsm8k")] == [0, 2, 3, 4]


def test_non_utf8_bytes_policy(storage: AnyStorage, caplog: pytest.LogCaptureFixture) -> None:
    """Invalid UTF-8 is replaced by U+FFFD (with a warning); a line it breaks is skipped; nothing crashes."""
    good = json.dumps(traj(0).to_dict()).encode()
    in_string = good.replace(b'"ex-0"', b'"ex-\xff\xfe0"') + b"\n"
    outside = b'{"idx": 1, \xff "benchmark": "gsm8k"}\n'
    storage.write(TRAJ, in_string + outside + _line(2))
    with caplog.at_level(logging.WARNING, logger="evalsyncd.store"):
        got = EvalStore(storage).read_trajectories("r", "gsm8k")
    assert [t.idx for t in got] == [0, 2]
    assert got[0].example_id == "ex-\ufffd\ufffd0"
    messages = [r.getMessage() for r in caplog.records]
    assert any("line 1: invalid UTF-8" in m for m in messages)
    assert any("line 2: invalid UTF-8" in m for m in messages)
    assert any("line 2: skipping malformed JSON" in m for m in messages)


def test_unparseable_json_files_read_as_missing(
    storage: AnyStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """A result.json, summary.json or metadata.json that does not parse reads as None/absent, with a warning."""
    store = EvalStore(storage)
    store.create_run("m", ["a", "b", "c"], run_id="good")
    storage.write("runs/good/a/result.json", b'{"name": "a", "score": ')
    storage.write("runs/good/b/result.json", b'{"score": 1.0}')  # valid JSON, missing fields
    storage.write("runs/good/c/result.json", b"\xff\xfe")
    storage.write("runs/good/summary.json", b"[1, 2]")
    storage.write("runs/bad/metadata.json", b"{not json")
    storage.write("runs/partial/metadata.json", b'{"run_id": "partial"}')
    with caplog.at_level(logging.WARNING, logger="evalsyncd.store"):
        assert store.read_result("good", "a") is None
        assert store.read_result("good", "b") is None
        assert store.read_result("good", "c") is None
        assert store.read_summary("good") is None
        assert [r.run_id for r in store.list_runs()] == ["good"]
        # As the reference: the score of any result.json that parses as a JSON object.
        assert store.finalize_run("good").scores == {"b": 1.0}
    text = caplog.text
    for path in ("runs/good/a/result.json", "runs/good/b/result.json", "runs/bad/metadata.json",
                 "runs/partial/metadata.json"):  # fmt: skip
        assert storage.url(path) in text


def test_stray_files_in_runs_are_ignored(storage: AnyStorage) -> None:
    """A file directly under runs/ (not a run directory) neither crashes list_runs nor shows up."""
    store = EvalStore(storage)
    store.create_run("m", [], run_id="r")
    storage.write("runs/README", b"hello")
    assert [r.run_id for r in store.list_runs()] == ["r"]
    assert [r.run_id for r in asyncio.run(_alist_and_close(store, storage))] == ["r"]


async def _alist_and_close(store: EvalStore, storage: Any) -> list[RunMetadata]:
    try:
        return await store.alist_runs()
    finally:
        await storage.aclose()


# ── Streaming ──────────────────────────────────────────────────────────────────


class CountingStorage:
    """A real storage, plus a record of ranged reads (and optional delay and failure injection)."""

    def __init__(self, inner: Any, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.ranges: list[tuple[int, int | None]] = []
        self.full_reads = 0
        self.bounded_reads = 0  # ranged reads from offset 0 with a length (JSON files)
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def url(self, path: str = "") -> str:
        return str(self.inner.url(path))

    @contextlib.contextmanager
    def _track(self, whole: bool = True) -> Iterator[None]:
        with self._lock:
            self.in_flight += 1
            if whole:
                self.full_reads += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def read(self, path: str) -> bytes:
        with self._track():
            time.sleep(self.delay_s)
            return bytes(self.inner.read(path))

    async def aread(self, path: str) -> bytes:
        with self._track():
            await asyncio.sleep(self.delay_s)
            return bytes(await self.inner.aread(path))

    def read_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        if path.endswith(".json"):  # a bounded read of a whole JSON file
            with self._track(whole=False):
                self.bounded_reads += 1
                time.sleep(self.delay_s)
                return bytes(self.inner.read_range(path, offset, length))
        self.ranges.append((offset, length))
        return bytes(self.inner.read_range(path, offset, length))

    async def aread_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        if path.endswith(".json"):  # a bounded read of a whole JSON file
            with self._track(whole=False):
                self.bounded_reads += 1
                await asyncio.sleep(self.delay_s)
                return bytes(await self.inner.aread_range(path, offset, length))
        self.ranges.append((offset, length))
        return bytes(await self.inner.aread_range(path, offset, length))


class SyncOnlyStorage:
    """Only the sync ``Storage`` methods of a real storage (no ``a*``), with a delay per read."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self.counting = CountingStorage(inner, delay_s)

    def url(self, path: str = "") -> str:
        return self.counting.url(path)

    def read(self, path: str) -> bytes:
        return self.counting.read(path)

    def list_dir(self, prefix: str) -> list[str]:
        return list(self.counting.inner.list_dir(prefix))

    def exists(self, path: str) -> bool:
        return bool(self.counting.inner.exists(path))

    def stat(self, path: str) -> StorageStat | None:
        return self.counting.inner.stat(path)  # type: ignore[no-any-return]

    def read_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        return self.counting.read_range(path, offset, length)


def test_iter_trajectories_streams_in_bounded_chunks(storage: AnyStorage) -> None:
    """iter_trajectories reads chunk_size ranges lazily: memory and I/O do not follow the file size."""
    payload = b"".join(_line(i) for i in range(300))
    storage.write(TRAJ, payload)
    counting = CountingStorage(storage)
    store = EvalStore(counting, chunk_size=4096)  # type: ignore[arg-type]
    it = store.iter_trajectories("r", "gsm8k")
    assert counting.ranges == []
    assert next(it).idx == 0
    assert counting.ranges == [(0, 4096)]
    assert [t.idx for t in it] == list(range(1, 300))
    assert all(length == 4096 for _, length in counting.ranges)
    assert [off for off, _ in counting.ranges] == list(range(0, len(payload) + 1, 4096))
    assert counting.full_reads == 0

    counting.ranges.clear()
    assert store.read_single_trajectory("r", "gsm8k", 5) == traj(5)
    assert len(counting.ranges) == 1  # stops at the match


def test_streaming_parser_bounded_buffer() -> None:
    """The line splitter keeps only the unfinished line between chunks, not what it has parsed."""
    splitter = store_module._LineSplitter("mem://x")
    line = _line(1)
    records = []
    for _ in range(1000):
        records.extend(splitter.feed(line[:50]))
        records.extend(splitter.feed(line[50:]))
        assert len(splitter._partial) == 0
    assert len(records) == 1000


# ── Concurrency ──────────────────────────────────────────────────────────────────

_WRITERS, _PER_WRITER = 4, 60
_SIZES = (100, 5_000, 70_000, 200_000)


def _writer_process(root: str, worker: int, go: Any) -> None:
    store = EvalStore(root)
    go.wait(30)
    for i in range(_PER_WRITER):
        pad = chr(ord("a") + worker) * _SIZES[(i + worker) % len(_SIZES)]
        t = StoredTrajectory(
            idx=i, benchmark="gsm8k", example_id=f"w{worker}-{i}", logs={"pad": pad}
        )
        store.write_trajectory("r", "gsm8k", t)


def test_concurrent_writer_processes_produce_whole_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Several processes appending to one trajectories.jsonl at once leave only whole, untorn lines."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [
        ctx.Process(target=_writer_process, args=(str(tmp_path), w, go)) for w in range(_WRITERS)
    ]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    raw = (tmp_path / TRAJ).read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert len(lines) == _WRITERS * _PER_WRITER
    seen = set()
    for line in lines:
        d = json.loads(line)  # raises on a torn or interleaved line
        pad = d["logs"]["pad"]
        assert pad == pad[0] * len(pad)
        seen.add(d["example_id"])
    assert len(seen) == _WRITERS * _PER_WRITER
    with caplog.at_level(logging.WARNING, logger="evalsyncd.store"):
        assert len(EvalStore(tmp_path).read_trajectories("r", "gsm8k")) == _WRITERS * _PER_WRITER
    assert not caplog.records


def _make_runs(storage: Any, n: int) -> None:
    store = EvalStore(storage)
    for i in range(n):
        store.create_run("m", ["gsm8k"], run_id=f"run-{i:03d}")


@pytest.mark.parametrize("wrapper", ["async-capable", "sync-only"])
def test_list_runs_fetches_metadata_concurrently(storage: AnyStorage, wrapper: str) -> None:
    """list_runs keeps many metadata reads in flight (bounded), not one sequential round trip per run."""
    n, delay_s, limit = 40, 0.05, 16
    _make_runs(storage, n)
    slow: Any = (
        CountingStorage(storage, delay_s)
        if wrapper == "async-capable"
        else SyncOnlyStorage(storage, delay_s)
    )
    counting = slow if wrapper == "async-capable" else slow.counting
    store = EvalStore(slow, max_concurrency=limit)
    storage.list_dir("runs")  # the client for sync calls is open before the timing
    start = time.monotonic()
    runs = store.list_runs()
    elapsed_s = time.monotonic() - start
    assert len(runs) == n
    # plus the (absent) run catalog, unless it is looked up through read_internal;
    # each metadata.json is one read bounded by MAX_JSON_BYTES (a ranged read)
    assert counting.full_reads + counting.bounded_reads in (n, n + 1)
    assert 4 <= counting.max_in_flight <= limit
    # Sequential reads would take at least n * delay_s = 2 s.
    assert elapsed_s < n * delay_s / 2, f"{elapsed_s:.2f} s: reads look sequential"


def test_alist_runs_fetches_metadata_concurrently(storage: AnyStorage) -> None:
    """alist_runs awaits the storage's native async reads concurrently, within max_concurrency."""
    n, delay_s, limit = 40, 0.05, 8
    _make_runs(storage, n)
    counting = CountingStorage(storage, delay_s)
    store = EvalStore(counting, max_concurrency=limit)  # type: ignore[arg-type]

    async def timed() -> tuple[list[RunMetadata], float]:
        try:
            await storage.alist_dir("runs")  # open this loop's client outside the timing
            start = time.monotonic()
            runs = await store.alist_runs()
            return runs, time.monotonic() - start
        finally:
            await storage.aclose()

    runs, elapsed_s = asyncio.run(timed())
    assert [r.run_id for r in runs] == sorted((f"run-{i:03d}" for i in range(n)), reverse=True)
    assert counting.max_in_flight == limit
    # Sequential reads would take at least n * delay_s = 2 s.
    assert elapsed_s < n * delay_s / 2, f"{elapsed_s:.2f} s: reads look sequential"


# ── Outages ────────────────────────────────────────────────────────────────────


class FailingStorage(CountingStorage):
    """A real storage whose reads and listings fail with a transient error (an outage)."""

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise TransientStorageError("connection reset (injected)", url=self.url())

    async def _afail(self, *args: Any, **kwargs: Any) -> Any:
        raise TransientStorageError("connection reset (injected)", url=self.url())

    read = read_range = list_dir = exists = stat = _fail  # type: ignore[assignment]
    aread = aread_range = alist_dir = aexists = astat = _afail  # type: ignore[assignment]


def test_outage_propagates_and_is_never_no_runs(local_storage: LocalStorage) -> None:
    """Every read raises the storage error during an outage instead of reporting runs or files missing."""
    EvalStore(local_storage).create_run("m", ["gsm8k"], run_id="r")
    store = EvalStore(FailingStorage(local_storage))  # type: ignore[arg-type]
    for call in (
        store.list_runs,
        lambda: store.read_run("r"),
        lambda: store.read_result("r", "gsm8k"),
        lambda: store.read_trajectories("r", "gsm8k"),
        lambda: store.read_single_trajectory("r", "gsm8k", 0),
        lambda: store.read_summary("r"),
        lambda: store.list_benchmarks("r"),
        lambda: store.finalize_run("r"),
        lambda: asyncio.run(store.alist_runs()),
        lambda: asyncio.run(store.aread_result("r", "gsm8k")),
        lambda: asyncio.run(store.aread_trajectories("r", "gsm8k")),
    ):
        with pytest.raises(TransientStorageError):
            call()


def test_metadata_read_failure_mid_listing_propagates(local_storage: LocalStorage) -> None:
    """If one metadata read fails while others are in flight, list_runs raises it (no partial list)."""
    _make_runs(local_storage, 20)

    class OneBad(CountingStorage):
        async def aread(self, path: str) -> bytes:
            if "run-007" in path:
                raise TransientStorageError("timeout (injected)")
            return await super().aread(path)

        async def aread_range(self, path: str, offset: int, length: int | None = None) -> bytes:
            if "run-007" in path:  # metadata.json is read by a bounded (ranged) read
                raise TransientStorageError("timeout (injected)")
            return await super().aread_range(path, offset, length)

    store = EvalStore(OneBad(local_storage, 0.01))  # type: ignore[arg-type]
    with pytest.raises(TransientStorageError):
        store.list_runs()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_unreachable_server_is_a_storage_error_not_no_runs(
    cloud_env: dict[str, str], backend: str
) -> None:
    """With the server unreachable, list_runs/alist_runs raise a StorageError instead of returning []."""
    url = _closed_port_url()
    storage: Any
    if backend == "gcs":
        storage = GCSStorage(
            "evalsyncd-test", "p", endpoint_url=url, timeout_s=2.0, connect_timeout_s=1.0
        )
    else:
        storage = S3Storage("evalsyncd-test", "p", endpoint_url=url, **S3_SHORT_TIMEOUTS)
    store = EvalStore(storage)
    start = time.monotonic()
    with storage:
        with pytest.raises(StorageError):
            store.list_runs()
        with pytest.raises(StorageError):
            store.read_trajectories("r", "gsm8k")
    with pytest.raises(StorageError):
        asyncio.run(_alist_and_close(store, storage))
    assert time.monotonic() - start < 60


class AsyncOnlyStorage:
    """A real storage's async methods only: any sync call fails the test."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name.startswith("a") or name in ("url", "__aenter__", "__aexit__"):
            return getattr(self.inner, name)
        raise AssertionError(f"sync storage method {name} called from an async EvalStore method")


def test_async_methods_use_only_async_storage_calls(storage: AnyStorage) -> None:
    """alist_runs, aread_result, aread_trajectories and aiter_trajectories never call sync storage methods."""
    store = EvalStore(storage)
    store.create_run("m", ["gsm8k"], run_id="r")
    store.write_trajectory("r", "gsm8k", traj(0))
    store.write_result("r", BenchmarkResult("gsm8k", 1.0, 1, 1))
    async_store = EvalStore(AsyncOnlyStorage(storage))  # type: ignore[arg-type]
    want = store.read_result("r", "gsm8k")

    async def main() -> None:
        try:
            assert [r.run_id for r in await async_store.alist_runs()] == ["r"]
            assert (await async_store.aread_result("r", "gsm8k")) == want
            assert await async_store.aread_trajectories("r", "gsm8k") == [traj(0)]
        finally:
            await storage.aclose()

    asyncio.run(main())


def test_utf8_bom_on_first_line_is_ignored(storage: AnyStorage) -> None:
    """A UTF-8 byte order mark before the first record does not cost that record."""
    storage.write(TRAJ, b"\xef\xbb\xbf" + _line(0) + _line(1))
    assert [t.idx for t in EvalStore(storage).read_trajectories("r", "gsm8k")] == [0, 1]


def test_local_path_under_a_file_reads_as_missing(local_storage: LocalStorage) -> None:
    """(Storage layer) a key below a regular file is missing: read raises ObjectNotFoundError, stat is None."""
    from evalsyncd.errors import ObjectNotFoundError

    local_storage.write("runs/README", b"x")
    assert local_storage.stat("runs/README/metadata.json") is None
    local_storage.remove("runs/README/metadata.json")
    with pytest.raises(ObjectNotFoundError):
        local_storage.read("runs/README/metadata.json")


def test_store_pickles_with_its_storage(storage: AnyStorage) -> None:
    """An EvalStore pickles (configuration only) and the copy reads the same runs."""
    import pickle

    store = EvalStore(storage, max_concurrency=4)
    store.create_run("m", [], run_id="r")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.max_concurrency == 4
    assert [r.run_id for r in copy.list_runs()] == ["r"]
    copy.storage.close()  # type: ignore[attr-defined]


def test_store_never_imports_the_daemon() -> None:
    """Importing evalsyncd.store (and the package re-exports) loads no daemon module."""
    import subprocess
    import sys

    code = (
        "import sys, evalsyncd, evalsyncd.store; evalsyncd.EvalStore; "
        "print([m for m in sys.modules if m.startswith(('evalsyncd.sync', 'evalsyncd.cli'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_a_cloud_url_string_is_refused_not_read_as_a_directory(tmp_path: Path) -> None:
    """EvalStore("s3://...") and Fleet("gs://...") raise ValueError pointing to storage_from_uri
    instead of creating a local directory named like the URL; "file://" strings are local."""
    from evalsyncd import Fleet

    cwd = Path.cwd()
    for url in ("s3://my-bucket/evals/host-1", "gs://b/p"):
        with pytest.raises(ValueError, match="storage_from_uri"):
            EvalStore(url)
        with pytest.raises(ValueError, match="storage_from_uri"):
            Fleet(url)
    assert not (cwd / "s3:").exists() and not (cwd / "gs:").exists()
    store = EvalStore((tmp_path / "s").as_uri())
    assert isinstance(store.storage, LocalStorage) and store.storage.root == tmp_path / "s"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"checkpoint_name": ".ckpt"},
        {"run_id": ".hidden"},
        {"benchmarks": [".gsm8k"]},
    ],
    ids=["checkpoint_name", "run_id", "benchmark"],
)
def test_create_run_refuses_names_the_daemon_would_not_mirror(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    """A run id or benchmark starting with '.' would be a dot-directory, which evalsyncd
    never mirrors: create_run refuses it, naming the rule, and writes nothing."""
    store = EvalStore(str(tmp_path))
    args: dict[str, Any] = {"model_name": "m", "benchmarks": ["b"], **kwargs}
    with pytest.raises(ValueError, match=r"starts with '\.'.*does not mirror"):
        store.create_run(**args)
    assert not any(tmp_path.rglob("*"))


def test_writers_refuse_a_dot_benchmark_and_every_accepted_name_is_mirrored(
    tmp_path: Path,
) -> None:
    """write_trajectory/write_result refuse a '.' benchmark; every path create_run and the
    writers accept for unusual (non-dot) names is one the daemon mirrors."""
    from evalsyncd.sync.files import FileKind, classify, scan_tree

    store = EvalStore(str(tmp_path))
    run_id = store.create_run("m", ["b"], checkpoint_name="step.tmp~")
    with pytest.raises(ValueError, match="starts with"):
        store.write_trajectory(run_id, ".b", traj(0))
    for name in ("b", "x.swp", "a.b", "-dash"):
        store.write_trajectory(run_id, name, traj(0))
    paths = [rel for rel, _ in scan_tree(tmp_path)]
    assert len(paths) == 6  # runs.jsonl, metadata.json, 4 trajectories
    assert all(classify(p) is not FileKind.IGNORED for p in paths)
