"""Measurement 7: requests per hour and per second, by number of growing files, at default settings.

``files`` ``trajectories.jsonl`` files each get a 300-byte line every 200 ms for
``duration_s`` (30 s; 20 s quick) while the daemon runs with its default
settings (``flush_interval_s`` 1 s, tail log on, ``max_main_lag_s`` 60 s), to S3
and to GCS side by side, each through its own counting proxy. The same runs
with ``max_main_lag_s = 0`` give the per-file design of the first version (every
main object exact after each flush). HTTP requests are counted by parsing the
request stream in the proxy from the first line written to the daemon's exit
(SIGTERM brings every main object up to date: included), and scaled to an hour.

Baseline in the same run: ``aws s3 sync`` once per flush, which costs a LIST
plus one PUT per changed file per invocation (its requests per invocation are
counted in measurement 1 for one file; here ``1 + files`` per second).

Target (issue "one request per flush"): the requests of a flush do not grow
with the number of files; at 50 files, at most 5 requests a second per destination.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bench.common import BUCKET, Bench, Daemon
from evalsyncd.testing.proxy import CountingProxy

__all__ = ["run"]

LINE = b'{"idx": 0, "pad": "' + b"z" * 276 + b'"}\n'
PERIOD_S = 0.2


def _one(
    bench: Bench, scheme: str, files: int, mode: str, duration_s: float, out: dict[str, Any]
) -> None:
    server = bench.s3 if scheme == "s3" else bench.gcs
    tag = f"requests-{scheme}-{files}-{mode}"
    root = bench.dir(f"{tag}/root")
    state = bench.dir(f"{tag}/state")
    paths = [root / f"runs/r{i:03d}/gsm8k/trajectories.jsonl" for i in range(files)]
    for p in paths:
        p.parent.mkdir(parents=True)
    extra = {"max_main_lag_s": 0.0} if mode == "per-file" else {}
    with CountingProxy("127.0.0.1", server.port) as proxy:
        daemon = Daemon(
            root, state, f"{scheme}://{BUCKET}/{tag}", proxy.url, destination=extra
        ).start()
        try:
            time.sleep(2.0)
            proxy.reset()
            t0 = time.monotonic()
            n = 0
            fds = [open(p, "ab", buffering=0) for p in paths]  # noqa: SIM115 - closed below
            try:
                while time.monotonic() - t0 < duration_s:
                    for f in fds:
                        f.write(LINE)
                    n += 1
                    time.sleep(max(0.0, t0 + n * PERIOD_S - time.monotonic()))
            finally:
                for f in fds:
                    f.close()
        finally:
            daemon.stop()
        reqs = proxy.requests
    out[f"{scheme} {files} {mode}"] = {
        "files": files,
        "mode": mode,
        "lines": n * files,
        "seconds": duration_s,
        "requests": reqs,
        "requests_per_s": reqs / duration_s,
        "requests_per_hour": reqs * 3600 / duration_s,
        "requests_per_file_hour": reqs * 3600 / duration_s / files,
        "bytes_per_hour": proxy.total * 3600 / duration_s,
    }


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 7."""
    duration_s = 20.0 if bench.quick else 30.0
    counts = (1, 10, 50) if bench.quick else (1, 10, 50, 200)
    out: dict[str, Any] = {}
    for files in counts:
        for mode in ("tail log", "per-file"):
            threads = [
                threading.Thread(target=_one, args=(bench, s, files, mode, duration_s, out))
                for s in ("s3", "gs")
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    res: dict[str, Any] = {}
    for files in counts:
        for scheme, label in (("s3", "S3"), ("gs", "GCS")):
            for mode in ("tail log", "per-file"):
                key = f"{scheme} {files} {mode}"
                res[f"{files} files, {label}, {mode}"] = out.get(key, {"error": "failed"})
        res[f"{files} files, aws s3 sync every 1 s"] = {
            "files": files,
            "mode": "aws s3 sync",
            "requests_per_s": 1.0 + files,
            "requests_per_hour": (1.0 + files) * 3600,
            "requests_per_file_hour": (1.0 + files) * 3600 / files,
        }
    return res
