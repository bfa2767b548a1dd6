"""A deterministic simulation of the daemon's core: seeded chaos, crashes, invariants.

In the spirit of FoundationDB's simulator and TigerBeetle's VOPR: one process,
one event loop, no server and no real sleep. The whole core (scheduler, both
shippers, the journal, the tail log) runs over :class:`~evalsyncd.storage.memory.MemoryStorage`
on a virtual clock, while a seeded schedule mixes, step by step:

- local changes: complete lines, partial lines (finished later), truncations at
  any byte, atomic replacements, deletions, valid, invalid and blank JSON;
- daemon passes after virtual time has passed (0.01 s to 70 s: flush
  intervals, idle spells, ``max_main_lag_s``);
- storage chaos on the daemon's requests: transient failures, lost answers
  (the request took effect, the answer never came), bursts of throttling,
  outages, an access denial that parks the destination, and reordering
  (requests in flight yield to each other a random number of times);
- crashes: the k-th storage request of a pass kills the daemon, before the
  request or after it took effect. Everything in memory is dropped, the
  journal loses what it had not committed (``kill -9``), and a fresh
  destination (scheduler, shippers, tail writer) is built over the same
  journal file and the same bucket, then does its start-up scan.

After every step that can change the bucket (passes and crash recoveries;
local changes only add versions a check may match), for every file ever
written:

- its main object is a line-complete prefix of a version of the file
  (append-only) or a whole version that parses (``*.json``);
- the stitched view (main object + tail log) is too, and never goes back to
  an older version of the file once it showed a newer one;
- no line appears twice in either.

At the end the chaos stops and the daemon drains: every main object and every
stitched view then equals the local file (JSONL: up to its last newline), and
files deleted locally are gone when ``mirror_deletes`` is on.

Replay a seed::

    python -m evalsyncd.testing.sim --seed 1234
    pytest tests/test_simulation.py --sim-seed=1234

Determinism: the schedule, the chaos, the clocks (``monotonic`` and wall,
file mtimes included) and the backoff jitter all come from the seed; the
event loop runs coroutines in a fixed order. :func:`run_seed` returns a
digest of the storage requests made, so a test can prove a seed replays
identically.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import structlog

from evalsyncd.config import DestinationSettings, RetrySettings
from evalsyncd.errors import AccessDeniedError, StorageError, TransientStorageError
from evalsyncd.storage.memory import MemoryBucket, MemoryStorage, Operation, drop_bucket
from evalsyncd.sync.destination import Destination
from evalsyncd.sync.files import FileKind, classify, scan_tree
from evalsyncd.sync.journal import Entry, Journal

__all__ = [
    "Chaos",
    "Crash",
    "SimFailure",
    "SimJournal",
    "SimResult",
    "SimS3Storage",
    "SimStorage",
    "VirtualClock",
    "main",
    "run_seed",
    "run_seeds",
]

T = TypeVar("T")

FILES = (
    "runs.jsonl",
    "runs/r0/metadata.json",
    "runs/r0/gsm8k/trajectories.jsonl",
    "runs/r0/gsm8k/result.json",
    "runs/r1/math/trajectories.jsonl",
    "runs/r1/math/result.json",
)
"""The files a simulation writes (append-only and replace-on-write, three phases)."""


class Crash(BaseException):
    """A simulated ``kill -9``: nothing in the daemon may catch it."""


class SimFailure(AssertionError):
    """An invariant broke; the message names the seed, the step and how to replay it."""


@dataclass
class VirtualClock:
    """Monotonic and wall time that move only when the simulation says so, seconds."""

    now: float = 0.0
    base: float = 1_800_000_000.0

    def monotonic(self) -> float:
        """Virtual monotonic time, seconds."""
        return self.now

    def wall(self) -> float:
        """Virtual Unix time, seconds."""
        return self.base + self.now

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass."""
        self.now += max(0.0, seconds)


@dataclass
class Chaos:
    """What goes wrong with the daemon's storage requests; all of it from one ``rng``.

    Attributes:
        crash_at: the request number (:attr:`calls`) that crashes the daemon.
        crash_after: that request takes effect before the crash.
        fail_next: so many next requests fail (throttling: ``TransientStorageError``).
        lost_next: so many next requests take effect and lose their answer.
        deny_next: so many next requests are denied (a permanent error: parks).
        outage: every request fails until it is cleared.
        fault_rate: chance that any request fails transiently.
        dead: the daemon crashed; everything it still does raises :class:`Crash`.
    """

    rng: random.Random
    calls: int = 0
    crashes: int = 0
    faults: int = 0
    crash_at: int | None = None
    crash_after: bool = False
    fail_next: int = 0
    lost_next: int = 0
    deny_next: int = 0
    outage: bool = False
    fault_rate: float = 0.0
    dead: bool = False
    trace: Any = field(default_factory=hashlib.sha256)

    def calm(self) -> None:
        """No more faults or crashes (the end of a simulation)."""
        self.crash_at = None
        self.fail_next = self.lost_next = self.deny_next = 0
        self.outage = False
        self.fault_rate = 0.0

    def die(self) -> Crash:
        """The daemon is killed now."""
        self.dead = True
        self.crash_at = None
        self.crashes += 1
        return Crash(f"crash #{self.crashes} at request {self.calls}")

    def check_alive(self) -> None:
        """Raise :class:`Crash` if the daemon was killed (it must not act any more)."""
        if self.dead:
            raise Crash("the daemon is dead")

    def verdict(self, op: str) -> str:
        """What happens to the next request: ``ok``, ``fail``, ``lost``, ``deny``,
        ``crash`` (before it) or ``crash_after`` (after it took effect)."""
        self.calls += 1
        self.trace.update(f"{self.calls}:{op};".encode())
        if self.crash_at is not None and self.calls >= self.crash_at:
            return "crash_after" if self.crash_after else "crash"
        if self.outage:
            return "fail"
        if self.deny_next:
            self.deny_next -= 1
            return "deny"
        if self.fail_next:
            self.fail_next -= 1
            return "fail"
        if self.lost_next:
            self.lost_next -= 1
            return "lost"
        if self.fault_rate and self.rng.random() < self.fault_rate:
            return "fail"
        return "ok"


class SimStorage(MemoryStorage):
    """A daemon's ``MemoryStorage`` whose requests go through :class:`Chaos`.

    Each request first yields to the other coroutines a random number of times
    (requests in flight complete in another order), then fails, loses its
    answer, crashes the daemon, or runs.
    """

    chaos: Chaos

    async def _run(self, op: Operation, url: str, effect: Callable[[MemoryBucket], T]) -> T:
        chaos = self.chaos
        chaos.check_alive()
        for _ in range(chaos.rng.choice((0, 0, 0, 1, 2))):
            await asyncio.sleep(0)
            chaos.check_alive()
        verdict = chaos.verdict(op)
        if verdict == "crash":
            raise chaos.die()
        if verdict == "fail":
            chaos.faults += 1
            raise TransientStorageError(f"{url}: simulated failure of {op}", url=url)
        if verdict == "deny":
            chaos.faults += 1
            raise AccessDeniedError(f"{url}: simulated access denied on {op}", url=url)
        try:
            result = await super()._run(op, url, effect)
        except StorageError:
            if verdict == "crash_after":
                raise chaos.die() from None
            raise
        if verdict == "crash_after":
            raise chaos.die()
        if verdict == "lost":
            chaos.faults += 1
            raise TransientStorageError(f"{url}: simulated lost answer of {op}", url=url)
        return result


class SimS3Storage(SimStorage):
    """:class:`SimStorage` with S3's shape: appends in place only from 512 bytes (5 MiB
    on S3), so below that main objects are rewritten whole."""

    append_in_place_min_bytes: ClassVar[int] = 512


class SimJournal(Journal):
    """A journal that refuses every write once the daemon is dead (a killed process
    writes nothing), and commits only when told to or every 256 rows (never by time,
    so a seed replays the same)."""

    MAX_PENDING_S = math.inf
    chaos: Chaos

    def ack(self, entry: Entry) -> None:
        """See :meth:`Journal.ack`."""
        self.chaos.check_alive()
        super().ack(entry)

    def forget(self, destination: str, path: str) -> None:
        """See :meth:`Journal.forget`."""
        self.chaos.check_alive()
        super().forget(destination, path)

    def commit(self) -> None:
        """See :meth:`Journal.commit`."""
        self.chaos.check_alive()
        super().commit()

    def set_destination_state(
        self, name: str, state: str, *, success: bool = False, error: str | None = None
    ) -> None:
        """See :meth:`Journal.set_destination_state`."""
        self.chaos.check_alive()
        super().set_destination_state(name, state, success=success, error=error)


@dataclass
class SimResult:
    """What one seed did."""

    seed: int
    steps: int
    crashes: int
    faults: int
    requests: int
    digest: str
    """SHA-256 of the sequence of storage requests: equal for two runs of one seed."""


@dataclass
class _File:
    versions: list[bytes] = field(default_factory=lambda: [b""])
    exists: bool = False
    partial: bytes = b""  # the rest of a line written without its end
    unknown: bool = False
    """Known limit: the object exists but a crash took the file's only journal row (a
    first write landed, its row was never committed). Deleted before the daemon sees
    it again, the object stays: the daemon never learned of it, and only a listing of
    the prefix could find it. Cleared once the journal has a row again."""
    floor_main: int = 0
    floor_view: int = 0


class _Sim:
    """One seed's world: the local files, the bucket, the daemon, the checks."""

    def __init__(self, seed: int, workdir: Path, steps: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.steps = steps
        self.clock = VirtualClock()
        self.chaos = Chaos(random.Random(self.rng.getrandbits(64)))
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.root.mkdir()
        self.state.mkdir()
        self.bucket = f"sim-{seed}-{os.getpid()}-{id(self):x}"
        self.files: dict[str, _File] = {p: _File() for p in FILES}
        self.ids = 0
        self.trace: deque[str] = deque(maxlen=40)
        rng = self.rng
        tail = rng.random() < 0.7
        self.mirror_deletes = rng.random() < 0.4
        self.storage_class: type[SimStorage] = SimS3Storage if rng.random() < 0.4 else SimStorage
        self.settings = DestinationSettings.model_construct(
            name="sim",
            url=f"memory://{self.bucket}/p",
            max_main_lag_s=60.0 if tail else 0.0,
            compact_idle_s=10.0,
            tail_max_pieces=rng.choice((2, 4, 32)),
            direct_append_bytes=rng.choice((256, 1024, 64 * 1024)),
            max_concurrency=rng.choice((1, 4)),
            retry=RetrySettings.model_construct(
                initial_backoff_s=1.0, max_backoff_s=30.0, parked_retry_s=120.0
            ),
        )
        self.chunk_bytes = rng.choice((512, 2048, 1 << 20))
        self.step = 0
        self.dest: Destination | None = None
        self.journal: SimJournal | None = None
        self.storage: SimStorage | None = None
        self.reader = MemoryStorage(self.bucket, "p")
        self.reader.tail_refresh_s = 0.0
        self.plain = MemoryStorage(self.bucket, "p")
        self.plain.read_tail = False

    # -- the daemon ------------------------------------------------------------------------

    async def start(self) -> None:
        """A daemon process: a fresh journal handle, storage and destination, then a scan."""
        self.chaos.dead = False
        journal = SimJournal(self.state / "journal.sqlite3", self.root)
        journal.chaos = self.chaos
        storage = self.storage_class(self.bucket, "p")
        storage.chaos = self.chaos
        await storage.__aenter__()
        self.journal, self.storage = journal, storage
        self.dest = Destination(
            self.settings,
            storage,
            journal,
            self.root,
            flush_interval_s=1.0,
            mirror_deletes=self.mirror_deletes,
            invalid_json_grace_s=5.0,
            chunk_bytes=self.chunk_bytes,
            retry_chunk_bytes=max(256, self.chunk_bytes // 4),
            inflight_bytes=1 << 20,
            clock=self.clock.monotonic,
            wall=self.clock.wall,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        self.rescan()

    async def stop(self, *, crashed: bool) -> None:
        """The process ends: killed (uncommitted journal rows lost) or cleanly."""
        assert self.journal is not None and self.storage is not None
        if crashed:
            self.journal.abandon()
        else:
            self.journal.close()
        self.chaos.dead = False
        with contextlib.suppress(BaseException):
            await self.storage.__aexit__(None, None, None)
        self.dest = self.journal = self.storage = None

    def rescan(self) -> None:
        """The service's scan: mark every file the journal is behind on."""
        d, journal = self.dest, self.journal
        assert d is not None and journal is not None
        entries = journal.entries(d.name)
        seen = set()
        for rel, st in scan_tree(self.root):
            seen.add(rel)
            e = entries.get(rel)
            if e is None or not e.unchanged(st):
                d.mark(rel)
        for rel, e in entries.items():
            if rel not in seen and e.status != "deleted":
                d.mark(rel)

    async def daemon_pass(self, *, drain: bool = False) -> None:
        """One pass after virtual time passed; a crash restarts the daemon."""
        d = self.dest
        assert d is not None
        self.clock.now = max(self.clock.now, d.retry_at)
        if drain:
            d.shipper.drain_all()
        try:
            await d.run_pass()
        except Crash:
            self.trace.append(f"  crashed at request {self.chaos.calls}")
            await self.stop(crashed=True)
            await self.start()
            assert self.journal is not None
            rows = self.journal.entries("sim")
            for path, f in self.files.items():
                if path not in rows and await self._read(self.plain, path) is not None:
                    f.unknown = True

    # -- local changes ---------------------------------------------------------------------

    def _line(self) -> bytes:
        self.ids += 1
        pad = "x" * self.rng.choice((0, 10, 100, 700))
        return json.dumps({"i": self.ids, "seed": self.seed, "pad": pad}).encode() + b"\n"

    def _touch(self, path: str) -> None:
        """Give ``path`` the virtual time as mtime (each change a distinct one)."""
        self.clock.advance(0.001)
        ns = int(self.clock.wall() * 1e9)
        os.utime(self.root / path, ns=(ns, ns), follow_symlinks=False)
        if self.dest is not None:
            self.dest.mark(path)  # the watcher's hint

    def _write_atomic(self, path: str, data: bytes) -> None:
        full = self.root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        tmp = full.parent / f".{full.name}.{self.ids}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, full)
        f = self.files[path]
        f.versions.append(data)
        f.exists = True
        f.partial = b""
        self._touch(path)

    def append(self, path: str, *, partial: bool) -> None:
        """Append complete lines (finishing a partial one first), maybe a partial line."""
        f = self.files[path]
        data = f.partial
        f.partial = b""
        for _ in range(self.rng.randint(0 if partial else 1, 4)):
            data += self._line()
        if partial:
            line = self._line()
            cut = self.rng.randint(1, len(line) - 1)
            data, f.partial = data + line[:cut], line[cut:]
        full = self.root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        with open(full, "ab") as out:
            out.write(data)
        if f.exists:
            f.versions[-1] += data
        else:
            f.versions.append(data)
            f.exists = True
        self._touch(path)

    def truncate(self, path: str) -> None:
        """Cut the file in place at any byte (a new version of it)."""
        f = self.files[path]
        size = len(f.versions[-1])
        cut = self.rng.randint(0, size)
        os.truncate(self.root / path, cut)
        f.versions.append(f.versions[-1][:cut])
        f.partial = b""
        self._touch(path)

    def replace(self, path: str) -> None:
        """Atomically replace the file (a new inode): new lines, or new JSON."""
        if classify(path) is FileKind.APPEND:
            data = b"".join(self._line() for _ in range(self.rng.randint(0, 3)))
        else:
            self.ids += 1
            roll = self.rng.random()
            if roll < 0.15:
                data = b'{"v": %d, "half' % self.ids  # a writer caught mid-way: not JSON
            elif roll < 0.22:
                data = b""
            else:
                data = json.dumps({"v": self.ids, "seed": self.seed}).encode()
        self._write_atomic(path, data)

    def delete(self, path: str) -> None:
        """Delete the file."""
        with contextlib.suppress(FileNotFoundError):
            (self.root / path).unlink()
        f = self.files[path]
        f.exists = False
        f.partial = b""
        f.versions.append(b"")  # what comes next starts a new version
        if self.dest is not None:
            self.dest.mark(path)

    # -- the schedule ----------------------------------------------------------------------

    async def run(self) -> None:
        await self.start()
        try:
            for step in range(self.steps):
                self.step = step
                await self.one_step()
            await self.quiesce()
        finally:
            if self.journal is not None:
                await self.stop(crashed=False)
            drop_bucket(self.bucket)

    async def one_step(self) -> None:
        rng, chaos = self.rng, self.chaos
        path = rng.choice(FILES)
        roll = rng.random()
        kind = classify(path)
        if roll < 0.42:
            wait = rng.choice((0.01, 1.0, 1.0, 3.0, 11.0, 70.0))
            self.clock.advance(wait)
            armed = ""
            if rng.random() < 0.9:
                chaos.crash_at = chaos.calls + rng.randint(1, 4)
                chaos.crash_after = rng.random() < 0.5
                armed = f" crash at request {chaos.crash_at}" + (
                    " after it" if chaos.crash_after else ""
                )
            self.trace.append(f"{self.step}: pass after {wait}s{armed}")
            await self.daemon_pass()
            chaos.crash_at = None
            await self.check()
        elif roll < 0.52:
            what = rng.choice(("fail", "lost", "outage", "deny", "rate", "calm", "rescan"))
            if what == "fail":
                chaos.fail_next = rng.randint(1, 4)
            elif what == "lost":
                chaos.lost_next = rng.randint(1, 2)
            elif what == "outage":
                chaos.outage = not chaos.outage
            elif what == "deny":
                chaos.deny_next = 1
            elif what == "rate":
                chaos.fault_rate = rng.choice((0.05, 0.2))
            elif what == "calm":
                chaos.calm()
            else:
                self.rescan()
            self.trace.append(f"{self.step}: chaos {what}")
        elif kind is FileKind.APPEND:
            exists = self.files[path].exists
            action = rng.random()
            if not exists or action < 0.6:
                self.append(path, partial=rng.random() < 0.25)
                self.trace.append(f"{self.step}: append {path}")
            elif action < 0.75:
                self.truncate(path)
                self.trace.append(f"{self.step}: truncate {path}")
            elif action < 0.92:
                self.replace(path)
                self.trace.append(f"{self.step}: replace {path}")
            else:
                self.delete(path)
                self.trace.append(f"{self.step}: delete {path}")
        elif rng.random() < 0.9 or not self.files[path].exists:
            self.replace(path)
            self.trace.append(f"{self.step}: write {path}")
        else:
            self.delete(path)
            self.trace.append(f"{self.step}: delete {path}")

    async def quiesce(self) -> None:
        """Stop the chaos, finish partial lines and JSON, drain, and compare everything."""
        self.step = self.steps
        self.chaos.calm()
        for path, f in self.files.items():
            if not f.exists:
                continue
            if classify(path) is FileKind.APPEND and f.partial:
                self.append(path, partial=False)
            elif classify(path) is FileKind.APPEND and not f.versions[-1].endswith(b"\n"):
                self.append(path, partial=False)  # a line cut by a truncation, completed
            elif classify(path) is FileKind.REPLACE and not _parses(f.versions[-1]):
                self.ids += 1
                self._write_atomic(path, json.dumps({"v": self.ids}).encode())
        self.trace.append("quiesce")
        for _ in range(40):
            self.clock.advance(15.0)
            assert self.dest is not None
            self.rescan()
            await self.daemon_pass(drain=True)
            await self.check()
            if self.dest.caught_up and await self._equal():
                return
        d = self.dest
        assert d is not None
        self.fail(
            f"no quiescence: {await self._differences()}; dirty {d.pending_paths()}, "
            f"{d.shipper.behind} main objects behind, {d.state.value}, last error {d.last_error}"
            + "".join(
                f"\n  behind: {p} {ft} journal {self.journal.get(d.name, p) if self.journal else None}"
                for p, ft in (d.tail.writer.index.files.items() if d.tail is not None else ())
            )
        )

    # -- the invariants --------------------------------------------------------------------

    async def _read(self, storage: MemoryStorage, path: str) -> bytes | None:
        try:
            return await storage.aread(path)
        except FileNotFoundError:
            return None

    async def check(self) -> None:
        """The invariants of every file's main object and stitched view (module docstring)."""
        paths = list(self.files)
        views = await asyncio.gather(*(self._read(self.reader, p) for p in paths))
        mains = await asyncio.gather(*(self._read(self.plain, p) for p in paths))
        rows = self.journal.entries("sim") if self.journal is not None else {}
        for path, view, main in zip(paths, views, mains, strict=True):
            f = self.files[path]
            if path in rows:
                f.unknown = False
            if main is not None:
                f.floor_main = self._version_of(path, "main object", main, f.floor_main)
            if view is not None:
                f.floor_view = self._version_of(path, "stitched view", view, f.floor_view)

    def _version_of(self, path: str, what: str, data: bytes, floor: int) -> int:
        """Check ``data`` against the versions of ``path``; returns the new floor: the
        oldest version the observations so far are all consistent with."""
        f = self.files[path]
        append = classify(path) is FileKind.APPEND
        if append:
            if data and not data.endswith(b"\n"):
                self.fail(f"{what} of {path} ends in a partial line: ...{data[-60:]!r}")
            lines = data.split(b"\n")[:-1]
            if len(set(lines)) != len(lines):
                self.fail(f"{what} of {path} holds a line twice")
            matches = [i for i, v in enumerate(f.versions) if v.startswith(data)]
        else:
            if path.endswith(".json") and data.strip() and not _parses(data):
                self.fail(f"{what} of {path} is not JSON: {data[:60]!r}")
            matches = [i for i, v in enumerate(f.versions) if v == data]
        if not matches:
            kind = "a prefix of" if append else "equal to"
            self.fail(f"{what} of {path} ({len(data)} bytes) is not {kind} any version of it")
        # going back: consistent only with versions older than every version an earlier
        # observation was consistent with (a prefix can match several versions)
        # (not across a deletion: a mirrored delete drops the tail's entry first, so
        # readers may see the main object's older content until it goes)
        if not f.exists:
            return 0
        if max(matches) < floor:
            self.fail(f"{what} of {path} went back to version {max(matches)} after {floor}")
        return max(floor, min(matches))

    async def _expected(self) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        for path, f in self.files.items():
            if f.exists:
                data = f.versions[-1]
                if classify(path) is FileKind.APPEND:
                    data = data[: data.rfind(b"\n") + 1]
                out[path] = data
            elif self.mirror_deletes and not f.unknown:
                out[path] = None
        return out

    async def _differences(self) -> list[str]:
        diffs = []
        for path, want in (await self._expected()).items():
            main = await self._read(self.plain, path)
            view = await self._read(self.reader, path)
            if main != want or view != want:
                diffs.append(
                    f"{path}: local {_size(want)}, main object {_size(main)}, stitched {_size(view)}"
                )
        return diffs

    async def _equal(self) -> bool:
        return not await self._differences()

    def fail(self, message: str) -> None:
        trace = "\n".join(self.trace)
        raise SimFailure(
            f"simulation seed {self.seed}, step {self.step}: {message}\n"
            f"  replay: python -m evalsyncd.testing.sim --seed {self.seed}"
            f"  (or pytest tests/test_simulation.py --sim-seed={self.seed})\n"
            f"last steps:\n{trace}"
        )


def _memory_dir() -> str | None:
    """A RAM-backed temporary directory when the system has one (``/dev/shm``): the
    journal's commits and the files' renames then cost no disk I/O."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _parses(data: bytes) -> bool:
    if not data.strip():
        return True
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _size(data: bytes | None) -> str:
    return "absent" if data is None else f"{len(data)} B"


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Drop the daemon's log lines while simulating (thousands of crashes are noisy)."""
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.KeyValueRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL + 0),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**saved)


def run_seed(seed: int, steps: int = 80, workdir: Path | None = None) -> SimResult:
    """Simulate one seed; see the module docstring.

    Args:
        seed: the schedule, the chaos and the clocks all derive from it.
        steps: steps before the final drain.
        workdir: where the local root and the journal live (default: a fresh
            temporary directory, removed afterwards).

    Raises:
        SimFailure: an invariant broke (the message says how to replay the seed).
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(
                stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="evalsyncd-sim-", dir=_memory_dir())
                )
            )
        else:
            workdir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(_quiet_logs())
        sim = _Sim(seed, workdir, steps)
        asyncio.run(sim.run())
        return SimResult(
            seed,
            steps,
            sim.chaos.crashes,
            sim.chaos.faults,
            sim.chaos.calls,
            sim.chaos.trace.hexdigest(),
        )


def run_seeds(
    seeds: range, steps: int = 80, report: Callable[[SimResult], None] | None = None
) -> list[SimResult]:
    """Simulate every seed of ``seeds`` in order (each in its own directory).

    Raises:
        SimFailure: the first seed whose invariants broke.
    """
    results = []
    base = Path(tempfile.mkdtemp(prefix="evalsyncd-sim-", dir=_memory_dir()))
    try:
        for seed in seeds:
            result = run_seed(seed, steps, base / str(seed))
            shutil.rmtree(base / str(seed), ignore_errors=True)
            results.append(result)
            if report is not None:
                report(result)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m evalsyncd.testing.sim --seed N [--seeds COUNT] [--steps S]``.

    Returns:
        0 when every seed kept its invariants, 1 otherwise (the failure is printed).
    """
    parser = argparse.ArgumentParser(prog="python -m evalsyncd.testing.sim", description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="the (first) seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds from --seed")
    parser.add_argument("--steps", type=int, default=80, help="steps per seed")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        results = run_seeds(range(args.seed, args.seed + args.seeds), args.steps)
    except SimFailure as exc:
        print(exc, file=sys.stderr)
        return 1
    crashes = sum(r.crashes for r in results)
    faults = sum(r.faults for r in results)
    print(
        f"{len(results)} seeds, {crashes} crashes, {faults} faults, "
        f"{sum(r.requests for r in results)} requests in {time.monotonic() - started:.1f} s"
        + (f"; digest {results[0].digest[:16]}" if len(results) == 1 else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
