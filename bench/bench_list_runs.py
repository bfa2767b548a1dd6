"""Benchmark: ``EvalStore.list_runs`` against a sequential one-request-per-run reader.

Starts a real S3 server (SeaweedFS, ``evalsyncd.testing.servers.SeaweedS3Server``;
or fake-gcs-server with ``--backend gcs``) in a temporary directory, writes
``--runs`` runs (300 by default) into a bucket, then times, in the same process:

- ``sequential``: ``list_dir("runs")`` then one ``read`` of each
  ``metadata.json`` after the other (what the reference ``EvalStore`` does);
- ``list_runs``: ``EvalStore(storage).list_runs()`` (bounded concurrent reads).

Each measurement is repeated (``--repeat``) and the best time is kept. With
``--rtt-ms`` the client talks to the server through ``evalsyncd.testing.proxy.CountingProxy``, which
delays every chunk by half the round-trip time in each direction, which models
a cloud endpoint some distance away. Prints one line per RTT and the ratio.

The suite (``python -m bench``, measurement 4 in ``bench/readback.py``) reuses
``sequential_reader`` and ``best_of`` from here; this script remains the quick
way to vary runs, RTT, concurrency and backend for ``list_runs`` alone.

Usage::

    python -m bench.bench_list_runs [--runs 300] [--rtt-ms 0 20] [--backend s3|gcs]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evalsyncd.storage import GCSStorage, S3Storage
from evalsyncd.store import EvalStore
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.testing.servers import FakeGCSServer, SeaweedS3Server

BUCKET = "evalsyncd-bench"


def sequential_reader(storage: Any) -> list[dict[str, Any]]:
    """One request per run, one after the other (the reference's access pattern)."""
    runs = []
    for name in sorted(storage.list_dir("runs"), reverse=True):
        try:
            runs.append(json.loads(storage.read(f"runs/{name}/metadata.json")))
        except FileNotFoundError:
            continue
    return runs


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best_s, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best_s = min(best_s, time.perf_counter() - start)
    return best_s, result


def populate(storage: Any, runs: int) -> None:
    store = EvalStore(storage)

    async def write_all() -> None:
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                meta = {
                    "run_id": f"step{i:04d}_20240101_000000_{i:06x}",
                    "model_name": "Qwen/Qwen3-8B",
                    "checkpoint_path": f"tinker://bench/{i}",
                    "checkpoint_name": f"step{i:04d}",
                    "benchmarks": ["gsm8k", "math"],
                    "timestamp": f"2024-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}",
                    "config": {"temperature": 0.6},
                    "scores": {"gsm8k": 0.5, "math": 0.25},
                }
                await storage.awrite(
                    f"runs/{meta['run_id']}/metadata.json", json.dumps(meta, indent=2).encode()
                )

        try:
            await asyncio.gather(*(one(i) for i in range(runs)))
        finally:
            await storage.aclose()

    asyncio.run(write_all())
    assert len(store.storage.list_dir("runs")) == runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="list_runs vs a sequential reader")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 20.0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="EvalStore max_concurrency")
    parser.add_argument("--backend", choices=["s3", "gcs"], default="s3")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-list-runs-") as tmp:
        server: SeaweedS3Server | FakeGCSServer
        if args.backend == "s3":
            server = SeaweedS3Server(Path(tmp) / "seaweed").start()
        else:
            server = FakeGCSServer(Path(tmp) / "fakegcs").start()
        try:
            server.create_bucket(BUCKET)
            os.environ.update(server.client_env())

            def make(endpoint: str) -> Any:
                if args.backend == "s3":
                    return S3Storage(BUCKET, "bench", endpoint_url=endpoint)
                return GCSStorage(BUCKET, "bench", endpoint_url=endpoint)

            with make(server.endpoint_url) as direct:
                populate(direct, args.runs)
            print(
                f"backend={args.backend} runs={args.runs} repeat={args.repeat} "
                f"max_concurrency={args.concurrency}"
            )
            for rtt_ms in args.rtt_ms:
                proxy = None
                endpoint = server.endpoint_url
                if rtt_ms > 0:
                    proxy = CountingProxy("127.0.0.1", server.port, one_way_s=rtt_ms / 2000).start()
                    endpoint = proxy.url
                try:
                    with make(endpoint) as storage:
                        storage.list_dir("runs")  # warm up the connection pool
                        store = EvalStore(storage, max_concurrency=args.concurrency)
                        seq_s, seq = best_of(
                            args.repeat, functools.partial(sequential_reader, storage)
                        )
                        ours_s, ours = best_of(args.repeat, store.list_runs)
                    assert len(seq) == len(ours) == args.runs
                    print(
                        f"rtt={rtt_ms:5.1f} ms  sequential={seq_s:7.3f} s  "
                        f"list_runs={ours_s:7.3f} s  ratio={seq_s / ours_s:6.1f}x"
                    )
                finally:
                    if proxy is not None:
                        proxy.stop()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
