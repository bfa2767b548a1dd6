"""One destination, wired: a scheduler over a shipper, with its steps after the pass.

::

    Destination = Scheduler (sync/scheduler.py: dirty set, timing, state, retries)
                    +-- shipper: TailShipper (sync/tailmode.py)    the backend keeps a tail
                    |            |                                 log and max_main_lag_s > 0
                    |            +-- PerFileShipper for big deltas
                    |   or       PerFileShipper (sync/perfile.py)  every file on its own
                    +-- steps:   PublishCatalog, ServerVerdict, ReapLeftovers (sync/steps.py)

Both shippers share one :class:`~evalsyncd.sync.shipper.Context` built here
from the destination's settings. Nothing here decides or sends: this module
only builds the parts and keeps the names the service, the CLI and the tests
use (``mark``, ``run``, ``run_pass``, ``state``, ``stats``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from evalsyncd.config import DestinationSettings
from evalsyncd.errors import (
    PermanentStorageError,
    ServerBehaviourError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage import Backend
from evalsyncd.storage.tail import TailIndex
from evalsyncd.sync.journal import Journal
from evalsyncd.sync.owner import Owner
from evalsyncd.sync.passes import ByteBudget
from evalsyncd.sync.perfile import PerFileShipper
from evalsyncd.sync.plan import Policy
from evalsyncd.sync.scheduler import CHUNK_BYTES, RETRY_CHUNK_BYTES, Scheduler, Stats
from evalsyncd.sync.shipper import Context, Shipper
from evalsyncd.sync.states import DestinationState, backoff_delay
from evalsyncd.sync.steps import PublishCatalog, ReapLeftovers, ServerVerdict
from evalsyncd.sync.tailmode import TailShipper

__all__ = [
    "CHUNK_BYTES",
    "INFLIGHT_BYTES",
    "PROMOTE_MIN_BYTES",
    "RETRY_CHUNK_BYTES",
    "Destination",
    "DestinationState",
    "Stats",
    "backoff_delay",
    "shipping_context",
]

log = structlog.get_logger("evalsyncd.sync")

_PROBE_TIMEOUT_S = 30.0
"""Bound on one server probe, seconds (a probe that times out is tried again with the backoff)."""
_PROBE_DEFER_S = 1.0
"""At start, how long the probe waits after the claim for a write to ask for it, seconds:
an idle daemon (nothing to send) probes, and parks on an unusable server, all the same."""

PROMOTE_MIN_BYTES = 1024 * 1024
"""Pending bytes of one file from which its main object is due in the tail mode (at
least the backend's in-place append size, so that later deltas can go straight to it)."""
INFLIGHT_BYTES = 64 * 1024 * 1024
"""File bytes one destination holds in memory for uploads at once (a single line or
replace-on-write file larger than this is sent alone): memory does not grow with
the backlog."""


def shipping_context(
    settings: DestinationSettings,
    storage: Backend,
    journal: Journal,
    root: Path,
    *,
    flush_interval_s: float,
    mirror_deletes: bool = False,
    hold_deletes: bool = False,
    invalid_json_grace_s: float = 30.0,
    inflight_bytes: int = INFLIGHT_BYTES,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    owner: Owner | None = None,
) -> Context:
    """The context both shippers of a destination share, from its settings (no I/O)."""
    in_place = storage.append_in_place_min_bytes
    policy = Policy(
        flush_interval_s,
        invalid_json_grace_s,
        mirror_deletes,
        hold_deletes,
        max_main_lag_s=settings.max_main_lag_s,
        compact_idle_s=settings.compact_idle_s,
        tail_max_pieces=settings.tail_max_pieces,
        promote_bytes=max(PROMOTE_MIN_BYTES, in_place),
        in_place_min_bytes=in_place,
    )
    return Context(
        name=settings.name,
        root=root,
        storage=storage,
        journal=journal,
        policy=policy,
        budget=ByteBudget(inflight_bytes),
        direct_append_bytes=settings.direct_append_bytes,
        max_concurrency=settings.max_concurrency,
        max_upload_bytes_per_s=settings.max_upload_bytes_per_s,
        clock=clock,
        wall=wall,
        owner=owner,
    )


class Destination(Scheduler):
    """A mirror target: its scheduler, shipper and steps, built from its settings.

    Args:
        settings: the destination's configuration.
        storage: the opened backend (its clients are managed by the caller).
        journal: the shared journal.
        root: the watched root.
        flush_interval_s: minimum time between two passes, seconds.
        mirror_deletes: delete remote objects of files deleted locally.
        hold_deletes: act on no file missing locally (the root is another directory
            than the one the journal mirrored; see :class:`~evalsyncd.sync.plan.Policy`).
        invalid_json_grace_s: how long a ``.json`` may stay unparseable before it
            is reported, seconds.
        chunk_bytes: see :data:`CHUNK_BYTES`, bytes.
        retry_chunk_bytes: see :data:`RETRY_CHUNK_BYTES`, bytes.
        inflight_bytes: see :data:`INFLIGHT_BYTES`, bytes.
        clock: monotonic clock, seconds (injected for tests).
        wall: Unix time, seconds (injected for tests).
        rng: randomness for the backoff jitter (injected for tests).
        owner: the prefix's claim, checked before every pass writes (see
            :mod:`evalsyncd.sync.owner`); ``None``: not checked (unit tests).
    """

    def __init__(
        self,
        settings: DestinationSettings,
        storage: Backend,
        journal: Journal,
        root: Path,
        *,
        flush_interval_s: float,
        mirror_deletes: bool = False,
        hold_deletes: bool = False,
        invalid_json_grace_s: float = 30.0,
        chunk_bytes: int = CHUNK_BYTES,
        retry_chunk_bytes: int = RETRY_CHUNK_BYTES,
        inflight_bytes: int = INFLIGHT_BYTES,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        owner: Owner | None = None,
    ) -> None:
        self.settings = settings
        self._server_pending = False
        """The server probe has not run yet (set by :meth:`run`; ``sync --once`` skips it)."""
        self.owner = owner
        """This daemon's claim on the prefix (``None``: not checked)."""
        self.storage = storage
        self.root = root
        self.ctx = shipping_context(
            settings,
            storage,
            journal,
            root,
            flush_interval_s=flush_interval_s,
            mirror_deletes=mirror_deletes,
            hold_deletes=hold_deletes,
            invalid_json_grace_s=invalid_json_grace_s,
            inflight_bytes=inflight_bytes,
            clock=clock,
            wall=wall,
            owner=owner,
        )
        self.files = PerFileShipper(self.ctx)
        """The per-file path: one file straight to its main object."""
        self.tail: TailShipper | None = None
        """The tail-log shipper (``None``: every file on its own)."""
        shipper: Shipper = self.files
        if storage.supports_tail and settings.max_main_lag_s > 0:
            self.tail = TailShipper(self.ctx, storage.tail_writer(journal.writer_id()), self.files)
            shipper = self.tail
        super().__init__(
            settings.name,
            shipper,
            journal,
            self.ctx.meter,
            flush_interval_s=flush_interval_s,
            retry=settings.retry,
            steps=[
                PublishCatalog(self.ctx, self._tail_index),
                ServerVerdict(self.ctx),
                ReapLeftovers(self.ctx, settings.reap_interval_s, settings.reap_min_age_s),
            ],
            chunk_bytes=chunk_bytes,
            retry_chunk_bytes=retry_chunk_bytes,
            clock=clock,
            wall=wall,
            rng=rng,
        )

    def _tail_index(self) -> TailIndex | None:
        """The tail log's index now (``None``: no tail log); see :class:`PublishCatalog`."""
        return self.tail.writer.index if self.tail is not None else None

    @property
    def on_upload(self) -> Callable[[str, str, int, float], None] | None:
        """Called after each acknowledged write: ``(destination, op, bytes, duration_s)``."""
        return self.ctx.meter.on_upload

    @on_upload.setter
    def on_upload(self, hook: Callable[[str, str, int, float], None] | None) -> None:
        self.ctx.meter.on_upload = hook

    async def run(self) -> None:
        """Run the scheduler's passes until :meth:`stop`, after the server check.

        The check (:meth:`_check_server`: the claim, the probe, a reap) runs while
        the first passes read the tail log and stage files: every write waits for it
        (:meth:`Context.ensure_owner`), so nothing is written on a prefix this
        daemon does not own, and nothing but the tail log and the run catalog to a
        server the probe finds unusable, and a start spends the check's round trips
        staging. A
        tail object's create, and the run catalog, wait for the claim alone
        (:meth:`Context.ensure_claimed`): the probe starts when a write of an object
        asks for it, when the first pass ends (after its tail object uploaded: the
        probe's requests would slow it), or a second after the claim; the pass's last
        step waits for its verdict (:class:`~evalsyncd.sync.steps.ServerVerdict`). A
        check that could not run (an unreachable server) fails the pass that waits for
        it, or is recorded on its own when no pass wrote meanwhile (BACKOFF); it is then
        tried again with the destination's backoff before each pass, and nothing ships
        until it ran.
        """
        self._server_pending = True
        ctx = self.ctx
        ctx.check_wanted = asyncio.Event()
        ctx.claimed = asyncio.get_running_loop().create_future()
        check = ctx.check = asyncio.ensure_future(self._checked(ctx.claimed))
        try:
            await super().run()
        finally:
            ctx.check = ctx.claimed = ctx.check_wanted = None
            if not check.done():
                check.cancel()

    async def _checked(
        self, claimed: asyncio.Future[StorageError | None] | None = None
    ) -> StorageError | None:
        """:meth:`_check_server`, its failure recorded: the failure, or ``None``.

        Args:
            claimed: the start's check (:meth:`run`): gets the claim's outcome as soon
                as it is known, and the probe waits for :attr:`Context.check_wanted`.
        """
        try:
            await self._check_server(claimed)
        except StorageError as exc:
            if claimed is not None and not claimed.done():
                claimed.set_result(exc)  # the claim failed: so does a tail write
            self._on_failure(exc, permanent=isinstance(exc, PermanentStorageError))  # wakes
            return exc
        except BaseException as exc:  # a stop (cancelled): a write waiting on it stops too
            if claimed is not None and not claimed.done():
                if isinstance(exc, asyncio.CancelledError):
                    claimed.cancel()
                else:
                    claimed.set_exception(exc)
            raise
        # the first outcome of this run: the prefix is ours and the server usable
        self.journal.set_destination_state(self.name, self.state.value)
        return None

    async def run_pass(self) -> bool:
        """See :meth:`Scheduler.run_pass`. While the start's server check runs, a pass
        goes on and its writes wait for it (:meth:`run`). After a check that failed (the
        server was unreachable), first wait for :attr:`retry_at` and check again: a
        check that fails again is a failed pass (BACKOFF, retried with the backoff). A
        watched root that is gone or replaced fails the pass before anything is read
        (:meth:`Context.root_changed`): every file would look deleted."""
        await self._sleep(self.retry_at - self.clock())  # after a failure, its backoff
        changed = self.ctx.root_changed()
        if changed is not None:
            self._on_failure(changed, permanent=False)  # BACKOFF: looked at again, retried
            return False
        check = self.ctx.check
        if check is not None and check.done():
            self.ctx.check = self.ctx.claimed = None  # the start's check is over: recorded
        elif check is not None:
            return await super().run_pass()  # writes wait for the check; so does its end
        if self._server_pending:
            if self._stopping.is_set():
                return False  # a stop waits for no check, and nothing unchecked is sent
            if await self._checked() is not None:
                return False
        return await super().run_pass()

    async def _check_server(
        self, claimed: asyncio.Future[StorageError | None] | None = None
    ) -> None:
        """Claim the prefix, probe the server (:func:`evalsyncd.storage.probe.aadapt`):
        fallbacks are set and logged. With ``claimed`` (the start's check), the claim's
        success is set there and the probe waits for :attr:`Context.check_wanted`. After
        a probe, remove old leftovers of failed cleanups
        (:func:`evalsyncd.storage.reap.areap`), best effort. Only on a prefix this
        daemon owns: the probe writes under ``.evalsyncd/probe/``.

        A probe refused for good (a permission the probe needs) is logged and the
        daemon goes on (every append still checks its post-condition).

        Raises:
            PrefixOwnedError: another daemon owns the prefix (the destination parks,
                whether or not it has anything to send).
            PermanentStorageError: the claim was refused for good (a permission).
            ServerBehaviourError: the server lacks a required feature (the
                destination parks).
            TransientStorageError: the claim or the probe found no server (an
                outage, a timeout); tried again before the next pass.
        """
        from evalsyncd.storage.probe import aadapt
        from evalsyncd.storage.reap import areap

        if self.owner is not None:
            try:
                await self.owner.ensure()
            except PermanentStorageError:
                raise  # another daemon's prefix (PrefixOwnedError), a claim refused for good
            except StorageError as exc:
                raise _probe_error(self.storage, exc, "the prefix's claim") from exc
        if claimed is not None:
            claimed.set_result(None)
            if self.ctx.check_wanted is not None:
                # a write asks for the probe, or the first pass ends; with nothing to send
                # (no pass runs), it goes on after _PROBE_DEFER_S all the same
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_PROBE_DEFER_S):
                        await self.ctx.check_wanted.wait()
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):  # an unreachable server: retried
                await aadapt(self.storage)
        except ServerBehaviourError:
            raise
        except PermanentStorageError as exc:
            log.warning("server_probe_failed", destination=self.name, error=repr(exc))
        except (StorageError, TimeoutError) as exc:
            raise _probe_error(self.storage, exc) from exc
        self._server_pending = False
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                await areap(self.storage, min_age_s=self.settings.reap_min_age_s)
        except (StorageError, TimeoutError) as exc:
            log.warning("leftovers_not_removed", destination=self.name, error=repr(exc))

    async def throttle(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent under ``max_upload_bytes_per_s``."""
        await self.ctx.throttle(nbytes)


def _probe_error(
    storage: Backend, exc: BaseException, step: str = "the probe"
) -> TransientStorageError:
    """A server check that found no server at ``step`` (the prefix's claim, the probe), as
    the failure a pass records (``status`` shows it)."""
    url = getattr(exc, "url", None) or storage.url()
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    error = TransientStorageError(
        f"server probe of {storage.url()} failed ({step}), nothing is shipped until it "
        f"passes: {what}",
        url=url,
    )
    error.__cause__ = exc
    return error
