"""Measurement 3: backfill, an existing tree of runs mirrored from scratch.

A tree of ``runs`` runs is written with ``EvalStore`` on local disk: per run a
``metadata.json``, a ``summary.json`` and two benchmarks with a ``result.json``
and a ``trajectories.jsonl`` of 10 lines (~10 KiB): 6 files per run, plus
``runs.jsonl``. Each tool copies it to its own empty prefix on the S3 server
(directly, no proxy); wall time includes process start-up for all three:

- ``evalsyncd sync --once`` (a fresh journal);
- ``aws s3 sync`` (default settings: 10 concurrent requests);
- ``rclone copy`` (default settings: 4 transfers, 8 checkers).

The tree is kept for measurement 4, which reads back what evalsyncd mirrored.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BUCKET, Bench, Daemon, aws_sync, rclone_copy
from evalsyncd.errors import StorageError
from evalsyncd.store import BenchmarkResult, EvalStore, StoredTrajectory, StoredTurn

__all__ = ["make_tree", "run"]

BENCHMARKS = ["gsm8k", "math"]


def make_tree(root: Path, runs: int, lines: int = 10) -> int:
    """Write ``runs`` runs with the EvalStore under ``root``; returns the number of files."""
    store = EvalStore(root)
    for i in range(runs):
        run_id = f"step{i:04d}_20240101_000000_{i:06x}"
        store.create_run(
            "Qwen/Qwen3-8B",
            BENCHMARKS,
            checkpoint_path=f"tinker://bench/{i}",
            checkpoint_name=f"step{i:04d}",
            config={"temperature": 0.6},
            run_id=run_id,
        )
        results = {}
        for b in BENCHMARKS:
            for k in range(lines):
                store.write_trajectory(
                    run_id,
                    b,
                    StoredTrajectory(
                        idx=k,
                        benchmark=b,
                        example_id=f"{b}-{k:04d}",
                        turns=[
                            StoredTurn(role="user", content="Q" * 300, token_count=80),
                            StoredTurn(role="assistant", content="A" * 600, token_count=160),
                        ],
                        reward=float(k % 2),
                        metrics={"correct": float(k % 2)},
                    ),
                )
            results[b] = BenchmarkResult(
                name=b, score=0.5, num_examples=lines, num_correct=lines // 2
            )
            store.write_result(run_id, results[b])
        store.write_summary(run_id, results)
        store.finalize_run(run_id)
    return sum(len(f) for _, _, f in os.walk(root))


def _evalsyncd_once(bench: Bench, root: Path, prefix: str) -> None:
    state = bench.dir("backfill/state")
    env = Daemon(root, state, f"s3://{BUCKET}/{prefix}", bench.s3.endpoint_url).env
    subprocess.run(
        [sys.executable, "-m", "evalsyncd", "sync", "--once"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _count_objects(bench: Bench, prefix: str) -> int:
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=bench.s3.endpoint_url, region_name="us-east-1"
    )
    try:
        n = 0
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix + "/"
        ):
            n += sum(1 for o in page.get("Contents", ()) if "/.evalsyncd/" not in o["Key"])
        return n
    finally:
        client.close()


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 3; leaves the evalsyncd copy at prefix ``backfill-evalsyncd``."""
    runs = 60 if bench.quick else 300
    root = bench.dir("backfill/root")
    files = make_tree(root, runs)
    bench.backfill_root = root  # type: ignore[attr-defined]
    tools = {
        "evalsyncd sync --once": lambda p: _evalsyncd_once(bench, root, p),
        "aws s3 sync": lambda p: aws_sync(root, p, bench.s3.endpoint_url),
        "rclone copy": lambda p: rclone_copy(root, p, bench.s3.endpoint_url),
    }
    rows: dict[str, Any] = {}
    for name, fn in tools.items():
        prefix = "backfill-" + name.split()[0]
        t0 = time.monotonic()
        fn(prefix)
        wall = time.monotonic() - t0
        copied = _count_objects(bench, prefix)
        rows[name] = {"wall_s": wall, "files_per_s": files / wall, "objects": copied}
    base = rows["evalsyncd sync --once"]["files_per_s"]
    for row in rows.values():
        row["evalsyncd_speedup"] = base / row["files_per_s"]
    return {
        "runs": runs,
        "files": files,
        "tools": rows,
        "daemon": _daemon_milestones(bench, root, runs, files),
        "note": json.dumps(BENCHMARKS),
    }


def _daemon_milestones(bench: Bench, root: Path, runs: int, files: int) -> dict[str, float]:
    """``evalsyncd run`` from scratch: seconds until ``EvalStore`` on the bucket lists
    every run (through the tail log and the catalog), and until every main object exists."""
    prefix = "backfill-daemon"
    state = bench.dir("backfill/daemon-state")
    storage = bench.s3_storage(prefix)
    storage.tail_refresh_s = 0.0
    out: dict[str, float] = {}
    try:
        with Daemon(root, state, f"s3://{BUCKET}/{prefix}", bench.s3.endpoint_url):
            t0 = time.monotonic()
            deadline = t0 + 300.0
            while time.monotonic() < deadline and "all_main_objects_s" not in out:
                if "all_runs_listed_s" not in out:
                    with contextlib.suppress(StorageError):  # not there yet
                        if len(EvalStore(storage).list_runs()) == runs:
                            out["all_runs_listed_s"] = time.monotonic() - t0
                if _count_objects(bench, prefix) >= files:
                    out["all_main_objects_s"] = time.monotonic() - t0
                time.sleep(0.2)
    finally:
        storage.close()
    return out
