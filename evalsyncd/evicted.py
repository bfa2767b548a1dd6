"""The eviction marker: how a local store says a run's files now live only in its mirrors.

When the daemon evicts a run from the local disk (retention, see
:mod:`evalsyncd.sync.retention`), it leaves ``runs/{run_id}/metadata.json`` and
``summary.json`` in place and writes this marker next to them, before the first
other file of the run is deleted::

    runs/{run_id}/.evicted.json     (a dot-file: never mirrored)
    {
      "run_id": "base_20250101_000000_abcdef",
      "evicted_at": 1767225600.0,          # Unix time, seconds (when the eviction began)
      "mirrors": ["s3://bucket/evals/host-1", "gs://bucket/evals/host-1"],
      "files": ["runs/…/gsm8k/result.json", …],   # root-relative paths now remote only
      "bytes": 123456                      # their total size, bytes
    }

:class:`~evalsyncd.store.EvalStore` reads it (it knows nothing of the daemon)
to answer reads of the run from a mirror and to refuse writes to it;
``evalsyncd restore`` removes it once the files are back. This module is shared
by the store and the daemon and imports neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["MARKER_NAME", "EvictionMarker", "build_marker", "parse_marker"]

MARKER_NAME = ".evicted.json"
"""The marker's name inside the run directory."""


@dataclass(frozen=True, slots=True)
class EvictionMarker:
    """A parsed marker; see the module docstring for each field."""

    run_id: str
    evicted_at: float
    mirrors: tuple[str, ...]
    files: tuple[str, ...]
    bytes: int


def build_marker(marker: EvictionMarker) -> bytes:
    """The marker's bytes (JSON, UTF-8, indented)."""
    data: dict[str, Any] = {
        "run_id": marker.run_id,
        "evicted_at": marker.evicted_at,
        "mirrors": list(marker.mirrors),
        "files": list(marker.files),
        "bytes": marker.bytes,
    }
    return json.dumps(data, indent=2).encode()


def parse_marker(data: bytes, where: str) -> EvictionMarker:
    """Parse a marker.

    Args:
        data: its bytes.
        where: its path or URL, for the message.

    Raises:
        ValueError: not a marker (bad JSON or a missing field); the message names ``where``.
    """
    try:
        obj = json.loads(data)
        return EvictionMarker(
            run_id=str(obj["run_id"]),
            evicted_at=float(obj["evicted_at"]),
            mirrors=tuple(str(m) for m in obj["mirrors"]),
            files=tuple(str(f) for f in obj.get("files", ())),
            bytes=int(obj.get("bytes", 0)),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{where}: not an eviction marker ({exc!r})") from exc
