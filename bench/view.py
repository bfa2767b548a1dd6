"""Measurement 11: ``evalsyncd view``, its first screen over a big fleet and its live samples.

**First screen.** A fleet of 20 hosts x 500 runs (quick: 20 x 100) in the
bench S3 bucket under ``viewfleet/host-{i}``: each run's ``metadata.json``
and ``runs.jsonl`` line, as ``EvalStore`` writes them, and each host's run
catalog (``.evalsyncd/catalog.json``, built by ``catalog_from_root`` as the
daemon does). ``evalsyncd view s3://bench/viewfleet`` runs in this process
(its server on a thread, as the CLI runs it) over the loopback proxy that adds
10 ms each way (20 ms per request round trip) and counts requests. Each of 5
repetitions starts a fresh server (no cached listing, new SDK clients) and
times one ``GET /`` until its whole HTML is received: its first 200 rows (the
first screen; while the first listing goes on, those of the hosts listed so
far) are in it. Then, as ``view.js`` does next, ``GET /?fragment=1``, which
waits for the whole listing: the time from the first request until it is
received is the complete list's. Target: first screen at most 1.5 s, at most
3 requests per host (counted once the whole list is read).

Side by side, in the same run and through the same proxy: the reference
reader (tinker-cookbook 0.6.1's ``EvalStore`` over ``FsspecStorage``) lists
host after host, one read per run. It is measured on the first
``REFERENCE_HOSTS`` hosts and scaled to the fleet (its cost is linear in the
runs: each is one sequential read), and the table says so.

**Live.** A daemon (``evalsyncd run``, default ``flush_interval_s`` = 1 s)
mirrors a local root to ``s3://bench/viewlive/host`` through the same 20 ms
proxy; ``evalsyncd view s3://bench/viewlive`` serves the samples page of a
running eval. A writer appends one sample every 0.5 s; a poller fetches the
page's live fragment every ``refresh_s`` / 2 (0.5 s), as ``view.js`` does in an
open samples page, and records when each sample's line first appears. Target: p95 of
write-to-shown at most ``flush_interval_s`` + 2 s.

    python -m bench.view [--quick]     # standalone: prints the table
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import BUCKET, Bench, Daemon, reference_fsspec_storage, run_alone
from bench.fleet import load_reference_eval_store
from evalsyncd.catalog import CATALOG_PATH, catalog_from_root
from evalsyncd.storage import S3Storage
from evalsyncd.store import EvalStore, StoredTrajectory, StoredTurn
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.view import serve

__all__ = ["run"]

HOSTS = 20
RUNS_PER_HOST = 500
QUICK_RUNS_PER_HOST = 100
REFERENCE_HOSTS = 2
RTT_S = 0.020
FIRST_SCREEN_TARGET_S = 1.5
REQUESTS_PER_HOST_TARGET = 3.0
FLUSH_INTERVAL_S = 1.0
REFRESH_S = 1.0
FIRST_SCREEN_REPEATS = 5


@contextmanager
def view_server(storage: S3Storage, prefix: str, refresh_s: float = REFRESH_S) -> Iterator[str]:
    """``evalsyncd view`` on a thread (its own event loop, as the CLI); yields its base URL."""
    state: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        stop = asyncio.Event()
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop

        def on_ready(url: str) -> None:
            state["url"] = url
            ready.set()

        await serve(storage, prefix, port=0, refresh_s=refresh_s, stop=stop, on_ready=on_ready)

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            state["error"] = exc
            ready.set()

    thread = threading.Thread(target=thread_main, name="bench-view", daemon=True)
    thread.start()
    ready.wait(60)
    if "url" not in state:
        raise RuntimeError(f"the view server did not start: {state.get('error')!r}")
    try:
        yield str(state["url"])
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as r:
        return bytes(r.read())


def _get_or_empty(url: str) -> bytes:
    """The body, or ``b""`` for an error answer (a run not mirrored yet is a 404 page)."""
    try:
        return _get(url)
    except OSError:
        return b""


# -- first screen -----------------------------------------------------------------------


def _write_fleet(bench: Bench, root: Path, runs: int) -> None:
    for i in range(HOSTS):
        host = f"host-{i:02d}"
        store = EvalStore(root / host)
        for k in range(runs):
            store.create_run(
                f"model-{i % 4}",
                ["gsm8k", "math"],
                checkpoint_name=f"step{k * 10}",
                run_id=f"{host}-step{k * 10:05d}",
                config={"temperature": 0.6},
            )

    files = [
        (f"{h.name}/{p.relative_to(h).as_posix()}", p.read_bytes())
        for h in sorted(root.iterdir())
        for p in sorted(h.rglob("*"))
        if p.is_file()
    ]
    files += [(f"{h.name}/{CATALOG_PATH}", catalog_from_root(h)) for h in sorted(root.iterdir())]

    async def upload() -> None:
        storage = bench.s3_storage("viewfleet")
        sem = asyncio.Semaphore(48)

        async def put(key: str, data: bytes) -> None:
            async with sem:
                await storage.awrite(key, data)

        # the catalogs last, as the daemon writes them after the runs' files
        await asyncio.gather(*(put(k, d) for k, d in files[:-HOSTS]))
        await asyncio.gather(*(put(k, d) for k, d in files[-HOSTS:]))
        await storage.aclose()

    asyncio.run(upload())


def _first_screen(bench: Bench, proxy: CountingProxy, runs: int) -> dict[str, Any]:
    total_runs = HOSTS * runs
    firsts: list[float] = []
    completes: list[float] = []
    requests: list[int] = []
    partial = 0
    for _ in range(FIRST_SCREEN_REPEATS):
        storage = S3Storage(BUCKET, "", endpoint_url=proxy.url)
        with storage, view_server(storage, "viewfleet") as base:
            proxy.reset()
            start = time.perf_counter()
            html = _get(base).decode("utf-8")
            firsts.append(time.perf_counter() - start)
            rows = html.count('class="run"')
            shown = re.search(r'data-total="(\d+)"', html)
            if rows < min(200, runs) or shown is None:  # runs: those of one host
                raise RuntimeError(f"first screen: {rows} rows, summary {shown}")
            partial += 'data-partial="1"' in html
            # what view.js fetches next: the live fragment, which waits for the whole listing
            fragment = _get(f"{base}?fragment=1").decode("utf-8")
            completes.append(time.perf_counter() - start)
            requests.append(proxy.requests)
            whole = re.search(r'data-total="(\d+)"', fragment)
            if whole is None or int(whole.group(1)) != total_runs or "data-partial" in fragment:
                raise RuntimeError(f"complete list: summary {whole}, expected {total_runs} runs")
    ref_cls = load_reference_eval_store()
    proxy.reset()
    start = time.perf_counter()
    ref_runs = 0
    for i in range(REFERENCE_HOSTS):
        store = ref_cls(reference_fsspec_storage(f"viewfleet/host-{i:02d}", proxy.url))
        ref_runs += len(store.list_runs())
    ref_s = time.perf_counter() - start
    ref_requests = proxy.requests
    if ref_runs != REFERENCE_HOSTS * runs:
        raise RuntimeError(f"reference listed {ref_runs} runs")
    scale = HOSTS / REFERENCE_HOSTS
    ours_s = statistics.median(firsts)
    ours_req = statistics.median(requests)
    # 2 requests are the fleet prefix's (its listing, the tail-log probe of the
    # storage root); each host then costs its runs/ listing, its tail-log probe
    # and its catalog read.
    per_host = (ours_req - 2) / HOSTS
    return {
        "hosts": HOSTS,
        "runs": total_runs,
        "repeats": FIRST_SCREEN_REPEATS,
        "evalsyncd_s": ours_s,
        "evalsyncd_s_all": firsts,
        "first_partial": partial,
        "complete_s": statistics.median(completes),
        "complete_s_all": completes,
        "evalsyncd_requests": ours_req,
        "evalsyncd_requests_per_host": per_host,
        "reference_s": ref_s * scale,
        "reference_requests": ref_requests * scale,
        "reference_measured_hosts": REFERENCE_HOSTS,
        "reference_measured_s": ref_s,
        "speedup": ref_s * scale / ours_s,
        "target_s": FIRST_SCREEN_TARGET_S,
        "target_requests_per_host": REQUESTS_PER_HOST_TARGET,
        "ok": max(firsts) <= FIRST_SCREEN_TARGET_S and per_host <= REQUESTS_PER_HOST_TARGET,
    }


# -- live ---------------------------------------------------------------------------------


def _live(bench: Bench, proxy: CountingProxy, samples: int) -> dict[str, Any]:
    root = bench.dir("viewlive/root")
    state = bench.dir("viewlive/state")
    store = EvalStore(root)
    run_id = store.create_run("live-model", ["gsm8k"], checkpoint_name="step1", run_id="live-run")
    first = StoredTrajectory(idx=0, benchmark="gsm8k", example_id="ex0", reward=1.0)
    store.write_trajectory(run_id, "gsm8k", first)
    written: dict[int, float] = {}
    shown: dict[int, float] = {}
    daemon = Daemon(
        root,
        state,
        f"s3://{BUCKET}/viewlive/host",
        proxy.url,
        flush_interval_s=FLUSH_INTERVAL_S,
    )
    with daemon:
        storage = S3Storage(BUCKET, "", endpoint_url=proxy.url)
        with storage, view_server(storage, "viewlive") as base:
            page = f"{base}samples?host=host&run={run_id}&benchmark=gsm8k&size=500&fragment=1"
            deadline = time.monotonic() + 60
            while b'data-line="0"' not in _get_or_empty(page):  # the daemon's first pass
                if time.monotonic() > deadline:
                    raise RuntimeError("live: the first sample never showed")
                time.sleep(0.2)
            stop = threading.Event()

            def poll() -> None:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        html = _get(page).decode("utf-8")
                    except OSError:
                        html = ""
                    now = time.monotonic()
                    for m in re.finditer(r'data-line="(\d+)"', html):
                        shown.setdefault(int(m.group(1)), now)
                    stop.wait(max(0.0, REFRESH_S / 2 - (now - t0)))

            poller = threading.Thread(target=poll, name="bench-view-poll", daemon=True)
            poller.start()
            for i in range(1, samples + 1):
                t = StoredTrajectory(
                    idx=i,
                    benchmark="gsm8k",
                    example_id=f"ex{i}",
                    turns=[StoredTurn("assistant", f"answer {i}")],
                    reward=float(i % 2),
                )
                store.write_trajectory(run_id, "gsm8k", t)
                written[i] = time.monotonic()
                time.sleep(0.5)
            deadline = time.monotonic() + 30
            while len([i for i in written if i in shown]) < samples and time.monotonic() < deadline:
                time.sleep(0.1)
            stop.set()
            poller.join(30)
    lat = sorted(shown[i] - written[i] for i in written if i in shown)
    missing = samples - len(lat)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else float("inf")
    target = FLUSH_INTERVAL_S + 2.0
    return {
        "samples": samples,
        "missing": missing,
        "p50_s": statistics.median(lat) if lat else float("inf"),
        "p95_s": p95,
        "max_s": lat[-1] if lat else float("inf"),
        "refresh_s": REFRESH_S,
        "poll_s": REFRESH_S / 2,
        "flush_interval_s": FLUSH_INTERVAL_S,
        "target_s": target,
        "ok": missing == 0 and p95 <= target,
    }


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 11 (the S3 server, through the 20 ms proxy)."""
    runs = QUICK_RUNS_PER_HOST if bench.quick else RUNS_PER_HOST
    with tempfile.TemporaryDirectory(dir=bench.tmp, prefix="viewfleet-") as tmp:
        _write_fleet(bench, Path(tmp), runs)
    proxy = CountingProxy("127.0.0.1", bench.s3.port, one_way_s=RTT_S / 2).start()
    try:
        first = _first_screen(bench, proxy, runs)
        live = _live(bench, proxy, 20 if bench.quick else 40)
    finally:
        proxy.stop()
    return {"first_screen": first, "live": live}


def main() -> int:
    result = run_alone("view", run, quick="--quick" in sys.argv[1:])
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
