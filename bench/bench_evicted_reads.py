"""Benchmark: reads of runs evicted by retention, against reading the bucket directly.

Starts a real S3 server (SeaweedFS) in a temporary directory, writes ``--runs``
finalized runs (300 by default) into a local root, mirrors them with
``evalsyncd sync --once``, evicts every third one with ``evalsyncd evict``, then
counts requests and times, in the same process, through a
:class:`~evalsyncd.testing.proxy.CountingProxy` adding ``--rtt-ms`` (20 ms) of
round-trip time:

- ``bucket``: ``EvalStore(S3Storage)`` (the baseline: every read from the bucket);
- ``local+fallback``: ``EvalStore(root, fallback=S3Storage)`` (the evicted runs'
  data files from the bucket, everything else from the local disk).

Usage::

    python -m bench.bench_evicted_reads [--runs 300] [--rtt-ms 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evalsyncd.cli import main as cli
from evalsyncd.storage import S3Storage
from evalsyncd.store import BenchmarkResult, EvalStore, StoredTrajectory
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.testing.servers import SeaweedS3Server

BUCKET = "evalsyncd-bench"


def _write(root: Path, runs: int) -> list[str]:
    store = EvalStore(root)
    ids = []
    for i in range(runs):
        run_id = store.create_run("m", ["gsm8k"], run_id=f"run{i:04d}")
        for k in range(20):
            store.write_trajectory(run_id, "gsm8k", StoredTrajectory(idx=k, benchmark="gsm8k"))
        store.write_result(run_id, BenchmarkResult("gsm8k", 0.5, 20, 10))
        store.write_summary(run_id, {})
        store.finalize_run(run_id)
        ids.append(run_id)
    old = time.time() - 2 * 86400
    for p in (root / "runs").rglob("*"):
        os.utime(p, (old, old))
    return ids


def _measure(proxy: CountingProxy, fn: Callable[[], Any]) -> tuple[int, float]:
    proxy.reset()
    start = time.perf_counter()
    fn()
    return proxy.requests, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="reads of evicted runs vs the bucket")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-evicted-") as tmp_name:
        tmp = Path(tmp_name)
        server = SeaweedS3Server(tmp / "seaweed").start()
        try:
            server.create_bucket(BUCKET)
            os.environ.update(server.client_env())
            root = tmp / "root"
            root.mkdir()
            ids = _write(root, args.runs)
            cfg = tmp / "config.toml"
            cfg.write_text(
                f'root = "{root}"\nstate_dir = "{tmp / "state"}"\nlog_level = "warning"\n'
                "[retention]\nenabled = true\nmin_age_s = 60.0\n"
                f'[[destinations]]\nname = "s3"\nurl = "s3://{BUCKET}/h1"\n'
                f'endpoint_url = "{server.endpoint_url}"\nmax_main_lag_s = 0.0\n'
            )
            assert cli(["sync", "--once", "--config", str(cfg)]) == 0
            # evict every third run: hide the others from the policy for one round
            keep = [r for i, r in enumerate(ids) if i % 3]
            for r in keep:
                os.utime(root / "runs" / r / "summary.json")
            assert cli(["evict", "--json", "--config", str(cfg)]) == 0
            evicted = [r for i, r in enumerate(ids) if i % 3 == 0]
            port = int(server.endpoint_url.rsplit(":", 1)[1])
            with CountingProxy("127.0.0.1", port, one_way_s=args.rtt_ms / 2000) as proxy:
                bucket = EvalStore(S3Storage(BUCKET, "h1", endpoint_url=proxy.url))
                local = EvalStore(root, fallback=S3Storage(BUCKET, "h1", endpoint_url=proxy.url))
                run = evicted[len(evicted) // 2]
                # today's local store: the same tree without eviction markers
                plain_root = tmp / "plain"
                shutil.copytree(root, plain_root, ignore=shutil.ignore_patterns(".evicted.json"))
                plain = EvalStore(plain_root)
                rows = []
                for name, store in (("bucket", bucket), ("local+fallback", local)):
                    store.read_run(ids[0])  # warm the clients
                    store.read_result(evicted[0], "gsm8k")
                    for what, fn in (
                        ("list_runs", store.list_runs),
                        ("read_run", lambda s=store: s.read_run(run)),
                        ("read_result", lambda s=store: s.read_result(run, "gsm8k")),
                        ("read_trajectories", lambda s=store: s.read_trajectories(run, "gsm8k")),
                    ):
                        n, secs = _measure(proxy, fn)
                        rows.append((name, what, n, secs))
                plain.list_runs()
                rows.append(("local (today)", "list_runs", *_measure(proxy, plain.list_runs)))
                assert local.read_trajectories(run, "gsm8k") == bucket.read_trajectories(
                    run, "gsm8k"
                )
                assert sum(r.evicted for r in local.list_runs()) == len(evicted)
            print(
                f"{args.runs} runs, {len(evicted)} evicted, {args.rtt_ms:.0f} ms RTT "
                "(requests, seconds; same process, same server)"
            )
            for name, what, n, secs in rows:
                print(f"  {name:15} {what:18} {n:4d} requests  {secs * 1000:8.1f} ms")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
