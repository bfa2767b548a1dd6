"""Two measurements of the suite, per source tree, side by side in one run.

For each round and each tree given with ``--tree`` (a checkout of evalsyncd:
its ``bench`` and its ``evalsyncd``, put first on ``PYTHONPATH``; the daemon it
starts inherits that path), a child process starts fresh servers and runs:

- ``wire``: the evalsyncd (S3) row of measurement 1 (``bench.wire``): 8 MiB in
  64 steps with the daemon's defaults (tail log on), bytes on the wire per
  appended byte (target: at most 2.0x);
- ``writer``: measurement 5 (``bench.writer``, full mode): the daemon's CPU
  seconds per MiB appended (target: at most 0.05 s/MiB).

Trees alternate within each round, so a busy machine weighs on both alike.
Nothing here asserts: it measures.

    python -m bench.ab --tree /path/to/baseline --tree . --rounds 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench.common import run_in_tree

__all__ = ["main"]

_CHILD = """
import json, sys, tempfile
from pathlib import Path
from bench.common import Bench
what = sys.argv[1]
with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
    bench = Bench(quick=False, tmp=Path(tmp))
    bench.start()
    try:
        if what == "wire":
            from bench import wire
            result = wire._evalsyncd(bench, "s3", 8 * 1024 * 1024, 64, "ab")
        else:
            from bench import writer
            result = writer.run(bench)
    finally:
        bench.stop()
print(json.dumps(result, default=str))
"""


def _child(tree: Path, what: str) -> dict[str, Any]:
    return run_in_tree(tree, ["-c", _CHILD, what], what)


def _figure(what: str, r: dict[str, Any]) -> str:
    if what == "wire":
        ratio = (r["bytes_up"] + r["bytes_down"]) / r["appended"]
        return (
            f"{ratio:.2f}x ({r['bytes_up']:,} B up, {r['bytes_down']:,} B down, "
            f"{r['requests']} requests, main object complete: {r['main_object_complete']})"
        )
    return (
        f"{r['daemon_cpu_s_per_mib']:.4f} s/MiB ({r['daemon_cpu_s_during_running_phases']:.2f} s "
        f"for {r['mib_appended']:.1f} MiB; running/stopped {r['ratio']:.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--only", nargs="+", choices=["wire", "writer"], default=["wire", "writer"])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    print("| measurement | round | tree | figure |")
    print("| --- | --- | --- | --- |")
    for what in args.only:
        for n in range(args.rounds):
            for tree in args.tree:
                result = _child(tree.resolve(), what)
                print(f"| {what} | {n + 1} | {tree} | {_figure(what, result)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
