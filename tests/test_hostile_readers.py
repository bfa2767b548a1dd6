"""A hostile or damaged host costs the reader that host, not the fleet (real S3 server, CLI).

The fixed hostile cases on SeaweedFS: a decompression bomb in one host's tail
log, read by ``Fleet``, ``runs ls``, ``runs report`` and ``restore``; keys a
restore refuses, reported by name with exit status 1 unless
``--allow-skipped``. The random cases are in ``tests/test_hostile_tail.py``.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evalsyncd.fleet import Fleet
from evalsyncd.restore import restore_run
from evalsyncd.storage import S3Storage
from evalsyncd.storage.memory import MemoryStorage, drop_bucket, memory_bucket
from evalsyncd.storage.tail import MAX_INDEX_BYTES, object_name
from evalsyncd.store import EvalStore, StoredTrajectory
from evalsyncd.testing.servers import SeaweedS3Server
from tests.conftest import S3_BUCKET
from tests.opshelpers import evalsyncd as run_cli
from tests.test_hostile_tail import bomb


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def bombed_fleet(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> Iterator[tuple[str, str, Path]]:
    """A fleet on SeaweedFS: host ``good`` (run g1), host ``bad`` (run b1, plain objects intact)
    whose newest tail object is a 256 KB header inflating to 256 MiB. Yields
    ``(fleet URL, the tail object's URL, the local tree of b1)``."""
    src = tmp_path / "src"
    for host, run_id in (("good", "g1"), ("bad", "b1")):
        store = EvalStore(src / host)
        store.create_run("m", ["gsm8k"], run_id=run_id)
        store.write_trajectory(run_id, "gsm8k", StoredTrajectory(idx=0, benchmark="gsm8k"))
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as s:
        for path, data in _tree(src).items():
            s.write(path, data)
    key = f"{unique_prefix}/bad/.evalsyncd/tail/{object_name(9)}"
    client = s3_server.raw_client()
    try:
        client.put_object(Bucket=S3_BUCKET, Key=key, Body=bomb(256 << 20))
    finally:
        client.close()
    yield f"s3://{S3_BUCKET}/{unique_prefix}", f"s3://{S3_BUCKET}/{key}", src / "bad/runs/b1"


def test_a_bomb_in_one_hosts_tail_costs_that_host_not_the_fleet(
    bombed_fleet: tuple[str, str, Path], s3_server: SeaweedS3Server, tmp_path: Path
) -> None:
    """Fleet lists both hosts (bad from its plain objects) and names the tail object, holding
    about MAX_INDEX_BYTES, not the 256 MiB the header claims; runs ls/report exit 1 naming it,
    0 with --allow-skipped; restore restores the plain run and says so."""
    fleet_url, tail_url, b1 = bombed_fleet
    prefix = fleet_url.removeprefix(f"s3://{S3_BUCKET}/")
    with S3Storage(S3_BUCKET, endpoint_url=s3_server.endpoint_url) as storage:
        tracemalloc.start()
        try:
            listing = Fleet(storage, prefix).list_runs()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 4 * MAX_INDEX_BYTES, f"peak {peak} bytes"
    assert sorted((r.host, r.run_id) for r in listing.runs) == [("bad", "b1"), ("good", "g1")]
    assert [(p.host, p.kind, p.url) for p in listing.problems] == [("bad", "damaged", tail_url)]

    ls = run_cli("runs", "ls", "--json", fleet_url)
    assert ls.returncode == 1, ls.stderr
    assert tail_url in ls.stderr and "inflates to more than the limit" in ls.stderr
    assert ls.stderr.count(tail_url) == 1, ls.stderr  # named once, with its host
    show = run_cli("runs", "show", fleet_url, "b1")
    assert show.returncode == 1 and show.stderr.count(tail_url) == 1, show.stderr
    assert '"run_id": "b1"' in ls.stdout and '"run_id": "g1"' in ls.stdout
    assert run_cli("runs", "ls", "--allow-skipped", fleet_url).returncode == 0
    report = run_cli("runs", "report", fleet_url, "-o", str(tmp_path / "r.html"))
    assert report.returncode == 1 and tail_url in (tmp_path / "r.html").read_text()

    dest = tmp_path / "dest"
    restored = run_cli("restore", fleet_url, "b1", "--root", str(dest))
    assert restored.returncode == 1, restored.stderr
    assert tail_url in restored.stderr and "restored" in restored.stdout
    assert restored.stderr.count(tail_url) == 1, restored.stderr
    assert _tree(dest / "runs/b1") == _tree(b1)
    again = run_cli("restore", "--allow-skipped", fleet_url, "b1", "--root", str(dest))
    assert again.returncode == 0 and "already present and identical" in again.stdout


def test_restore_names_the_keys_it_refuses_and_exits_1(tmp_path: Path) -> None:
    """Dot-files in a run directory (never uploaded by the daemon) are not restored; restore
    names each one and exits 1, or 0 with --allow-skipped."""
    src = tmp_path / "host"
    store = EvalStore(src)
    store.create_run("m", ["gsm8k"], run_id="r1")
    store.write_trajectory("r1", "gsm8k", StoredTrajectory(idx=0, benchmark="gsm8k"))
    (src / "runs/r1/.metadata.json.123.tmp").write_bytes(b"{")
    (src / "runs/r1/gsm8k/.hidden").write_bytes(b"x")
    dest = tmp_path / "dest"
    out = run_cli("restore", str(src), "r1", "--root", str(dest))
    assert out.returncode == 1, out.stderr
    assert "skipped" in out.stderr and ".metadata.json.123.tmp" in out.stderr
    assert "gsm8k/.hidden" in out.stderr
    assert not (dest / "runs/r1/.metadata.json.123.tmp").exists()
    assert (dest / "runs/r1/gsm8k/trajectories.jsonl").exists()
    again = run_cli("restore", "--allow-skipped", str(src), "r1", "--root", str(dest))
    assert again.returncode == 0, again.stderr


def test_restore_never_writes_outside_the_root_and_reports_escaping_keys(tmp_path: Path) -> None:
    """Keys such as runs/r1/../../../../x (which a lax server accepts) are refused and named."""
    bucket = f"hostile-{uuid.uuid4().hex}"
    try:
        with MemoryStorage(bucket) as storage:
            store = EvalStore(storage, "h")
            store.create_run("m", ["gsm8k"], run_id="r1")
            b = memory_bucket(bucket)
            with b.lock:
                b.put("h/runs/r1/../../../../x", b"escaped")
                b.put("h/runs/r1/b/../../../../y", b"escaped")
            result = restore_run(EvalStore(storage, "h"), "r1", tmp_path / "dest")
    finally:
        drop_bucket(bucket)
    assert result.files == ["metadata.json"]
    reasons = {s.url: s.reason for s in result.skipped}
    assert reasons == {
        f"memory://{bucket}/h/runs/r1/..": "'..' would escape the run directory",
        f"memory://{bucket}/h/runs/r1/b/..": "'..' would escape the run directory",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_verify_names_the_files_it_cannot_check_as_keys(tmp_path: Path) -> None:
    """A local file whose name is not valid UTF-8 (so no valid key) is listed as skipped with
    the reason, not a crash; the other files are checked."""
    import asyncio
    import os

    from evalsyncd.verify import verify_storage

    root = tmp_path / "root"
    (root / "runs/r1").mkdir(parents=True)
    (root / "runs/r1/ok.jsonl").write_bytes(b"{}\n")
    os.close(os.open(os.fsencode(root / "runs/r1") + b"/bad\xff.jsonl", os.O_CREAT | os.O_WRONLY))
    bucket = f"hostile-{uuid.uuid4().hex}"
    try:
        with MemoryStorage(bucket) as storage:
            storage.write("runs/r1/ok.jsonl", b"{}\n")

            async def check() -> object:
                try:
                    return await verify_storage(storage, root, name="d")
                finally:
                    await storage.aclose()

            report: Any = asyncio.run(check())
    finally:
        drop_bucket(bucket)
    assert report.ok and report.checked == 1
    [skipped] = report.skipped
    assert skipped.startswith("runs/r1/bad") and "not valid UTF-8" in skipped


async def _stage_tail(storage: S3Storage, rel: str, base: int, version: str | None) -> None:
    """Four more lines of ``rel`` in ``storage``'s tail log, building on ``base`` bytes."""
    async with storage:
        writer = storage.tail_writer("w")
        await writer.open()
        more = b"".join(_LINE % i for i in range(4, 8))
        writer.stage_append(rel, base, more, base=base, main_version=version, mtime=1.0)
        await writer.commit()


_LINE = b'{"idx": %d, "benchmark": "gsm8k", "reward": 1.0}\n'


@pytest.mark.parametrize("tamper", ["appended", "truncated"])
def test_a_plain_object_changed_under_pending_tail_lines_is_read_plain_and_named(
    tamper: str, tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server
) -> None:
    """A host's plain trajectories.jsonl changed by another tool (a foreign line appended, or
    truncated below what the tail log builds on) while its tail log holds 4 more lines: runs
    show counts the plain object's lines (never tail lines glued onto foreign bytes, never a
    "kept changing" error) and names the object, exit 1; runs export too; restore copies the plain object and
    exits 1 naming it, 0 with --allow-skipped."""
    prefix = f"t/plain-{tamper}-{uuid.uuid4().hex[:8]}"
    rel = "runs/r1/gsm8k/trajectories.jsonl"
    src = tmp_path / "src"
    store = EvalStore(src)
    store.create_run("m", ["gsm8k"], run_id="r1")
    for i in range(4):
        store.write_trajectory("r1", "gsm8k", StoredTrajectory(idx=i, benchmark="gsm8k"))
    tree = _tree(src)
    clean = EvalStore(tmp_path / "clean")  # another host of the fleet, sound
    clean.create_run("m", ["gsm8k"], run_id="r0")
    clean.write_trajectory("r0", "gsm8k", StoredTrajectory(idx=0, benchmark="gsm8k"))
    with S3Storage(S3_BUCKET, f"{prefix}/h0", endpoint_url=s3_server.endpoint_url) as h0:
        for path, data in _tree(tmp_path / "clean").items():
            h0.write(path, data)
    host = S3Storage(S3_BUCKET, f"{prefix}/h1", endpoint_url=s3_server.endpoint_url)
    with host:
        versions = {path: host.write(path, data) for path, data in tree.items()}
    asyncio.run(_stage_tail(host, rel, len(tree[rel]), versions[rel]))
    plain = tree[rel] + b'{"evil": 1}\n' if tamper == "appended" else _LINE % 0
    client = s3_server.raw_client()
    try:
        client.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/h1/{rel}", Body=plain)
    finally:
        client.close()
    fleet_url = f"s3://{S3_BUCKET}/{prefix}"
    main_url = f"{fleet_url}/h1/{rel}"

    show = run_cli("runs", "show", fleet_url, "r1")
    assert show.returncode == 1, show.stderr
    lines = plain.count(b"\n") - (tamper == "appended")  # the foreign line is not a trajectory
    assert f"gsm8k: no result yet, {lines} trajectories" in show.stdout, show.stdout
    assert main_url in show.stderr and "changed by something other than evalsyncd" in show.stderr
    assert "kept changing" not in show.stderr

    out = tmp_path / "out"
    exported = run_cli("runs", "export", fleet_url, "--output", str(out))
    assert exported.returncode == 1, exported.stderr
    assert main_url in exported.stderr and "changed by something other" in exported.stderr
    assert (out / "samples.csv").read_text().count("\n") == 1 + 1 + lines  # header, h0, h1
    assert f"{fleet_url}/h0" not in exported.stderr  # the damage is h1's alone
    exported = run_cli("runs", "export", "--allow-skipped", fleet_url, "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    assert main_url in exported.stderr

    dest = tmp_path / "dest"
    restored = run_cli("restore", fleet_url, "r1", "--root", str(dest))
    assert restored.returncode == 1, restored.stderr
    assert main_url in restored.stderr and "restored" in restored.stdout
    assert (dest / rel).read_bytes() == plain
    again = run_cli("restore", "--allow-skipped", fleet_url, "r1", "--root", str(dest))
    assert again.returncode == 0, again.stderr


def test_terminal_escapes_from_a_bucket_are_shown_not_obeyed(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """A run id holding ESC sequences that would erase the warning lines above it is skipped
    and named escaped (runs ls exits 1, 0 with --allow-skipped); a model name retitling the
    terminal is printed escaped by runs ls and runs show; EvalStore refuses to create such
    a run id. No ESC or BEL byte reaches stdout or stderr."""
    evil_id = "x\x1b[2K\x1b[1A\x1b[2Kevil"
    evil_model = "m\x1b]0;pwned\x07"
    meta = (
        b'{"run_id": "%s", "model_name": "%s", "checkpoint_path": null, "checkpoint_name": '
        b'null, "benchmarks": ["gsm8k"], "timestamp": "2026-01-01T00:00:00"}'
    )
    client = s3_server.raw_client()
    try:
        for run_id, model in ((evil_id, "m"), ("good", evil_model)):
            body = meta % (json_str(run_id), json_str(model))
            key = f"{unique_prefix}/h1/runs/{run_id}/metadata.json"
            client.put_object(Bucket=S3_BUCKET, Key=key, Body=body)
    finally:
        client.close()
    url = f"s3://{S3_BUCKET}/{unique_prefix}"

    ls = run_cli("runs", "ls", url)
    assert ls.returncode == 1, ls.stderr
    for out in (ls.stdout, ls.stderr):
        assert "\x1b" not in out and "\x07" not in out
    assert "good  m\\x1b]0;pwned\\x07" in ls.stdout
    assert "x\\x1b[2K\\x1b[1A\\x1b[2Kevil" in ls.stderr and "skipped" in ls.stderr
    assert run_cli("runs", "ls", "--allow-skipped", url).returncode == 0
    show = run_cli("runs", "show", url, "good")
    assert show.returncode == 0, show.stderr
    assert "model: m\\x1b]0;pwned\\x07" in show.stdout and "\x1b" not in show.stdout

    with pytest.raises(ValueError, match="control character"):
        EvalStore(tmp_path / "local").create_run("m", ["gsm8k"], run_id=evil_id)
    with pytest.raises(ValueError, match="control character"):
        EvalStore(tmp_path / "local").create_run("m", ["gsm\x9bk"], run_id="r")


def json_str(text: str) -> bytes:
    """``text`` as the inside of a JSON string (escapes as json.dumps writes them)."""
    return json.dumps(text)[1:-1].encode()
