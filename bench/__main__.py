"""``python -m bench [--quick] [--only NAME ...] [--out DIR]``: the whole benchmark suite.

Starts a local S3 server (SeaweedFS) and a GCS server (fake-gcs-server) in a
scratch directory, runs every measurement against them in one process (the
daemon under test runs as a child process), and writes ``docs/benchmarks.md``
and one PNG per measurement under ``docs/benchmarks/``. Results are also saved
as ``docs/benchmarks/results.json``. Exit status 0 when the suite ran, 1 when a
measurement failed (its error is in the report).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    backfill,
    fleet,
    footprint,
    freshness,
    readback,
    reqrate,
    samples,
    sdkcpu,
    view,
    wire,
    writer,
)
from bench.common import Bench
from bench.report import write_report

MEASUREMENTS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "wire": wire.run,
    "freshness": freshness.run,
    "backfill": backfill.run,
    "readback": readback.run,
    "writer": writer.run,
    "footprint": footprint.run,
    "requests": reqrate.run,
    "sdkcpu": sdkcpu.run,
    "fleet": fleet.run,
    "samples": samples.run,
    "view": view.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the short variant (about 8 minutes on 2 cores)"
    )
    parser.add_argument(
        "--only", nargs="+", choices=list(MEASUREMENTS), help="run only these measurements"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("docs"), help="where benchmarks.md goes (default docs)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers and daemons are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = args.only or list(MEASUREMENTS)
    if "readback" in names and "backfill" not in names:
        names.insert(names.index("readback"), "backfill")  # readback reads the backfilled tree
    tmp = Path(tempfile.mkdtemp(prefix="evalsyncd-bench-"))
    bench = Bench(quick=args.quick, tmp=tmp)
    started = time.monotonic()
    failed = False
    durations: dict[str, float] = {}
    try:
        bench.start()
        for name in names:
            t0 = time.monotonic()
            print(f"[bench] {name} ...", flush=True)
            try:
                bench.results[name] = MEASUREMENTS[name](bench)
            except Exception as exc:
                failed = True
                traceback.print_exc()
                bench.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            durations[name] = time.monotonic() - t0
            print(f"[bench] {name}: {durations[name]:.0f} s", flush=True)
    finally:
        bench.stop()
        if args.keep:
            print(f"[bench] scratch kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total_s = time.monotonic() - started
    md = write_report(
        bench.results, args.out, quick=args.quick, total_s=total_s, durations=durations
    )
    fresh = bench.results.get("freshness", {})
    fresh.pop("latencies", None)
    for b in bench.results.get("footprint", {}).get("backlogs", []):
        b.pop("rss_series", None)
    (args.out / "benchmarks" / "results.json").write_text(
        json.dumps(
            {"quick": args.quick, "total_s": total_s, "durations_s": durations, **bench.results},
            indent=1,
            default=str,
        )
    )
    print(f"[bench] done in {total_s:.0f} s; wrote {md}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
