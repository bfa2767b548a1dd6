"""Measurement 3: backfill, an existing tree of runs mirrored from scratch.

A tree of ``runs`` runs is written with ``EvalStore`` on local disk: per run a
``metadata.json``, a ``summary.json`` and two benchmarks with a ``result.json``
and a ``trajectories.jsonl`` of 10 lines (~10 KiB): 6 files per run, plus
``runs.jsonl``. Each tool copies it to its own empty prefix on the S3 server
(directly, no proxy); wall time includes process start-up for all of them:

- ``evalsyncd sync --once`` (a fresh journal): every plain object in place;
- ``aws s3 sync`` (default settings: 10 concurrent requests);
- ``rclone copy`` (default settings: 4 transfers, 8 checkers);
- ``SDK PutObject x8`` (:mod:`bench.sdkput`): aiobotocore alone, 8 PutObject
  calls in flight on a client set up as ``S3Storage``'s, nothing else: the
  ceiling of one Python process with this SDK on this machine.

The machine is shared and its load drifts by tens of percent within a minute,
so the tools take turns: ``rounds`` rounds (3; 1 quick), each tool once per
round in an order rotated every round, after a warm-up write that makes the
server allocate the bucket's volumes (the first tool would pay it otherwise).
The table gives each tool's median wall time and median CPU time (user +
system of the tool's processes; not the server's).

And in each round, after the tools, ``evalsyncd run`` from scratch (tail log and
catalog on) on a fresh prefix (the median of the rounds is reported, each round's too):
seconds from the process start until ``EvalStore`` on the bucket lists every
run (a new reader every 50 ms, as ``evalsyncd runs ls`` run again and again:
``EvalStore`` on a fresh ``S3Storage`` with default settings; the time is when
the call that first returns every run ends), and until every plain object
exists. Targets: the
plain objects at least 1.0x rclone's speed; the listing in at most a third of
rclone's median wall time.

The tree is kept for measurement 4, which reads back what evalsyncd mirrored
(prefix ``backfill-evalsyncd``, the first round's).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import BUCKET, Bench, Daemon, aws_sync, rclone_copy, run_alone
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
    state = bench.dir(f"backfill/state-{prefix}")
    Daemon(root, state, f"s3://{BUCKET}/{prefix}", bench.s3.endpoint_url).sync_once()


def _sdk_put(bench: Bench, root: Path, prefix: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "bench.sdkput", bench.s3.endpoint_url, str(root), prefix, "8"],
        env={**os.environ, **bench.s3.client_env()},
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


def _children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


EVALSYNCD = "evalsyncd sync --once"
RCLONE = "rclone copy"


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 3; leaves the evalsyncd copy at prefix ``backfill-evalsyncd``."""
    runs = 60 if bench.quick else 300
    rounds = 1 if bench.quick else 3
    root = bench.dir("backfill/root")
    files = make_tree(root, runs)
    bench.backfill_root = root  # type: ignore[attr-defined]
    tools: dict[str, tuple[str, Callable[[str], None]]] = {
        EVALSYNCD: ("evalsyncd", lambda p: _evalsyncd_once(bench, root, p)),
        "aws s3 sync": ("aws", lambda p: aws_sync(root, p, bench.s3.endpoint_url)),
        RCLONE: ("rclone", lambda p: rclone_copy(root, p, bench.s3.endpoint_url)),
        "SDK PutObject x8": ("sdk", lambda p: _sdk_put(bench, root, p)),
    }
    warmup = bench.dir("backfill/warmup")
    for i in range(20):
        (warmup / f"{i}.json").write_text("{}")
    _sdk_put(bench, warmup, "backfill-warmup")
    names = list(tools)
    walls: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    copied: dict[str, int] = {}
    starts: list[dict[str, float]] = []
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            short, fn = tools[name]
            prefix = f"backfill-{short}" + (f"-r{r}" if r else "")
            cpu0, t0 = _children_cpu_s(), time.monotonic()
            fn(prefix)
            walls[name].append(time.monotonic() - t0)
            cpus[name].append(_children_cpu_s() - cpu0)
            copied[name] = min(copied.get(name, files), _count_objects(bench, prefix))
        # the daemon's start takes its turn in the same round: the same load as the tools
        starts.append(_daemon_milestones(bench, root, runs, files, r))
    rows: dict[str, Any] = {}
    for name in names:
        wall = statistics.median(walls[name])
        rows[name] = {
            "wall_s": wall,
            "files_per_s": files / wall,
            "cpu_s": statistics.median(cpus[name]),
            "walls_s": walls[name],
            "objects": copied[name],
        }
    base = rows[EVALSYNCD]["files_per_s"]
    for row in rows.values():
        row["evalsyncd_speedup"] = base / row["files_per_s"]
    return {
        "runs": runs,
        "files": files,
        "rounds": rounds,
        "tools": rows,
        "daemon": _medians(starts),
        "note": json.dumps(BENCHMARKS),
    }


def _listed(bench: Bench, prefix: str, runs: int) -> bool:
    """Whether a new reader (``EvalStore`` on a fresh ``S3Storage``, default settings, as
    ``evalsyncd runs ls`` would open it) lists all ``runs`` runs."""
    storage = bench.s3_storage(prefix)
    try:
        return len(EvalStore(storage).list_runs()) == runs
    except StorageError:  # not there yet
        return False
    finally:
        storage.close()


def _medians(starts: list[dict[str, float]]) -> dict[str, float | list[float]]:
    """The median of each milestone of :func:`_daemon_milestones` over the rounds' starts,
    and every start's (``*_all``): a single start is at the mercy of the machine's load,
    and of where the reader's polls fall."""
    out: dict[str, float | list[float]] = {}
    for key in ("all_runs_listed_s", "all_main_objects_s"):
        values = [m[key] for m in starts if key in m]
        if values:
            out[key] = statistics.median(values)
            out[f"{key}_all"] = values
    return out


def _daemon_milestones(
    bench: Bench, root: Path, runs: int, files: int, round_: int = 0
) -> dict[str, float]:
    """``evalsyncd run`` from scratch: seconds until ``EvalStore`` on the bucket lists
    every run (through the tail log and the catalog), and until every main object exists."""
    prefix = "backfill-daemon" + (f"-r{round_}" if round_ else "")
    state = bench.dir(f"backfill/daemon-state-{round_}")
    out: dict[str, float] = {}
    with Daemon(root, state, f"s3://{BUCKET}/{prefix}", bench.s3.endpoint_url):
        t0 = time.monotonic()
        deadline = t0 + 300.0
        while time.monotonic() < deadline and "all_main_objects_s" not in out:
            if "all_runs_listed_s" not in out:
                if _listed(bench, prefix, runs):
                    out["all_runs_listed_s"] = time.monotonic() - t0
                time.sleep(0.05)
                continue
            if _count_objects(bench, prefix) >= files:
                out["all_main_objects_s"] = time.monotonic() - t0
            time.sleep(0.2)
    return out


def main() -> int:
    """``python -m bench.backfill``: this measurement alone, on its own servers."""
    res = run_alone("backfill", run, quick="--quick" in sys.argv)
    for name, row in res["tools"].items():
        print(
            f"{name:22s} {row['wall_s']:5.2f} s  {row['files_per_s']:6.0f} files/s  "
            f"cpu {row['cpu_s']:5.2f} s  evalsyncd/tool {row['evalsyncd_speedup']:.2f}x"
        )
    print(json.dumps(res["daemon"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
