"""Measurement 6: the daemon's footprint (RSS, CPU) and the rescan time of a large tree.

- **Idle**: a tree of 10,000 small files (2,000 quick; half ``.json``, half
  ``.jsonl``) is mirrored to S3; once the journal acknowledges every byte, RSS
  and CPU are sampled for 10 s (5 s quick) with nothing changing.
- **Backlog**: with that daemon still running, a backlog is moved into the root
  in one ``rename`` (files written beforehand elsewhere on the same disk): first
  a quarter of the size, then the full size (1 GiB; 128 MiB quick), 32 JSONL files
  each. RSS is sampled every 0.2 s until the journal acknowledges every byte;
  peak RSS of the two backlogs shows whether memory grows with the backlog.
  Catch-up throughput is reported too.
- **Rescan**: ``Service.rescan()`` of a tree of 100,000 empty files (20,000
  quick) in this process, with an empty journal (every file is new: the
  costliest case), against a bare ``os.scandir`` walk with ``stat`` of the same
  tree (the floor any scanner pays).

"Caught up" is read from the daemon's own journal (SQLite, opened read-only):
the sum of acknowledged offsets equals the bytes on disk.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import BUCKET, Bench, Daemon, wait_until
from evalsyncd.config import load_settings
from evalsyncd.sync.service import JOURNAL_NAME, Service

__all__ = ["run"]

MiB = 1024 * 1024


def _acked_bytes(state: Path) -> int:
    path = state / JOURNAL_NAME
    if not path.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            row = con.execute("SELECT COALESCE(SUM(acked_offset), 0) FROM entries").fetchone()
            return int(row[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            total += os.stat(os.path.join(dirpath, f)).st_size
    return total


def _small_tree(root: Path, files: int) -> None:
    line = b'{"idx": 0, "reward": 1.0, "pad": "' + b"x" * 200 + b'"}\n'
    for i in range(files):
        d = root / f"runs/r{i // 10:04d}"
        d.mkdir(parents=True, exist_ok=True)
        if i % 2:
            (d / f"b{i % 10}.jsonl").write_bytes(line * 2)
        else:
            (d / f"b{i % 10}.json").write_bytes(b'{"score": 0.5, "n": %d}' % i)


def _backlog(staging: Path, total: int) -> None:
    staging.mkdir(parents=True)
    line = (b'{"idx": 0, "pad": "' + b"y" * 1000 + b'"}\n')[:1023] + b"\n"
    per_file = total // 32
    block = line * (4 * MiB // len(line))
    for i in range(32):
        with open(staging / f"t{i:02d}.jsonl", "wb") as f:
            left = per_file
            while left > 0:
                chunk = block[: min(len(block), left - left % len(line) or len(line))]
                f.write(chunk)
                left -= len(chunk)


def _rescan(bench: Bench, files: int) -> dict[str, Any]:
    root = bench.dir("rescan/root")
    for i in range(files):
        d = root / f"runs/r{i // 100:04d}/b"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i % 100:02d}.jsonl").touch()
    t0 = time.perf_counter()
    n = 0
    stack = [str(root)]
    while stack:
        for e in os.scandir(stack.pop()):
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            else:
                e.stat(follow_symlinks=False)
                n += 1
    walk_s = time.perf_counter() - t0
    settings = load_settings(
        root=root,
        state_dir=bench.dir("rescan/state"),
        destinations=[
            {
                "name": "bench",
                "url": f"s3://{BUCKET}/rescan",
                "endpoint_url": bench.s3.endpoint_url,
            }
        ],
    )

    async def scan() -> tuple[int, float]:
        service = Service(settings)
        await service.open()
        try:
            t = time.perf_counter()
            seen = await service.rescan()
            return seen, time.perf_counter() - t
        finally:
            await service.close()

    seen, rescan_s = asyncio.run(scan())
    if seen != n:
        raise RuntimeError(f"rescan saw {seen} files, the walk {n}")
    return {"files": n, "rescan_s": rescan_s, "walk_stat_s": walk_s, "ratio": rescan_s / walk_s}


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 6."""
    files, idle_s, backlog = (2_000, 5.0, 128 * MiB) if bench.quick else (10_000, 10.0, 1024 * MiB)
    root = bench.dir("footprint/root")
    state = bench.dir("footprint/state")
    _small_tree(root, files)
    res: dict[str, Any] = {"files": files}
    with Daemon(root, state, f"s3://{BUCKET}/footprint", bench.s3.endpoint_url) as d:
        want = _tree_bytes(root)
        t0 = time.monotonic()
        if not wait_until(lambda: _acked_bytes(state) >= want, 600.0, 0.25):
            raise RuntimeError("the daemon did not catch up with the small-file tree")
        res["initial_sync_s"] = time.monotonic() - t0
        time.sleep(1.0)
        cpu0, w0 = d.cpu_s(), time.monotonic()
        rss = []
        while time.monotonic() - w0 < idle_s:
            rss.append(d.rss())
            time.sleep(0.2)
        res["idle"] = {
            "rss_mib": statistics.median(rss) / MiB,
            "cpu_percent": 100 * (d.cpu_s() - cpu0) / (time.monotonic() - w0),
            "seconds": idle_s,
        }
        res["backlogs"] = []
        for size in (backlog // 4, backlog):
            staging = bench.tmp / f"footprint/staging-{size // MiB}"
            _backlog(staging, size)
            want = _tree_bytes(root) + _tree_bytes(staging)
            cpu0, w0 = d.cpu_s(), time.monotonic()
            os.rename(staging, root / f"backlog-{size // MiB}")
            samples: list[tuple[float, int]] = []
            while _acked_bytes(state) < want:
                samples.append((time.monotonic() - w0, d.rss()))
                if time.monotonic() - w0 > 600 or not d.alive():
                    raise RuntimeError(f"backlog of {size // MiB} MiB not caught up")
                time.sleep(0.2)
            wall = time.monotonic() - w0
            res["backlogs"].append(
                {
                    "backlog_mib": size // MiB,
                    "catch_up_s": wall,
                    "mib_per_s": size / MiB / wall,
                    "peak_rss_mib": max(r for _, r in samples) / MiB if samples else 0.0,
                    "cpu_percent": 100 * (d.cpu_s() - cpu0) / wall,
                    "rss_series": [(round(t, 2), r / MiB) for t, r in samples],
                }
            )
    small, big = res["backlogs"]
    res["rss_growth_ratio"] = big["peak_rss_mib"] / max(small["peak_rss_mib"], 1e-9)
    res["rescan"] = _rescan(bench, 20_000 if bench.quick else 100_000)
    return res
