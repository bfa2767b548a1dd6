"""The sync daemon's engine: scanning, watching, journaling and uploading.

Depends on :mod:`evalsyncd.storage` and :mod:`evalsyncd.config`; never on the
eval store. ``docs/design.md`` describes the contract it keeps.
"""

from __future__ import annotations

from evalsyncd.sync.destination import Destination, DestinationState, backoff_delay
from evalsyncd.sync.files import FileKind, classify, phase_of, scan_tree
from evalsyncd.sync.journal import Entry, Journal, JournalError
from evalsyncd.sync.service import Backlog, Service, open_destination_storage

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
