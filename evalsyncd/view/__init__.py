"""``evalsyncd view URL``: a read-only local web app over a store or a fleet.

The package, one job per module::

    source.py         ViewSource: the runs listing (cached, shared), one run, host storages
    pages.py          what every page shares: app keys, rendering, parameters, PageError
    app.py            the aiohttp application: runs, score by checkpoint, run pages; security
    samples_pages.py  samples, one sample, compare (over evalsyncd.samples: index, search, compare)
    templates/        Jinja2 templates (autoescaped)
    static/           view.css, view.js (shipped in the wheel; nothing from the network)

:func:`serve` runs the server on the caller's event loop (the storage's async
clients live on the same loop) until ``stop`` is set. It writes nothing to any
storage. See ``docs/view.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from evalsyncd.storage import Storage
from evalsyncd.view.app import create_app
from evalsyncd.view.source import DEFAULT_REFRESH_S, ViewSource

__all__ = ["DEFAULT_PORT", "DEFAULT_REFRESH_S", "ViewSource", "create_app", "serve"]

DEFAULT_PORT = 8765
"""The port ``evalsyncd view`` listens on unless told otherwise."""

logger = logging.getLogger("evalsyncd.view")


async def serve(
    storage: Storage,
    prefix: str = "",
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    refresh_s: float = DEFAULT_REFRESH_S,
    allow_hosts: tuple[str, ...] = (),
    cache_dir: Path | None = None,
    stop: asyncio.Event,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the view of ``storage``/``prefix`` until ``stop`` is set.

    Args:
        storage: an open storage (closed by the caller; its clients for this
            loop are closed here on the way out).
        prefix: the fleet or host prefix in it.
        host: the address to listen on (loopback unless told otherwise).
        port: the TCP port (0: any free port).
        refresh_s: how often open pages refresh, and the longest the runs
            listing is reused, seconds.
        allow_hosts: extra names a request's ``Host`` may carry.
        cache_dir: where sample indexes are cached (default: the samples
            package's, on local disk).
        stop: set it to stop the server (the CLI sets it on SIGINT/SIGTERM).
        on_ready: called with the base URL (``http://host:port/``) once listening.

    Raises:
        OSError: the address is in use or cannot be bound.
    """
    source = ViewSource(storage, prefix, refresh_s=refresh_s, cache_dir=cache_dir)
    app = create_app(source, bind_host=host, allow_hosts=allow_hosts)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1]) if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        # Start the first runs listing now: a browser opened on the printed address
        # finds it read, or joins it (the first screen shows the first hosts at once).
        prefetch = asyncio.ensure_future(source.runs())
        prefetch.add_done_callback(lambda t: t.cancelled() or t.exception())
        if on_ready is not None:
            on_ready(f"http://{shown}:{bound}/")
        await stop.wait()
    finally:
        await runner.cleanup()
        await source.aclose()
