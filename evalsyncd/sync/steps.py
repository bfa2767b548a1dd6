"""Steps after a destination's pass: work that follows shipping, outside the scheduler.

- :class:`PublishCatalog`: the run catalog (``.evalsyncd/catalog.json``) after a
  pass that touched a run's ``metadata.json`` (see :mod:`evalsyncd.catalog`);
- :class:`ServerVerdict`: the verdict of the start's server check, after a pass
  that wrote while it ran;
- :class:`ReapLeftovers`: the removal of what failed cleanups left (GCS compose
  deltas, S3 multipart uploads; :mod:`evalsyncd.storage.reap`) every
  ``reap_interval_s``, and once a leftover noted since is ``reap_min_age_s`` old.

Each is a :class:`~evalsyncd.sync.scheduler.Step`; the scheduler runs them in
order after every pass that met no storage error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import crc32c
import structlog

from evalsyncd.catalog import CATALOG_MARK, CATALOG_PATH, build_catalog
from evalsyncd.errors import StorageError
from evalsyncd.storage.reap import areap, last_left
from evalsyncd.storage.tail import TailIndex
from evalsyncd.sync import lines
from evalsyncd.sync.files import is_run_metadata
from evalsyncd.sync.journal import EntryStatus
from evalsyncd.sync.scheduler import PassReport
from evalsyncd.sync.shipper import Context

__all__ = ["PublishCatalog", "ReapLeftovers", "ServerVerdict"]

log = structlog.get_logger("evalsyncd.sync")
CATALOG_NAME = CATALOG_PATH.split("/", 1)[1]


class PublishCatalog:
    """Upload the run catalog when a pass touched a run's metadata and the catalog changed.

    Args:
        ctx: the destination's shipping context.
        tail: the destination's tail log index now (``None``: no tail log); a complete
            catalog records its writer and seq, so readers may skip the listing of
            ``runs/`` (rule 6 of :mod:`evalsyncd.catalog`).
    """

    def __init__(self, ctx: Context, tail: Callable[[], TailIndex | None] | None = None) -> None:
        self.ctx = ctx
        self.tail = tail
        self._sent: bytes | None = None
        self._sent_entries: bytes | None = None
        self._sent_at: tuple[str, int] | None = None

    def next_due_in(self) -> float | None:
        """``None``: the catalog follows passes, never asks for one."""
        return None

    async def after_pass(self, report: PassReport) -> None:
        """One PUT of ``.evalsyncd/catalog.json`` if it changed.

        It holds every ``runs/*/metadata.json`` whose journal row says this
        destination has its current content. When every such row does (none
        changed since, none deleted with its remote kept, none unreadable) and the
        tail log is on, it also records the tail's writer and seq: it is complete
        as of that tail object.

        Raises:
            StorageError: the upload failed (retried with the next pass).
        """
        if not any(is_run_metadata(p) for p in report.paths) and not self._outdated():
            return
        ctx = self.ctx
        entries: dict[str, bytes] = {}
        complete = True
        for path, row in ctx.journal.entries(ctx.name).items():
            if not is_run_metadata(path):
                continue
            if row.status is not EntryStatus.OK:
                complete = False  # its remote object may be there, unlike its content here
                continue
            try:
                data = lines.read_known(ctx.root, row)
            except OSError:
                data = None
            if data is None:
                complete = False
                continue
            if crc32c.crc32c(data) == row.content_crc:
                entries[path.split("/")[1]] = data
            else:
                complete = False  # changed since it was sent: the next pass sends it
        index = self.tail() if self.tail is not None and complete else None
        at = (index.writer, index.seq) if index is not None and index.seq >= 0 else None
        plain = build_catalog(entries)
        if plain == self._sent_entries and self._still_vouched(index):
            return  # the same runs, and the catalog readers have is still complete
        catalog = build_catalog(entries, tail=at)
        if catalog == self._sent:
            return
        await ctx.ensure_claimed()  # like a tail object: the probe may still run
        await ctx.throttle(len(catalog))
        await ctx.storage.awrite_internal(CATALOG_NAME, catalog)
        self._sent, self._sent_entries, self._sent_at = catalog, plain, at
        ctx.meter.objects += 1  # counted, not reported to on_upload (not a file's bytes)
        ctx.meter.bytes += len(catalog)
        log.debug(
            "catalog_written",
            destination=ctx.name,
            runs=len(entries),
            bytes=len(catalog),
            tail_seq=at[1] if at is not None else None,
        )

    def _outdated(self) -> bool:
        """A catalog sent by this process that a later mark made incomplete (a run's
        ``metadata.json`` changed outside a pass's files, e.g. a removal at start)."""
        index = self.tail() if self.tail is not None else None
        return (
            index is not None
            and self._sent_at is not None
            and index.marks.get(CATALOG_MARK, -1) > self._sent_at[1]
        )

    def _still_vouched(self, index: TailIndex | None) -> bool:
        """Whether the catalog last sent is still vouched for by ``index`` (rule 6), or
        there is nothing to vouch with (no tail log: nothing to gain by a new PUT)."""
        if index is None or index.seq < 0:
            return self._sent_at is None
        if self._sent_at is None or self._sent_at[0] != index.writer:
            return False
        return index.marks.get(CATALOG_MARK, -1) <= self._sent_at[1]


class ServerVerdict:
    """After a pass while the start's server check (claim, probe, reap) still runs: wait
    for its verdict, so that such a pass (one that wrote only what needs the claim alone:
    a tail object, the run catalog) ends with it, never as a success ahead of it (status
    would read healthy while the probe may still find the server unusable).

    The last step but the reap: readers list the runs of the first tail object, and the
    run catalog then published, while the probe runs.

    Args:
        ctx: the destination's shipping context.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def next_due_in(self) -> float | None:
        """``None``: it follows passes, never asks for one."""
        return None

    async def after_pass(self, report: PassReport) -> None:
        """Wait for the start's check, if it runs (it starts now, if nothing asked before).

        Raises:
            StorageError: the check failed (the error it recorded): the pass failed.
        """
        if self.ctx.check is not None:
            await self.ctx.ensure_owner()


REAP_TIMEOUT_S = 60.0
"""Bound on one reap while the daemon runs, seconds (then it is tried at the next interval)."""
REAP_SLACK_S = 2.0
"""Added to a leftover's safe age before the reap meant for it, seconds: servers date
objects and uploads to the second, and their clocks may differ a little from ours."""


class ReapLeftovers:
    """Remove leftovers of failed cleanups while the daemon runs, not only at its start.

    A reap (:func:`evalsyncd.storage.reap.areap`: one listing of the area, plus one
    request per removal) runs after the first pass that is due: ``interval_s`` after
    the previous one, or as soon as a cleanup failure noted since then
    (:func:`~evalsyncd.storage.reap.last_left`) is ``min_age_s`` old (plus
    :data:`REAP_SLACK_S`), which is when a reap can remove it. Leftovers younger than ``min_age_s`` are never removed:
    an append may be using them. A failed reap is logged, never a failed pass.

    Args:
        ctx: the destination's shipping context.
        interval_s: time between two reaps, seconds (the daemon's start reaps first).
        min_age_s: the safe age of a leftover, seconds.
    """

    def __init__(self, ctx: Context, interval_s: float, min_age_s: float) -> None:
        self.ctx = ctx
        self.interval_s = interval_s
        self.min_age_s = min_age_s
        self._next_at = ctx.clock() + interval_s
        self._reaped_wall = ctx.wall()  # failures noted before this are handled

    def next_due_in(self) -> float | None:
        """Seconds until a reap is due, ``<= 0`` when it is (the scheduler then runs a
        pass, however quiet)."""
        due_in = self._next_at - self.ctx.clock()
        left = last_left(self.ctx.storage.url())
        if left is not None and left >= self._reaped_wall:
            due_in = min(due_in, left + self.min_age_s + REAP_SLACK_S - self.ctx.wall())
        return due_in

    async def after_pass(self, report: PassReport) -> None:
        """Reap when due; a failure is logged and tried again at the next interval."""
        ctx = self.ctx
        due_in = self.next_due_in()
        if due_in is not None and due_in > 0:
            return
        await ctx.ensure_owner()  # only on a prefix this daemon owns (PrefixOwnedError)
        started = ctx.wall()
        self._next_at = ctx.clock() + self.interval_s
        try:
            async with asyncio.timeout(REAP_TIMEOUT_S):
                removed = await areap(ctx.storage, min_age_s=self.min_age_s, fold_segments=False)
        except (StorageError, TimeoutError) as exc:
            log.warning("leftovers_not_removed", destination=ctx.name, error=repr(exc))
            return
        # failures noted since are younger than min_age_s: the next reap is theirs
        self._reaped_wall = started - self.min_age_s - REAP_SLACK_S
        log.debug("leftovers_reaped", destination=ctx.name, removed=removed)
