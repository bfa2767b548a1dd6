"""Steps after a destination's pass: work that follows shipping, outside the scheduler.

- :class:`PublishCatalog`: the run catalog (``.evalsyncd/catalog.json``) after a
  pass that touched a run's ``metadata.json`` (see :mod:`evalsyncd.catalog`).

Each is a :class:`~evalsyncd.sync.scheduler.Step`; the scheduler runs them in
order after every pass that met no storage error.
"""

from __future__ import annotations

import crc32c
import structlog

from evalsyncd.catalog import CATALOG_PATH, build_catalog
from evalsyncd.sync.files import is_run_metadata
from evalsyncd.sync.journal import EntryStatus
from evalsyncd.sync.scheduler import PassReport
from evalsyncd.sync.shipper import Context

__all__ = ["PublishCatalog"]

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
