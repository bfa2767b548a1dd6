"""Measurement 10: reading samples (``evalsyncd.samples``): a big file, compare, bulk reads.

Everything is read from the bench S3 bucket (SeaweedFS) through
``evalsyncd.testing.proxy.CountingProxy`` adding 10 ms each way (20 ms per
request round trip), which also counts requests and bytes. The index cache is
a fresh directory under the scratch space.

- **A big file**: one ``trajectories.jsonl`` of about 1 GiB, 200,000 samples of
  about 5 KiB (quick: 100 MiB, 20,000), uploaded as one object. Cases,
  each next to today's reader, ``EvalStore.iter_trajectories`` (streams 1 MiB
  ranges and stops when it has what it needs):
  the first page of 50 samples without an index (``SampleReader.ahead``: the
  target is <= 1 s and <= 1 % of the file fetched); the "incorrect" filter's
  first page without an index (``ahead(filter=...)``, target <= 2 s); the
  index build (seconds, CPU seconds of this process, which also runs the
  proxy, and MiB/s); a page in the middle once indexed (``apage``: the target
  is one or two ranged reads; the reference streams up to it), and again with
  ``refresh=False`` (no index check); the "incorrect"
  filter's first page once indexed; a text search whose only match is the
  last sample (streams the whole file); a re-check of the index with no
  change (one ranged read).
- **A 50 MB sample**: a file whose second line holds a 50 MB turn;
  ``asample_preview`` cold (index build of that file included) and warm.
  Target: first screen <= 1 s.
- **Compare**: two runs of 100,000 samples each (20,000 quick), indexed;
  ``compare_indexes`` (what the compare page calls: the index read as columns,
  categories, McNemar and the bootstrap) plus its first page of regressions,
  5 times (median, min, max); ``compare`` of the entries loaded as lists, once,
  in the note. Target <= 2 s.
- **Bulk reads**: the samples of 300 runs x 2 benchmarks x 10 samples (section
  4's shape): ``SampleReader.aread_many`` (32, then 64 files in flight; the
  client's ``max_pool_connections`` is 64), 3 times each (median, min, max,
  and the CPU seconds of the event loop's thread), against the reference's
  pattern, one ``read`` per file one after the other plus ``json.loads`` per
  line, on the same client. Target >= 10x. One more row: the same GETs by the
  SDK client alone (``get_object``, no parsing), the floor of any reader on it.

    python -m bench.samples [--quick]   # standalone: prints the rows
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bench.common import Bench, run_alone
from evalsyncd.samples import Category, SampleFilter, SampleReader, compare, compare_indexes
from evalsyncd.storage import S3Storage
from evalsyncd.store import EvalStore
from evalsyncd.testing.proxy import CountingProxy

__all__ = ["run"]

RTT_S = 0.020
PAGE = 50
T = TypeVar("T")
MiB = 1 << 20


def _text(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def _big_lines(count: int, seed: int = 0) -> Callable[[int, int], bytes]:
    """A maker of lines ``[lo, hi)`` of the big file (about 5 KiB each)."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(500)
    ]
    pool = _text(rng, words, 40_000)

    def make(lo: int, hi: int) -> bytes:
        out = []
        for i in range(lo, hi):
            a = (i * 7919) % (len(pool) - 5000)
            reward = 1.0 if i % 3 == 0 else 0.0
            record = {
                "idx": i,
                "benchmark": "big",
                "example_id": f"ex-{i}",
                "turns": [
                    {"role": "user", "content": pool[a : a + 1500], "token_count": 300},
                    {"role": "assistant", "content": pool[a + 1500 : a + 4500], "token_count": 600},
                ],
                "reward": reward,
                "metrics": {"correct": reward},
                "logs": {},
                "error": "timeout" if i % 50 == 7 else None,
                "time_seconds": 1.5,
            }
            if i == count - 1:
                record["turns"][1]["content"] += " NEEDLE-AT-THE-END"  # type: ignore[index]
            out.append(json.dumps(record).encode() + b"\n")
        return b"".join(out)

    return make


def _timed(fn: Callable[[], Awaitable[T]], loop: asyncio.AbstractEventLoop) -> tuple[float, T]:
    start = time.perf_counter()
    result = loop.run_until_complete(fn())
    return time.perf_counter() - start, result


def _row(
    case: str,
    ours_s: float,
    *,
    ref_s: float | None = None,
    target: str = "-",
    ok: bool | None = None,
    requests: float | None = None,
    mib: float | None = None,
    proxy: CountingProxy | None = None,
    note: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of the table; ``proxy``: its requests and MiB down since its last reset."""
    if proxy is not None:
        requests, mib = proxy.requests, proxy.bytes_down / MiB
    return {
        **(extra or {}),
        "case": case,
        "reference_s": ref_s,
        "evalsyncd_s": ours_s,
        "speedup": (ref_s / ours_s) if ref_s and ours_s else None,
        "target": target,
        "ok": ok,
        "requests": requests,
        "mib_fetched": mib,
        "note": note,
    }


def _upload_big(storage: S3Storage, path: str, count: int) -> int:
    make = _big_lines(count)
    step = 6_000  # about 32 MiB per piece
    data = b"".join(make(lo, min(count, lo + step)) for lo in range(0, count, step))
    storage.write(path, data)  # one object (appends to a 1 GB object would copy it each time)
    return len(data)


def _big_cases(bench: Bench, proxy: CountingProxy, count: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    path = "runs/big/big/trajectories.jsonl"
    with bench.s3_storage("samples-big") as direct:
        size = _upload_big(direct, path, count)
        long_line = json.dumps(
            {
                "idx": 1,
                "benchmark": "long",
                "turns": [{"role": "assistant", "content": "y" * (50 * MiB)}],
                "reward": 1.0,
            }
        ).encode()
        direct.write(
            "runs/big/long/trajectories.jsonl",
            b'{"idx": 0, "benchmark": "long", "reward": 0.0}\n' + long_line + b"\n",
        )
    mib = size / MiB
    cache = Path(tempfile.mkdtemp(dir=bench.tmp, prefix="samples-cache-"))
    loop = asyncio.new_event_loop()
    storage = S3Storage("bench", "samples-big", endpoint_url=proxy.url)
    try:
        reader = SampleReader(storage, cache)
        store = EvalStore(storage)
        loop.run_until_complete(storage.alist_dir("runs"))  # open the client

        def ref_first(n: int, keep: Callable[[Any], bool]) -> float:
            start = time.perf_counter()
            got = []
            for t in store.iter_trajectories("big", "big"):
                if keep(t):
                    got.append(t)
                    if len(got) >= n:
                        break
            return time.perf_counter() - start

        ref_head = ref_first(PAGE, lambda t: True)
        proxy.reset()
        secs, head = _timed(lambda: reader.ahead("big", "big", PAGE), loop)
        fetched = proxy.bytes_down / MiB
        assert [e.idx for e, _ in head] == list(range(PAGE))
        rows.append(
            _row(
                f"first page ({PAGE}) of a {mib:,.0f} MiB file, no index",
                secs,
                ref_s=ref_head,
                target="<= 1 s, <= 1 % fetched",
                ok=secs <= 1.0 and fetched <= 0.01 * mib,
                requests=proxy.requests,
                mib=fetched,
                note=f"{100 * fetched / mib:.3f} % of the file",
            )
        )
        ref_inc = ref_first(PAGE, lambda t: t.reward <= 0 and t.error is None)
        proxy.reset()
        secs, inc = _timed(lambda: reader.ahead("big", "big", PAGE, SampleFilter.INCORRECT), loop)
        assert len(inc) == PAGE
        rows.append(
            _row(
                '"incorrect" first page, no index',
                secs,
                ref_s=ref_inc,
                target="<= 2 s",
                ok=secs <= 2.0,
                proxy=proxy,
            )
        )

        proxy.reset()
        cpu0 = time.process_time()
        secs, index = _timed(lambda: reader.aindex("big", "big"), loop)
        cpu = time.process_time() - cpu0
        assert index.count() == count and index.complete
        rows.append(
            _row(
                "index build (whole file)",
                secs,
                proxy=proxy,
                note=f"{mib / secs:,.0f} MiB/s; {cpu:.1f} CPU-s in this process (proxy "
                f"included), {cpu / mib * 1000:.1f} CPU-ms/MiB",
            )
        )
        number = count // PAGE // 2
        start = time.perf_counter()
        want = number * PAGE
        for i, _t in enumerate(store.iter_trajectories("big", "big")):
            if i >= want + PAGE - 1:
                break
        ref_mid = time.perf_counter() - start
        for refresh in (True, False):
            proxy.reset()
            reads = reader.range_reads
            secs, page = _timed(
                lambda refresh=refresh: reader.apage("big", "big", number, PAGE, refresh=refresh),
                loop,
            )
            assert [e.idx for e, _ in page] == list(range(want, want + PAGE))
            ranged = reader.range_reads - reads
            label = "index check included" if refresh else "refresh=False"
            rows.append(
                _row(
                    f"page {number} of {PAGE}, indexed ({label})",
                    secs,
                    ref_s=ref_mid,
                    target="1 or 2 ranged reads",
                    ok=ranged <= 2,
                    proxy=proxy,
                    note=f"{ranged} ranged reads; the other request is the storage's "
                    "tail-log index (once a second)",
                )
            )
        proxy.reset()
        secs, page = _timed(
            lambda: reader.apage("big", "big", 0, PAGE, SampleFilter.INCORRECT), loop
        )
        assert len(page) == PAGE
        rows.append(
            _row(
                '"incorrect" first page, indexed',
                secs,
                ref_s=ref_inc,
                target="<= 2 s",
                ok=secs <= 2.0,
                proxy=proxy,
            )
        )
        proxy.reset()
        secs, _ = _timed(lambda: reader.aindex("big", "big"), loop)
        rows.append(
            _row(
                "index re-check, file unchanged",
                secs,
                proxy=proxy,
            )
        )
        proxy.reset()
        secs, found = _timed(lambda: reader.asearch("big", "big", "needle-at-the-end"), loop)
        assert [e.idx for e, _ in found.matches] == [count - 1]
        rows.append(
            _row(
                "text search, only match in the last sample",
                secs,
                proxy=proxy,
                note=f"{mib / secs:,.0f} MiB/s",
            )
        )
        proxy.reset()
        secs, preview = _timed(lambda: reader.asample_preview("big", "long", 1), loop)
        assert preview.truncated == {0: 50 * MiB}
        rows.append(
            _row(
                "a 50 MB sample's first screen, cold (index build of its file included)",
                secs,
                target="<= 1 s",
                ok=secs <= 1.0,
                proxy=proxy,
            )
        )
        proxy.reset()
        secs, preview = _timed(lambda: reader.asample_preview("big", "long", 1), loop)
        rows.append(
            _row(
                "a 50 MB sample's first screen, indexed",
                secs,
                target="<= 1 s",
                ok=secs <= 1.0,
                proxy=proxy,
            )
        )
        loop.run_until_complete(storage.aclose())
    finally:
        loop.close()
        storage.close()
    return rows


def _compare_case(bench: Bench, proxy: CountingProxy, count: int) -> dict[str, Any]:
    rng = random.Random(1)
    with bench.s3_storage("samples-compare") as direct:
        for run, p in (("a", 0.55), ("b", 0.6)):
            lines = []
            for i in range(count):
                error = "boom" if rng.random() < 0.02 else None
                reward = 1.0 if rng.random() < p else 0.0
                record = {"idx": i, "benchmark": "gsm", "example_id": f"ex-{i}", "reward": reward}
                if error:
                    record["error"] = error
                lines.append(json.dumps(record).encode() + b"\n")
            direct.write(f"runs/{run}/gsm/trajectories.jsonl", b"".join(lines))
    cache = Path(tempfile.mkdtemp(dir=bench.tmp, prefix="samples-cache-"))
    loop = asyncio.new_event_loop()
    storage = S3Storage("bench", "samples-compare", endpoint_url=proxy.url)
    try:
        reader = SampleReader(storage, cache)
        start = time.perf_counter()
        import scipy.stats  # noqa: F401  (imported once per process, timed apart)

        import_s = time.perf_counter() - start
        ia = loop.run_until_complete(reader.aindex("a", "gsm"))
        ib = loop.run_until_complete(reader.aindex("b", "gsm"))
        times = []
        for _ in range(COMPARE_REPEATS):
            start = time.perf_counter()
            result = compare_indexes(ia, ib, seed=0)
            page = result.rows.select(Category.REGRESSION)[:200]  # what the page shows
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        listed = compare(list(ia.entries()), list(ib.entries()), seed=0)
        entries_s = time.perf_counter() - start
        loop.run_until_complete(storage.aclose())
    finally:
        loop.close()
        storage.close()
    assert result.matched == count and len(page) == 200
    assert (listed.counts, listed.mcnemar_p) == (result.counts, result.mcnemar_p)
    secs = statistics.median(times)
    return _row(
        f"compare {count:,} vs {count:,} samples, indexed",
        secs,
        target="<= 2 s",
        ok=max(times) <= 2.0,
        note=f"`compare_indexes` (the compare page's call) + its first page of regressions, "
        f"median of {COMPARE_REPEATS}: min {min(times):.3f} s, max {max(times):.3f} s; "
        f"`compare` of the entries as lists (loaded from the index, included): {entries_s:.3f} s; "
        f"McNemar p={result.mcnemar_p:.2g}, reward diff CI "
        f"[{result.reward_diff_ci[0]:.4f}, {result.reward_diff_ci[1]:.4f}]; "
        f"first import of scipy.stats {import_s:.2f} s, not included"
        if result.reward_diff_ci and result.mcnemar_p is not None
        else "",
        extra={"all_s": times, "entries_s": entries_s},
    )


COMPARE_REPEATS = 5
BULK_RUNS = 300
BULK_BENCHMARKS = ("gsm8k", "math")
BULK_SAMPLES = 10


def _bulk_cases(bench: Bench, proxy: CountingProxy) -> list[dict[str, Any]]:
    rng = random.Random(2)

    async def upload(storage: S3Storage) -> None:
        sem = asyncio.Semaphore(32)

        async def put(key: str, data: bytes) -> None:
            async with sem:
                await storage.awrite(key, data)

        jobs = []
        for r in range(BULK_RUNS):
            for b in BULK_BENCHMARKS:
                data = b"".join(
                    json.dumps(
                        {
                            "idx": i,
                            "benchmark": b,
                            "example_id": f"{b}-{i}",
                            "turns": [
                                {"role": "assistant", "content": "z" * rng.randrange(200, 600)}
                            ],
                            "reward": float(rng.random() < 0.5),
                        }
                    ).encode()
                    + b"\n"
                    for i in range(BULK_SAMPLES)
                )
                jobs.append(put(f"runs/run-{r:04d}/{b}/trajectories.jsonl", data))
        await asyncio.gather(*jobs)
        await storage.aclose()

    asyncio.run(upload(bench.s3_storage("samples-bulk")))
    pairs = [(f"run-{r:04d}", b) for r in range(BULK_RUNS) for b in BULK_BENCHMARKS]
    cache = Path(tempfile.mkdtemp(dir=bench.tmp, prefix="samples-cache-"))
    conc = [32, 64]
    with S3Storage(
        "bench", "samples-bulk", endpoint_url=proxy.url, max_pool_connections=max(conc)
    ) as storage:
        storage.list_dir("runs")  # warm up
        proxy.reset()
        start = time.perf_counter()
        n_ref = 0
        for run_id, b in pairs:
            data = storage.read(f"runs/{run_id}/{b}/trajectories.jsonl")
            n_ref += sum(1 for line in data.split(b"\n") if line.strip() and json.loads(line))
        ref_s = time.perf_counter() - start
        ref_requests = proxy.requests

        rows = []
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(storage.alist_dir("runs"))  # warm up this loop's client
            for limit in conc:

                async def ours(limit: int = limit) -> int:
                    reader = SampleReader(storage, cache, max_concurrency=limit)
                    got = await reader.aread_many(pairs)
                    if any(g.error for g in got):
                        errors = [g.error for g in got if g.error][:3]
                        raise RuntimeError(f"bulk read failed: {errors}")
                    return sum(len(g.samples) for g in got)

                times, cpus, requests = [], [], []
                for _ in range(BULK_REPEATS):
                    proxy.reset()
                    cpu0 = time.thread_time()
                    secs, n_ours = _timed(ours, loop)
                    cpus.append(time.thread_time() - cpu0)
                    times.append(secs)
                    requests.append(proxy.requests)
                    if n_ours != n_ref or n_ref != len(pairs) * BULK_SAMPLES:
                        raise RuntimeError(f"bulk read counts differ: {n_ours} vs {n_ref}")
                secs = statistics.median(times)
                rows.append(
                    _row(
                        f"bulk: {BULK_RUNS} runs x {len(BULK_BENCHMARKS)} benchmarks, "
                        f"{n_ref:,} samples, {limit} in flight",
                        secs,
                        ref_s=ref_s,
                        target=">= 10x",
                        ok=ref_s / secs >= 10,
                        requests=statistics.median(requests),
                        note=f"median of {BULK_REPEATS}: min {min(times):.3f} s "
                        f"({ref_s / min(times):.1f}x), max {max(times):.3f} s "
                        f"({ref_s / max(times):.1f}x); {statistics.median(cpus):.2f} CPU-s on the "
                        f"event loop's thread; reference: {ref_requests} requests, one after the other",
                        extra={"all_s": times, "loop_cpu_s": cpus},
                    )
                )
            client = loop.run_until_complete(storage._client())
            keys = [storage._key(f"runs/{r}/{b}/trajectories.jsonl") for r, b in pairs]

            async def get(key: str) -> bytes:
                resp = await client.get_object(Bucket=storage.bucket, Key=key)
                async with resp["Body"] as body:
                    data: bytes = await body.read()
                return data

            async def sdk() -> int:
                sem = asyncio.Semaphore(max(conc))

                async def one(key: str) -> int:
                    async with sem:
                        return len(await get(key))

                return len(await asyncio.gather(*(one(k) for k in keys)))

            times, cpus = [], []
            for _ in range(BULK_REPEATS):
                proxy.reset()
                cpu0 = time.thread_time()
                secs, _n = _timed(sdk, loop)
                cpus.append(time.thread_time() - cpu0)
                times.append(secs)
            rows.append(
                _row(
                    f"bulk, the SDK alone: {len(keys)} GetObject calls, {max(conc)} in flight "
                    "(no parsing)",
                    statistics.median(times),
                    ref_s=ref_s,
                    requests=proxy.requests,
                    note=f"the floor of any reader on this client: median of {BULK_REPEATS}, "
                    f"min {min(times):.3f} s, max {max(times):.3f} s; "
                    f"{statistics.median(cpus):.2f} CPU-s on the event loop's thread",
                    extra={"all_s": times, "loop_cpu_s": cpus},
                )
            )
            loop.run_until_complete(storage.aclose())
        finally:
            loop.close()
    return rows


BULK_REPEATS = 3


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 10 (needs only the S3 server)."""
    count = 20_000 if bench.quick else 200_000
    rows: list[dict[str, Any]] = []
    proxy = CountingProxy("127.0.0.1", bench.s3.port, one_way_s=RTT_S / 2).start()
    try:
        rows += _big_cases(bench, proxy, count)
        rows.append(_compare_case(bench, proxy, 20_000 if bench.quick else 100_000))
        rows += _bulk_cases(bench, proxy)
    finally:
        proxy.stop()
    return {"rtt_ms": RTT_S * 1000, "rows": rows}


def main() -> int:
    result = run_alone("samples", run, quick="--quick" in sys.argv)
    for r in result["rows"]:
        ref = f"{r['reference_s']:.3f} s" if r["reference_s"] is not None else "-"
        print(
            f"{r['case']}: {r['evalsyncd_s']:.3f} s (ref {ref}) req={r['requests']} "
            f"MiB={r['mib_fetched']} target={r['target']} ok={r['ok']} {r['note']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
