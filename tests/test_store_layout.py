"""The store's pure parts: paths and parsing (``evalsyncd.store.layout``), and how reads reach a
storage (``evalsyncd.store.aio``)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from evalsyncd.storage import LocalStorage
from evalsyncd.store import BenchmarkResult, RunMetadata, StoredTrajectory
from evalsyncd.store.aio import bounded_map, reads_of
from evalsyncd.store.layout import (
    StoreLayout,
    TrajectoryFilter,
    TrajectoryParser,
    parse_json_object,
    parse_model,
)
from tests.test_store import traj


def test_layout_paths_under_the_prefix() -> None:
    """Every file of the tree has its path under the prefix; names are checked first."""
    layout = StoreLayout("evals/x")
    assert layout.index() == "evals/x/runs.jsonl"
    assert layout.runs_dir() == "evals/x/runs"
    assert layout.catalog() == "evals/x/.evalsyncd/catalog.json"
    assert layout.metadata("r") == "evals/x/runs/r/metadata.json"
    assert layout.summary("r") == "evals/x/runs/r/summary.json"
    assert layout.result("r", "b") == "evals/x/runs/r/b/result.json"
    assert layout.trajectories("r", "b") == "evals/x/runs/r/b/trajectories.jsonl"
    assert StoreLayout().metadata("r") == "runs/r/metadata.json"
    for bad in ("", ".", "..", "a/b", "a\\b", "n\x00"):
        with pytest.raises(ValueError):
            layout.metadata(bad)
        with pytest.raises(ValueError):
            layout.result("r", bad)


def test_listings_keep_only_valid_names() -> None:
    """runs_in drops names that are not safe segments; benchmarks_in also drops the run's files."""
    listing = ["a", "..", "b\\c", "metadata.json", "summary.json", "gsm8k"]
    assert StoreLayout.runs_in(listing) == ["a", "metadata.json", "summary.json", "gsm8k"]
    assert StoreLayout.benchmarks_in(listing) == ["a", "gsm8k"]


def test_parse_model_warns_and_reads_as_missing(caplog: pytest.LogCaptureFixture) -> None:
    """A JSON object of the wrong shape parses to None with a warning naming file and model."""
    with caplog.at_level(logging.WARNING, logger="evalsyncd.store"):
        assert parse_model(BenchmarkResult, {"score": 1.0}, "mem://r.json") is None
        assert parse_model(RunMetadata, parse_json_object(b"[1]", "mem://m.json"), "x") is None
        assert parse_model(RunMetadata, None, "mem://absent") is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "mem://r.json" in messages[0] and "not a BenchmarkResult" in messages[0]
    assert "mem://m.json" in messages[1] and "not an object" in messages[1]
    good = BenchmarkResult("b", 0.5, 2, 1)
    assert parse_model(BenchmarkResult, good.to_dict(), "x") == good
    # JSON integers have no bound: one no float holds is not a score (no OverflowError)
    huge = parse_json_object(b'{"benchmark": "b", "score": 1' + b"0" * 400 + b"}", "mem://h")
    assert parse_model(BenchmarkResult, huge, "mem://h") is None


def test_trajectory_parser_across_chunks(caplog: pytest.LogCaptureFixture) -> None:
    """Lines split anywhere across chunks parse once each; the filter applies; a corrupted line
    is skipped with its line number."""
    data = b"".join(
        [
            (json.dumps(traj(0, 1.0).to_dict()) + "\n").encode(),
            b'{"idx": "no benchmark"}\n',
            (json.dumps(traj(2, 0.0).to_dict()) + "\n").encode(),
            (json.dumps(traj(3, 1.0).to_dict()) + "\n").encode(),
        ]
    )
    parser = TrajectoryParser("mem://t.jsonl", TrajectoryFilter(correct_only=True))
    got: list[StoredTrajectory] = []
    with caplog.at_level(logging.WARNING, logger="evalsyncd.store"):
        for start in range(0, len(data), 5):
            got.extend(parser.feed(data[start : start + 5]))
        parser.close()
    assert [t.idx for t in got] == [0, 3]
    assert [r.getMessage().split(": ")[0] for r in caplog.records] == ["mem://t.jsonl line 2"]


def test_bounded_map_keeps_order_and_limit() -> None:
    """bounded_map returns results in input order with at most ``limit`` calls in flight."""
    in_flight = peak = 0

    async def slow_square(x: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001 * (10 - x))
        in_flight -= 1
        return x * x

    assert asyncio.run(bounded_map(slow_square, list(range(10)), 3)) == [x * x for x in range(10)]
    assert peak == 3
    assert asyncio.run(bounded_map(slow_square, [], 3)) == []


def test_bounded_map_cancels_the_rest_on_the_first_error() -> None:
    """On the first error bounded_map cancels the calls in flight and raises that error."""
    cancelled: list[int] = []

    async def main() -> None:
        gate = asyncio.Event()

        async def call(x: int) -> int:
            if x == 0:
                await gate.wait()
                raise KeyError("boom")
            try:
                gate.set()
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(x)
                raise
            return x

        with pytest.raises(KeyError):
            await asyncio.wait_for(bounded_map(call, [0, 1, 2], 3), 10)

    asyncio.run(main())
    assert sorted(cancelled) == [1, 2]


class _SyncOnly:
    """The sync reads of a LocalStorage, and nothing else."""

    def __init__(self, inner: LocalStorage) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name.startswith("a"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_reads_of_a_sync_only_storage_run_in_threads(local_storage: LocalStorage) -> None:
    """A storage without a-methods is read through worker threads, with "missing" as None."""
    local_storage.write("d/f", b"0123456789")
    local_storage.write("runs/README", b"x")
    reads = reads_of(_SyncOnly(local_storage))

    async def main() -> tuple[Any, ...]:
        return (
            await reads.read("d/f"),
            await reads.read_range("d/f", 2, 3),
            await reads.list_dir("d"),
            await reads.exists("d/f"),
            await reads.read_or_none("d/absent"),
            await reads.read_or_none("runs/README/metadata.json"),
            await reads.read_catalog(""),
        )

    assert asyncio.run(main()) == (b"0123456789", b"234", ["f"], True, None, None, None)
