"""Ownership of a prefix: one writer per prefix (``evalsyncd/sync/owner.py``).

Pure decisions and the claim protocol over ``MemoryStorage`` (fast), then two real
daemons on one prefix against SeaweedFS and fake-gcs-server, in both modes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from evalsyncd.errors import ConflictError, CorruptObjectError, PrefixOwnedError
from evalsyncd.storage import GCSStorage, S3Storage
from evalsyncd.storage.memory import MemoryStorage
from evalsyncd.storage.tail import TailIndex, read_index
from evalsyncd.sync.journal import Journal
from evalsyncd.sync.owner import (
    OWNER_NAME,
    Claim,
    Owner,
    Verdict,
    check_claim,
    decide,
    read_claim,
    take_over,
)
from evalsyncd.sync.passes import ByteBudget
from evalsyncd.sync.perfile import PerFileShipper
from evalsyncd.sync.plan import Policy
from evalsyncd.sync.shipper import Batch, Context
from tests.daemon import Daemon, write_config
from tests.helpers import wait_for
from tests.reliability import RelEnv, events, list_keys, s3_main_object

A, B = "a" * 16, "b" * 16


@pytest.mark.parametrize(
    ("found", "tail_writer", "verdict"),
    [
        (None, None, Verdict.CLAIM),  # a fresh prefix
        (None, "", Verdict.CLAIM),
        (None, A, Verdict.CLAIM),  # upgrade: our own tail log, written before claims
        (None, B, Verdict.LEGACY),  # an older evalsyncd elsewhere writes it
        (Claim(A, "h", 1.0), B, Verdict.OWNED),  # the claim decides, not the tail
        (Claim(B, "h", 1.0), A, Verdict.FOREIGN),
    ],
)
def test_decide(found: Claim | None, tail_writer: str | None, verdict: Verdict) -> None:
    """The decision table of the module docstring, as daemon A (writer id ``A``) sees it."""
    assert decide(found, A, tail_writer) is verdict


def test_claim_then_restart_keeps_it_and_another_writer_parks(
    memory_storage: MemoryStorage,
) -> None:
    """The first writer claims; the same writer (a restart, days later) keeps it; another
    writer gets PrefixOwnedError naming the owner's host, the claim time and the fix."""

    async def run() -> None:
        first = await check_claim(memory_storage, A, "s3", host="gpu-1")
        assert (first.writer, first.host) == (A, "gpu-1")
        again = await check_claim(memory_storage, A, "s3", host="renamed")
        assert again == first  # kept, not rewritten
        with pytest.raises(PrefixOwnedError) as info:
            await check_claim(memory_storage, B, "s3", host="gpu-2")
        message = str(info.value)
        assert "'gpu-1'" in message and first.when() in message
        assert "{hostname}" in message and "evalsyncd claim" in message
        assert "--destination s3 --take-over" in message
        assert info.value.owner_host == "gpu-1" and info.value.claimed_at == first.claimed_at
        assert await read_claim(memory_storage) == first

    asyncio.run(run())


def test_upgrade_an_unclaimed_prefix_with_another_writers_tail_parks(
    memory_storage: MemoryStorage,
) -> None:
    """A prefix written by an evalsyncd from before claims: the writer of its tail log claims
    it; any other daemon parks (an unknown tail writer means someone else writes there)."""

    async def run() -> None:
        writer = memory_storage.tail_writer(A)
        writer.stage_replace("x.json", b"{}", mtime=0.0)
        await writer.commit()
        with pytest.raises(PrefixOwnedError, match="keeps no owner claim"):
            await check_claim(memory_storage, B, "mem")
        assert await read_claim(memory_storage) is None  # nothing written by the loser
        assert (await check_claim(memory_storage, A, "mem")).writer == A

    asyncio.run(run())


class _LaxStorage(MemoryStorage):
    """A server that ignores the create precondition (overwrites, answers 200)."""

    async def acreate_internal(self, name: str, data: bytes) -> None:
        await self.awrite_internal(name, data)


def test_a_server_ignoring_the_precondition_leaves_one_owner(unique_prefix: str) -> None:
    """Two daemons claiming at once through a server that ignores If-None-Match: exactly
    one believes it owns the prefix (the claim is read back, not trusted)."""
    lax = _LaxStorage("lax-bucket", unique_prefix)

    async def run() -> tuple[Claim | BaseException, Claim | BaseException]:
        return await asyncio.gather(
            check_claim(lax, A, "d"), check_claim(lax, B, "d"), return_exceptions=True
        )

    results = asyncio.run(run())
    owners = [r for r in results if isinstance(r, Claim)]
    assert len(owners) == 1 and sum(isinstance(r, PrefixOwnedError) for r in results) == 1
    assert lax.read_internal(OWNER_NAME) == owners[0].encode()


def test_take_over_replaces_the_claim_and_the_old_owner_notices(
    memory_storage: MemoryStorage,
) -> None:
    """take_over makes this writer the owner; the displaced owner's next check (a conflict
    or the periodic re-read) raises PrefixOwnedError instead of writing."""

    async def run() -> None:
        now = [0.0]
        old = Owner(memory_storage, A, "d", recheck_s=60.0, clock=lambda: now[0])
        await old.ensure()
        previous, claim = await take_over(memory_storage, B, host="new-host")
        assert previous is not None and previous.writer == A and claim.writer == B
        await old.ensure()  # within recheck_s: no request, still believes it
        # a conflict re-reads the claim at once, even right after a check: the new
        # owner's write that caused it may follow that check by a millisecond
        exc = await old.explain(ConflictError("412"))  # a write of it conflicted
        assert isinstance(exc, PrefixOwnedError) and "'new-host'" in str(exc)
        now[0] = 120.0
        with pytest.raises(PrefixOwnedError):
            await old.ensure()

    asyncio.run(run())


def test_a_displaced_owner_never_rewrites_the_new_owners_object(
    memory_storage: MemoryStorage, tmp_path: Path
) -> None:
    """The new owner claims and writes its object right after the old owner's periodic
    check: the old owner's next append conflicts, and it parks instead of rewriting the
    object with its own file (regression: a claim read less than a second earlier was
    trusted, the old owner rewrote, and the new owner, with nothing new to send, never
    repaired its object)."""
    root = tmp_path / "root"
    local = root / "runs/r/b/trajectories.jsonl"
    local.parent.mkdir(parents=True)
    local.write_bytes(b'{"a": 0}\n')
    key = "runs/r/b/trajectories.jsonl"

    async def run() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            owner = Owner(memory_storage, A, "mem", recheck_s=60.0)
            ctx = Context(
                name="mem",
                root=root,
                storage=memory_storage,
                journal=journal,
                policy=Policy(flush_interval_s=0.01, invalid_json_grace_s=0.0),
                budget=ByteBudget(1 << 20),
                direct_append_bytes=1 << 30,
                owner=owner,
            )
            shipper = PerFileShipper(ctx)
            assert (await shipper.ship(Batch({key: 1}, 1 << 20))).done == [key]
            await take_over(memory_storage, B, host="new-host")
            await memory_storage.awrite(key, b'{"b": 10}\n')  # the new owner's first write
            local.write_bytes(b'{"a": 0}\n{"a": 1}\n')  # one more line
            outcome = await shipper.ship(Batch({key: 2}, 1 << 20))
            assert isinstance(outcome.error, PrefixOwnedError), outcome
            assert "'new-host'" in str(outcome.error)

    asyncio.run(run())
    assert memory_storage.read(key) == b'{"b": 10}\n'


def test_a_vanished_claim_hands_nothing_over(memory_storage: MemoryStorage, tmp_path: Path) -> None:
    """B, parked on A's prefix, never claims it when A's claim disappears (a lifecycle rule
    on ``.evalsyncd/``, a ``sync --delete``), also after a restart; A recreates its claim
    at its next check; ``take_over`` is the way for B."""

    async def run() -> None:
        a = Owner(memory_storage, A, "d", state_dir=tmp_path / "a")
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        await a.ensure()
        b = Owner(memory_storage, B, "d", state_dir=tmp_path / "b")
        with pytest.raises(PrefixOwnedError):
            await b.ensure()
        await memory_storage._delete_keys([memory_storage._key(".evalsyncd/" + OWNER_NAME)], "")
        assert await read_claim(memory_storage) is None
        for owner in (b, Owner(memory_storage, B, "d", state_dir=tmp_path / "b")):
            with pytest.raises(PrefixOwnedError) as info:
                await owner.ensure()
            assert "is gone" in str(info.value) and "--take-over" in str(info.value)
            assert info.value.owner_writer == A
        assert await read_claim(memory_storage) is None  # B created nothing
        await a.confirm()  # the owner's next check recreates its claim
        found = await read_claim(memory_storage)
        assert found is not None and found.writer == A
        await take_over(memory_storage, B)
        await Owner(memory_storage, B, "d", state_dir=tmp_path / "b").ensure()

    asyncio.run(run())


@pytest.mark.parametrize(
    "damaged",
    [
        b"not json",
        b'{"format": 1, "writer": "w", "host": "h", "claimed_at": 1' + b"0" * 400 + b"}",
        b'{"format": 1, "writer": "w", "host": "h", "claimed_at": "inf"}',
    ],
    ids=["not json", "a time past a float", "an infinite time"],
)
def test_a_damaged_claim_is_reported_not_overwritten(
    memory_storage: MemoryStorage, damaged: bytes
) -> None:
    """A claim that does not parse parks with its URL and the take-over fix; take_over
    replaces it."""
    memory_storage.write_internal(OWNER_NAME, damaged)

    async def run() -> None:
        with pytest.raises(CorruptObjectError, match=r"owner\.json.*--take-over"):
            await check_claim(memory_storage, A, "d")
        previous, claim = await take_over(memory_storage, A)
        assert previous is None and claim.writer == A

    asyncio.run(run())


# -- two real daemons on one prefix ---------------------------------------------------------


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"from": text}) + "\n")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evalsyncd", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("kind", "lag"),
    [("s3", 60.0), ("s3", 0.0), ("gcs", 60.0), ("gcs", 0.0)],
    ids=["s3-tail", "s3-per-file", "gcs-tail", "gcs-per-file"],
)
def test_two_daemons_on_one_prefix_the_first_keeps_writing(
    rel: RelEnv, tmp_path: Path, kind: str, lag: float
) -> None:
    """Daemon A mirrors; daemon B (its own root and state) on the same prefix writes nothing
    and parks naming A's host; A keeps writing, also across a restart; status shows who
    owns; `claim --take-over` hands the prefix to B, and A then parks instead of fighting."""
    reader = rel.add(kind, max_main_lag_s=lag)
    assert isinstance(reader, S3Storage | GCSStorage)
    reader.tail_refresh_s = 0.0
    key = "runs/r/b/trajectories.jsonl"
    mine, theirs = rel.root / key, tmp_path / "b-root" / key
    _append(mine, "a0")
    _append(theirs, "b0")
    b_cfg = write_config(
        tmp_path / "b.toml",
        tmp_path / "b-root",
        tmp_path / "b-state",
        rel.dests,
        flush_interval_s=0.1,
        log_level="debug",
    )
    a = rel.daemon(log_level="debug")
    with a:
        wait_for(lambda: reader.exists(key) and reader.read(key) == mine.read_bytes(), 30)
        with Daemon(b_cfg, tmp_path / "b.log") as b:

            def b_parked() -> bool:
                return any(
                    e.get("new") == "parked" and "owned by another evalsyncd" in e["reason"]
                    for e in events(b, "destination_state")
                )

            wait_for(b_parked, 30, 0.1, "B parked")
            reason = next(e["reason"] for e in events(b, "destination_state"))
            assert repr(socket.gethostname()) in reason and "--take-over" in reason
            for i in range(1, 4):
                _append(mine, f"a{i}")
                _append(theirs, f"b{i}")
            wait_for(lambda: reader.read(key) == mine.read_bytes(), 30, 0.1, "A's lines")
            assert not events(b, "upload_succeeded") and not events(b, "tail_written")
            status = _cli("status", "--config", str(b_cfg))
            assert status.returncode == 1 and "parked" in status.stderr, status
            assert f"owner: host {socket.gethostname()}" in status.stdout, status.stdout
            assert "this host writes nothing there" in status.stdout
    assert a.proc is not None and a.proc.returncode == 0
    assert b"b0" not in reader.read(key)
    if isinstance(reader, S3Storage):
        assert b"b0" not in s3_main_object(reader, key)
    if lag:

        async def newest() -> TailIndex:
            try:
                return await read_index(reader)
            finally:
                await reader.aclose()

        index = asyncio.run(newest())
        assert index.writer in ("", _writer(rel.state))
    status = _cli("status", "--config", str(rel.tmp / "config.toml"))
    assert "owner: this host" in status.stdout, status.stdout

    # a restart keeps the claim
    _append(mine, "a4")
    with rel.daemon(log_level="debug"):
        wait_for(lambda: reader.read(key) == mine.read_bytes(), 30, 0.1, "A after restart")
        # the take-over: B's host takes the prefix back while A still runs
        # B's file is not A's: the take-over is refused, naming it, unless told to discard
        refused = _cli("claim", "--config", str(b_cfg), "--destination", kind, "--take-over")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "not taken over" in refused.stdout and key in refused.stdout
        assert "--discard-remote" in refused.stdout
        taken = _cli(
            "claim",
            "--config",
            str(b_cfg),
            "--destination",
            kind,
            "--take-over",
            "--discard-remote",
        )
        assert taken.returncode == 0, taken.stdout + taken.stderr
        assert "taken over from host" in taken.stdout
        with Daemon(b_cfg, tmp_path / "b2.log") as b2:
            _append(theirs, "b4")
            _append(mine, "a5")

            lines = iter(range(6, 10_000))

            def a_parked() -> bool:
                _append(mine, f"a{next(lines)}")  # A keeps writing until it notices
                return _a_parked(rel.log_path)

            wait_for(a_parked, 60, 0.2, "A parked after the take-over")
            more = iter(range(5, 10_000))

            def b_mirrored() -> bool:
                if reader.read(key) == theirs.read_bytes():
                    return True
                # B keeps writing, as a live host does: fake-gcs-server ignores compose's
                # ifGenerationMatch, so an append of A's in flight at the take-over can land
                # on B's object (A's post-condition check catches it, then A parks); B's
                # next append finds bytes its file never had and rewrites the object
                _append(theirs, f"b{next(more)}")
                return False

            wait_for(b_mirrored, 60, 0.5, "B's lines")
            assert b2.alive()
    check = _cli("claim", "--config", str(rel.tmp / "config.toml"))
    assert check.returncode == 1 and "owned by another evalsyncd" in check.stdout


def _a_parked(log_path: Path) -> bool:
    return any(
        e.get("new") == "parked" and "owned by another evalsyncd" in (e.get("reason") or "")
        for e in Daemon(log_path, log_path).log_events()
        if e.get("event") == "destination_state"
    )


def _writer(state: Path) -> str:
    from evalsyncd.sync.journal import Journal

    with Journal(state / "journal.sqlite3", readonly=True) as journal:
        return journal.writer_id()


def test_claim_command_usage(rel: RelEnv) -> None:
    """`claim --take-over` without --destination is a usage error (no mass take-over);
    `claim` on a fresh prefix claims it and lists it under keys of the internal area."""
    reader = rel.add("s3")
    cfg = write_config(rel.tmp / "c.toml", rel.root, rel.state, rel.dests)
    assert _cli("claim", "--config", str(cfg), "--take-over").returncode == 2
    done = _cli("claim", "--config", str(cfg))
    assert done.returncode == 0 and "owned by this host" in done.stdout, done.stdout + done.stderr
    assert ".evalsyncd/owner.json" in list_keys(reader, internal=True)


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_take_over_never_discards_what_only_the_bucket_holds(
    rel: RelEnv, tmp_path: Path, kind: str
) -> None:
    """A reinstalled host whose root came back from an older backup (3 of 8 lines): the
    take-over is refused, naming the file and both sizes, instead of letting the daemon
    replace the bucket's 8 lines with 3; once the file holds the bucket's lines again (and
    more), the take-over goes through and the daemon only appends."""
    reader = rel.add(kind)
    key = "runs/r/b/trajectories.jsonl"
    for i in range(8):
        _append(rel.root / key, f"a{i}")
    cfg = write_config(rel.tmp / "a.toml", rel.root, rel.state, rel.dests)
    assert _cli("sync", "--config", str(cfg), "--once").returncode == 0
    full = (rel.root / key).read_bytes()
    backup = b"".join(full.splitlines(keepends=True)[:3])
    (tmp_path / "new-root" / key).parent.mkdir(parents=True)
    (tmp_path / "new-root" / key).write_bytes(backup)
    new = write_config(
        tmp_path / "new.toml", tmp_path / "new-root", tmp_path / "new-state", rel.dests
    )
    refused = _cli("claim", "--config", str(new), "--destination", kind, "--take-over")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "not taken over" in refused.stdout and key in refused.stdout
    assert f"bucket {len(full)} B, local {len(backup)} B" in refused.stdout
    assert reader.read(key) == full  # nothing written, the old claim stands
    (tmp_path / "new-root" / key).write_bytes(full)  # the bucket's copy, brought back
    _append(tmp_path / "new-root" / key, "new0")
    taken = _cli("claim", "--config", str(new), "--destination", kind, "--take-over")
    assert taken.returncode == 0 and "taken over" in taken.stdout, taken.stdout + taken.stderr
    assert _cli("sync", "--config", str(new), "--once").returncode == 0
    assert reader.read(key) == (tmp_path / "new-root" / key).read_bytes()


def test_a_local_directory_destination_is_claimed_exclusively(tmp_path: Path) -> None:
    """A local-directory mirror: the claim is a hard link of a complete file (exclusive,
    never partial); a second writer parks, and no temporary file is left behind."""
    from evalsyncd.storage import LocalStorage

    mirror = LocalStorage(tmp_path / "mirror")

    async def run() -> None:
        assert (await check_claim(mirror, A, "file", host="nfs-1")).writer == A
        with pytest.raises(PrefixOwnedError, match="'nfs-1'"):
            await check_claim(mirror, B, "file")

    asyncio.run(run())
    assert sorted(p.name for p in (tmp_path / "mirror/.evalsyncd").iterdir()) == [OWNER_NAME]
