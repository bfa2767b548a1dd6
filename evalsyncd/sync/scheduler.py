"""One destination's scheduler: its dirty set, its timing, its state and its retries.

::

    mark(path) --> dirty set --pass (at most one per flush_interval_s; at once when urgent)-->
        Batch(due paths, chunk_bytes) --> shipper.ship() --> Outcome
            done / failed     out of the dirty set (unless marked again meanwhile)
            deferred          not before now + after_s
            again             marked again (urgent: the next pass starts at once)
            more              the shipper left due work for the next pass: it starts at once
            error             states.after_failure --> BACKOFF or PARKED until retry_at
        pass succeeded --> steps after the pass (the run catalog, ...) --> HEALTHY

The scheduler knows nothing of files or storage: a shipper
(:mod:`evalsyncd.sync.shipper`) does the work and returns what happened,
and never calls back. The lifecycle and the retry policy are pure
(:mod:`evalsyncd.sync.states`). The dirty set is bounded by the number of
files, never by bytes (the backlog is the journal lagging behind the files).
Clocks and randomness are injected, so a simulation drives it in virtual time
(``evalsyncd.testing.sim``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from evalsyncd.config import RetrySettings
from evalsyncd.errors import PermanentStorageError, StorageError
from evalsyncd.sync.journal import Journal
from evalsyncd.sync.passes import release_frames
from evalsyncd.sync.shipper import Batch, Meter, Outcome, Shipper
from evalsyncd.sync.states import DestinationState, after_failure, check_transition

__all__ = ["CHUNK_BYTES", "RETRY_CHUNK_BYTES", "PassReport", "Scheduler", "Stats", "Step"]

log = structlog.get_logger("evalsyncd.sync")

CHUNK_BYTES = 8 * 1024 * 1024
"""Largest delta sent in one append, and largest tail object body, bytes (unless a
single line is longer)."""
RETRY_CHUNK_BYTES = 1024 * 1024
"""The same bound while the destination is failing (BACKOFF, PARKED), bytes: a pass
that retries during an outage stages this much, not the backlog, so its memory
(the pieces, the object built of them, the SDK's copy of it) stays the same however
long the outage; the first pass that succeeds restores :data:`CHUNK_BYTES`."""


@dataclass(frozen=True)
class PassReport:
    """What a step after the pass is told: the batch's paths and the shipper's outcome."""

    paths: Sequence[str]
    outcome: Outcome


class Step(Protocol):
    """Work that follows each successful pass (the run catalog, the reaping of leftovers);
    see :class:`Scheduler`."""

    async def after_pass(self, report: PassReport) -> None:
        """Run after a pass that met no storage error.

        Raises:
            StorageError: the step failed; the pass counts as failed (retried).
        """
        ...

    def next_due_in(self) -> float | None:
        """Seconds until this step wants a pass even with nothing dirty (``None``: never)."""
        ...


@dataclass
class _Dirty:
    since: float  # Unix time the path first became dirty
    seq: int  # bumped whenever the path is marked again
    not_before: float = 0.0  # monotonic time before which it is not retried


@dataclass
class Stats:
    """Counters of one destination since the daemon started."""

    bytes_uploaded: int = 0
    objects_uploaded: int = 0
    failures: dict[str, int] = field(default_factory=dict)


class Scheduler:
    """When a destination's shipper runs, and what its failures mean; see the module docstring.

    Args:
        name: the destination's name (journal, logs).
        shipper: does the work of a pass.
        journal: where the destination's state is recorded.
        meter: the shipper's upload counters (read for :attr:`stats`).
        flush_interval_s: minimum time between two passes, seconds.
        retry: the backoff and parking settings.
        steps: run in order after each successful pass.
        chunk_bytes: see :data:`CHUNK_BYTES`, bytes.
        retry_chunk_bytes: see :data:`RETRY_CHUNK_BYTES`, bytes.
        clock: monotonic clock, seconds.
        wall: Unix time, seconds (the age of dirty marks).
        rng: randomness for the backoff jitter.
    """

    def __init__(
        self,
        name: str,
        shipper: Shipper,
        journal: Journal,
        meter: Meter,
        *,
        flush_interval_s: float,
        retry: RetrySettings,
        steps: Sequence[Step] = (),
        chunk_bytes: int = CHUNK_BYTES,
        retry_chunk_bytes: int = RETRY_CHUNK_BYTES,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.shipper = shipper
        self.journal = journal
        self.steps = list(steps)
        """Run in order after each successful pass (others may append theirs)."""
        self.flush_interval_s = flush_interval_s
        self.retry = retry
        self.clock = clock
        """The monotonic clock, seconds."""
        self.wall = wall
        self.state = DestinationState.HEALTHY
        self.last_error: str | None = None
        self._recorded: BaseException | None = None  # the failure recorded last
        self.retry_at = 0.0
        """Monotonic time before which no pass starts (after a failure), seconds."""
        self._meter = meter
        self._failures_by_kind: dict[str, int] = {}
        self._chunk_bytes = chunk_bytes
        self._retry_chunk_bytes = min(retry_chunk_bytes, chunk_bytes)
        self._rng = rng or random.Random()
        self._dirty: dict[str, _Dirty] = {}
        self._seq = 0
        self._wake = asyncio.Event()
        self._urgent = False
        self._failures = 0
        self._last_pass = -1e18
        self._last_success_recorded = -1e18
        self._stopping = asyncio.Event()
        # Nothing is recorded yet: until this destination's first outcome (its server
        # check, a pass, a transition) the journal keeps the state recorded last, so that
        # `status` never reports a parked destination healthy before anything was tried.

    # -- intake ------------------------------------------------------------------------

    def mark(self, path: str, *, urgent: bool = False) -> None:
        """Mark ``path`` (relative to the root) as possibly behind; wake the loop."""
        self._seq += 1
        item = self._dirty.get(path)
        if item is None:
            self._dirty[path] = _Dirty(since=self.wall(), seq=self._seq)
        else:
            item.seq = self._seq
            item.not_before = 0.0
        if urgent:
            self._urgent = True
        self._wake.set()

    @property
    def stats(self) -> Stats:
        """Uploads and failures since the daemon started (a snapshot)."""
        return Stats(self._meter.bytes, self._meter.objects, dict(self._failures_by_kind))

    @property
    def pending_files(self) -> int:
        """How many files are marked dirty."""
        return len(self._dirty)

    @property
    def oldest_pending_s(self) -> float:
        """Age of the oldest dirty mark, seconds (0 when nothing is pending)."""
        if not self._dirty:
            return 0.0
        return max(0.0, self.wall() - min(d.since for d in self._dirty.values()))

    def pending_paths(self) -> list[str]:
        """The dirty paths, in no particular order."""
        return list(self._dirty)

    def is_idle(self) -> bool:
        """Nothing dirty (a file waiting for a newline does not count as dirty)."""
        return not self._dirty

    @property
    def chunk_bytes(self) -> int:
        """Most file bytes one request carries now, bytes (unless a single line is longer):
        :data:`CHUNK_BYTES` when healthy, :data:`RETRY_CHUNK_BYTES` after a failed pass
        (retrying during an outage costs the same memory however large the backlog)."""
        if self.state is DestinationState.HEALTHY:
            return self._chunk_bytes
        return self._retry_chunk_bytes

    @property
    def caught_up(self) -> bool:
        """Nothing dirty and no main object behind what readers see."""
        return not self._dirty and not self.shipper.behind

    # -- the loop ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to exit after the pass in progress (sleeps end at once)."""
        self._stopping.set()
        self._wake.set()

    async def _sleep(self, delay_s: float) -> None:
        """Sleep ``delay_s`` seconds, or less if the destination is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, delay_s))

    def _transition(self, new: DestinationState, reason: str | None = None) -> None:
        """Move to ``new`` along an edge of :data:`~evalsyncd.sync.states.EDGES`; logged.

        Raises:
            TransitionError: not an edge (a bug).
        """
        if new is self.state:
            return
        check_transition(self.state, new)
        old, self.state = self.state, new
        level = log.warning if new is not DestinationState.HEALTHY else log.info
        if new is DestinationState.PARKED:
            level = log.error
        level(
            "destination_state", destination=self.name, old=old.value, new=new.value, reason=reason
        )
        self.journal.set_destination_state(
            self.name, new.value, success=new is DestinationState.HEALTHY, error=reason
        )

    async def run(self) -> None:
        """Run passes until :meth:`stop`; then one last pass with every main object due
        (the pass in progress completes first)."""
        while not self._stopping.is_set():
            timeout = self._next_due_in()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            if self._stopping.is_set():
                break
            if not self._urgent:
                await self._sleep(self._last_pass + self.flush_interval_s - self.clock())
            self._wake.clear()
            self._urgent = False
            self._last_pass = self.clock()
            try:
                await self.run_pass()
            except Exception as exc:  # the loop must outlive any bug or local I/O error
                log.exception(
                    "pass_crashed", destination=self.name, error=f"{type(exc).__name__}: {exc}"
                )
                self._on_failure(exc, permanent=False)
        if self.shipper.behind:
            # a clean stop leaves every main object exact (within the stop timeout)
            with contextlib.suppress(Exception):
                await self.drain()

    async def drain(
        self, deadline: float | None = None, on_pass: Callable[[], None] | None = None
    ) -> bool:
        """Passes with every pending main object due, until caught up: the one drain of a
        clean stop (one pass: ``deadline`` ``None``) and of ``sync --once``.

        Args:
            deadline: monotonic time to give up at, seconds (``None``: after one pass).
            on_pass: called after each pass (progress).

        Returns:
            Whether the destination is caught up. A parked destination, or a failure
            while stopping, ends the drain at once.
        """
        while True:
            self.shipper.drain_all()
            passed = await self.run_pass()
            if on_pass is not None:
                on_pass()
            if self.caught_up or deadline is None or self.clock() >= deadline:
                break
            if not passed and (self.state is DestinationState.PARKED or self._stopping.is_set()):
                break
            # files still waiting (a quiet period, a retry): look again shortly
            await self._sleep(min(0.2, self.flush_interval_s))
        return self.caught_up

    def _next_due_in(self) -> float | None:
        now = self.clock()
        deferred = [d.not_before for d in self._dirty.values() if d.not_before > now]
        ready = any(d.not_before <= now for d in self._dirty.values())
        if ready:
            return 0.0
        waits = [t - now for t in deferred]
        for step in self.steps:
            due = step.next_due_in()
            if due is not None:
                waits.append(due)
        if self.shipper.behind:
            due = self.shipper.next_due_in()
            if due is not None:
                waits.append(due)
        return max(0.0, min(waits)) if waits else None

    async def run_pass(self) -> bool:
        """Hand every due dirty file to the shipper, apply its outcome, then run the steps.

        A pass after a failure first waits until :attr:`retry_at` (a stop ends
        the wait at once).

        Returns:
            True when the pass met no storage error (files may still wait: a
            partial line, an unparseable JSON), False after a failure (the
            destination is then in BACKOFF or PARKED until :attr:`retry_at`).
        """
        await self._sleep(self.retry_at - self.clock())
        now = self.clock()
        batch = Batch(
            {p: d.seq for p, d in self._dirty.items() if d.not_before <= now}, self.chunk_bytes
        )
        uploads, sent = self._meter.objects, self._meter.bytes
        outcome = await self.shipper.ship(batch)
        self._apply(batch, outcome)
        if outcome.error is not None:
            error = outcome.error
            del outcome
            self._on_failure(error, permanent=isinstance(error, PermanentStorageError))
            return False
        try:
            report = PassReport(list(batch.paths), outcome)
            for step in self.steps:
                await step.after_pass(report)
        except StorageError as exc:
            self._on_failure(exc, permanent=isinstance(exc, PermanentStorageError))
            return False
        self._failures = 0
        self._transition(DestinationState.HEALTHY)
        if self._meter.objects > uploads:
            # the canonical line of a pass (per-upload events are debug)
            log.info(
                "pass_finished",
                destination=self.name,
                files=len(batch.paths),
                uploads=self._meter.objects - uploads,
                bytes=self._meter.bytes - sent,
                main_behind=self.shipper.behind,
                duration_s=round(self.clock() - now, 4),
            )
        if batch.paths and self.clock() - self._last_success_recorded > 1.0:
            self._last_success_recorded = self.clock()
            self.journal.set_destination_state(self.name, self.state.value, success=True)
        return True

    def _apply(self, batch: Batch, outcome: Outcome) -> None:
        """Update the dirty set from a shipper's outcome (see the module docstring)."""
        for path in (*outcome.done, *outcome.failed):
            seq = batch.paths.get(path)
            item = self._dirty.get(path)
            if seq is not None and item is not None and item.seq == seq:
                del self._dirty[path]
        for path, after_s in outcome.deferred.items():
            item = self._dirty.get(path)
            if item is not None and item.seq == batch.paths.get(path):
                item.not_before = self.clock() + after_s
        for path, urgent in outcome.again.items():
            self.mark(path, urgent=urgent)
        if outcome.more:
            self._urgent = True
            self._wake.set()

    def _on_failure(self, exc: BaseException, *, permanent: bool) -> None:
        """Record a failed pass: BACKOFF or PARKED until :attr:`retry_at` (no sleep here).

        One failure is recorded once, however many report it: the error of a check
        that a pass waited for (``Destination.run``) comes back as that pass's error.
        """
        if exc is self._recorded:
            return
        self._recorded = exc
        release_frames(exc)
        kind = type(exc).__name__
        self._failures_by_kind[kind] = self._failures_by_kind.get(kind, 0) + 1
        self.last_error = f"{kind}: {exc}"
        self._failures += 1
        retry = after_failure(self._failures, permanent, self.clock(), self.retry, self._rng)
        self._transition(retry.state, self.last_error)
        if retry.state is DestinationState.BACKOFF:
            self.journal.set_destination_state(self.name, self.state.value, error=self.last_error)
        self.retry_at = retry.at
        log.warning(
            "pass_failed",
            destination=self.name,
            error=self.last_error,
            failures=self._failures,
            retry_in_s=round(retry.delay_s, 3),
        )
        self._wake.set()
        self._urgent = True
