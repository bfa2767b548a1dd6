"""Measurement 4: reading back the runs that measurement 3 mirrored to S3.

Over the bucket copy evalsyncd made of the backfill tree (300 runs; 60 quick):

- ``list_runs``: ``EvalStore.list_runs()`` (bounded concurrent reads) against the
  sequential reader of ``bench/bench_list_runs.py`` (one listing, then one
  ``read`` per ``metadata.json``, one after the other: the reference's pattern);
- ``read_trajectories``: ``EvalStore.read_trajectories`` for every run and
  benchmark, called one after the other as a user loop would, against a
  sequential reader doing one ``read`` per ``trajectories.jsonl`` and
  ``json.loads`` per line (the reference's pattern).

Both sides use the same ``S3Storage`` client, warmed up, once on plain loopback
(best of 3) and once through ``evalsyncd.testing.proxy.CountingProxy`` adding 10 ms each way, i.e.
20 ms per request round trip (best of 1).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from bench.backfill import BENCHMARKS
from bench.bench_list_runs import best_of, sequential_reader
from bench.common import Bench
from evalsyncd.store import EvalStore
from evalsyncd.testing.proxy import CountingProxy

__all__ = ["run"]


def _sequential_trajectories(storage: Any, run_ids: list[str]) -> int:
    n = 0
    for run_id in run_ids:
        for b in BENCHMARKS:
            try:
                data = storage.read(f"runs/{run_id}/{b}/trajectories.jsonl")
            except FileNotFoundError:
                continue
            n += sum(1 for line in data.split(b"\n") if line.strip() and json.loads(line))
    return n


def _ours_trajectories(store: EvalStore, run_ids: list[str]) -> int:
    return sum(len(store.read_trajectories(r, b)) for r in run_ids for b in BENCHMARKS)


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 4 (needs measurement 3's bucket copy)."""
    prefix = "backfill-evalsyncd"
    rows: dict[str, Any] = {}
    for rtt_ms in (0, 20):
        proxy = CountingProxy("127.0.0.1", bench.s3.port, one_way_s=rtt_ms / 2000).start()
        repeat = 3 if rtt_ms == 0 else 1
        try:
            with bench.s3_storage(prefix, proxy.url) as storage:
                storage.list_dir("runs")  # warm up the connection pool
                store = EvalStore(storage)
                run_ids = sorted(storage.list_dir("runs"))
                cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
                    "list_runs": (
                        functools.partial(sequential_reader, storage),
                        store.list_runs,
                    ),
                    "read_trajectories": (
                        functools.partial(_sequential_trajectories, storage, run_ids),
                        functools.partial(_ours_trajectories, store, run_ids),
                    ),
                }
                for case, (ref_fn, ours_fn) in cases.items():
                    proxy.reset()
                    ref_s, ref = best_of(repeat, ref_fn)
                    ref_req = proxy.requests / repeat
                    proxy.reset()
                    ours_s, ours = best_of(repeat, ours_fn)
                    ours_req = proxy.requests / repeat
                    count = ref if isinstance(ref, int) else len(ref)
                    got = ours if isinstance(ours, int) else len(ours)
                    if count != got:
                        raise RuntimeError(f"{case}: reference read {count}, evalsyncd {got}")
                    rows[f"{case} @ {rtt_ms} ms"] = {
                        "runs": len(run_ids),
                        "items": got,
                        "reference_s": ref_s,
                        "evalsyncd_s": ours_s,
                        "speedup": ref_s / ours_s,
                        "reference_requests": ref_req,
                        "evalsyncd_requests": ours_req,
                    }
        finally:
            proxy.stop()
    return rows
