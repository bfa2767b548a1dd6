"""The tail shipper: one request per pass for every file, main objects on a schedule.

Used when the backend keeps a tail log (``storage.supports_tail``) and
``max_main_lag_s`` > 0. One pass::

    dirty files --plan()--> staged pieces (new complete lines; small JSON whole)
                          | one tail object: TailWriter.commit()        (1 request)
                          v on success only
                  journal: tail_offset, tail_since          readers now see the bytes
    files that are due --promote--> main object up to date  (a request or a few per file)
                          | journal: acked_offset; index drops the pieces
                          v
                  index-only tail object if pieces were dropped; old tail objects deleted

A file goes *straight to its main object* instead (through the per-file
shipper this shipper owns, :class:`~evalsyncd.sync.perfile.PerFileShipper`) when its new bytes in one
flush reach ``direct_append_bytes`` and the backend appends them in place
(GCS compose at any size, S3 multipart from 5 MiB), or when it is new and
empty; never while the tail holds pieces of it (a stale entry would otherwise
be stitched with a rewritten main object).

What a file needs is decided by :func:`evalsyncd.sync.plan.plan` and
dispatched by :func:`evalsyncd.sync.shipper.dispatch`, as on the per-file
path; when its main object is *due* by :func:`evalsyncd.sync.plan.main_due`:
when it fell behind the tail ``max_main_lag_s`` ago, when the file was quiet
for ``compact_idle_s``, when it has ``tail_max_pieces`` pieces in the tail or
``promote_bytes`` pending bytes, when its run is finalized (its
``summary.json`` was flushed), and at shutdown and the end of ``sync --once``.

Recovery (:meth:`TailShipper.open`): the newest index is read and compared with
the journal. An entry that agrees with its journal row is kept; any
disagreement (a crash between a tail write and its journal commit, between a
main-object update and the next index) resets the row to its main object's
offset and asks for the file again (:attr:`Outcome.again`), so its pending bytes are staged again from
the local file: never trusted blindly, never lost. Entries of files that no
longer exist locally are written to their main objects from the tail's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import crc32c
import structlog

from evalsyncd.catalog import CATALOG_MARK
from evalsyncd.errors import ObjectNotFoundError, StorageError, TailConflictError
from evalsyncd.storage import Backend, check_key
from evalsyncd.storage.tail import FileTail, TailIndex, TailWriter, stitch
from evalsyncd.sync import lines
from evalsyncd.sync.files import FileKind, classify, is_run_metadata, open_beneath, phase_of
from evalsyncd.sync.journal import Entry, EntryStatus
from evalsyncd.sync.passes import by_phase, log_failure, worst_error
from evalsyncd.sync.perfile import PerFileShipper
from evalsyncd.sync.plan import Action, Do, MainFacts, Observed, main_due, observe
from evalsyncd.sync.shipper import Batch, Context, Outcome, dispatch, settle

__all__ = ["DIRECT", "Staged", "TailShipper"]

log = structlog.get_logger("evalsyncd.sync")

_YIELD_EVERY = 32
"""Files staged between two yields to the event loop: staging thousands of files (a
backfill) is CPU work that would otherwise hold the loop (the requests of the server
check, the watcher) for a tenth of a second and more."""

DIRECT: Final = object()
"""Plan outcome: sync this file on its own (straight to its main object)."""


@dataclass
class Staged:
    """A file whose pieces are staged in the next tail object, and its journal row after it."""

    path: str
    entry: Entry
    remove: bool = False
    """A mirrored delete: the main object is removed once the index forgets the file."""
    empty: bool = False
    """Rewritten without a complete line: the main object is written empty (``entry``
    is its row after that), before the index forgets the file's entry when that entry
    does not read the main object, else after."""
    written: bool = False
    """``empty``: the main object was written already (``entry`` has its version)."""


class TailShipper:
    """The tail-log shipper of one destination; see the module docstring.

    Args:
        ctx: the destination's shipping context.
        writer: the tail log's writer on the context's storage.
        files: the per-file shipper for big deltas (default: one over ``ctx``).

    The shipper reconciles against main objects alone: it turns the storage's
    stitched reads off (``ctx.storage.read_tail = False``).
    """

    def __init__(
        self, ctx: Context, writer: TailWriter, files: PerFileShipper | None = None
    ) -> None:
        ctx.storage.read_tail = False
        self.ctx = ctx
        self.writer = writer
        self.files = files or PerFileShipper(ctx)
        """The per-file path, for files that go straight to their main object."""
        self.chunk_bytes = self.files.chunk_bytes
        """Most file bytes one tail object carries (set from each :class:`Batch`), bytes."""
        self._last_change: dict[str, float] = {}  # path -> monotonic time of its last tail piece
        self._finalized: set[str] = set()  # run directories whose summary.json was flushed
        self._since: dict[str, float] = {}  # path -> Unix time its main object fell behind
        self._drain_all = False
        self._opened = False
        self._restage: set[str] = set()  # reset at open; their old entries wait for new ones

    # -- recovery ------------------------------------------------------------------------

    async def open(self) -> list[str]:
        """Read the newest index and reconcile it with the journal (see the module
        docstring).

        A file reset to its main object's offset keeps its old index entry until
        its bytes are staged again (readers never see it go back to an older
        version meanwhile).

        Returns:
            The files reset, to stage again in this pass.
        """
        ctx = self.ctx
        index = await self.writer.open()
        if index.files:
            await ctx.ensure_owner()  # reconciling writes (see _ship)
        rows = ctx.journal.entries(ctx.name)
        reset: list[str] = []
        removed: list[str] = []
        for path, ft in index.files.items():
            row = rows.get(path)
            if row is None or row.status is EntryStatus.DELETED:
                if (ctx.root / path).exists():
                    # staged again from the local file in this pass; the entry stays
                    # until then, so readers never see the file vanish meanwhile
                    self._restage.add(path)
                    reset.append(path)
                elif ctx.policy.mirror_deletes and not ctx.policy.hold_deletes:
                    self.writer.forget(path)  # deleted locally: the index forgets it first,
                    removed.append(path)  # then its main object goes
                else:
                    await self._promote_orphan(path, ft)
                continue
            if not _agrees(row, ft):
                reset.append(path)
        for path, row in rows.items():
            if row.main_behind and path not in index.files:
                reset.append(path)
        for path in reset:
            row = rows.get(path)
            if row is None or path in self._restage:
                continue
            self._restage.add(path)
            # the row's CRC32C is that of the content staged in the tail, not of the main
            # object's: cleared, or the same content would be taken as sent (RECORD)
            crc = row.content_crc if classify(path) is FileKind.APPEND else None
            ctx.journal.ack(
                replace(
                    row,
                    tail_offset=row.acked_offset,
                    tail_since=None,
                    seen_size=-1,
                    content_crc=crc,
                )
            )
            log.warning(
                "tail_reconciled",
                destination=ctx.name,
                key=path,
                journal_offset=row.tail_offset,
                main_offset=row.acked_offset,
                action="restage from the main object's offset",
            )
        ctx.journal.commit()
        for path, row in rows.items():
            if row.main_behind and path not in reset and row.tail_since is not None:
                self._last_change[path] = ctx.clock()
                self._since[path] = row.tail_since
        if any(is_run_metadata(p) for p in removed):
            self.writer.mark(CATALOG_MARK)  # before the removal: see evalsyncd.catalog
        if self.writer.dirty:
            await self.commit_index()
        for path in removed:
            await ctx.storage.aremove(path)
            ctx.journal.forget(ctx.name, path)
            log.info("delete_mirrored", destination=ctx.name, key=path)
        self._opened = True  # only now: a failed reconciliation is redone at the next pass
        log.info(
            "tail_opened",
            destination=ctx.name,
            seq=index.seq,
            writer=index.writer or None,
            pending_files=len(index.files),
            reset=len(reset),
        )
        return reset

    def reopen(self) -> None:
        """Read the index and reconcile again at the next pass (another writer wrote the log)."""
        self._opened = False

    async def _promote_orphan(self, path: str, ft: FileTail) -> None:
        """Write a file that exists only in the tail (deleted locally) to its main object."""
        data = await _remote_bytes(self.ctx.storage, self.writer, path, ft, ft.size)
        if data is None:
            self.writer.forget(path)
            return
        version = await self.ctx.timed_write(path, data, 0, "write")
        self.writer.promoted(path, len(data), version)
        log.info("tail_orphan_promoted", destination=self.ctx.name, key=path, bytes=len(data))

    # -- one pass ------------------------------------------------------------------------

    def drain_all(self) -> None:
        """Make every pending main object due (shutdown, ``sync --once``)."""
        self._drain_all = True

    @property
    def behind(self) -> int:
        """How many files have a main object behind the tail."""
        return len(self.writer.index.files)

    def next_due_in(self) -> float:
        """Seconds until the next main object is due (0: now)."""
        policy = self.ctx.policy
        if self._drain_all:
            return 0.0
        now = self.ctx.clock()
        waits = [t + policy.compact_idle_s - now for t in self._last_change.values()]
        now_wall = self.ctx.wall()
        waits += [t + policy.max_main_lag_s - now_wall for t in self._since.values()]
        return max(0.0, min(waits)) if waits else policy.max_main_lag_s

    async def ship(self, batch: Batch) -> Outcome:
        """Stage every due file of ``batch``, write one tail object, then update due main
        objects; see :class:`Outcome` (its ``error``: nothing unacknowledged was journaled).
        A pass that wrote only a tail object while the start's server check runs ends
        before the check's verdict: the steps after it wait for that
        (:class:`~evalsyncd.sync.steps.ServerVerdict`)."""
        outcome = Outcome()
        self.chunk_bytes = self.files.chunk_bytes = batch.chunk_bytes
        reset: list[str] = []
        try:
            await self._ship(batch, outcome, reset)
        except StorageError as exc:
            outcome.error = exc
        if outcome.error is not None:
            if isinstance(outcome.error, TailConflictError):
                self.reopen()  # another writer's tail object: read the log again
            outcome.error = await self.ctx.explain(outcome.error)
        for path in reset:
            if path not in batch.paths and path not in outcome.done:
                outcome.again.setdefault(path, False)  # not done: the scheduler keeps it
        return outcome

    async def _ship(self, batch: Batch, outcome: Outcome, reset: list[str]) -> None:
        """One pass; ``reset`` receives the files recovery asks to stage again."""
        ctx = self.ctx
        if not self._opened:
            try:
                reset += await self.open()
            except StorageError:
                await ctx.ensure_owner()  # another daemon's prefix is reported as such
                raise
        # a tail object whose answer was lost is what readers see: adopt its index, and
        # stage its files again (their entries stay until then)
        lost = sorted(await self.writer.settle())
        self._restage.update(lost)
        reset += lost
        # Nothing is written before ctx.ensure_owner() (another daemon's prefix, the server
        # check at start), or a tail object before ctx.ensure_claimed(). Staging writes
        # only for a file the index names (an empty main object): with an empty index,
        # files are staged first, the check runs meanwhile.
        if self.writer.index.files or self.writer.dirty or reset:
            await ctx.ensure_owner()
        staged: list[Staged] = []
        direct: list[str] = []
        paths = sorted(dict.fromkeys([*batch.paths, *reset]), key=phase_of)
        rows = ctx.journal.rows(ctx.name, paths)
        for i, path in enumerate(paths):
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)  # the loop's other work (the server check at start) goes on
            if self.writer.staged_bytes >= self.chunk_bytes:
                outcome.again[path] = True  # one tail object per chunk: the rest comes next
                continue
            try:
                planned = await self.plan(path, rows)
            except Exception as exc:
                settle(ctx.name, self.files.reporter, outcome, path, exc)
                continue
            if planned is DIRECT:
                direct.append(path)
            elif isinstance(planned, Staged):
                staged.append(planned)
            else:
                if path in self._restage:
                    self._keep_or_drop(path)
                outcome.done.append(path)
        if any(is_run_metadata(p) for p in direct):
            # a run's metadata.json changes outside the tail: a marked object first, so
            # that no reader takes the run catalog for complete meanwhile (catalog.py)
            self.writer.mark(CATALOG_MARK)
        if staged or direct or self.writer.dirty or not ctx.checking:
            # before the first write; and in every pass once the start's check is over
            # (a displaced owner notices the new one, even with nothing to send). A tail
            # object waits for the claim alone, and the probe starts after it (the steps
            # wait for its verdict); objects below (and perfile's) wait for the whole check.
            try:
                await ctx.ensure_claimed()
            except BaseException:
                self.writer.discard()  # nothing staged was sent: the next pass stages it again
                raise
        if staged or self.writer.dirty:
            await self.commit(staged)
            if any(s.remove or s.empty for s in staged):
                await ctx.ensure_owner()  # objects are written below
            for s in staged:
                if s.remove:
                    # the index no longer names it: now its main object may go
                    await ctx.storage.aremove(s.path)
                    ctx.journal.forget(ctx.name, s.path)
                    log.info("delete_mirrored", destination=ctx.name, key=s.path)
                elif s.empty and s.written:
                    ctx.journal.ack(s.entry)
                elif s.empty:
                    # the index no longer names it: now its main object may be emptied
                    version = await ctx.timed_write(s.path, b"", 0, "write")
                    ctx.journal.ack(replace(s.entry, remote_version=version))
                outcome.done.append(s.path)
                if s.entry.seen_size < 0:
                    outcome.again[s.path] = True  # more complete lines than one chunk
        if direct:
            await ctx.ensure_owner()  # objects: after the whole check (the tail: the claim)
            await self.files.ship_paths(direct, outcome)
            if outcome.error is not None:
                return
        if not self._drain_all and any(is_run_metadata(s.path) for s in staged):
            # New runs are in the tail object just written: the steps after this pass
            # publish the run catalog, so readers list them now, before the requests
            # of the main objects due (and before working out which are), which the
            # next pass (at once) sends.
            outcome.more = True
            return
        await self.promote_due(self.due_now())

    async def plan(
        self, path: str, rows: Mapping[str, Entry] | None = None
    ) -> Staged | object | None:
        """Stage what ``path`` needs in the next tail object (see :func:`~evalsyncd.sync.plan.plan`).

        Args:
            path: the file, relative to the root.
            rows: the journal's rows of this pass's files, read together
                (:meth:`~evalsyncd.sync.journal.Journal.rows`); ``None``: read this one.

        Returns:
            A :class:`Staged` (pieces staged), :data:`DIRECT` (sync it on its own),
            or ``None`` (nothing to send; the journal may have been updated).

        Raises:
            NotReady: the file is not ready yet. InvalidKeyError: not a valid key.
        """
        ctx = self.ctx
        kind = classify(path)
        if kind is FileKind.IGNORED:
            return None
        check_key(path)
        row = rows.get(path) if rows is not None else ctx.journal.get(ctx.name, path)
        if self._drain_all and row is None and self.writer.current(path) is None:
            # every main object is due in this pass (a stop, sync --once): a file new to
            # this destination would be staged only to be promoted at once; it goes
            # straight to its main object (one request, its bytes once on the wire)
            return DIRECT
        st = None
        if kind is FileKind.REPLACE and self.writer.current(path) is None:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(ctx.root, path), follow_symlinks=False)
                if st.st_size >= ctx.direct_append_bytes and not (row and row.unchanged(st)):
                    return DIRECT  # a large file is sent whole to its main object, not staged
        async with observe(ctx.root, path, row, ctx.budget.hold, st) as seen:
            return await dispatch(ctx, self.files.reporter, seen, row, self)

    def _keep_or_drop(self, path: str) -> None:
        """A file restaged after recovery had nothing to send. Its old entry goes with the
        next index, except a replace-on-write file's: readers saw that content, and the
        local file holds no newer one that may be sent (unparseable JSON), so it is kept
        and brought into the main object from the tail, as any pending entry."""
        self._restage.discard(path)
        ft = self.writer.current(path)
        row = self.ctx.journal.get(self.ctx.name, path)
        if ft is None or ft.kind != "r" or row is None or row.status is not EntryStatus.INVALID:
            return
        since = self.ctx.wall()
        self.ctx.journal.ack(replace(row, tail_offset=ft.size, tail_since=since, content_crc=None))
        self._since[path] = since
        self._last_change[path] = self.ctx.clock()

    # -- the Sender protocol: what plan() decided, staged ----------------------------------

    async def send_deleted(self, path: str, row: Entry, *, remove: bool) -> Staged | object:
        """DELETED/REMOVE: through the tail while it holds pieces of the file, else DIRECT."""
        return self._plan_deleted(path, row, remove=remove)

    async def send_whole(self, seen: Observed, row: Entry | None) -> Staged:
        """UPLOAD: the whole content staged."""
        st = seen.facts.st
        assert seen.data is not None and st is not None
        return self._stage_replace(seen.facts.path, seen.data, st, row, seen.facts.crc)

    async def send_lines(
        self, seen: Observed, row: Entry | None, action: Action
    ) -> Staged | object | None:
        """APPEND/REWRITE: the next complete lines staged (or DIRECT)."""
        st = seen.facts.st
        assert seen.fd is not None and st is not None
        return await self._stage_lines(seen.facts.path, seen.fd, st, row, action.do is Do.REWRITE)

    def _plan_deleted(self, path: str, entry: Entry, *, remove: bool) -> Staged | object:
        if is_run_metadata(path):
            self.writer.mark(CATALOG_MARK)  # the run catalog changes (see evalsyncd.catalog)
        if self.writer.current(path) is None:
            return DIRECT  # nothing in the tail: the per-file path handles it
        if remove:
            self.writer.forget(path)  # the index forgets it first, then the main object goes
            return Staged(path, entry, remove=True)
        log.info("local_file_deleted", destination=self.ctx.name, key=path, remote="kept")
        # its pending bytes still reach the main object, from the tail
        return Staged(path, replace(entry, status=EntryStatus.DELETED))

    async def _stage_lines(
        self, path: str, fd: int, st: os.stat_result, entry: Entry | None, rewrite: bool
    ) -> Staged | object | None:
        """Stage the next complete lines of an append-only file (or route it DIRECT)."""
        ctx = self.ctx
        ft = self.writer.current(path)
        if rewrite or entry is None:
            base, version, start = 0, None, 0
        else:
            base, version, start = entry.acked_offset, entry.remote_version, entry.tail_offset
            if entry.main_behind and (
                ft is None or ft.kind != "a" or ft.base != base or ft.size != start
            ):
                start = base  # the tail does not continue where the journal says: restage
        in_place = start == 0 or start >= ctx.storage.append_in_place_min_bytes
        pending = entry is not None and entry.main_behind and not rewrite
        direct_ok = in_place and ft is None and not pending
        # One chunk per tail object, all files together. A file whose new bytes may go
        # straight to its main object reads a whole chunk: it is staged only when fewer
        # than direct_append_bytes of them are complete lines.
        if direct_ok and st.st_size - start >= ctx.direct_append_bytes:
            room = self.chunk_bytes
        else:
            room = max(1, self.chunk_bytes - self.writer.staged_bytes)
        async with ctx.read_delta(fd, start, st.st_size, room) as data:
            if not data:
                if rewrite and (entry is not None or ft is not None or st.st_size == 0):
                    # a new empty file, or one replaced or truncated with no complete
                    # line (the remote, or the tail, holds an older file): an empty main
                    # object now, never stitched with old pieces
                    if ft is None:
                        return DIRECT
                    new = lines.new_entry(ctx.name, path, st)
                    written = ft.kind == "r" or ft.base == 0
                    if written:
                        # the entry does not read the main object: empty it first, so
                        # readers see the entry's content until the index forgets it
                        version = await ctx.timed_write(path, b"", 0, "write")
                        new = replace(new, remote_version=version)
                    self.writer.forget(path)
                    self._last_change.pop(path, None)
                    self._since.pop(path, None)
                    return Staged(path, new, empty=True, written=written)
                if entry is not None and not rewrite:
                    ctx.journal.ack(
                        replace(entry, seen_size=st.st_size, seen_mtime_ns=st.st_mtime_ns)
                    )
                return None
            if direct_ok and len(data) >= ctx.direct_append_bytes:
                return DIRECT
            self.writer.stage_append(
                path, start, data, base=base, main_version=version, mtime=st.st_mtime
            )
        end = start + len(data)
        since = entry.tail_since if pending and entry is not None else None
        new = lines.new_entry(
            ctx.name,
            path,
            st,
            acked_offset=base,
            fingerprint=lines.fingerprint_at(fd, end),
            remote_version=version,
            tail_offset=end,
            tail_since=since if since is not None else ctx.wall(),
        )
        if st.st_size - start > room:
            new = replace(new, seen_size=-1)  # more complete lines than fitted in this object
        return Staged(path, new)

    def _stage_replace(
        self,
        path: str,
        data: bytes,
        st: os.stat_result,
        entry: Entry | None,
        crc: int | None,
    ) -> Staged:
        """Stage the whole content of a replace-on-write file."""
        self.writer.stage_replace(path, data, mtime=st.st_mtime)
        if is_run_metadata(path):
            self.writer.mark(CATALOG_MARK)  # the run catalog changes (see evalsyncd.catalog)
        pending = entry is not None and entry.main_behind and entry.tail_since is not None
        new = lines.new_entry(
            self.ctx.name,
            path,
            st,
            acked_offset=entry.acked_offset if entry is not None else 0,
            content_crc=crc,
            remote_version=entry.remote_version if entry is not None else None,
            tail_offset=len(data),
            tail_since=entry.tail_since if pending and entry is not None else self.ctx.wall(),
        )
        return Staged(path, new)

    async def commit(self, staged: list[Staged]) -> None:
        """Write the staged pieces as one tail object, then journal them.

        Raises:
            StorageError: the write failed; nothing was journaled.
        """
        ctx = self.ctx
        size = self.writer.staged_bytes
        await ctx.throttle(size)
        started = ctx.clock()
        index = await self._commit_writer()
        duration_s = ctx.clock() - started
        now = ctx.clock()
        for s in staged:
            self._restage.discard(s.path)
            if s.remove or s.empty:
                continue
            ctx.journal.ack(s.entry)
            self._last_change[s.path] = now
            if s.entry.tail_since is not None:
                self._since.setdefault(s.path, s.entry.tail_since)
            if s.path.endswith("/summary.json"):
                self._finalized.add(s.path.rsplit("/", 1)[0] + "/")
        ctx.journal.commit()
        ctx.meter.uploaded("tail", size, duration_s)
        log.debug(
            "tail_written",
            destination=ctx.name,
            seq=index.seq,
            files=len(staged),
            bytes=size,
            duration_s=round(duration_s, 4),
        )

    async def _commit_writer(self) -> TailIndex:
        """One tail object with what the writer staged (see :meth:`TailWriter.commit`)."""
        return await self.writer.commit()

    async def commit_index(self) -> None:
        """Write an index-only tail object (pieces were dropped), then delete dead objects."""
        before = self.writer.index.live_seqs()
        await self._commit_writer()
        if before - self.writer.index.live_seqs():
            deleted = await self.writer.collect()
            log.debug("tail_collected", destination=self.ctx.name, deleted=deleted)

    def due(self, path: str, entry: Entry, now_wall: float, now: float) -> str | None:
        """Why the main object of ``path`` should be brought up to date now (see
        :func:`~evalsyncd.sync.plan.main_due`), or ``None``."""
        facts = MainFacts(
            idle_s=now - self._last_change.get(path, 0.0),
            pieces=self.writer.pieces_of(path),
            finalized=_under_any(path, self._finalized),
            drain=self._drain_all,
        )
        return main_due(entry, facts, now_wall, self.ctx.policy)

    def due_now(self) -> list[tuple[str, Entry]]:
        """The files whose main object is due now, with their journal rows (an index entry
        the journal says is done is dropped from the index on the way)."""
        ctx = self.ctx
        now_wall, now = ctx.wall(), ctx.clock()
        due: list[tuple[str, Entry]] = []
        for path in list(self.writer.index.files):
            if path in self._restage:
                continue  # its entry is not what its journal row describes: restaged first
            entry = ctx.journal.get(ctx.name, path)
            if entry is None or entry.tail_since is None:
                # the journal says the main object is all there is (promoted, or given
                # up), but the index that was to drop the entry was never written (its
                # commit failed): drop it now, or it would stay behind forever
                self.writer.forget(path)
                continue
            reason = self.due(path, entry, now_wall, now)
            if reason is not None:
                log.debug("main_due", destination=ctx.name, key=path, reason=reason)
                due.append((path, entry))
        return due

    async def promote_due(self, due: list[tuple[str, Entry]] | None = None) -> None:
        """Bring every due main object up to date, phase by phase, then drop their pieces.

        Args:
            due: what :meth:`due_now` returned (``None``: ask it now).

        Raises:
            StorageError: a main-object update failed (the others of its phase
                completed; later phases wait for the next pass).
        """
        ctx = self.ctx
        if due is None:
            due = self.due_now()
        if due:
            await ctx.ensure_owner()  # the first pass's tail object waited for the claim alone
        error: StorageError | None = None
        try:
            phases = by_phase(due, lambda item: item[0], self._promote_guarded)
            async with contextlib.aclosing(phases):
                async for results in phases:
                    ctx.journal.commit()
                    error = worst_error(results)
                    for (path, _e), result in results:
                        if result is None or isinstance(result, StorageError):
                            continue
                        if not isinstance(result, Exception):
                            raise result
                        log_failure("promote_failed", ctx.name, path, result)
                    if error is not None:
                        break
        finally:
            if self.writer.dirty:
                await self.commit_index()
        if error is not None:
            raise error
        if not self.writer.index.files:
            self._drain_all = False
            self._finalized.clear()

    async def _promote_guarded(self, item: tuple[str, Entry]) -> None:
        async with self.ctx.sem:
            await self.promote(*item)

    async def promote(self, path: str, entry: Entry) -> None:
        """Bring the main object of ``path`` to the journal's ``tail_offset``.

        The bytes come from the local file when it is still the file the journal
        describes, else from the tail (a file deleted or rewritten since).
        """
        ctx = self.ctx
        ft = self.writer.current(path)
        end = entry.tail_offset
        if (
            classify(path) is FileKind.APPEND
            and entry.acked_offset > 0
            and (entry.acked_offset >= ctx.storage.append_in_place_min_bytes)
        ):
            start = entry.acked_offset
        else:
            start = 0
        async with ctx.budget.hold(end - start):
            data = _local_bytes(ctx.root, entry, start, end)
            if data is None and ft is not None and ft.size >= end:
                data = await _remote_bytes(ctx.storage, self.writer, path, ft, end, start)
            if data is None or len(data) != end - start:
                # neither source holds the bytes any more: the next change re-sends the file
                ctx.journal.ack(replace(entry, tail_offset=entry.acked_offset, tail_since=None))
                self.writer.forget(path)
                self._last_change.pop(path, None)
                self._since.pop(path, None)
                return
            if start == 0:
                version = await ctx.timed_write(path, data, 0, "write")
            else:
                try:
                    version = await self.files.append(path, data, start)
                except lines.RemoteDiverged:
                    whole = _local_bytes(ctx.root, entry, 0, end)
                    if whole is None and ft is not None:
                        whole = await _remote_bytes(ctx.storage, self.writer, path, ft, end)
                    if whole is None:
                        raise
                    version = await ctx.timed_write(path, whole, 0, "write")
                except lines.RemoteAhead as adv:
                    version = adv.version
            del data
        ctx.journal.ack(
            replace(
                entry,
                acked_offset=end,
                remote_version=version,
                tail_since=None,
                acked_at=ctx.wall(),
            )
        )
        self.writer.promoted(path, end, version)
        self._last_change.pop(path, None)
        self._since.pop(path, None)


async def _remote_bytes(
    storage: Backend, writer: TailWriter, path: str, ft: FileTail, end: int, start: int = 0
) -> bytes | None:
    """Bytes ``[start, end)`` of ``path`` as the tail (and main object) hold them, by the
    writer's own index; ``None`` when an object they were in is gone."""
    main_size = ft.base if ft.kind == "a" else 0
    try:
        return await stitch(
            writer.backend,
            writer.index,
            ft,
            start,
            end,
            main_size,
            lambda at, n: storage.aread_range(path, at, n),
        )
    except ObjectNotFoundError:
        return None


def _agrees(row: Entry, ft: FileTail) -> bool:
    """Whether a journal row and a recovered index entry describe the same pending bytes."""
    if not row.main_behind or row.tail_offset != ft.size:
        return False
    if ft.kind == "r":
        return classify(row.path) is FileKind.REPLACE
    return ft.base == row.acked_offset and classify(row.path) is FileKind.APPEND


def _local_bytes(root: Path, entry: Entry, start: int, end: int) -> bytes | None:
    """Bytes ``[start, end)`` of the local file, if it is still the file ``entry`` describes
    (same inode, long enough, same fingerprint or, replace-on-write, same CRC32C)."""
    try:
        fd = open_beneath(root, entry.path)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not lines.same_file(st, entry.dev, entry.ino) or st.st_size < entry.tail_offset:
            return None
        if classify(entry.path) is FileKind.REPLACE:
            data = os.pread(fd, st.st_size + 1, 0)
            ok = len(data) == entry.tail_offset and crc32c.crc32c(data) == entry.content_crc
            return data[start:end] if ok else None
        if entry.tail_offset and lines.fingerprint_at(fd, entry.tail_offset) != entry.fingerprint:
            return None
        return os.pread(fd, end - start, start)
    except OSError:
        return None
    finally:
        os.close(fd)


def _under_any(path: str, dirs: set[str]) -> bool:
    """Whether ``path`` is below one of ``dirs`` (each ending in ``/``): a lookup per
    directory level of ``path``, not a scan of ``dirs`` (which holds every run finalized
    since the last promotion; ``due`` asks it for every file of the tail index)."""
    cut = path.find("/")
    while cut >= 0:
        if path[: cut + 1] in dirs:
            return True
        cut = path.find("/", cut + 1)
    return False
