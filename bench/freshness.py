"""Measurement 2: freshness, the time from a line's write to its visibility in the bucket.

``files`` JSONL files each get one ~200-byte line every 50 ms for ``duration_s``
while the daemon (default settings, S3, talking to the server directly) runs.
The writer records, per file, the end offset and ``time.monotonic()`` of every
line right after its ``write``.

Visibility is read two ways: as evalsyncd's readers see the file
(``S3Storage.astat``: main object plus pending tail pieces, what ``EvalStore``
reads; the poller re-reads the tail index every 0.2 s, ``tail_refresh_s``) and
as plain tools see it (the main object alone, what ``aws s3 cp`` reads).
Targets: evalsyncd readers p99 at most ``flush_interval_s`` + 1 s; plain
readers p99 at most ``max_main_lag_s`` + ``flush_interval_s`` + 1 s. A sample of
``sampled`` files is polled continuously, all of them concurrently in each round;
a line counts as visible at the *end* of the first round whose size covers it.
Latencies are thus upper bounds, too high by at most one round (the round time
is reported). Every line of every sampled file is measured; polling all 200
files would only load the two-core machine with requests that compete with
the daemon. After the writers stop, polling continues until the sampled files
are complete (or 60 s).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from typing import Any

from bench.common import BUCKET, Bench, Daemon

__all__ = ["run"]

PERIOD_S = 0.05


def _percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 2."""
    files, duration_s, sampled = (50, 20.0, 20) if bench.quick else (200, 60.0, 40)
    root = bench.dir("fresh/root")
    state = bench.dir("fresh/state")
    prefix = "fresh"
    rels = [f"runs/r{i:03d}/gsm8k/trajectories.jsonl" for i in range(files)]
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    step = max(1, files // sampled)
    sample = rels[::step][:sampled]
    writes: dict[str, list[tuple[int, float]]] = {rel: [] for rel in sample}
    stop_writing = threading.Event()
    late_ticks = 0

    def writer() -> None:
        nonlocal late_ticks
        fds = {rel: os.open(root / rel, os.O_WRONLY | os.O_APPEND) for rel in rels}
        sizes = dict.fromkeys(rels, 0)
        try:
            n = 0
            start = time.monotonic()
            while not stop_writing.is_set():
                for rel, fd in fds.items():
                    line = (
                        f'{{"idx": {n}, "t": {time.time():.6f}, "file": "{rel}", '
                        f'"pad": "{"x" * 80}"}}\n'
                    ).encode()
                    os.write(fd, line)
                    sizes[rel] += len(line)
                    if rel in writes:
                        writes[rel].append((sizes[rel], time.monotonic()))
                n += 1
                due = start + n * PERIOD_S
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                else:
                    late_ticks += 1
        finally:
            for fd in fds.values():
                os.close(fd)

    latencies: list[float] = []
    plain: list[float] = []
    rounds: list[float] = []

    async def poller(writing: threading.Thread) -> None:
        storage = bench.s3_storage(prefix)
        storage.tail_refresh_s = 0.2
        main_only = bench.s3_storage(prefix)
        main_only.read_tail = False
        seen = dict.fromkeys(sample, 0)  # lines already resolved per file
        seen_plain = dict.fromkeys(sample, 0)
        try:
            deadline = None
            while True:
                t0 = time.monotonic()
                stats, mains = await asyncio.gather(
                    asyncio.gather(*(storage.astat(rel) for rel in sample)),
                    asyncio.gather(*(main_only.astat(rel) for rel in sample)),
                )
                t1 = time.monotonic()
                rounds.append(t1 - t0)
                for got, into, done in ((stats, latencies, seen), (mains, plain, seen_plain)):
                    for rel, st in zip(sample, got, strict=True):
                        size = st.size if st is not None else 0
                        w = writes[rel]
                        i = done[rel]
                        while i < len(w) and w[i][0] <= size:
                            into.append(t1 - w[i][1])
                            i += 1
                        done[rel] = i
                if not writing.is_alive():
                    deadline = deadline or time.monotonic() + 80.0
                    complete = all(seen[r] == seen_plain[r] == len(writes[r]) for r in sample)
                    if complete or t1 > deadline:
                        break
                await asyncio.sleep(0.05)
        finally:
            await storage.aclose()
            await main_only.aclose()

    with Daemon(root, state, f"s3://{BUCKET}/{prefix}", bench.s3.endpoint_url) as daemon:
        time.sleep(2.0)  # the startup scan of empty files
        t = threading.Thread(target=writer, name="fresh-writer")
        t.start()
        timer = threading.Timer(duration_s, stop_writing.set)
        timer.start()
        try:
            asyncio.run(poller(t))
        finally:
            stop_writing.set()
            timer.cancel()
            t.join()
        alive = daemon.alive()
    total_lines = sum(len(w) for w in writes.values())
    return {
        "files": files,
        "duration_s": duration_s,
        "lines_per_s": files / PERIOD_S,
        "sampled_files": len(sample),
        "sampled_lines": total_lines,
        "measured_lines": len(latencies),
        "late_writer_ticks": late_ticks,
        "poll_round_s_median": statistics.median(rounds),
        "p50_s": _percentile(latencies, 50),
        "p99_s": _percentile(latencies, 99),
        "max_s": max(latencies),
        "latencies": latencies,
        "plain_measured_lines": len(plain),
        "plain_p50_s": _percentile(plain, 50) if plain else None,
        "plain_p99_s": _percentile(plain, 99) if plain else None,
        "plain_max_s": max(plain) if plain else None,
        "flush_interval_s": 1.0,
        "max_main_lag_s": 60.0,
        "target_p99_s": 2.0,
        "target_plain_p99_s": 62.0,
        "daemon_alive": alive,
    }
