"""A hostile bucket, read by the CLI: peak memory and outcome of each reader, per source tree.

Starts moto's S3 server (``moto[server]``; it accepts any key, as a bucket
written by a buggy or hostile host would hold) and writes a fleet under
``s3://hostile/fleet``:

- ``good``: one intact run ``r0``;
- ``bad``: one intact run ``r1`` (plain objects) and a tail object whose
  header is a decompression bomb (about 200 KB that inflate to
  ``--bomb-mib`` MiB of JSON);
- ``keys``: one run ``r2`` plus two keys that escape the run directory
  (``runs/r2/../../../../tmp/x`` and ``runs/r2/b/../../../../y``).

Then runs ``evalsyncd runs ls``, ``runs show``, ``runs report`` and
``restore`` as child processes under ``/usr/bin/time -v`` and prints, per
source tree given with ``--tree`` (a checkout of evalsyncd put first on
``PYTHONPATH``), the exit status, the peak RSS and the last line of stderr,
side by side. Nothing here asserts: it measures.

    python -m bench.hostile --tree /path/to/baseline --tree .
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

from evalsyncd.testing.servers import _free_port_block

__all__ = ["main"]

BUCKET = "hostile"


def _metadata(run_id: str) -> bytes:
    return json.dumps(
        {
            "run_id": run_id,
            "model_name": "m",
            "checkpoint_path": None,
            "checkpoint_name": "step1",
            "benchmarks": ["b"],
            "timestamp": "2026-01-01T00:00:00",
            "scores": {"b": 0.5},
        },
        indent=2,
    ).encode()


def bomb_tail_object(inflated_mib: int) -> bytes:
    """A tail object whose header inflates to ``inflated_mib`` MiB (valid JSON, no ``files``)."""
    comp = zlib.compressobj(9)
    parts = [comp.compress(b'{"pad":"')]
    block = b"a" * (1 << 20)
    for _ in range(inflated_mib):
        parts.append(comp.compress(block))
    parts.append(comp.compress(b'"}'))
    parts.append(comp.flush())
    packed = b"".join(parts)
    return b"evalsyncd-tail 1 " + str(len(packed)).encode() + b"\n" + packed


def populate(client: object, bomb_mib: int) -> None:
    """Write the hostile fleet (see the module docstring)."""
    put = client.put_object  # type: ignore[attr-defined]

    def run(host: str, run_id: str) -> None:
        base = f"fleet/{host}"
        put(Bucket=BUCKET, Key=f"{base}/runs/{run_id}/metadata.json", Body=_metadata(run_id))
        put(Bucket=BUCKET, Key=f"{base}/runs/{run_id}/summary.json", Body=b'{"b": {"score": 0.5}}')
        put(
            Bucket=BUCKET,
            Key=f"{base}/runs/{run_id}/b/trajectories.jsonl",
            Body=b'{"idx": 0, "benchmark": "b", "reward": 1.0}\n',
        )
        line = {"run_id": run_id, "timestamp": "2026-01-01T00:00:00", "model": "m"}
        put(Bucket=BUCKET, Key=f"{base}/runs.jsonl", Body=(json.dumps(line) + "\n").encode())

    run("good", "r0")
    run("bad", "r1")
    put(
        Bucket=BUCKET,
        Key=f"fleet/bad/.evalsyncd/tail/{2**64 - 1 - 7:016x}",
        Body=bomb_tail_object(bomb_mib),
    )
    run("keys", "r2")
    put(Bucket=BUCKET, Key="fleet/keys/runs/r2/../../../../tmp/x", Body=b"escaped")
    put(Bucket=BUCKET, Key="fleet/keys/runs/r2/b/../../../../y", Body=b"escaped")


def _measure(tree: Path, argv: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """Exit status, peak RSS in MiB, and the last stderr line of one CLI run."""
    child_env = {**env, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "evalsyncd", *argv],
        env=child_env,
        cwd=tree,  # ``-m`` puts the working directory first on sys.path
        capture_output=True,
        text=True,
        timeout=600,
    )
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss = int(m.group(1)) / 1024 if m else float("nan")
    lines = [
        ln
        for ln in proc.stderr.splitlines()
        if ln and not ln.startswith("\t") and "Command exited" not in ln
    ]
    status = re.search(r"Exit status: (\d+)", proc.stderr)
    return int(status.group(1)) if status else proc.returncode, rss, (lines or [""])[-1][:160]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--bomb-mib", type=int, default=200)
    args = parser.parse_args(argv)
    port = _free_port_block((0,), low=46000, high=52000)
    moto = Path(sys.executable).with_name("moto_server")
    server = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        import botocore.session

        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="k",
            aws_secret_access_key="s",
        )
        client.create_bucket(Bucket=BUCKET)
        populate(client, args.bomb_mib)
        client.close()
        with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
            cases = [
                ("runs ls (good host only)", ["runs", "ls", f"s3://{BUCKET}/fleet/good"]),
                ("runs ls (fleet)", ["runs", "ls", f"s3://{BUCKET}/fleet"]),
                ("runs show r0 (fleet)", ["runs", "show", f"s3://{BUCKET}/fleet", "r0"]),
                (
                    "runs report (fleet)",
                    ["runs", "report", f"s3://{BUCKET}/fleet", "-o", f"{tmp}/r.html"],
                ),
                ("restore r1 (bad host, via fleet)", ["restore", f"s3://{BUCKET}/fleet", "r1"]),
                ("restore r2 (escaping keys)", ["restore", f"s3://{BUCKET}/fleet/keys", "r2"]),
            ]
            print("| case | tree | exit | peak RSS | last stderr line |")
            print("| --- | --- | --- | --- | --- |")
            for i, (name, cmd) in enumerate(cases):
                for j, tree in enumerate(args.tree):
                    if cmd[0] == "restore":
                        cmd = [*cmd[:3], "--root", f"{tmp}/root-{i}-{j}"]
                    code, rss, last = _measure(tree.resolve(), cmd, env)
                    print(f"| {name} | {tree} | {code} | {rss:.0f} MiB | {last} |", flush=True)
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
