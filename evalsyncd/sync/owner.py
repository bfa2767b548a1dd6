"""Ownership of a destination's prefix: one writer per prefix, never displaced silently.

Two daemons writing one prefix (a fleet config without ``{hostname}``, two
hosts with one hostname, a cloned image) would overwrite each other's main
objects. The first daemon to write a prefix *claims* it; any other daemon finds
the claim before its first write, writes nothing under the prefix and parks.

Layout and format (the claim is small JSON, created conditionally)::

    {prefix}/.evalsyncd/owner.json
    {"format": 1, "writer": "9f3c...", "host": "gpu-7", "claimed_at": 1733450000.0,
     "token": "5e1a..."}

``writer`` is the state directory's id (the journal's ``tail_writer``, the id
its tail objects carry), ``host`` the hostname when claimed, ``claimed_at``
Unix seconds, ``token`` a random id of the claiming attempt (read back to
prove that this attempt's bytes are the ones stored).

Decision table (:func:`decide`, pure)::

    claim found, its writer is ours              OWNED    write
    claim found, another writer                  FOREIGN  park (PrefixOwnedError)
    no claim, no tail log or our own tail log    CLAIM    create it, read it back
    no claim, another writer's tail log          LEGACY   park: an older evalsyncd
                                                          (before claims) writes there
    no claim, but this daemon saw another's      park: a vanished claim (a lifecycle
    claim there before (its state directory)     rule, a sync --delete) hands nothing over

Claiming is ``If-None-Match: *`` / ``ifGenerationMatch=0`` / ``link(2)``
(:meth:`~evalsyncd.storage.Backend.acreate_internal`), then a read back: a
server that ignores the precondition leaves one claim, the last, and the
daemon whose bytes are not the ones stored parks instead of writing. A
restarted daemon keeps its claim (its state directory keeps the writer id),
however long it was offline. A host whose state directory is gone takes its
prefix back with ``evalsyncd claim --destination NAME --take-over``
(:func:`take_over`); the old owner, if alive, re-reads the claim within
:data:`RECHECK_S`, or at once when a write of it conflicts, and parks.

The claim costs one GET when a destination starts (plus a LIST, a GET and a
conditional PUT and a GET the first time), then one GET per :data:`RECHECK_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

from evalsyncd.errors import (
    ConflictError,
    CorruptObjectError,
    ObjectNotFoundError,
    PrefixOwnedError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage import Backend
from evalsyncd.storage.tail import TailConflictError

__all__ = [
    "CLAIM_FORMAT",
    "OWNERS_NAME",
    "OWNER_NAME",
    "RECHECK_S",
    "Claim",
    "Owner",
    "Verdict",
    "check_claim",
    "decide",
    "owned_error",
    "read_claim",
    "read_owner_records",
    "record_owner",
    "take_over",
]

log = structlog.get_logger("evalsyncd.sync")

OWNER_NAME: Final = "owner.json"
"""The claim's name in the destination's internal area (``{prefix}/.evalsyncd/owner.json``)."""
OWNERS_NAME: Final = "owners.json"
"""The file in the state directory where the daemon records each destination's owner
as last seen (what ``evalsyncd status`` shows)."""
CLAIM_FORMAT: Final = 1
"""Version of the claim's format."""
RECHECK_S: Final = 60.0
"""How often a writing daemon re-reads its claim, seconds (one GET)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """The content of ``.evalsyncd/owner.json``; see the module docstring.

    Attributes:
        writer: the owner's writer id (its state directory's).
        host: the owner's hostname when it claimed.
        claimed_at: when it claimed, Unix seconds.
        token: random id of the claiming attempt.
        format: :data:`CLAIM_FORMAT`.
    """

    writer: str
    host: str
    claimed_at: float
    token: str = ""
    format: int = CLAIM_FORMAT

    @classmethod
    def new(cls, writer: str, host: str | None = None, now: float | None = None) -> Claim:
        """A fresh claim by ``writer`` on this host (``host``: ``socket.gethostname()``)."""
        return cls(
            writer=writer,
            host=host if host is not None else socket.gethostname(),
            claimed_at=time.time() if now is None else now,
            token=secrets.token_hex(8),
        )

    def encode(self) -> bytes:
        """The claim as JSON bytes."""
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes, url: str) -> Claim:
        """Parse a claim.

        Raises:
            CorruptObjectError: not a claim of a known format (names ``url`` and the fix).
        """
        try:
            raw = json.loads(data)
            fmt = int(raw.get("format", 0))
            if fmt != CLAIM_FORMAT:
                raise ValueError(f"unknown format {fmt} (this evalsyncd reads {CLAIM_FORMAT})")
            claimed_at = float(raw["claimed_at"])
            if not math.isfinite(claimed_at):
                raise ValueError(f"claimed_at is {claimed_at}, not a time")
            return cls(
                writer=str(raw["writer"]),
                host=str(raw["host"]),
                claimed_at=claimed_at,
                token=str(raw.get("token", "")),
                format=fmt,
            )
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise CorruptObjectError(
                f"{url}: not an evalsyncd owner claim ({exc}); if this host should own the "
                "prefix, run `evalsyncd claim --destination NAME --take-over`",
                url=url,
            ) from exc

    def when(self) -> str:
        """``claimed_at`` as an ISO 8601 UTC time."""
        return _iso(self.claimed_at)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Verdict(enum.Enum):
    """What :func:`decide` says a daemon may do with a prefix."""

    OWNED = "owned"
    CLAIM = "claim"
    FOREIGN = "foreign"
    LEGACY = "legacy"


def decide(found: Claim | None, writer: str, tail_writer: str | None) -> Verdict:
    """The decision table of the module docstring.

    Args:
        found: the claim read from the prefix, or ``None`` when there is none.
        writer: this daemon's writer id.
        tail_writer: the writer of the prefix's newest tail object (``""`` or
            ``None``: no tail log); looked at only when there is no claim.
    """
    if found is not None:
        return Verdict.OWNED if found.writer == writer else Verdict.FOREIGN
    if tail_writer and tail_writer != writer:
        return Verdict.LEGACY
    return Verdict.CLAIM


def _claim_url(storage: Backend) -> str:
    return storage.url(f".evalsyncd/{OWNER_NAME}")


def _fix(destination: str) -> str:
    return (
        "give each host its own prefix (put {hostname} in the destination's url), or, if this "
        "host is meant to own it (reinstalled, its state directory lost), take it back with "
        f"`evalsyncd claim --config ... --destination {destination} --take-over`"
    )


def owned_error(
    storage: Backend, claim: Claim, writer: str, destination: str, *, vanished: bool = False
) -> PrefixOwnedError:
    """The error of a daemon that finds ``claim`` by another writer (names owner, time,
    fix); ``vanished``: the claim it saw before is gone, which hands nothing over."""
    me = socket.gethostname()
    if vanished:
        what = (
            f"the claim of host {claim.host!r} (writer {claim.writer}, since {claim.when()}) "
            f"that this daemon saw is gone from {_claim_url(storage)}"
        )
    else:
        same = " (the same hostname as this host)" if claim.host == me else ""
        what = (
            f"owned by another evalsyncd: host {claim.host!r}{same} (writer {claim.writer}) "
            f"since {claim.when()}"
        )
    return PrefixOwnedError(
        f"{storage.url()}: {what}; this daemon (host {me!r}, writer {writer}) "
        f"{'still ' if vanished else ''}writes nothing there. Fix: {_fix(destination)}",
        url=_claim_url(storage),
        owner_host=claim.host,
        owner_writer=claim.writer,
        claimed_at=claim.claimed_at,
    )


async def read_claim(storage: Backend) -> Claim | None:
    """The prefix's claim, or ``None`` when there is none. One GET.

    Raises:
        CorruptObjectError: the object is not a claim.
        StorageError: the read failed.
    """
    try:
        data = await storage.aread_internal(OWNER_NAME)
    except ObjectNotFoundError:
        return None
    return Claim.decode(data, _claim_url(storage))


async def _tail_writer(storage: Backend, writer: str) -> tuple[str, float]:
    """The writer id and creation time of the prefix's newest tail object (``""``: none)."""
    if not storage.supports_tail:
        return "", 0.0
    index = await storage.tail_writer(writer).open()
    return index.writer, index.created


async def check_claim(
    storage: Backend,
    writer: str,
    destination: str,
    *,
    host: str | None = None,
    seen: Claim | None = None,
) -> Claim:
    """Make sure ``writer`` owns the prefix of ``storage``: read the claim, create it if
    there is none (and no other writer's tail log, and this daemon never saw another's
    claim there), and read it back.

    Args:
        storage: the destination's backend, entered.
        writer: this daemon's writer id.
        destination: the destination's name (for the fix in messages).
        host: this host's name (default ``socket.gethostname()``).
        seen: another writer's claim this daemon saw on the prefix before. Its
            disappearance (a lifecycle rule on ``.evalsyncd/``, a ``sync --delete``)
            does not hand the prefix over: only ``claim --take-over`` does.

    Returns:
        The claim, ``writer``'s.

    Raises:
        PrefixOwnedError: another writer owns the prefix, or an older evalsyncd
            writes its tail log without a claim.
        CorruptObjectError: the claim object is damaged.
        StorageError: a request failed (transient ones are retried by the caller).
    """
    found = await read_claim(storage)
    verdict = decide(found, writer, None)
    if verdict is Verdict.CLAIM and seen is not None and seen.writer != writer:
        raise owned_error(storage, seen, writer, destination, vanished=True)
    if verdict is Verdict.CLAIM:
        tail_writer, tail_created = await _tail_writer(storage, writer)
        verdict = decide(None, writer, tail_writer)
        if verdict is Verdict.LEGACY:
            raise PrefixOwnedError(
                f"{storage.url()}: written by another evalsyncd (writer {tail_writer}, its newest "
                f"tail object from {_iso(tail_created)}) that keeps no owner claim (a version "
                f"before claims); this daemon (host {socket.gethostname()!r}, writer {writer}) "
                f"writes nothing there. Fix: {_fix(destination)}",
                url=_claim_url(storage),
                owner_writer=tail_writer,
            )
    if verdict is Verdict.CLAIM:
        mine = Claim.new(writer, host)
        # a conflict: another daemon (or our own attempt whose answer was lost) was first
        with contextlib.suppress(ConflictError):
            await storage.acreate_internal(OWNER_NAME, mine.encode())
        found = await read_claim(storage)  # the server's answer is checked, not trusted
        if found is None:
            raise TransientStorageError(
                f"{_claim_url(storage)}: the claim just created cannot be read back",
                url=_claim_url(storage),
            )
        if found.writer == writer:
            log.info(
                "prefix_claimed",
                destination=destination,
                url=storage.url(),
                writer=writer,
                host=found.host,
            )
        verdict = decide(found, writer, None)
    assert found is not None
    if verdict is not Verdict.OWNED:
        raise owned_error(storage, found, writer, destination)
    return found


async def take_over(
    storage: Backend, writer: str, *, host: str | None = None
) -> tuple[Claim | None, Claim]:
    """Claim the prefix for ``writer`` whoever owned it (``evalsyncd claim --take-over``).

    Returns:
        ``(the previous claim or None, the new claim)``.

    Raises:
        ConflictError: the claim read back is another's (someone claimed meanwhile).
        StorageError: a request failed.
    """
    try:
        previous = await read_claim(storage)
    except CorruptObjectError:
        previous = None
    mine = Claim.new(writer, host)
    await storage.awrite_internal(OWNER_NAME, mine.encode())
    found = await read_claim(storage)
    if found is None or found.token != mine.token:
        raise ConflictError(
            f"{_claim_url(storage)}: another claim replaced this one at once "
            f"({'none' if found is None else found.host!r}); try again",
            url=_claim_url(storage),
        )
    return previous, found


# -- what the daemon last saw, for `evalsyncd status` ----------------------------------------


def record_owner(
    state_dir: Path, destination: str, url: str, claim: Claim | None, mine: bool, *, error: str = ""
) -> None:
    """Record ``destination``'s owner in ``{state_dir}/owners.json`` (atomically).

    The file maps destination name -> ``{url, host, writer, claimed_at, mine,
    checked_at, error}``; ``evalsyncd status`` reads it.
    """
    path = state_dir / OWNERS_NAME
    records = read_owner_records(state_dir)
    records[destination] = {
        "url": url,
        "host": claim.host if claim else None,
        "writer": claim.writer if claim else None,
        "claimed_at": claim.claimed_at if claim else None,
        "mine": mine,
        "checked_at": time.time(),
        "error": error,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_owner_records(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The records of :func:`record_owner` (``{}`` when there are none or they do not parse)."""
    try:
        raw = json.loads((state_dir / OWNERS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


class Owner:
    """One destination's claim, as its daemon holds it: checked before the first write,
    re-read every :data:`RECHECK_S` and after a conflict.

    Args:
        storage: the destination's backend.
        writer: this daemon's writer id.
        destination: the destination's name.
        state_dir: where :func:`record_owner` records what was seen (``None``: nowhere).
        recheck_s: see :data:`RECHECK_S`, seconds.
        clock: monotonic clock, seconds (injected for tests).
    """

    def __init__(
        self,
        storage: Backend,
        writer: str,
        destination: str,
        *,
        state_dir: Path | None = None,
        recheck_s: float = RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.writer = writer
        self.destination = destination
        self.state_dir = state_dir
        self.recheck_s = recheck_s
        self.clock = clock
        self.claim: Claim | None = None
        """The claim last seen (ours once :meth:`ensure` returned)."""
        self._checked_at: float | None = None
        self._reads = 0  # claim reads issued (under the lock)
        self._recorded: tuple[Any, ...] | None = None
        self._lock = asyncio.Lock()
        self.seen = self._seen_before()
        """Another writer's claim this daemon saw on the prefix (kept across restarts
        in the state directory): never replaced but by ``claim --take-over``."""

    def _seen_before(self) -> Claim | None:
        if self.state_dir is None:
            return None
        rec = read_owner_records(self.state_dir).get(self.destination, {})
        writer, host, at = rec.get("writer"), rec.get("host"), rec.get("claimed_at")
        if (
            rec.get("url") != self.storage.url()
            or rec.get("mine")
            or not isinstance(writer, str)
            or not writer
            or writer == self.writer
        ):
            return None
        return Claim(
            writer, host if isinstance(host, str) else "", at if isinstance(at, float) else 0.0
        )

    @property
    def confirmed(self) -> bool:
        """Whether this daemon owned the prefix when it last looked."""
        return self.claim is not None and self.claim.writer == self.writer

    async def ensure(self) -> None:
        """Return when this daemon owns the prefix; no request while the last check is
        younger than ``recheck_s``.

        Raises:
            PrefixOwnedError: another daemon owns it (write nothing).
            StorageError: the claim could not be read or created.
        """
        now = self.clock()
        if (
            self.confirmed
            and self._checked_at is not None
            and now - self._checked_at < self.recheck_s
        ):
            return
        await self._check()

    async def confirm(self) -> None:
        """Re-read the claim now: a write met a conflict.

        The read is issued after this call starts (callers that arrive together share
        one GET), so a conflict caused by a new owner's write is always explained by
        its claim: a new owner claims before it writes, and the servers read after
        write consistently.

        Raises:
            PrefixOwnedError: another daemon owns the prefix now.
        """
        await self._check()

    async def explain(self, exc: StorageError) -> StorageError:
        """The error a failed pass reports: a conflict (a tail object or a main object
        changed by someone else) becomes :class:`PrefixOwnedError` when another daemon
        owns the prefix now; anything else is returned as it is."""
        if not isinstance(exc, ConflictError | TailConflictError):
            return exc
        try:
            await self.confirm()
        except PrefixOwnedError as owned:
            return owned
        except StorageError:
            return exc
        if isinstance(exc, TailConflictError):
            # ours: a displaced owner (taken over while it ran) wrote one more tail object
            # before it noticed; re-read the tail log and retry, never park the owner
            error = TransientStorageError(
                f"{exc}; this daemon owns the prefix (claimed {self.claim.when() if self.claim else '?'})"
                ": re-reading the tail log",
                url=exc.url,
            )
            error.__cause__ = exc
            return error
        return exc

    async def _check(self) -> None:
        reads = self._reads
        async with self._lock:
            if self._reads > reads and self.confirmed:
                return  # a read issued after this call started: one request for all callers
            self._reads += 1
            asked = self.clock()
            try:
                self.claim = await check_claim(
                    self.storage, self.writer, self.destination, seen=self.seen
                )
            except PrefixOwnedError as exc:
                self.claim = None
                self._checked_at = asked
                host = exc.owner_host
                other = (
                    Claim(exc.owner_writer, host or "", exc.claimed_at or 0.0)
                    if host is not None
                    else None
                )
                if other is not None:
                    self.seen = other
                self._record(other, mine=False, error=str(exc))
                raise
            self._checked_at = asked
            self.seen = None
            self._record(self.claim, mine=True)

    def _record(self, claim: Claim | None, *, mine: bool, error: str = "") -> None:
        if self.state_dir is None:
            return
        key = (claim.writer if claim else None, claim.claimed_at if claim else None, mine, error)
        if key == self._recorded:
            return
        try:
            record_owner(
                self.state_dir, self.destination, self.storage.url(), claim, mine, error=error
            )
        except OSError as exc:
            log.warning("owner_record_failed", destination=self.destination, error=str(exc))
            return
        self._recorded = key
