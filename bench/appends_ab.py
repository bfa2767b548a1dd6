"""S3 appends below 5 MiB, per source tree: the segment log against whole rewrites.

What ``max_main_lag_s = 0`` (the per-file path: ``append(path, data, offset=N)``
per file per flush, then ``flush()`` at a stop or after ``compact_idle_s``) and
library appends (``EvalStore`` opened on ``s3://``, one ``append`` per
trajectory) cost on S3, measured for each source tree given with ``--tree``
(a checkout of evalsyncd put first on ``PYTHONPATH``), side by side on one
SeaweedFS server in one run. Each tree's worker process talks to the server
through its own counting proxy (``evalsyncd.testing.proxy.CountingProxy``) and
reports requests, bytes up and down, and the latency of each append; then the
requests of one ``stat``, ``read``, ``read_range``, ``exists`` and ``remove``
of a file it appended to, from a fresh instance (main objects alone:
``read_tail = False``).

Cases:

- ``library``: ``EvalStore.write_trajectory`` of ``--lines`` trajectories of
  about 1 KiB to one benchmark, then ``flush()``;
- ``per-file 4 MiB``: 64 appends of 64 KiB at their offsets, then ``flush()``;
- ``per-file 8 MiB``: 64 appends of 128 KiB (crossing 5 MiB: multipart copy).

Nothing here asserts: it measures. ``--rtt-ms`` adds a round trip to each
request (the proxy delays each chunk by half of it).

    python -m bench.appends_ab --tree /path/to/baseline --tree .
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

BUCKET = "appends"
KiB = 1024
MiB = 1024 * KiB


def _worker(endpoint: str, prefix: str, lines: int, rtt_ms: float) -> dict[str, Any]:
    """Run every case against ``endpoint`` with the evalsyncd on ``sys.path``."""
    from urllib.parse import urlsplit

    import evalsyncd
    from evalsyncd import EvalStore, StoredTrajectory
    from evalsyncd.storage import S3Storage
    from evalsyncd.testing.proxy import CountingProxy

    target = urlsplit(endpoint)
    assert target.hostname is not None and target.port is not None
    out: dict[str, Any] = {"evalsyncd": str(Path(evalsyncd.__file__).parent.parent)}
    with CountingProxy(target.hostname, target.port, one_way_s=rtt_ms / 2000) as proxy:

        def counts() -> dict[str, int]:
            return {"requests": proxy.requests, "up": proxy.bytes_up, "down": proxy.bytes_down}

        def case(name: str, grow: Any) -> None:
            storage = S3Storage(BUCKET, f"{prefix}/{name}", endpoint_url=proxy.url)
            with storage:
                storage.exists("warm-up")  # client and bucket check, not counted
                proxy.reset()
                path, latencies, total = grow(storage)
                appended = counts()
                proxy.reset()
                storage.flush()
                flushed = counts()
            fresh = S3Storage(BUCKET, f"{prefix}/{name}", endpoint_url=proxy.url)
            fresh.read_tail = False
            reads: dict[str, int] = {}
            with fresh:
                fresh.exists("warm-up")
                for op, args in [
                    ("stat", (path,)),
                    ("exists", (path,)),
                    ("read", (path,)),
                    ("read_range", (path, 0, 100)),
                    ("remove", (path,)),
                ]:
                    proxy.reset()
                    getattr(fresh, op)(*args)
                    reads[op] = proxy.requests
            out[name] = {
                "appends": len(latencies),
                "bytes": total,
                "appended": appended,
                "flush": flushed,
                "latency_s": latencies,
                "reads": reads,
            }

        def library(storage: Any) -> tuple[str, list[float], int]:
            store = EvalStore(storage)
            run = store.create_run("m", ["b"])
            latencies = []
            for i in range(lines):
                traj = StoredTrajectory(idx=i, benchmark="b", reward=1.0, logs={"pad": "x" * 900})
                t0 = time.perf_counter()
                store.write_trajectory(run, "b", traj)
                latencies.append(time.perf_counter() - t0)
            path = f"runs/{run}/b/trajectories.jsonl"
            return path, latencies, len(storage.read(path))

        def per_file(step: int) -> Any:
            def grow(storage: Any) -> tuple[str, list[float], int]:
                block = (b"x" * (KiB - 1) + b"\n") * (step // KiB)
                latencies = []
                for i in range(64):
                    t0 = time.perf_counter()
                    storage.append("t.jsonl", block, offset=i * step)
                    latencies.append(time.perf_counter() - t0)
                return "t.jsonl", latencies, 64 * step

            return grow

        case("library", library)
        case("per-file 4 MiB", per_file(64 * KiB))
        case("per-file 8 MiB", per_file(128 * KiB))
    return out


def _run_tree(tree: Path, endpoint: str, prefix: str, args: argparse.Namespace) -> dict[str, Any]:
    # imported here: the worker is this file run under another tree's bench package
    from bench.common import run_in_tree

    worker = [str(Path(__file__).resolve()), "--worker", endpoint, prefix]
    return run_in_tree(tree, [*worker, str(args.lines), str(args.rtt_ms)], "worker")


def _row(tree: str, name: str, r: dict[str, Any]) -> str:
    lat = sorted(r["latency_s"])
    p50 = statistics.median(lat) * 1000
    p95 = lat[int(0.95 * (len(lat) - 1))] * 1000
    a, f = r["appended"], r["flush"]
    wire = a["up"] + a["down"] + f["up"] + f["down"]
    reads = " / ".join(str(r["reads"][k]) for k in ("stat", "exists", "read", "read_range"))
    return (
        f"| {name} | {tree} | {r['appends']} | {r['bytes']:,} | "
        f"{a['requests'] / r['appends']:.2f} | {f['requests']} | "
        f"{a['up']:,} / {a['down']:,} | {f['up']:,} / {f['down']:,} | "
        f"{wire / r['bytes']:.2f}x | {p50:.1f} / {p95:.1f} | {reads} | {r['reads']['remove']} |"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        endpoint, prefix, lines, rtt_ms = argv[1], argv[2], int(argv[3]), float(argv[4])
        print(json.dumps(_worker(endpoint, prefix, lines, rtt_ms)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.appends_ab", description=__doc__)
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--lines", type=int, default=300, help="library appends (trajectories)")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="added round trip, ms")
    args = parser.parse_args(argv)
    from evalsyncd.testing.servers import SeaweedS3Server

    with tempfile.TemporaryDirectory(prefix="appends-ab-") as tmp:
        server = SeaweedS3Server(Path(tmp) / "seaweed").start()
        try:
            server.create_bucket(BUCKET)
            os.environ.update(server.client_env())
            results = {}
            for i, tree in enumerate(args.tree):
                results[str(tree)] = _run_tree(
                    tree.resolve(), server.endpoint_url, f"t{i}-{time.time_ns()}", args
                )
        finally:
            server.stop()
    print(f"added RTT {args.rtt_ms:g} ms; SeaweedFS on loopback\n")
    print(
        "| case | tree | appends | bytes appended | requests / append | flush requests | "
        "up / down during appends | up / down at flush | wire / appended | "
        "latency per append p50 / p95 (ms) | requests: stat / exists / read / read_range | "
        "remove |"
    )
    print("| --- " * 12 + "|")
    names = [n for n in next(iter(results.values())) if n != "evalsyncd"]
    for name in names:
        for tree, res in results.items():
            print(_row(f"{tree} ({res['evalsyncd']})", name, res[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
