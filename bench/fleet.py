"""Measurement 8: reading a whole fleet, and one big host, against the reference EvalStore.

Setup, in the bench S3 bucket (SeaweedFS): a fleet of 8 hosts x 40 runs under
``fleet/host-{i}`` and one host with 300 runs under ``single/host`` (the same
in quick mode: it is small). Each run is written
by ``EvalStore`` to a local root (metadata, two results, a short trajectories
file, its ``runs.jsonl`` line) and uploaded file by file; each host's catalog
is then built with ``catalog_from_root`` and written to
``{host}/.evalsyncd/catalog.json``, as the daemon does.

The reference is tinker-cookbook 0.6.1's own ``EvalStore`` (its
``stores/eval_store.py`` and ``stores/storage.py``, executed by path from the
wheel) over its ``FsspecStorage`` on s3fs, one store per host, ``list_runs``
host after host, as a user must do today. A fresh s3fs filesystem (and, on
our side, a fresh ``S3Storage`` client) is made for every repetition.

Cases (requests counted by ``evalsyncd.testing.proxy.CountingProxy``, which also
adds the latency: 10 ms each way, i.e. 20 ms per request round trip):

- ``fleet: runs ls --json @ 20 ms``: ``python -m evalsyncd runs ls --json
  s3://bench/fleet`` as a child process, process start included; its JSON is
  checked against the reference's runs (same hosts, ids and metadata);
- ``fleet: Fleet.list_runs @ 20 ms``: the Python API in this process;
- ``fleet mirrored by the daemon: runs ls --json @ 20 ms``: the same 8 hosts
  mirrored by ``evalsyncd sync --once`` (one per host, fresh journals) to
  ``fleet-daemon/host-{i}``: each host keeps a tail log and a catalog the tail
  log vouches for, as a running daemon leaves them (compared with the same
  reference run as the rows above: same hosts, ids and metadata);
- ``one host, 300 runs: EvalStore.list_runs @ 0 / 20 ms``: ``EvalStore`` on
  the storage of the host's parent prefix with the host as store prefix (how a
  fleet opens hosts; S3Storage reserves ``.evalsyncd/`` at its own root, see
  docs/fleet.md), against the reference on the host prefix;
- ``... (store at the host prefix, no catalog)``: ``EvalStore`` rooted at the
  host prefix itself, where S3Storage hides the catalog: concurrent per-run
  reads only.

Targets: fleet <= 3 requests per host (plus the fleet prefix), CLI >= 20x, Python >= 30x; one host
>= 10x on loopback and >= 30x at 20 ms.

    python -m bench.fleet            # standalone: prints the table
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    BUCKET,
    REFERENCE_VERSION,
    Bench,
    Daemon,
    load_reference_storage,
    reference_fsspec_storage,
    reference_wheel,
    run_alone,
)
from evalsyncd.catalog import CATALOG_PATH, catalog_from_root
from evalsyncd.fleet import Fleet
from evalsyncd.storage import S3Storage
from evalsyncd.store import BenchmarkResult, EvalStore, StoredTrajectory
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.testing.servers import S3_ACCESS_KEY, S3_SECRET_KEY

__all__ = ["load_reference_eval_store", "run"]

HOSTS = 8
RUNS_PER_HOST = 40
SINGLE_RUNS = 300
RTT_S = 0.020


def load_reference_eval_store() -> type:
    """The reference ``EvalStore`` class (tinker-cookbook's ``stores/eval_store.py``, by path).

    Registers stub packages ``tinker_cookbook`` and ``tinker_cookbook.stores`` and
    the reference ``storage`` module, so its one import resolves without the
    package's heavy ``__init__``.
    """
    name = "tinker_cookbook.stores.eval_store"
    if name in sys.modules:
        return sys.modules[name].EvalStore  # type: ignore[no-any-return]
    storage_mod = load_reference_storage()
    for pkg in ("tinker_cookbook", "tinker_cookbook.stores"):
        sys.modules.setdefault(pkg, types.ModuleType(pkg))
    sys.modules["tinker_cookbook.stores.storage"] = storage_mod
    with zipfile.ZipFile(reference_wheel()) as zf:
        source = zf.read("tinker_cookbook/stores/eval_store.py").decode("utf-8")
    mod = types.ModuleType(name)
    mod.__file__ = f"tinker_cookbook-{REFERENCE_VERSION}!tinker_cookbook/stores/eval_store.py"
    sys.modules[name] = mod
    exec(compile(source, mod.__file__, "exec"), mod.__dict__)
    return mod.EvalStore  # type: ignore[no-any-return]


def _write_host(root: Path, host: str, runs: int) -> None:
    store = EvalStore(root)
    for i in range(runs):
        run_id = store.create_run(
            f"model-{host}",
            ["gsm8k", "math"],
            checkpoint_path=f"tinker://bench/{host}/{i}",
            checkpoint_name=f"step{i * 10}",
            config={"temperature": 0.6},
            run_id=f"{host}-step{i * 10:05d}",
        )
        for b, score in (("gsm8k", 0.3 + i / 400), ("math", 0.1 + i / 500)):
            store.write_result(
                run_id, BenchmarkResult(name=b, score=score, num_examples=100, num_correct=30)
            )
        store.write_trajectory(
            run_id, "gsm8k", StoredTrajectory(idx=0, benchmark="gsm8k", reward=1.0)
        )
        store.finalize_run(run_id)


def _upload(bench: Bench, prefix: str, roots: dict[str, Path]) -> None:
    """Upload each host's root file by file, then its catalog (built as the daemon builds it)."""

    async def go(storage: S3Storage) -> None:
        sem = asyncio.Semaphore(32)

        async def put(key: str, data: bytes) -> None:
            async with sem:
                await storage.awrite(key, data)

        jobs = []
        for host, root in roots.items():
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                jobs.append(put(f"{host}/{path.relative_to(root).as_posix()}", path.read_bytes()))
        await asyncio.gather(*jobs)
        await asyncio.gather(
            *(
                put(f"{host}/{CATALOG_PATH}", catalog_from_root(root))
                for host, root in roots.items()
            )
        )
        await storage.aclose()

    storage = bench.s3_storage(prefix)
    asyncio.run(go(storage))


def _mirror(bench: Bench, prefix: str, roots: dict[str, Path]) -> None:
    """Mirror each host's root with ``evalsyncd sync --once`` (its own fresh journal)."""
    for host, root in roots.items():
        state = bench.dir(f"fleet-daemon/{host}")
        Daemon(root, state, f"s3://{BUCKET}/{prefix}/{host}", bench.s3.endpoint_url).sync_once()


def _best(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _measure(proxy: CountingProxy, repeat: int, fn: Callable[[], Any]) -> tuple[float, Any, float]:
    proxy.reset()
    secs, result = _best(repeat, fn)
    return secs, result, proxy.requests / repeat


def _row(
    ref: tuple[float, Any, float], ours: tuple[float, Any, float], hosts: int, target: float | None
) -> dict[str, Any]:
    speedup = ref[0] / ours[0]
    return {
        "hosts": hosts,
        "reference_s": ref[0],
        "evalsyncd_s": ours[0],
        "speedup": speedup,
        "target_speedup": target,
        "reference_requests": ref[2],
        "evalsyncd_requests": ours[2],
        "evalsyncd_requests_per_host": ours[2] / hosts,
        "ok": target is None or speedup >= target,
    }


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 8 (needs only the S3 server)."""
    ref_store_cls = load_reference_eval_store()
    with tempfile.TemporaryDirectory(dir=bench.tmp, prefix="fleet-") as tmp:
        fleet_roots = {f"host-{i}": Path(tmp) / f"host-{i}" for i in range(HOSTS)}
        for host, root in fleet_roots.items():
            _write_host(root, host, RUNS_PER_HOST)
        _upload(bench, "fleet", fleet_roots)
        _mirror(bench, "fleet-daemon", fleet_roots)
        single_root = Path(tmp) / "single"
        _write_host(single_root, "host", SINGLE_RUNS)
        _upload(bench, "single", {"host": single_root})

    rows: dict[str, Any] = {}
    for rtt_s in (RTT_S, 0.0):
        proxy = CountingProxy("127.0.0.1", bench.s3.port, one_way_s=rtt_s / 2).start()
        ms = int(rtt_s * 1000)
        try:
            if rtt_s:
                rows.update(_fleet_cases(proxy, ref_store_cls, ms))
            rows.update(_single_cases(proxy, ref_store_cls, ms))
        finally:
            proxy.stop()
    return rows


def _ref_fleet(ref_store_cls: type, endpoint: str) -> list[dict[str, Any]]:
    out = []
    for i in range(HOSTS):
        host = f"host-{i}"
        store = ref_store_cls(reference_fsspec_storage(f"fleet/{host}", endpoint))
        out.extend({"host": host, **m.to_dict()} for m in store.list_runs())
    return out


def _key(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((r["host"], json.dumps(r, sort_keys=True)) for r in rows)


def _fleet_cases(proxy: CountingProxy, ref_store_cls: type, ms: int) -> dict[str, Any]:
    ref = _measure(proxy, 1, lambda: _ref_fleet(ref_store_cls, proxy.url))
    expected = _key(ref[1])
    if len(ref[1]) != HOSTS * RUNS_PER_HOST:
        raise RuntimeError(f"reference listed {len(ref[1])} runs")
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": proxy.url,
    }

    def cli(prefix: str = "fleet") -> list[dict[str, Any]]:
        out = subprocess.run(
            [sys.executable, "-m", "evalsyncd", "runs", "ls", "--json", f"s3://{BUCKET}/{prefix}"],
            env=env,
            capture_output=True,
            check=True,
        )
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def api() -> list[dict[str, Any]]:
        with S3Storage(BUCKET, "fleet", endpoint_url=proxy.url) as storage:
            listing = Fleet(storage).list_runs()
        if not listing.ok or listing.problems:
            raise RuntimeError(f"fleet problems: {listing.problems}")
        return [r.to_dict() for r in listing.runs]

    rows = {}
    cases: tuple[tuple[str, Callable[[], list[dict[str, Any]]], float | None], ...] = (
        ("runs ls --json", cli, 20.0),
        ("Fleet.list_runs", api, 30.0),
        ("runs ls --json, mirrored by the daemon", lambda: cli("fleet-daemon"), None),
    )
    for name, fn, target in cases:
        ours = _measure(proxy, 3, fn)
        if _key(ours[1]) != expected:
            raise RuntimeError(f"{name}: runs differ from the reference's")
        rows[f"fleet {HOSTS}x{RUNS_PER_HOST}: {name} @ {ms} ms"] = _row(ref, ours, HOSTS, target)
    return rows


def _single_cases(proxy: CountingProxy, ref_store_cls: type, ms: int) -> dict[str, Any]:
    def ref_fn() -> list[dict[str, Any]]:
        store = ref_store_cls(reference_fsspec_storage("single/host", proxy.url))
        return [m.to_dict() for m in store.list_runs()]

    def ours_at(prefix: str, store_prefix: str) -> Callable[[], list[dict[str, Any]]]:
        def fn() -> list[dict[str, Any]]:
            with S3Storage(BUCKET, prefix, endpoint_url=proxy.url) as storage:
                return [m.to_dict() for m in EvalStore(storage, store_prefix).list_runs()]

        return fn

    ref = _measure(proxy, 1 if ms else 3, ref_fn)
    expected = sorted(json.dumps(r, sort_keys=True) for r in ref[1])
    if len(expected) != SINGLE_RUNS:
        raise RuntimeError(f"reference listed {len(expected)} runs")
    target = 30.0 if ms else 10.0
    rows = {}
    for label, fn, tgt in (
        ("EvalStore.list_runs", ours_at("single", "host"), target),
        (
            "EvalStore.list_runs (store at the host prefix, no catalog)",
            ours_at("single/host", ""),
            0.0,
        ),
    ):
        ours = _measure(proxy, 3, fn)
        if sorted(json.dumps(r, sort_keys=True) for r in ours[1]) != expected:
            raise RuntimeError(f"{label}: runs differ from the reference's")
        rows[f"one host, {SINGLE_RUNS} runs: {label} @ {ms} ms"] = _row(ref, ours, 1, tgt)
    return rows


def main() -> int:
    rows = run_alone("fleet", run, quick=False)
    for name, r in rows.items():

        def f(key: str, spec: str, r: dict[str, Any] = r) -> str:
            return "-" if r.get(key) is None else format(r[key], spec)

        print(
            f"{name}\n    reference {f('reference_s', '.3f')} s ({f('reference_requests', '.0f')} "
            f"req)  evalsyncd {f('evalsyncd_s', '.3f')} s ({f('evalsyncd_requests', '.0f')} req, "
            f"{f('evalsyncd_requests_per_host', '.1f')}/host)  {f('speedup', '.1f')}x  target "
            f"{f('target_speedup', '.0f')}x {'OK' if r['ok'] else 'MISSED'}"
        )
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
