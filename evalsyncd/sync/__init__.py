"""The sync daemon's engine: scanning, watching, journaling and uploading.

Depends on :mod:`evalsyncd.storage` and :mod:`evalsyncd.config`; never on the
eval store. ``docs/design.md`` describes the contract it keeps.

The names below are resolved on first use (PEP 562): ``evalsyncd status`` and
``evalsyncd verify`` import :mod:`evalsyncd.sync.journal`, ``files``, ``lines``
and ``offline`` without loading watchdog or the daemon's core.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evalsyncd.sync.destination import Destination, DestinationState, backoff_delay
    from evalsyncd.sync.files import FileKind, classify, phase_of, scan_tree
    from evalsyncd.sync.journal import Entry, Journal, JournalError
    from evalsyncd.sync.offline import Backlog, open_destination_storage
    from evalsyncd.sync.service import Service

__all__ = [
    "Backlog",
    "Destination",
    "DestinationState",
    "Entry",
    "FileKind",
    "Journal",
    "JournalError",
    "Service",
    "backoff_delay",
    "classify",
    "open_destination_storage",
    "phase_of",
    "scan_tree",
]

_HOME = {
    "Backlog": "offline",
    "Destination": "destination",
    "DestinationState": "states",
    "Entry": "journal",
    "FileKind": "files",
    "Journal": "journal",
    "JournalError": "journal",
    "Service": "service",
    "backoff_delay": "states",
    "classify": "files",
    "open_destination_storage": "offline",
    "phase_of": "files",
    "scan_tree": "files",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
