"""Measurement 7: requests per hour for one steadily appending file at default settings.

One ``trajectories.jsonl`` gets a ~1 KiB line every 100 ms for 60 s (20 s quick)
while the daemon runs with its default ``flush_interval_s`` (1 s), once to S3
and once to GCS (side by side, each through its own counting proxy). HTTP
requests are counted by parsing the request stream in the proxy, from the
first line to the daemon's exit (SIGTERM flushes: the S3 compaction is
included), and scaled to an hour.

Baselines in the same run: "one PUT per flush" (3,600 an hour, the floor for a
tool that rewrites the object once a second) and ``aws s3 sync`` once a second
(its requests per invocation, counted in measurement 1, times 3,600).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bench.common import BUCKET, Bench, Daemon
from evalsyncd.devproxy import CountingProxy

__all__ = ["run"]


def _one(bench: Bench, scheme: str, duration_s: float, out: dict[str, Any]) -> None:
    server = bench.s3 if scheme == "s3" else bench.gcs
    root = bench.dir(f"requests-{scheme}/root")
    state = bench.dir(f"requests-{scheme}/state")
    path = root / "runs/r0/gsm8k/trajectories.jsonl"
    path.parent.mkdir(parents=True)
    line = b'{"idx": 0, "pad": "' + b"z" * 1000 + b'"}\n'
    with CountingProxy("127.0.0.1", server.port) as proxy:
        daemon = Daemon(root, state, f"{scheme}://{BUCKET}/requests", proxy.url).start()
        try:
            time.sleep(2.0)
            proxy.reset()
            t0 = time.monotonic()
            n = 0
            with open(path, "ab", buffering=0) as f:
                while time.monotonic() - t0 < duration_s:
                    f.write(line)
                    n += 1
                    time.sleep(max(0.0, t0 + n * 0.1 - time.monotonic()))
        finally:
            daemon.stop()
        reqs = proxy.requests
    out[scheme] = {
        "lines": n,
        "seconds": duration_s,
        "requests": reqs,
        "requests_per_hour": reqs * 3600 / duration_s,
        "bytes_per_hour": proxy.total * 3600 / duration_s,
    }


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 7."""
    duration_s = 20.0 if bench.quick else 60.0
    out: dict[str, Any] = {}
    threads = [
        threading.Thread(target=_one, args=(bench, s, duration_s, out)) for s in ("s3", "gs")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res: dict[str, Any] = {
        "evalsyncd (S3)": out.get("s3", {"error": "failed"}),
        "evalsyncd (GCS)": out.get("gs", {"error": "failed"}),
        "one PUT per flush": {"requests_per_hour": 3600.0},
    }
    wire = bench.results.get("wire", {}).get("8 MiB / 64 steps", {}).get("aws s3 sync", {})
    if "requests_per_step" in wire:
        res["aws s3 sync every 1 s"] = {"requests_per_hour": wire["requests_per_step"] * 3600}
    return res
