"""Measurement 1: bytes on the wire per appended byte, for a growing ``trajectories.jsonl``.

A file grows to ``total`` bytes in ``steps`` equal steps (one ``write`` of whole
1 KiB lines per step). After each step every tool mirrors it:

- evalsyncd: the daemon runs (``flush_interval_s`` 0.2 s, so steps stay apart
  without slowing the suite); the step ends once a separate client, talking to
  the server directly, sees the object at the file's size. When the last step
  is visible the daemon is stopped with SIGTERM, which brings every main object
  up to date, and that is counted too, so the figure is the full cost of
  "main object = local file".
- ``aws s3 sync`` and ``rclone copy``: one invocation per step.
- the reference tinker-cookbook ``FsspecStorage`` (s3fs): one ``append`` per
  line and one ``flush`` per step, as its docstring advises.

Each tool talks to the server through its own counting proxy (``evalsyncd.testing.proxy``);
bytes up plus down, headers included, divided by the bytes appended. The tools'
own counters are not used. Peers run only against S3 (they have no GCS append
either); the GCS row's baseline is the same whole-file re-upload, computed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    BUCKET,
    Bench,
    Daemon,
    aws_sync,
    rclone_copy,
    reference_fsspec_storage,
    wait_until,
)
from evalsyncd.testing.proxy import CountingProxy

__all__ = ["run"]

MiB = 1024 * 1024
LINE = 1024
NAME = "trajectories.jsonl"


def _step_block(step: int, size: int) -> bytes:
    lines = []
    for i in range(size // LINE):
        head = f'{{"step": {step}, "i": {i}, "pad": "'
        lines.append(head + "x" * (LINE - len(head) - 3) + '"}\n')
    block = "".join(lines).encode()
    assert len(block) == size
    return block


def _remote_size(storage: Any, path: str) -> int:
    st = storage.stat(path)
    return -1 if st is None else int(st.size)


def _evalsyncd(bench: Bench, scheme: str, total: int, steps: int, tag: str) -> dict[str, Any]:
    server = bench.s3 if scheme == "s3" else bench.gcs
    root = bench.dir(f"wire-{tag}-{scheme}/root")
    state = bench.dir(f"wire-{tag}-{scheme}/state")
    prefix = f"wire-{tag}-evalsyncd"
    checker = bench.s3_storage(prefix) if scheme == "s3" else bench.gcs_storage(prefix)
    path = root / NAME
    appended = 0
    started = time.monotonic()
    with CountingProxy("127.0.0.1", server.port) as proxy, checker:
        daemon = Daemon(
            root, state, f"{scheme}://{BUCKET}/{prefix}", proxy.url, flush_interval_s=0.2
        ).start()
        try:
            with open(path, "ab", buffering=0) as f:
                for step in range(steps):
                    block = _step_block(step, total // steps)
                    f.write(block)
                    appended += len(block)
                    if not wait_until(lambda n=appended: _remote_size(checker, NAME) == n, 120.0):
                        raise RuntimeError(f"evalsyncd {scheme}: step {step} not mirrored in 120 s")
        finally:
            code = daemon.stop()
        if code != 0:
            raise RuntimeError(f"evalsyncd exited with status {code}; see {daemon.log_path}")
        remote = checker.read(NAME)
        if remote != path.read_bytes():
            raise RuntimeError(f"evalsyncd {scheme}: remote differs from the local file")
        main = _main_object_size(bench, scheme, prefix)
        return {
            "bytes_up": proxy.bytes_up,
            "bytes_down": proxy.bytes_down,
            "requests": proxy.requests,
            "appended": appended,
            "wall_s": time.monotonic() - started,
            "main_object_complete": main == appended,
        }


def _main_object_size(bench: Bench, scheme: str, prefix: str) -> int:
    """Size of the plain object other tools see (without the tail log)."""
    if scheme == "gs":
        with bench.gcs_storage(prefix) as g:
            return _remote_size(g, NAME)
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=bench.s3.endpoint_url, region_name="us-east-1"
    )
    try:
        return int(client.head_object(Bucket=BUCKET, Key=f"{prefix}/{NAME}")["ContentLength"])
    finally:
        client.close()


def _peer(
    bench: Bench, name: str, total: int, steps: int, tag: str, mirror: Callable[..., None]
) -> dict[str, Any]:
    root = bench.dir(f"wire-{tag}-{name}/root")
    path = root / NAME
    appended = 0
    started = time.monotonic()
    with CountingProxy("127.0.0.1", bench.s3.port) as proxy:
        with open(path, "ab", buffering=0) as f:
            for step in range(steps):
                block = _step_block(step, total // steps)
                f.write(block)
                appended += len(block)
                mirror(root, f"wire-{tag}-{name}", proxy.url, block)
        return {
            "bytes_up": proxy.bytes_up,
            "bytes_down": proxy.bytes_down,
            "requests": proxy.requests,
            "appended": appended,
            "wall_s": time.monotonic() - started,
            "main_object_complete": True,
        }


def _fsspec_peer(bench: Bench, total: int, steps: int, tag: str) -> dict[str, Any]:
    appended = 0
    started = time.monotonic()
    with CountingProxy("127.0.0.1", bench.s3.port) as proxy:
        storage = reference_fsspec_storage(f"wire-{tag}-fsspec", proxy.url)
        try:
            for step in range(steps):
                block = _step_block(step, total // steps)
                for line in block.splitlines(keepends=True):
                    storage.append(NAME, line)
                storage.flush()
                appended += len(block)
        finally:
            storage.close()
        return {
            "bytes_up": proxy.bytes_up,
            "bytes_down": proxy.bytes_down,
            "requests": proxy.requests,
            "appended": appended,
            "wall_s": time.monotonic() - started,
            "main_object_complete": True,
        }


def _aws(root: Path, prefix: str, endpoint: str, _block: bytes) -> None:
    aws_sync(root, prefix, endpoint)


def _rclone(root: Path, prefix: str, endpoint: str, _block: bytes) -> None:
    rclone_copy(root, prefix, endpoint)


def _tool_jobs(bench: Bench, total: int, steps: int) -> dict[str, Callable[[], dict[str, Any]]]:
    tag = f"{total // MiB}m"
    return {
        "evalsyncd (S3)": lambda: _evalsyncd(bench, "s3", total, steps, tag),
        "evalsyncd (GCS)": lambda: _evalsyncd(bench, "gs", total, steps, tag),
        "aws s3 sync": lambda: _peer(bench, "aws", total, steps, tag, _aws),
        "rclone copy": lambda: _peer(bench, "rclone", total, steps, tag, _rclone),
        "reference FsspecStorage": lambda: _fsspec_peer(bench, total, steps, tag),
    }


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 1; returns ``{"8 MiB / 64 steps": {tool: row}, ...}``.

    Bytes on the wire do not depend on timing (each step is mirrored before the
    next), so tools run side by side in three lanes to keep the suite short.
    The peers run at 8 MiB only: at 64 MiB they re-upload the whole file each
    step (8-16 GiB through the counting proxy, longer than the suite's budget),
    and at 8 MiB their figures already equal the computed whole-file re-upload,
    which the table also gives at 64 MiB.
    """
    sizes = [(8 * MiB, 64)] if bench.quick else [(8 * MiB, 64), (64 * MiB, 256)]
    labels = {total: f"{total // MiB} MiB / {steps} steps" for total, steps in sizes}
    jobs = {
        (total, n): j for total, steps in sizes for n, j in _tool_jobs(bench, total, steps).items()
    }
    lanes: list[list[tuple[int, str]]] = [[], [], []]
    for total, _steps in sizes:
        lanes[0] += [(total, "evalsyncd (S3)"), (total, "evalsyncd (GCS)")]
    lanes[1].append((8 * MiB, "aws s3 sync"))
    lanes[2] += [(8 * MiB, "rclone copy"), (8 * MiB, "reference FsspecStorage")]
    out: dict[tuple[int, str], dict[str, Any]] = {}

    def worker(lane: list[tuple[int, str]]) -> None:
        for key in lane:
            try:
                out[key] = jobs[key]()
            except Exception as exc:
                out[key] = {"error": f"{type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=worker, args=(lane,)) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res: dict[str, Any] = {}
    for total, steps in sizes:
        rows: dict[str, dict[str, Any]] = {}
        for name in _tool_jobs(bench, total, steps):
            row = out.get((total, name), {"skipped": "not run at this size (see the note)"})
            if "appended" in row:
                row["ratio"] = (row["bytes_up"] + row["bytes_down"]) / row["appended"]
                row["requests_per_step"] = row["requests"] / steps
            rows[name] = row
        # The whole-file re-upload every step: the sum of the sizes after each step.
        rows["whole-file re-upload (computed)"] = {
            "ratio": sum(total // steps * (k + 1) for k in range(steps)) / total
        }
        res[labels[total]] = rows
    return res


if __name__ == "__main__":  # a quick manual check: python -m bench.wire
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp:
        b = Bench(quick=True, tmp=Path(tmp))
        b.start()
        try:
            print(json.dumps(run(b), indent=2))
        finally:
            b.stop()
