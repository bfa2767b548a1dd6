"""Read speed and request counts of two source trees on one well-formed bucket, interleaved.

An A/B check for changes to the readers: one SeaweedFS server, one host of 300
runs (written by ``EvalStore``, uploaded file by file, with its catalog, as
``bench/fleet.py`` does), then for each round and each source tree given with
``--tree`` a child process (working directory: the tree, so ``-m``/``-c``
import that tree's ``evalsyncd``) that times, best of 5:

- ``list_runs`` of ``EvalStore`` opened one level up (the catalog is read);
- ``list_runs`` of ``EvalStore`` rooted at the host prefix with ``use_catalog=False``
  (one ``metadata.json`` read per run: 300 reads);

once direct and once through ``CountingProxy`` adding 20 ms per round trip
(requests counted). Rounds alternate the trees, so load on a shared machine
falls on both; the table gives the median of the rounds.

    python -m bench.readspeed_ab --tree /path/to/baseline --tree . --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import BUCKET
from bench.fleet import SINGLE_RUNS, _write_host
from evalsyncd.catalog import CATALOG_PATH, catalog_from_root
from evalsyncd.storage import S3Storage
from evalsyncd.testing.servers import SeaweedS3Server

__all__ = ["main"]

CHILD = r"""
import json, sys, time
from evalsyncd.storage import S3Storage
from evalsyncd.store import EvalStore
from evalsyncd.testing.proxy import CountingProxy
port, out = int(sys.argv[1]), {}
for rtt in (0, 20):
    proxy = CountingProxy("127.0.0.1", port, one_way_s=rtt / 2000).start()
    try:
        for case, (prefix, store_prefix, catalog) in {
            "catalog": ("single", "host", True), "no catalog": ("single/host", "", False),
        }.items():
            best = None
            for _ in range(5):
                with S3Storage("BUCKET", prefix, endpoint_url=proxy.url) as s:
                    s.list_dir("")
                    before = proxy.requests
                    t = time.perf_counter()
                    n = len(EvalStore(s, store_prefix, use_catalog=catalog).list_runs())
                    dt = time.perf_counter() - t
                    reqs = proxy.requests - before
                best = dt if best is None else min(best, dt)
            out[f"{case} @ {rtt} ms"] = [best, reqs, n]
    finally:
        proxy.stop()
print(json.dumps(out))
""".replace("BUCKET", BUCKET)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readspeed_ab", description=__doc__)
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="readspeed-ab-") as tmp:
        server = SeaweedS3Server(Path(tmp) / "seaweed").start()
        try:
            server.create_bucket(BUCKET)
            env = {**os.environ, **server.client_env()}
            os.environ.update(server.client_env())
            root = Path(tmp) / "host"
            _write_host(root, "host", SINGLE_RUNS)
            with S3Storage(BUCKET, "single/host", endpoint_url=server.endpoint_url) as s:
                for p in sorted(q for q in root.rglob("*") if q.is_file()):
                    s.write(p.relative_to(root).as_posix(), p.read_bytes())
            with S3Storage(BUCKET, "single", endpoint_url=server.endpoint_url) as s:
                s.write(f"host/{CATALOG_PATH}", catalog_from_root(root))
            results: dict[str, dict[str, list[list[float]]]] = {str(t): {} for t in args.tree}
            for _ in range(args.rounds):
                for tree in args.tree:
                    proc = subprocess.run(
                        [sys.executable, "-c", CHILD, str(server.port)],
                        cwd=tree.resolve(),
                        env={**env, "PYTHONPATH": str(tree.resolve())},
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    for case, row in json.loads(proc.stdout.splitlines()[-1]).items():
                        results[str(tree)].setdefault(case, []).append(row)
        finally:
            server.stop()
    trees = [str(t) for t in args.tree]
    head = " | ".join(f"{t}: median s (requests)" for t in trees)
    print(f"| case | {head} |")
    print("|" + " --- |" * (1 + len(trees)))
    for case in results[trees[0]]:
        cells = []
        for t in trees:
            rows = results[t][case]
            med = statistics.median(r[0] for r in rows)
            reqs = sorted({int(r[1]) for r in rows})
            cells.append(f"{med:.3f} s ({'/'.join(map(str, reqs))}; {int(rows[0][2])} runs)")
        print(f"| {case} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
