"""Steps after a destination's pass: work that follows shipping, outside the scheduler.

- :class:`PublishCatalog`: the run catalog (``.evalsyncd/catalog.json``) after a
  pass that touched a run's ``metadata.json`` (see :mod:`evalsyncd.catalog`);
- :class:`FlushAppends`: the backend's flush of buffered library appends
  (``aflush``) once appends have been quiet for ``compact_idle_s``.

Each is a :class:`~evalsyncd.sync.scheduler.Step`; the scheduler runs them in
order after every pass that met no storage error.
"""

from __future__ import annotations

import crc32c
import structlog

from evalsyncd.catalog import CATALOG_PATH, build_catalog
from evalsyncd.errors import StorageError
from evalsyncd.sync.files import is_run_metadata
from evalsyncd.sync.journal import EntryStatus
from evalsyncd.sync.scheduler import PassReport
from evalsyncd.sync.shipper import Context

__all__ = ["FlushAppends", "PublishCatalog"]

log = structlog.get_logger("evalsyncd.sync")
CATALOG_NAME = CATALOG_PATH.split("/", 1)[1]


class PublishCatalog:
    """Upload the run catalog when a pass touched a run's metadata and the catalog changed.

    Args:
        ctx: the destination's shipping context.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._sent: bytes | None = None

    def next_due_in(self) -> float | None:
        """``None``: the catalog follows passes, never asks for one."""
        return None

    async def after_pass(self, report: PassReport) -> None:
        """One PUT of ``.evalsyncd/catalog.json`` if it changed.

        It holds every ``runs/*/metadata.json`` whose journal row says this
        destination has its current content.

        Raises:
            StorageError: the upload failed (retried with the next pass).
        """
        if not any(is_run_metadata(p) for p in report.paths):
            return
        ctx = self.ctx
        entries: dict[str, bytes] = {}
        for path, row in ctx.journal.entries(ctx.name).items():
            if not is_run_metadata(path) or row.status is not EntryStatus.OK:
                continue
            try:
                data = (ctx.root / path).read_bytes()
            except OSError:
                continue
            if crc32c.crc32c(data) == row.content_crc:
                entries[path.split("/")[1]] = data
        catalog = build_catalog(entries)
        if catalog == self._sent:
            return
        await ctx.throttle(len(catalog))
        await ctx.storage.awrite_internal(CATALOG_NAME, catalog)
        self._sent = catalog
        ctx.meter.objects += 1  # counted, not reported to on_upload (not a file's bytes)
        ctx.meter.bytes += len(catalog)
        log.debug("catalog_written", destination=ctx.name, runs=len(entries), bytes=len(catalog))


class FlushAppends:
    """Flush the backend's buffered appends after ``idle_s`` without one.

    Args:
        ctx: the destination's shipping context.
        idle_s: quiet time after the last append, seconds.
    """

    def __init__(self, ctx: Context, idle_s: float) -> None:
        self.ctx = ctx
        self.idle_s = idle_s
        self._pending = False
        self._last_append = 0.0

    def next_due_in(self) -> float | None:
        """Seconds until the flush is due, while appends wait for one."""
        if not self._pending:
            return None
        return self._last_append + self.idle_s - self.ctx.clock()

    async def after_pass(self, report: PassReport) -> None:
        """Note the pass's appends; flush once they have been quiet for ``idle_s``.

        A failed flush is logged and tried again after the next pass (not a
        failed pass: the appends themselves were acknowledged).
        """
        ctx = self.ctx
        if report.outcome.appended:
            self._pending = True
            self._last_append = ctx.clock()
        if not self._pending or ctx.clock() - self._last_append < self.idle_s:
            return
        self._pending = False
        try:
            await ctx.storage.aflush()
        except StorageError as exc:
            self._pending = True
            log.warning("flush_failed", destination=ctx.name, error=f"{type(exc).__name__}: {exc}")
