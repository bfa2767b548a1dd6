"""The daemon's pure core: plan() for every kind of file and row, and the destination lifecycle."""

from __future__ import annotations

import asyncio
import os
import random
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from evalsyncd.config import RetrySettings
from evalsyncd.sync.journal import Entry, EntryStatus
from evalsyncd.sync.passes import ByteBudget
from evalsyncd.sync.plan import (
    NEW_FILE,
    Action,
    Do,
    FileFacts,
    MainFacts,
    Policy,
    main_due,
    observe,
    plan,
)
from evalsyncd.sync.states import (
    EDGES,
    DestinationState,
    TransitionError,
    after_failure,
    check_transition,
)

NOW = 1_000_000.0
POLICY = Policy(flush_interval_s=1.0, invalid_json_grace_s=30.0)


def st(
    size: int = 100, mtime: float = NOW - 100, ino: int = 7, mode: int = stat.S_IFREG
) -> os.stat_result:
    """A stat of a file (regular unless ``mode`` says otherwise)."""
    ns = int(mtime * 1e9)
    secs = int(mtime)
    # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime), float times, ns times
    fields = (
        mode | 0o644,
        ino,
        1,
        1,
        0,
        0,
        size,
        secs,
        secs,
        secs,
        mtime,
        mtime,
        mtime,
        ns,
        ns,
        ns,
    )
    return os.stat_result(fields)


def row(
    path: str = "t.jsonl",
    *,
    status: EntryStatus = EntryStatus.OK,
    size: int = 50,
    tail_offset: int = 50,
    ino: int = 7,
    crc: int | None = None,
) -> Entry:
    """A journal row that saw the file at ``size`` bytes (so a file of another size changed)."""
    return Entry(
        destination="d",
        path=path,
        dev=1,
        ino=ino,
        acked_offset=tail_offset,
        fingerprint=0,
        content_crc=crc,
        remote_version="v1",
        seen_size=size,
        seen_mtime_ns=int((NOW - 100) * 1e9),
        status=status,
        acked_at=NOW - 200,
        tail_offset=tail_offset,
    )


SAME = st(size=50)  # the stat row() saw: unchanged

CASES: list[tuple[str, FileFacts, Entry | None, Policy, Action]] = [
    # -- any kind
    ("ignored name", FileFacts("runs/.m.json.1.tmp", st()), None, POLICY, Action(Do.SKIP)),
    ("unreadable", FileFacts("a.jsonl", None, error="EACCES"), row(), POLICY, Action(Do.UNREADABLE, reason="EACCES")),
    ("not regular (symlink)", FileFacts("a.jsonl", st(mode=stat.S_IFLNK)), None, POLICY, Action(Do.SKIP)),
    ("replaced by a symlink: as deleted", FileFacts("t.jsonl", st(mode=stat.S_IFLNK)), row(), POLICY, Action(Do.DELETED)),
    ("replaced by a FIFO, mirror_deletes", FileFacts("t.jsonl", st(mode=stat.S_IFIFO)), row(), replace(POLICY, mirror_deletes=True), Action(Do.REMOVE)),
    ("unchanged since the row", FileFacts("t.jsonl", SAME), row(), POLICY, Action(Do.SKIP)),
    # -- deleted locally
    ("gone, never synced", FileFacts("a.jsonl", None), None, POLICY, Action(Do.SKIP)),
    ("gone, already marked", FileFacts("t.jsonl", None), row(status=EntryStatus.DELETED), POLICY, Action(Do.SKIP)),
    ("gone: keep the remote", FileFacts("t.jsonl", None), row(), POLICY, Action(Do.DELETED)),
    ("gone, mirror_deletes", FileFacts("t.jsonl", None), row(), replace(POLICY, mirror_deletes=True), Action(Do.REMOVE)),
    ("gone, deletes held (another root)", FileFacts("t.jsonl", None), row(), replace(POLICY, mirror_deletes=True, hold_deletes=True), Action(Do.SKIP)),
    ("gone, deletes held, mirror_deletes off", FileFacts("t.jsonl", None), row(), replace(POLICY, hold_deletes=True), Action(Do.SKIP)),
    ("gone with its file system, mirror_deletes", FileFacts("t.jsonl", None, other_fs=True), row(), replace(POLICY, mirror_deletes=True), Action(Do.SKIP)),
    # -- append-only
    ("new append-only file", FileFacts("t.jsonl", st()), None, POLICY, Action(Do.REWRITE, reason=NEW_FILE)),
    ("back after a delete", FileFacts("t.jsonl", st()), row(status=EntryStatus.DELETED), POLICY, Action(Do.REWRITE, reason=NEW_FILE)),
    ("grown: append from tail_offset", FileFacts("t.jsonl", st(size=90)), row(tail_offset=40), POLICY, Action(Do.APPEND, offset=40)),
    ("truncated", FileFacts("t.jsonl", st(size=10), divergence="truncated"), row(), POLICY, Action(Do.REWRITE, reason="truncated")),
    ("replaced (new inode)", FileFacts("t.jsonl", st(ino=8), divergence="replaced (new inode)"), row(), POLICY, Action(Do.REWRITE, reason="replaced (new inode)")),
    # -- replace-on-write
    ("changed while read", FileFacts("r/m.json", st(), changed_while_read=True), None, POLICY, Action(Do.WAIT, after_s=1.0)),
    ("json parses: upload", FileFacts("r/m.json", st(), crc=5), None, POLICY, Action(Do.UPLOAD)),
    ("json, fresh mtime, parses: upload at once", FileFacts("r/m.json", st(mtime=NOW), crc=5), None, POLICY, Action(Do.UPLOAD)),
    ("json unparseable within grace", FileFacts("r/m.json", st(mtime=NOW - 5), json_error="bad", crc=5), None, POLICY, Action(Do.WAIT, after_s=1.0)),
    ("json unparseable past grace", FileFacts("r/m.json", st(mtime=NOW - 31), json_error="bad", crc=5), None, POLICY, Action(Do.INVALID, reason="bad")),
    ("empty json waits for the grace", FileFacts("r/m.json", st(size=0, mtime=NOW - 10), blank=True, crc=0), None, POLICY, Action(Do.WAIT, after_s=20.05)),
    ("empty json past grace: upload", FileFacts("r/m.json", st(size=0, mtime=NOW - 40), blank=True, crc=0), None, POLICY, Action(Do.UPLOAD)),
    ("other file, not quiet yet", FileFacts("r/notes.txt", st(mtime=NOW - 0.5), crc=1), None, POLICY, Action(Do.WAIT, after_s=0.55)),
    ("other file, quiet: upload", FileFacts("r/notes.txt", st(mtime=NOW - 2), crc=1), None, POLICY, Action(Do.UPLOAD)),
    ("dated in the future: quiet", FileFacts("r/notes.txt", st(mtime=NOW + 86400), crc=1), None, POLICY, Action(Do.UPLOAD)),
    ("future, unparseable json: reported", FileFacts("r/m.json", st(mtime=NOW + 86400), json_error="bad", crc=5), None, POLICY, Action(Do.INVALID, reason="bad")),
    ("same content as sent: record", FileFacts("r/m.json", st(), crc=5), row("r/m.json", crc=5), POLICY, Action(Do.RECORD)),
    ("other content: upload", FileFacts("r/m.json", st(), crc=6), row("r/m.json", crc=5), POLICY, Action(Do.UPLOAD)),
    ("was invalid, same bytes: upload", FileFacts("r/m.json", st(), crc=5), row("r/m.json", status=EntryStatus.INVALID, crc=5), POLICY, Action(Do.UPLOAD)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("facts", "entry", "policy", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan(facts: FileFacts, entry: Entry | None, policy: Policy, expected: Action) -> None:
    """plan() returns the documented action for each kind of file, row and age."""
    got = plan(facts, entry, NOW, policy)
    assert got.do is expected.do
    assert (got.offset, got.reason) == (expected.offset, expected.reason)
    assert got.after_s == pytest.approx(expected.after_s)


def test_observe_reads_only_what_plan_needs(tmp_path: Path) -> None:
    """observe(): an unchanged file is only stat'ed; an append-only file is opened and its
    fingerprint checked; a replace-on-write file is read under the byte budget; errors are facts."""
    (tmp_path / "t.jsonl").write_bytes(b'{"a": 1}\n{"b"')
    (tmp_path / "m.json").write_bytes(b'{"broken"')
    budget = ByteBudget(1000)

    async def scenario() -> None:
        async with observe(tmp_path, "t.jsonl", None, budget.hold) as seen:
            assert seen.fd is not None and seen.facts.st is not None
            assert seen.facts.divergence is None
        async with observe(tmp_path, "m.json", None, budget.hold) as seen:
            assert seen.data == b'{"broken"' and seen.facts.json_error
            assert budget.free == 1000 - len(b'{"broken"')
        assert budget.free == 1000
        async with observe(tmp_path, "gone.jsonl", None, budget.hold) as seen:
            assert seen.facts.st is None and seen.facts.error is None
        st_m = os.stat(tmp_path / "m.json")
        unchanged = Entry(
            "d", "m.json", st_m.st_dev, st_m.st_ino, 9, None, 1, None,
            st_m.st_size, st_m.st_mtime_ns, EntryStatus.OK, NOW,
        )  # fmt: skip
        async with observe(tmp_path, "m.json", unchanged, budget.hold) as seen:
            assert seen.data is None and budget.free == 1000
        (tmp_path / "locked.json").write_bytes(b"{}")
        (tmp_path / "locked.json").chmod(0)
        if os.geteuid() != 0:  # root reads anything
            async with observe(tmp_path, "locked.json", None, budget.hold) as seen:
                assert seen.facts.error is not None
                assert plan(seen.facts, None, NOW, POLICY).do is Do.UNREADABLE

    asyncio.run(scenario())


H, B, P = DestinationState.HEALTHY, DestinationState.BACKOFF, DestinationState.PARKED
TRANSITIONS = [
    # old, new, allowed: the lifecycle of docs/design.md section 9, written out by hand
    (H, B, True),  # a transient error
    (H, P, True),  # a permanent error
    (B, H, True),  # a pass succeeded
    (B, P, True),  # a permanent error while backing off
    (P, H, True),  # the periodic retry of a parked destination succeeded
    (P, B, True),  # that retry met a transient error
    (H, H, False),  # staying is not a transition
    (B, B, False),
    (P, P, False),
]


@pytest.mark.parametrize(("old", "new", "allowed"), TRANSITIONS)
def test_transitions_follow_the_edges(
    old: DestinationState, new: DestinationState, allowed: bool
) -> None:
    """Each transition is allowed or refused as the hand-written table says, and EDGES says
    the same; a refused one raises TransitionError naming it."""
    assert (new in EDGES[old]) is allowed
    if allowed:
        check_transition(old, new)
    else:
        with pytest.raises(TransitionError, match=f"{old.value} -> {new.value}"):
            check_transition(old, new)


def test_the_transition_table_covers_every_pair() -> None:
    """The table above names every (old, new) pair of states once."""
    pairs = [(old, new) for old, new, _ in TRANSITIONS]
    assert sorted(pairs, key=str) == sorted(
        ((o, n) for o in DestinationState for n in DestinationState), key=str
    )


def test_after_failure_returns_a_time_not_a_sleep() -> None:
    """A transient failure backs off (a time within the jitter bounds); a permanent one parks
    for parked_retry_s; both are pure in the clock and the randomness."""
    retry = RetrySettings(initial_backoff_s=1.0, max_backoff_s=8.0, parked_retry_s=300.0)
    first = after_failure(1, False, 50.0, retry, random.Random(1))
    assert first.state is DestinationState.BACKOFF
    assert 50.5 <= first.at <= 51.0 and first.at == 50.0 + first.delay_s
    assert after_failure(1, False, 50.0, retry, random.Random(1)) == first
    tenth = after_failure(10, False, 50.0, retry, random.Random(2))
    assert 4.0 <= tenth.delay_s <= 8.0
    parked = after_failure(3, True, 50.0, retry, random.Random(3))
    assert (parked.state, parked.at) == (DestinationState.PARKED, 350.0)


TAIL = Policy(
    flush_interval_s=1.0,
    invalid_json_grace_s=30.0,
    max_main_lag_s=60.0,
    compact_idle_s=10.0,
    tail_max_pieces=32,
    promote_bytes=1 << 20,
    in_place_min_bytes=5 << 20,
)
MiB = 1 << 20


def behind(path: str = "t.jsonl", acked: int = 0, tail: int = 100, since: float = NOW - 5) -> Entry:
    """A row whose main object holds ``acked`` bytes and the tail up to ``tail``."""
    return replace(row(path, tail_offset=acked), tail_offset=tail, tail_since=since)


DUE: list[tuple[str, Entry, MainFacts, Policy, str | None]] = [
    ("up to date", replace(behind(), tail_since=None), MainFacts(99, 1), TAIL, None),
    ("drain wins", behind(), MainFacts(0, 1, drain=True), TAIL, "drain"),
    ("drain, up to date: nothing", replace(behind(), tail_since=None), MainFacts(0, 1, drain=True), TAIL, None),
    ("clock stepped back", behind(since=NOW + 3600), MainFacts(0, 1), TAIL, "max_main_lag_s"),
    ("behind for max_main_lag_s", behind(since=NOW - 61), MainFacts(0, 1), TAIL, "max_main_lag_s"),
    ("busy, small, recent", behind(), MainFacts(1, 3), TAIL, None),
    ("idle, new object", behind(acked=0, tail=100), MainFacts(11, 1), TAIL, "idle"),
    ("idle, S3 below 5 MiB, little pending: waits (geometric)", behind(acked=4 * MiB, tail=4 * MiB + 10), MainFacts(11, 1), TAIL, None),
    ("idle, S3 below 5 MiB, pending >= object", behind(acked=1000, tail=2000), MainFacts(11, 1), TAIL, "idle"),
    ("idle, appendable in place", behind(acked=6 * MiB, tail=6 * MiB + 10), MainFacts(11, 1), TAIL, "idle"),
    ("idle replace-on-write", behind("r/m.json", acked=4000, tail=10), MainFacts(11, 1), TAIL, "idle"),
    ("tail_max_pieces", behind(acked=4 * MiB, tail=4 * MiB + 10), MainFacts(1, 32), TAIL, "tail_max_pieces"),
    ("tail_max_pieces, small pieces far from the in-place size", behind(acked=0, tail=32 * 1000), MainFacts(1, 32), TAIL, "tail_max_pieces"),
    ("tail_max_pieces deferred: in-place size within 32 more pieces", behind(acked=0, tail=4 * MiB), MainFacts(1, 32), replace(TAIL, promote_bytes=5 * MiB), None),
    ("tail_max_pieces deferred at most to twice as many", behind(acked=0, tail=4 * MiB), MainFacts(1, 64), replace(TAIL, promote_bytes=5 * MiB), "tail_max_pieces"),
    ("tail_max_pieces not deferred for replace-on-write", behind("r/m.json", acked=0, tail=4 * MiB), MainFacts(1, 32), replace(TAIL, promote_bytes=5 * MiB), "tail_max_pieces"),
    ("tail_max_pieces not deferred in place", behind(acked=6 * MiB, tail=6 * MiB + 10), MainFacts(1, 32), TAIL, "tail_max_pieces"),
    ("pending_bytes", behind(acked=100, tail=100 + MiB), MainFacts(1, 2), TAIL, "pending_bytes"),
    ("crosses the in-place size", behind(acked=4 * MiB, tail=5 * MiB + 1), MainFacts(1, 2), replace(TAIL, promote_bytes=5 * MiB), "in_place_size"),
    ("run finalized", behind(acked=100, tail=200), MainFacts(1, 2, finalized=True), TAIL, "run_finalized"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "facts", "policy", "expected"), [c[1:] for c in DUE], ids=[c[0] for c in DUE]
)
def test_main_due(entry: Entry, facts: MainFacts, policy: Policy, expected: str | None) -> None:
    """main_due() names the first reason a main object behind the tail is due, or None."""
    assert main_due(entry, facts, NOW, policy) == expected
