"""evalsyncd: keep ML evaluation runs mirrored to S3 and GCS without slowing their writers.

The eval store API is re-exported here (``from evalsyncd import EvalStore``). The
names are resolved lazily (PEP 562), so ``import evalsyncd.sync`` (the daemon)
does not load the store or its dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BenchmarkResult",
    "EvalStore",
    "Fleet",
    "FleetListing",
    "FleetRun",
    "RunMetadata",
    "StoredTrajectory",
    "StoredTurn",
    "__version__",
]

_STORE_NAMES = frozenset(
    {"BenchmarkResult", "EvalStore", "RunMetadata", "StoredTrajectory", "StoredTurn"}
)

if TYPE_CHECKING:
    from evalsyncd.fleet import Fleet, FleetListing, FleetRun
    from evalsyncd.store import (
        BenchmarkResult,
        EvalStore,
        RunMetadata,
        StoredTrajectory,
        StoredTurn,
    )


_FLEET_NAMES = frozenset({"Fleet", "FleetListing", "FleetRun"})


def __getattr__(name: str) -> Any:
    if name in _FLEET_NAMES:
        from evalsyncd import fleet

        return getattr(fleet, name)
    if name in _STORE_NAMES:
        from evalsyncd import store

        return getattr(store, name)
    raise AttributeError(f"module 'evalsyncd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
