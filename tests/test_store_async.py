"""The read API of ``EvalStore`` written once: every read has its ``a``-twin, on every backend.

Each test taking ``storage`` runs once per backend (local, S3, GCS) against the
real servers. Also here: where sync reads and writes run (the bridge, or the
caller's thread).
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from evalsyncd.errors import TransientStorageError
from evalsyncd.fleet import Fleet
from evalsyncd.storage import AnyStorage, LocalStorage
from evalsyncd.store import BenchmarkResult, EvalStore, EvalStoreReader
from tests.helpers import run_closing as _run
from tests.test_store import AsyncOnlyStorage, FailingStorage, traj

SYNC_READS = [
    "list_runs",
    "read_run",
    "read_summary",
    "list_benchmarks",
    "read_result",
    "iter_trajectories",
    "read_trajectories",
    "read_single_trajectory",
]


def _filled(storage: Any) -> EvalStore:
    """A store with one finalized run ``r`` (gsm8k: 5 trajectories, a result; math: none)."""
    store = EvalStore(storage)
    store.create_run("m", ["gsm8k", "math"], run_id="r")
    for i in range(5):
        store.write_trajectory("r", "gsm8k", traj(i, float(i % 2), "boom" if i == 4 else None))
    result = BenchmarkResult("gsm8k", 0.4, 5, 2, num_errors=1)
    store.write_result("r", result)
    store.write_summary("r", {"gsm8k": result})
    store.finalize_run("r")
    return store


def test_every_public_read_has_its_async_twin() -> None:
    """Each public sync read of EvalStore has an ``a``-twin with the same parameters."""
    public = {n for n in dir(EvalStoreReader) if not n.startswith("_")}
    reads = {n for n in public if n.startswith(("read", "list", "iter"))}
    assert reads == set(SYNC_READS)
    for name in SYNC_READS:
        sync, twin = getattr(EvalStore, name), getattr(EvalStore, "a" + name)
        assert (
            inspect.signature(sync).parameters.keys() == inspect.signature(twin).parameters.keys()
        )
        assert inspect.iscoroutinefunction(twin) == (name != "iter_trajectories"), name


def test_async_twins_answer_like_sync(storage: AnyStorage) -> None:
    """aread_run, aread_summary, alist_benchmarks, aread_result, aread_single_trajectory and the
    filtered aread_trajectories/aiter_trajectories return what their sync twins return."""
    store = _filled(storage)

    async def reads() -> dict[str, Any]:
        return {
            "list_runs": await store.alist_runs(),
            "read_run": await store.aread_run("r"),
            "read_summary": await store.aread_summary("r"),
            "missing_summary": await store.aread_summary("nope"),
            "list_benchmarks": await store.alist_benchmarks("r"),
            "no_benchmarks": await store.alist_benchmarks("nope"),
            "read_result": await store.aread_result("r", "gsm8k"),
            "single": await store.aread_single_trajectory("r", "gsm8k", 3),
            "single_missing": await store.aread_single_trajectory("r", "gsm8k", 42),
            "errors": await store.aread_trajectories("r", "gsm8k", errors_only=True),
            "incorrect": [
                t async for t in store.aiter_trajectories("r", "gsm8k", incorrect_only=True)
            ],
            "none": await store.aread_trajectories("r", "math"),
        }

    got = _run(storage, reads)
    assert got == {
        "list_runs": store.list_runs(),
        "read_run": store.read_run("r"),
        "read_summary": store.read_summary("r"),
        "missing_summary": None,
        "list_benchmarks": store.list_benchmarks("r"),
        "no_benchmarks": [],
        "read_result": store.read_result("r", "gsm8k"),
        "single": store.read_single_trajectory("r", "gsm8k", 3),
        "single_missing": None,
        "errors": store.read_trajectories("r", "gsm8k", errors_only=True),
        "incorrect": list(store.iter_trajectories("r", "gsm8k", incorrect_only=True)),
        "none": [],
    }
    assert got["read_run"].scores == {"gsm8k": 0.4}
    assert got["list_benchmarks"] == ["gsm8k"]
    assert [t.idx for t in got["errors"]] == [4] and [t.idx for t in got["incorrect"]] == [0, 2]


def test_aread_run_of_a_missing_run_raises(storage: AnyStorage) -> None:
    """aread_run raises FileNotFoundError naming the run, as read_run does."""
    store = EvalStore(storage)
    with pytest.raises(FileNotFoundError, match="run nope not found"):
        _run(storage, lambda: store.aread_run("nope"))


def test_new_async_twins_use_only_async_storage_calls(storage: AnyStorage) -> None:
    """aread_run, aread_summary, alist_benchmarks and aread_single_trajectory never call a
    sync storage method."""
    want = _filled(storage)
    store = EvalStore(AsyncOnlyStorage(storage))

    async def reads() -> tuple[Any, ...]:
        return (
            await store.aread_run("r"),
            await store.aread_summary("r"),
            await store.alist_benchmarks("r"),
            await store.aread_single_trajectory("r", "gsm8k", 2),
        )

    assert _run(storage, reads) == (
        want.read_run("r"),
        want.read_summary("r"),
        ["gsm8k"],
        want.read_single_trajectory("r", "gsm8k", 2),
    )


@pytest.mark.parametrize("bad", ["", "a/b", "..", "nul\x00"])
def test_async_twins_refuse_bad_names(local_storage: LocalStorage, bad: str) -> None:
    """The new a-twins raise ValueError for a name that is not one safe path segment."""
    store = EvalStore(local_storage)
    for make in (
        lambda: store.aread_run(bad),
        lambda: store.aread_summary(bad),
        lambda: store.alist_benchmarks(bad),
        lambda: store.aread_single_trajectory("ok", bad, 0),
        lambda: store.aread_trajectories(bad, "gsm8k"),
    ):
        with pytest.raises(ValueError):
            asyncio.run(make())


def test_async_twins_propagate_an_outage(local_storage: LocalStorage) -> None:
    """During an outage the new a-twins raise the storage error, never "missing"."""
    _filled(local_storage)
    store = EvalStore(FailingStorage(local_storage))
    for make in (
        lambda: store.aread_run("r"),
        lambda: store.aread_summary("r"),
        lambda: store.alist_benchmarks("r"),
        lambda: store.aread_single_trajectory("r", "gsm8k", 0),
    ):
        with pytest.raises(TransientStorageError):
            asyncio.run(make())


def test_sync_reads_of_local_disk_work_inside_a_running_loop(local_storage: LocalStorage) -> None:
    """On local storage every sync read also works inside a running loop, as the reference
    EvalStore's do, and answers as outside it (on cloud storage they raise: test_store.py)."""
    store = _filled(local_storage)
    calls: list[Callable[[], object]] = [
        store.list_runs,
        lambda: store.read_run("r"),
        lambda: store.read_summary("r"),
        lambda: store.list_benchmarks("r"),
        lambda: store.read_result("r", "gsm8k"),
        lambda: next(store.iter_trajectories("r", "gsm8k")),
        lambda: store.read_trajectories("r", "gsm8k"),
        lambda: store.read_single_trajectory("r", "gsm8k", 0),
    ]

    outside = [call() for call in calls]

    async def main() -> list[object]:
        return [call() for call in calls]

    assert asyncio.run(main()) == outside


def test_writes_run_in_the_callers_thread_even_inside_a_loop(tmp_path: Path) -> None:
    """On local disk the writes (finalize_run and delete_run included) work inside a running
    loop and never start the storage bridge's thread."""
    code = f"""
import asyncio, threading
from evalsyncd.store import BenchmarkResult, EvalStore, StoredTrajectory

async def main():
    store = EvalStore({str(tmp_path)!r})
    store.create_run("m", ["gsm8k"], run_id="r")
    store.write_trajectory("r", "gsm8k", StoredTrajectory(idx=0, benchmark="gsm8k"))
    store.write_result("r", BenchmarkResult("gsm8k", 1.0, 1, 1))
    store.write_summary("r", {{}})
    assert store.finalize_run("r").scores == {{"gsm8k": 1.0}}
    store.create_run("m", [], run_id="gone")
    store.delete_run("gone")

asyncio.run(main())
print(sorted(t.name for t in threading.enumerate() if "bridge" in t.name))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]


def test_iter_trajectories_fetches_a_chunk_per_step_through_the_bridge(
    local_storage: LocalStorage,
) -> None:
    """The sync stream asks for the next chunk only when the consumer reaches it, and stops
    cleanly when abandoned half-way."""
    store = _filled(local_storage)
    store.chunk_size = 64
    it = store.iter_trajectories("r", "gsm8k")
    assert next(it).idx == 0
    del it  # abandoned: no error, nothing left running
    assert [t.idx for t in store.iter_trajectories("r", "gsm8k")] == [0, 1, 2, 3, 4]


def test_fleet_passes_store_options_to_each_host(local_storage: LocalStorage) -> None:
    """Fleet's store settings (max_concurrency, chunk_size, use_catalog) reach every host's store."""
    fleet = Fleet(local_storage, max_hosts=2, max_concurrency=3, chunk_size=128, use_catalog=False)
    store = fleet.store("h")
    assert (store.max_concurrency, store.chunk_size, store.use_catalog) == (3, 128, False)
    assert store.url() == local_storage.url("h")
    with pytest.raises(ValueError, match="max_hosts"):
        Fleet(local_storage, max_hosts=0)
