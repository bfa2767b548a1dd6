"""What the two shippers share: their context, a batch, its outcome, one dispatch, one read.

A *shipper* takes a :class:`Batch` (dirty paths, the chunk size of this pass)
and returns an :class:`Outcome` (paths done, deferred, failed, to look at
again, and the storage error that stopped the pass). It never calls back into
the scheduler (:mod:`evalsyncd.sync.scheduler`), which owns the dirty set,
timing, the state machine and the retries::

    Scheduler --Batch--> PerFileShipper (sync/perfile.py)   straight to main objects
                         TailShipper    (sync/tailmode.py)  one tail object per pass,
                                                            main objects on a schedule;
                                                            owns a PerFileShipper
              <-Outcome-

Both shippers hold one :class:`Context` (root, storage, journal, byte budget,
policy, bandwidth limiter, clocks, upload meter), read new lines through one
:meth:`Context.read_delta`, and act on :func:`~evalsyncd.sync.plan.plan`'s
decision through one :func:`dispatch`: the journal-only actions (``RECORD``,
``INVALID``, ``WAIT``, ``UNREADABLE``) are done here, the rest by the
shipper's :class:`Sender` methods.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import structlog
from aiolimiter import AsyncLimiter

from evalsyncd.errors import InvalidKeyError, RootChangedError, StorageError
from evalsyncd.storage import Backend
from evalsyncd.sync.files import dir_identity, has_entries
from evalsyncd.sync.journal import Entry, EntryStatus, Journal
from evalsyncd.sync.lines import blocking, new_entry, read_lines, seen_as
from evalsyncd.sync.owner import Owner
from evalsyncd.sync.passes import ByteBudget, Held, log_failure
from evalsyncd.sync.plan import NEW_FILE, Action, Do, Observed, Policy, plan

__all__ = [
    "Batch",
    "Context",
    "Delta",
    "Meter",
    "NotReady",
    "Outcome",
    "Reporter",
    "Sender",
    "Shipper",
    "decide",
    "dispatch",
    "record_invalid",
    "settle",
]

log = structlog.get_logger("evalsyncd.sync")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class NotReady(Exception):
    """The file is not ready (partial JSON, still changing); try again in ``after_s`` seconds."""

    def __init__(self, after_s: float) -> None:
        super().__init__(after_s)
        self.after_s = after_s


@dataclass
class Meter:
    """Acknowledged uploads of one destination since it started.

    Attributes:
        objects: acknowledged writes (a tail object, an append, a whole write).
        bytes: their bytes.
        on_upload: called after each as ``(destination, op, bytes, duration_s)`` (metrics).
    """

    name: str
    objects: int = 0
    bytes: int = 0
    on_upload: Callable[[str, str, int, float], None] | None = None

    def uploaded(self, op: str, nbytes: int, duration_s: float) -> None:
        """Count one acknowledged upload of ``nbytes`` bytes that took ``duration_s`` seconds."""
        self.objects += 1
        self.bytes += nbytes
        if self.on_upload is not None:
            self.on_upload(self.name, op, nbytes, duration_s)


class Delta:
    """The context of :meth:`Context.read_delta` (a class, not a generator: one per file
    of a pass): the bytes read, their size held of the byte budget until it exits."""

    __slots__ = ("_args", "_held")

    def __init__(self, held: Held, fd: int, start: int, size: int, room: int) -> None:
        self._held = held
        self._args = (fd, start, size, room)

    async def __aenter__(self) -> bytes:
        fd, start, size, room = self._args
        await self._held.__aenter__()
        try:
            return await blocking(size - start, read_lines, fd, start, size, room)
        except BaseException:
            await self._held.__aexit__(None, None, None)
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self._held.__aexit__(None, None, None)


@dataclass
class Context:
    """What both shippers of one destination work with.

    Attributes:
        name: the destination's name (journal rows, logs).
        root: the watched root.
        storage: the destination's opened backend.
        journal: the shared journal.
        policy: the settings :func:`~evalsyncd.sync.plan.plan` follows.
        budget: file bytes held for uploads at once.
        direct_append_bytes: new bytes of one file from which the tail shipper sends
            them straight to the main object (where the backend appends in place), bytes.
        max_concurrency: files in flight at once.
        max_upload_bytes_per_s: bandwidth limit, bytes per second (``None``: none).
        clock: monotonic clock, seconds.
        wall: Unix time, seconds (compared with file mtimes; recorded in the journal).
        owner: the prefix's claim (:mod:`evalsyncd.sync.owner`), checked before a
            shipper writes and when a write conflicts; ``None``: not checked.
        check: the destination's server check while it runs (the claim and the probe,
            ``Destination.run``): its result is the error it recorded, or ``None``.
            Shippers read and stage meanwhile; every write of an object waits for it
            (:meth:`ensure_owner`), a tail object's create and the run catalog for its
            claim only (:meth:`ensure_claimed`).
        claimed: the claim step of :attr:`check` while it runs: its result is the
            error the check recorded there, or ``None`` once the prefix is claimed.
        check_wanted: set when a write of an object (or the end of a pass) asks for
            the check: its probe waits for that, so that a start's first tail object
            neither waits on the probe's round trips nor shares its upload with them.
    """

    name: str
    root: Path
    storage: Backend
    journal: Journal
    policy: Policy
    budget: ByteBudget
    direct_append_bytes: int = 64 * 1024
    max_concurrency: int = 8
    max_upload_bytes_per_s: int | None = None
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    owner: Owner | None = None
    check: asyncio.Future[StorageError | None] | None = None
    claimed: asyncio.Future[StorageError | None] | None = None
    check_wanted: asyncio.Event | None = None
    meter: Meter = field(init=False)
    sem: asyncio.Semaphore = field(init=False)
    _limiter: AsyncLimiter | None = field(init=False)
    _root_id: tuple[int, int] | None = field(init=False)

    def __post_init__(self) -> None:
        self._root_id = dir_identity(self.root)
        self.meter = Meter(self.name)
        self.sem = asyncio.Semaphore(self.max_concurrency)
        self._limiter = (
            AsyncLimiter(self.max_upload_bytes_per_s, 1.0) if self.max_upload_bytes_per_s else None
        )

    def root_changed(self) -> RootChangedError | None:
        """Whether :attr:`root` is gone or is another directory than when this context was
        made (device and inode; one ``stat``): a pass must then send nothing, since every
        file would look deleted (and with ``mirror_deletes``, every object would go). The
        journal's recorded root coming back is adopted (it lifts ``hold_deletes``)."""
        now = dir_identity(self.root)
        if now is not None and now == self._root_id:
            return None
        if now is not None:
            known = self.journal.root_identity()
            if (
                self._root_id is None
                or now == known
                or (known is None and self.policy.hold_deletes and has_entries(self.root))
            ):
                # created after the start; or the journal's own root is back (a volume
                # mounted after a start on its empty mount point; with a journal from
                # before the record, the first directory with files there): adopted
                self._root_id = now
                if known is None:
                    self.journal.record_root_identity(now)
                if self.policy.hold_deletes:  # its deletions mirror again
                    self.policy = replace(self.policy, hold_deletes=False)
                    log.info("root_returned", destination=self.name, root=str(self.root))
                return None
        what = "is gone" if now is None else "is another directory now"
        return RootChangedError(
            f"the watched root {self.root} {what} (moved, removed, replaced or a volume "
            "unmounted): nothing is sent until it is back; a restart mirrors the directory "
            "there, and deletes nothing it lacks until --adopt-root"
        )

    @property
    def checking(self) -> bool:
        """Whether the destination's server check (:attr:`check`) is still running."""
        return self.check is not None and not self.check.done()

    async def ensure_owner(self) -> None:
        """Return when this daemon owns the prefix (no request between rechecks) and the
        server check (:attr:`check`), if one runs, passed: the call before a write (a
        tail object's create: :meth:`ensure_claimed`).

        Raises:
            PrefixOwnedError: another daemon owns it: write nothing.
            StorageError: the claim could not be read or created, or the server check
                failed (the error it recorded).
        """
        await self._passed(self.check)

    async def ensure_claimed(self) -> None:
        """Return when this daemon owns the prefix, while the start's server probe may
        still run: the call before a write of the tail log (a tail object's create) or
        of the run catalog, and nothing else.

        Both are objects under ``.evalsyncd/`` replaced or created whole, sent with their
        CRC32C, which a server that refuses checksums (the one feature the probe requires)
        refuses the same way; every other feature the probe looks for serves writes of
        objects (:meth:`ensure_owner`). The probe is not asked to start: on a machine
        whose cores the server shares, its requests would slow the upload of the first
        tail object, which readers wait for; it starts when the pass ends, when a write
        of an object asks for it, or a second after the claim
        (``docs/benchmarks.md`` section 3).

        Raises:
            PrefixOwnedError: another daemon owns it: write nothing.
            StorageError: the claim could not be read or created (the error the check
                recorded).
        """
        claim_only = self.checking and self.claimed is not None
        await self._passed(self.claimed if claim_only else self.check, ask=not claim_only)

    def want_check(self) -> None:
        """Let the start's server probe go on (see :attr:`check_wanted`)."""
        if self.check_wanted is not None:
            self.check_wanted.set()

    async def _passed(
        self, step: asyncio.Future[StorageError | None] | None, *, ask: bool = True
    ) -> None:
        if ask:
            self.want_check()
        if step is not None:
            error = await asyncio.shield(step)
            if error is not None:
                raise error
        if self.owner is not None:
            await self.owner.ensure()

    async def explain(self, exc: StorageError) -> StorageError:
        """The error a failed pass reports: a conflict becomes ``PrefixOwnedError`` when
        another daemon owns the prefix now (see ``Owner.explain``)."""
        return exc if self.owner is None else await self.owner.explain(exc)

    async def throttle(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent under ``max_upload_bytes_per_s`` (no limit: at once)."""
        if self._limiter is None:
            return
        rate = int(self._limiter.max_rate)
        while nbytes > 0:
            step = min(nbytes, rate)
            await self._limiter.acquire(step)
            nbytes -= step

    def read_delta(self, fd: int, start: int, size: int, room: int) -> Delta:
        """The complete lines of ``fd`` from ``start`` (at most ``room`` bytes unless one line
        is longer; ``b""``: none), holding their size of the byte budget while inside
        (``async with ctx.read_delta(...) as data:``).

        Args:
            fd: the append-only file, open for reading.
            start: byte offset the delta starts at.
            size: the file's size when it was observed, bytes.
            room: most bytes wanted.
        """
        return Delta(self.budget.hold(min(size - start, room)), fd, start, size, room)

    async def timed_write(self, path: str, data: bytes, offset: int, op: str) -> str | None:
        """One write (``op="write"``, at offset 0) or append (``"append"``) of ``data``,
        paced, counted on :attr:`meter` and logged.

        Returns:
            The object's new version token.

        Raises:
            StorageError: the storage failed.
        """
        await self.throttle(len(data))
        started = self.clock()
        if op == "write":
            version = await self.storage.awrite(path, data)
        else:
            version = await self.storage.aappend(path, data, offset=offset)
        duration_s = self.clock() - started
        self.meter.uploaded(op, len(data), duration_s)
        log.debug(
            "upload_succeeded",
            destination=self.name,
            key=path,
            op=op,
            start=offset,
            end=offset + len(data),
            bytes=len(data),
            duration_s=round(duration_s, 4),
        )
        return version


@dataclass(frozen=True)
class Batch:
    """What a scheduler hands a shipper for one pass.

    Attributes:
        paths: dirty path -> the sequence number of its latest mark.
        chunk_bytes: most file bytes one request carries in this pass (unless a
            single line is longer), bytes.
    """

    paths: dict[str, int]
    chunk_bytes: int


@dataclass
class Outcome:
    """What a shipper did with a :class:`Batch`.

    Attributes:
        done: paths in sync (or with nothing to do until they change again).
        deferred: path -> seconds until it is worth another look (not ready yet).
        failed: path -> why (a bug or a local I/O error: logged, retried at the next
            rescan; not a valid key: reported once). Out of the dirty set, like ``done``.
        again: paths to look at again (``True``: at once, e.g. more than one chunk).
        error: the storage error that stopped the pass (later phases were not
            started; nothing unacknowledged was journaled).
    """

    done: list[str] = field(default_factory=list)
    deferred: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    again: dict[str, bool] = field(default_factory=dict)
    error: StorageError | None = None
    more: bool = False
    """Work of the shipper's own is due now and was left for the next pass (main objects
    after a tail object that made new runs visible, so the steps after this pass, the
    run catalog among them, run first): the next pass starts at once."""

    def settle(self, path: str, exc: BaseException) -> None:
        """File ``exc`` (anything but a storage error) raised for ``path`` under its heading.

        Raises:
            BaseException: ``exc`` itself when it is not an ``Exception`` (cancellation).
        """
        if isinstance(exc, NotReady):
            self.deferred[path] = exc.after_s
        elif isinstance(exc, InvalidKeyError):
            self.failed[path] = f"not a valid key: {exc}"
        elif isinstance(exc, Exception):
            self.failed[path] = f"{type(exc).__name__}: {exc}"
        else:
            raise exc


class Shipper(Protocol):
    """Gets a batch, returns an outcome; never calls the scheduler."""

    async def ship(self, batch: Batch) -> Outcome:
        """Sync the batch's due files; see :class:`Outcome`."""
        ...

    @property
    def behind(self) -> int:
        """Files whose main object is behind what readers see (0 without a tail log)."""
        ...

    def next_due_in(self) -> float | None:
        """Seconds until something of this shipper's own is due (``None``: nothing)."""
        ...

    def drain_all(self) -> None:
        """Make every pending main object due (a clean stop, ``sync --once``)."""
        ...


class Sender(Protocol, Generic[T_co]):
    """The actions of :func:`plan` that send bytes, as one shipper does them."""

    async def send_lines(self, seen: Observed, row: Entry | None, action: Action) -> T_co:
        """APPEND/REWRITE: new complete lines of an append-only file (``seen.fd``)."""
        ...

    async def send_whole(self, seen: Observed, row: Entry | None) -> T_co:
        """UPLOAD: the whole content of a replace-on-write file (``seen.data``)."""
        ...

    async def send_deleted(self, path: str, row: Entry, *, remove: bool) -> T_co:
        """DELETED/REMOVE: the file is gone locally (``remove``: mirror the delete)."""
        ...


class Reporter:
    """Logs an error about a file once, until the file syncs again."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._reported: set[str] = set()

    def once(self, path: str, event: str, **fields: object) -> None:
        """Log ``event`` about ``path`` unless it was logged since the file last synced."""
        if path not in self._reported:
            self._reported.add(path)
            log.error(event, destination=self.name, key=path, **fields)

    def clear(self, path: str) -> None:
        """``path`` is valid again: its next error is reported."""
        self._reported.discard(path)


def decide(ctx: Context, reporter: Reporter, seen: Observed, row: Entry | None) -> Action:
    """:func:`~evalsyncd.sync.plan.plan` at the context's time, logging a rewrite's reason.

    Raises:
        NotReady: the plan is WAIT.
    """
    action = plan(seen.facts, row, ctx.wall(), ctx.policy)
    if action.do is Do.WAIT:
        raise NotReady(action.after_s)
    if action.do in (Do.UPLOAD, Do.RECORD):
        reporter.clear(seen.facts.path)  # valid again: report it if it breaks again
    if action.do is Do.UNREADABLE:
        log.warning(
            "file_unreadable", destination=ctx.name, key=seen.facts.path, error=action.reason
        )
    if action.do is Do.REWRITE and action.reason != NEW_FILE and row is not None:
        st = seen.facts.st
        log.warning(
            "file_changed_rewriting",
            destination=ctx.name,
            key=seen.facts.path,
            reason=action.reason,
            acked_offset=row.tail_offset,
            size=st.st_size if st is not None else 0,
        )
    return action


async def dispatch(
    ctx: Context,
    reporter: Reporter,
    seen: Observed,
    row: Entry | None,
    sender: Sender[T],
) -> T | None:
    """Decide what the file ``seen`` describes needs and do it: the one dispatch of
    :func:`~evalsyncd.sync.plan.plan`'s result for both shippers.

    Journal-only actions are done here: ``RECORD`` (the content was sent already:
    the row takes the new stat and identity, its offsets unchanged), ``INVALID``
    (reported once, journaled as invalid); ``SKIP`` and ``UNREADABLE`` do nothing.
    The others go to ``sender``.

    Returns:
        What ``sender`` returned, or ``None`` for a journal-only action.

    Raises:
        NotReady: the plan is WAIT.
        StorageError: what ``sender`` raised.
    """
    action = decide(ctx, reporter, seen, row)
    st = seen.facts.st
    if action.do in (Do.DELETED, Do.REMOVE):
        assert row is not None
        return await sender.send_deleted(seen.facts.path, row, remove=action.do is Do.REMOVE)
    if action.do in (Do.APPEND, Do.REWRITE):
        return await sender.send_lines(seen, row, action)
    if action.do is Do.UPLOAD:
        return await sender.send_whole(seen, row)
    if action.do is Do.RECORD:
        assert row is not None and st is not None
        ctx.journal.ack(seen_as(row, st))
    elif action.do is Do.INVALID:
        assert st is not None
        record_invalid(ctx, reporter, seen, row, action)
    return None


def record_invalid(
    ctx: Context, reporter: Reporter, seen: Observed, row: Entry | None, action: Action
) -> None:
    """Report an unparseable ``*.json`` once and journal it as invalid (not uploaded)."""
    path, st = seen.facts.path, seen.facts.st
    assert st is not None
    reporter.once(
        path,
        "invalid_json_not_uploaded",
        file=str(ctx.root / path),
        error=action.reason,
        size=st.st_size,
    )
    base = row or new_entry(ctx.name, path, st)
    ctx.journal.ack(seen_as(base, st, status=EntryStatus.INVALID))


def settle(name: str, reporter: Reporter, outcome: Outcome, path: str, exc: BaseException) -> None:
    """File ``exc`` (anything but a storage error) raised syncing ``path`` in ``outcome``,
    logging it: not a valid key is reported once; anything else (a bug, a local I/O
    error) is logged with its traceback and retried at the next rescan.

    Raises:
        BaseException: ``exc`` itself when it is not an ``Exception`` (cancellation).
    """
    outcome.settle(path, exc)
    if isinstance(exc, InvalidKeyError):
        reporter.once(path, "file_not_mirrorable", error=str(exc))
    elif path in outcome.failed:
        log_failure("file_sync_failed", name, path, exc)
